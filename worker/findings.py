"""Domain types shared by pipelines, model adapters and outputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

# Every output of a demo model carries this label: SR, alerts, CLI tables.
DEMO_LABEL = "DEMO / NOT FOR CLINICAL USE"


@dataclass(frozen=True)
class ModelCard:
    """What an output must say about the model that produced it."""

    name: str
    version: str
    manufacturer: str
    findings: tuple[str, ...]
    # Demo models are labelled DEMO / NOT FOR CLINICAL USE in every output.
    demo: bool
    # SHA-256 of the weights file: the device UID in Contributing Equipment changes with it.
    weights_sha256: str


@dataclass(frozen=True)
class DecodedImage:
    """One frame ready for a model: float32 in [0, 1], 0 = black as a radiologist sees it."""

    sop_instance_uid: str
    sop_class_uid: str
    pixels: npt.NDArray[np.float32]
    # (row spacing, column spacing) in mm when the header says so.
    pixel_spacing_mm: tuple[float, float] | None = None
    view_position: str | None = None


@dataclass(frozen=True)
class FindingResult:
    """A finding of one study: the model's probability against the site's operating point."""

    finding: str  # key of templates/codes.yaml, e.g. "pneumothorax"
    probability: float
    threshold: float
    # The finding is one the site marks urgent (pneumothorax first); urgent *and* present alerts.
    urgent_finding: bool
    # Images whose score gave the study's probability (the maximum over the study's images).
    source_sop_instance_uids: tuple[str, ...] = field(default_factory=tuple)

    @property
    def present(self) -> bool:
        return self.probability >= self.threshold

    @property
    def urgent(self) -> bool:
        return self.urgent_finding and self.present
