"""The classifier interface every chest X-ray triage adapter implements."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from worker.findings import DecodedImage, ModelCard


class ModelLoadError(Exception):
    """A model folder cannot be loaded; the message names the folder and what is wrong with it."""


class Classifier(Protocol):
    """An image classifier: one probability per finding for each image."""

    card: ModelCard
    # Operating points the model ships with; the site's settings may override them per finding.
    default_thresholds: dict[str, float]

    def predict(self, images: Sequence[DecodedImage]) -> list[dict[str, float]]:
        """One dict finding -> probability per image, keys in card.findings order."""
        ...
