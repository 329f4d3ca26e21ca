"""What the torchxrayvision, TorchScript and Hugging Face adapters share: the model description
file next to the weights, preprocessing as data, and one classifier over a network's logits.

Each of those model folders holds, beside the weights in their own format, a ``pacs-ai.json``:

.. code-block:: json

    {
      "format": "torchxrayvision",
      "name": "xrv-densenet121-res224-all", "version": "1", "manufacturer": "mlmed",
      "demo": false,
      "findings": {"Pneumothorax": "pneumothorax", "Effusion": "pleural_effusion"},
      "default_thresholds": {"pneumothorax": 0.5, "pleural_effusion": 0.5},
      "preprocessing": {"input_size": [224, 224], "fit": "crop", "value_range": [-1024, 1024]}
    }

``findings`` maps the model's own output labels to the project's finding keys (those of
``templates/codes.yaml``); outputs it does not name are dropped, so the SR only ever carries
findings it has a code for. Unknown keys are errors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from worker.findings import DEMO_LABEL, DecodedImage, ModelCard
from worker.models.base import ModelLoadError

CONFIG_FILE = "pacs-ai.json"

Activation = Literal["sigmoid", "softmax", "none"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ImagePreprocessing(Strict):
    """How a decoded frame (float32 in [0, 1], 0 = black) becomes the network's input.

    Steps, in order: fit to a square (``fit``), resize to ``input_size``, map [0, 1] linearly onto
    ``value_range``, repeat to ``channels``, then ``(x - mean) / std`` per channel when given.
    """

    input_size: tuple[int, int] = Field(description="(rows, columns)")
    resize: Literal["area", "bilinear", "bicubic", "nearest"] = "area"
    # stretch: resize as is; pad: black bars to a square first (keeps proportions);
    # crop: the centred square (torchxrayvision's XRayCenterCrop).
    fit: Literal["stretch", "pad", "crop"] = "stretch"
    value_range: tuple[float, float] = (0.0, 1.0)
    channels: Literal[1, 3] = 1
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ImagePreprocessing:
        if min(self.input_size) < 1:
            raise ValueError("input_size must be positive")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if values is not None and len(values) not in (1, self.channels):
                raise ValueError(f"{name} needs 1 or {self.channels} values")
        if self.std is not None and not all(s > 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


def preprocess(
    pixels: Any, preprocessing: ImagePreprocessing, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """One [0, 1] frame (rows, cols) as a network input of shape (channels, rows', cols')."""
    image = torch.as_tensor(pixels, dtype=torch.float32, device=device)
    if image.ndim != 2:
        raise ValueError(f"expected one grey frame (rows, cols), got shape {tuple(image.shape)}")
    image = image[None, None]
    rows, cols = image.shape[-2:]
    if preprocessing.fit == "pad":
        side = max(rows, cols)
        top, left = (side - rows) // 2, (side - cols) // 2
        image = F.pad(image, (left, side - cols - left, top, side - rows - top), value=0.0)
    elif preprocessing.fit == "crop":
        side = min(rows, cols)
        top, left = (rows - side) // 2, (cols - side) // 2
        image = image[..., top : top + side, left : left + side]
    size = preprocessing.input_size
    if tuple(image.shape[-2:]) != size:
        if preprocessing.resize in ("bilinear", "bicubic"):
            image = F.interpolate(
                image, size=size, mode=preprocessing.resize, align_corners=False, antialias=True
            )
        else:
            image = F.interpolate(image, size=size, mode=preprocessing.resize)
    low, high = preprocessing.value_range
    image = image[0].clamp(0.0, 1.0) * (high - low) + low
    image = image.expand(preprocessing.channels, -1, -1)
    if preprocessing.mean is not None and preprocessing.std is not None:
        mean = torch.tensor(preprocessing.mean, dtype=torch.float32, device=image.device)
        std = torch.tensor(preprocessing.std, dtype=torch.float32, device=image.device)
        image = (image - mean[:, None, None]) / std[:, None, None]
    return image.contiguous()


class AdapterConfig(Strict):
    """The fields every ``pacs-ai.json`` has; each adapter adds its own."""

    format: str
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    manufacturer: str = Field(min_length=1)
    demo: bool = False
    label: str | None = None
    # model output label -> project finding key (templates/codes.yaml); other outputs are dropped.
    findings: dict[str, str] = Field(min_length=1)
    # finding key -> operating point; exactly one per mapped finding.
    default_thresholds: dict[str, float]
    batch_size: int = Field(default=16, ge=1)

    @model_validator(mode="after")
    def _consistent_card(self) -> AdapterConfig:
        keys = list(self.findings.values())
        if len(set(keys)) != len(keys):
            raise ValueError("findings: two model outputs map to the same finding key")
        if set(self.default_thresholds) != set(keys):
            raise ValueError(
                "default_thresholds must give exactly one threshold per mapped finding "
                f"({', '.join(keys)})"
            )
        if not all(0.0 < t < 1.0 for t in self.default_thresholds.values()):
            raise ValueError("default thresholds must lie strictly between 0 and 1")
        if self.demo and self.label != DEMO_LABEL:
            raise ValueError(f"a demo model must carry label {DEMO_LABEL!r}")
        return self


ConfigT = TypeVar("ConfigT", bound=AdapterConfig)


def read_config(folder: Path, model: type[ConfigT], expected_format: str) -> ConfigT:
    """Read and validate ``pacs-ai.json`` of a model folder."""
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist or is not a folder")
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(
            f"model folder {folder} has no {CONFIG_FILE} (the model's name, findings mapping, "
            "thresholds and preprocessing)"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc
    found = data.get("format") if isinstance(data, dict) else None
    if found != expected_format:
        raise ModelLoadError(f"{path}: format is {found!r}, expected {expected_format!r}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ModelLoadError(f"{path} is invalid:\n{exc}") from exc


def sha256_files(paths: Iterable[Path]) -> str:
    """One SHA-256 over the files' names and bytes, in the order given."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode("utf-8") + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def card_of(config: AdapterConfig, outputs: Sequence[str], weights_sha256: str) -> ModelCard:
    """The model card: findings in the model's output order, mapped to finding keys."""
    return ModelCard(
        name=config.name,
        version=config.version,
        manufacturer=config.manufacturer,
        findings=tuple(config.findings[label] for label in outputs if label in config.findings),
        demo=config.demo,
        weights_sha256=weights_sha256,
    )


class TensorClassifier:
    """The Classifier interface over any network that maps a batch to one logit row per image."""

    def __init__(
        self,
        *,
        card: ModelCard,
        default_thresholds: Mapping[str, float],
        forward: Callable[[torch.Tensor], torch.Tensor],
        outputs: Sequence[str],
        label_to_finding: Mapping[str, str],
        activation: Activation,
        preprocessing: ImagePreprocessing,
        device: torch.device,
        batch_size: int = 16,
    ) -> None:
        self.card = card
        self.default_thresholds = dict(default_thresholds)
        self.forward = forward
        self.outputs = tuple(outputs)
        self.activation = activation
        self.preprocessing = preprocessing
        self.device = device
        self.batch_size = batch_size
        # (output column, finding key), in output order: the order card.findings has.
        self.columns = [
            (index, label_to_finding[label])
            for index, label in enumerate(self.outputs)
            if label in label_to_finding
        ]
        missing = sorted(set(label_to_finding) - set(self.outputs))
        if missing:
            raise ModelLoadError(
                f"{card.name}: findings mapping names outputs the model does not have: "
                f"{', '.join(missing)} (it has {', '.join(repr(o) for o in self.outputs)})"
            )

    def _scores(self, batch: torch.Tensor) -> torch.Tensor:
        logits = self.forward(batch)
        if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (
            batch.shape[0],
            len(self.outputs),
        ):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits)
            raise ModelLoadError(
                f"{self.card.name}: expected outputs of shape ({batch.shape[0]}, "
                f"{len(self.outputs)}) for a batch of {batch.shape[0]}, got {shape}"
            )
        logits = logits.float()
        if self.activation == "sigmoid":
            return torch.sigmoid(logits)
        if self.activation == "softmax":
            return torch.softmax(logits, dim=1)
        return logits

    def check(self) -> None:
        """Run one black image through the network: a wrong output width fails at start-up."""
        rows, cols = self.preprocessing.input_size
        with torch.inference_mode():
            self._scores(
                torch.zeros(1, self.preprocessing.channels, rows, cols, device=self.device)
            )

    def predict(self, images: Sequence[DecodedImage]) -> list[dict[str, float]]:
        """One dict finding -> probability per image, keys in card.findings order."""
        results: list[dict[str, float]] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                batch = torch.stack(
                    [preprocess(image.pixels, self.preprocessing, self.device) for image in chunk]
                )
                scores = self._scores(batch).cpu().numpy()
                results += [
                    {finding: float(row[index]) for index, finding in self.columns}
                    for row in scores
                ]
        return results
