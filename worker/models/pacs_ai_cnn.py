"""The project's own small CNN classifier and its model folder format, "pacs-ai-cnn".

A model folder holds two files:

- ``config.json``: the format name and version, the card (name, version, manufacturer, demo flag
  and label), the findings in output order with their default operating points, the architecture
  and the preprocessing (input size, resize method, value range). Unknown keys are errors.
- ``weights.pt``: the network's ``state_dict``, written by ``torch.save`` and read with
  ``weights_only=True`` (no pickled code runs). Its SHA-256 is the card's ``weights_sha256``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn

from worker.findings import DEMO_LABEL, DecodedImage, ModelCard
from worker.models.base import ModelLoadError
from worker.models.common import ImagePreprocessing
from worker.models.common import preprocess as common_preprocess

FORMAT: Literal["pacs-ai-cnn"] = "pacs-ai-cnn"
FORMAT_VERSION: Literal[1] = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Architecture(_Strict):
    """Conv blocks (3x3 conv, batch norm, ReLU, 2x2 max pool), then avg+max pooling and a linear head."""

    in_channels: Literal[1] = 1
    widths: tuple[int, ...] = Field(default=(8, 16, 32, 64, 64), min_length=1, max_length=8)


class Preprocessing(_Strict):
    """How a decoded frame (float32 in [0, 1]) becomes the network's input."""

    input_size: tuple[int, int] = (128, 128)  # (rows, columns)
    resize: Literal["area", "bilinear", "bicubic", "nearest"] = "area"
    # True: pad to a square with black before resizing, so anatomy keeps its proportions.
    keep_aspect: bool = False
    # The [0, 1] image is mapped linearly onto this range.
    value_range: tuple[float, float] = (-1.0, 1.0)


class ModelConfig(_Strict):
    """config.json of a pacs-ai-cnn model folder."""

    format: Literal["pacs-ai-cnn"]
    format_version: Literal[1]
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    manufacturer: str = Field(min_length=1)
    demo: bool
    label: str | None = None
    findings: tuple[str, ...] = Field(min_length=1)
    default_thresholds: dict[str, float]
    architecture: Architecture
    preprocessing: Preprocessing
    # Provenance (data, seed, epochs); informative only.
    training: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> ModelConfig:
        if len(set(self.findings)) != len(self.findings):
            raise ValueError("findings must be unique")
        if set(self.default_thresholds) != set(self.findings):
            raise ValueError("default_thresholds must give exactly one threshold per finding")
        if not all(0.0 < t < 1.0 for t in self.default_thresholds.values()):
            raise ValueError("default thresholds must lie strictly between 0 and 1")
        if self.demo and self.label != DEMO_LABEL:
            raise ValueError(f"a demo model must carry label {DEMO_LABEL!r}")
        rows, cols = self.preprocessing.input_size
        smallest = 2 ** len(self.architecture.widths)
        if rows < smallest or cols < smallest:
            raise ValueError(f"input_size must be at least {smallest} for this architecture")
        return self


class PacsAiCnn(nn.Module):
    """A small CNN with one logit per finding (sigmoid outside, so training can use BCE logits)."""

    def __init__(self, n_findings: int, architecture: Architecture | None = None) -> None:
        super().__init__()
        self.architecture = architecture or Architecture()
        self.n_findings = n_findings
        layers: list[nn.Module] = []
        channels: int = self.architecture.in_channels
        for width in self.architecture.widths:
            layers += [
                nn.Conv2d(channels, width, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            channels = width
        self.features = nn.Sequential(*layers)
        # Average pooling sees diffuse findings (a big heart), max pooling small ones (a
        # pneumothorax rim); the head gets both.
        self.head = nn.Linear(2 * channels, n_findings)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.features(x)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.head(pooled)


def preprocess(
    pixels: npt.NDArray[np.float32] | torch.Tensor,
    preprocessing: Preprocessing,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """One [0, 1] frame (rows, cols) as a network input of shape (1, rows', cols').

    The steps are the shared ones of every adapter (``worker.models.common.preprocess``); this
    format only spells them in its own config keys.
    """
    shared = ImagePreprocessing(
        input_size=preprocessing.input_size,
        resize=preprocessing.resize,
        fit="pad" if preprocessing.keep_aspect else "stretch",
        value_range=preprocessing.value_range,
        channels=1,
    )
    return common_preprocess(pixels, shared, device)


def resolve_device(name: str) -> torch.device:
    """'auto' is CUDA when available, else CPU; anything else must name a usable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"invalid device {name!r}: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available here")
    return device


class PacsAiCnnClassifier:
    """A loaded pacs-ai-cnn model: the Classifier interface over PacsAiCnn."""

    def __init__(
        self,
        *,
        card: ModelCard,
        default_thresholds: dict[str, float],
        net: PacsAiCnn,
        preprocessing: Preprocessing,
        device: torch.device,
        batch_size: int = 16,
    ) -> None:
        self.card = card
        self.default_thresholds = default_thresholds
        self.net = net.to(device).eval()
        self.preprocessing = preprocessing
        self.device = device
        self.batch_size = batch_size

    def predict(self, images: Sequence[DecodedImage]) -> list[dict[str, float]]:
        """One dict finding -> probability per image, keys in card.findings order."""
        results: list[dict[str, float]] = []
        with torch.inference_mode():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                batch = torch.stack(
                    [preprocess(image.pixels, self.preprocessing, self.device) for image in chunk]
                )
                probabilities = torch.sigmoid(self.net(batch)).float().cpu().numpy()
                results += [
                    {finding: float(p) for finding, p in zip(self.card.findings, row, strict=True)}
                    for row in probabilities
                ]
        return results


def _write_atomically(path: Path, data: bytes) -> None:
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def save_model(
    folder: Path,
    net: PacsAiCnn,
    *,
    name: str,
    version: str,
    manufacturer: str,
    findings: Sequence[str],
    default_thresholds: Mapping[str, float],
    preprocessing: Preprocessing,
    demo: bool = False,
    training: Mapping[str, Any] | None = None,
) -> Path:
    """Write `net` as a pacs-ai-cnn model folder (config.json + weights.pt); returns the folder."""
    if len(findings) != net.n_findings:
        raise ValueError(f"the network has {net.n_findings} outputs but {len(findings)} findings")
    config = ModelConfig(
        format=FORMAT,
        format_version=FORMAT_VERSION,
        name=name,
        version=version,
        manufacturer=manufacturer,
        demo=demo,
        label=DEMO_LABEL if demo else None,
        findings=tuple(findings),
        default_thresholds=dict(default_thresholds),
        architecture=net.architecture,
        preprocessing=preprocessing,
        training=dict(training) if training is not None else None,
    )
    folder.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu().contiguous() for key, value in net.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)
    _write_atomically(folder / WEIGHTS_FILE, buffer.getvalue())
    text = json.dumps(config.model_dump(mode="json"), indent=2) + "\n"
    # config.json last: a folder with a config always has its weights.
    _write_atomically(folder / CONFIG_FILE, text.encode("utf-8"))
    return folder


def read_config(folder: Path) -> ModelConfig:
    """Read and validate a model folder's config.json."""
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist or is not a folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model folder {folder} has no {CONFIG_FILE}") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else None
        raise ModelLoadError(f"{path}: format is {found!r}, expected {FORMAT!r}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ModelLoadError(f"{path} is invalid:\n{exc}") from exc


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load(folder: Path, device: str = "auto") -> PacsAiCnnClassifier:
    """Load a pacs-ai-cnn model folder onto `device` ("auto", "cpu", "cuda", "cuda:1", ...)."""
    config = read_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise ModelLoadError(f"model folder {folder} has no {WEIGHTS_FILE}")
    target = resolve_device(device)
    sha256 = _sha256(weights)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a bad file
        raise ModelLoadError(f"{weights} is not a readable weights file: {exc}") from exc
    if not isinstance(state, dict) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ModelLoadError(f"{weights} does not hold a state_dict of tensors")
    net = PacsAiCnn(len(config.findings), config.architecture)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{weights} does not match the architecture in {CONFIG_FILE}: {exc}"
        ) from exc
    card = ModelCard(
        name=config.name,
        version=config.version,
        manufacturer=config.manufacturer,
        findings=config.findings,
        demo=config.demo,
        weights_sha256=sha256,
    )
    return PacsAiCnnClassifier(
        card=card,
        default_thresholds=dict(config.default_thresholds),
        net=net,
        preprocessing=config.preprocessing,
        device=target,
    )
