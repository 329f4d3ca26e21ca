"""TorchScript classifiers: one ``torch.jit.save``-d file and a ``pacs-ai.json`` beside it.

A TorchScript file carries its own graph, so the description says what the graph cannot:
``"format": "torchscript"``, ``"weights": FILE``, ``"outputs"`` (the output labels in column
order), ``"activation"`` (``sigmoid`` for multi-label logits, ``softmax`` for one-of logits,
``none`` when the graph already returns probabilities) and ``"preprocessing"`` (input size,
fit, value range, channels, mean/std; see ``worker.models.common``).

TorchScript is code as well as weights: load files only from a source you trust, as you would a
Python package. ``torch.jit.load`` reads only the local file; nothing is fetched.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import Field, model_validator

from worker.models.base import ModelLoadError
from worker.models.common import (
    Activation,
    AdapterConfig,
    ImagePreprocessing,
    TensorClassifier,
    card_of,
    read_config,
    sha256_files,
)
from worker.models.pacs_ai_cnn import resolve_device

FORMAT = "torchscript"


class TorchScriptConfig(AdapterConfig):
    """pacs-ai.json of a TorchScript model folder."""

    weights: str = Field(default="model.pt", min_length=1)
    outputs: tuple[str, ...] = Field(min_length=1)
    activation: Activation = "sigmoid"
    preprocessing: ImagePreprocessing

    @model_validator(mode="after")
    def _known_outputs(self) -> TorchScriptConfig:
        unknown = sorted(set(self.findings) - set(self.outputs))
        if unknown:
            raise ValueError(f"findings names labels not in outputs: {', '.join(unknown)}")
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError("outputs must be unique")
        return self


def load(folder: Path, device: str = "auto") -> TensorClassifier:
    """Load a TorchScript model folder onto `device`."""
    config = read_config(folder, TorchScriptConfig, FORMAT)
    path = folder / config.weights
    if not path.is_file():
        raise ModelLoadError(f"TorchScript file {path} does not exist")
    target = resolve_device(device)
    try:
        module = torch.jit.load(str(path), map_location=target)
    except Exception as exc:  # torch raises RuntimeError / ValueError for a bad archive
        raise ModelLoadError(f"{path} is not a readable TorchScript file: {exc}") from exc
    module.eval()
    classifier = TensorClassifier(
        card=card_of(config, config.outputs, sha256_files([path])),
        default_thresholds=config.default_thresholds,
        forward=module,
        outputs=config.outputs,
        label_to_finding=config.findings,
        activation=config.activation,
        preprocessing=config.preprocessing,
        device=target,
        batch_size=config.batch_size,
    )
    try:
        classifier.check()
    except ModelLoadError:
        raise
    except Exception as exc:  # the graph refused the configured input
        raise ModelLoadError(
            f"{path} does not run on a {config.preprocessing.channels}-channel "
            f"{config.preprocessing.input_size} input: {exc}"
        ) from exc
    return classifier
