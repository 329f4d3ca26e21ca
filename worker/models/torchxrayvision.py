"""torchxrayvision weights: DenseNet-121 at 224 and ResNet-50 at 512, 18 pathologies.

The networks are written here, without torchvision (which does not install beside this torch),
with the module names torchxrayvision and torchvision use, so their weights files load unchanged:

- ``densenet121-res224-*`` files (``*-densenet121-d121-tw-lr001-rot45-tr15-sc15-seed0-best.pt``)
  are a whole pickled ``torchxrayvision.models.DenseNet``. They are read with
  ``torch.load(weights_only=True)`` and an allow-list that maps exactly the classes such a file
  names (torchxrayvision's DenseNet blocks, onto the classes below, and torch's own layers) and
  nothing else, so no code from the file runs; only the tensors are kept.
- ``resnet50-res512-all`` (``*-resnet50-test512-e400-state.pt``) is a ``state_dict`` of
  torchvision's ResNet-50 with a one-channel first convolution.
- Any ``state_dict`` of either network (``torch.save(model.state_dict(), ...)``, with or without
  torchxrayvision's ``model.`` wrapper prefix) loads too.

The folder holds the weights file and ``pacs-ai.json`` (see ``worker.models.common``) with
``"format": "torchxrayvision"``, ``"architecture": "densenet121-res224" | "resnet50-res512"``
and ``"weights": FILE``. Inputs follow torchxrayvision: one channel in [-1024, 1024], the centred
square, resized to 224 or 512; the outputs are the raw logits through a sigmoid
(torchxrayvision's optional ``op_norm`` recalibration is not applied: put its operating points in
``default_thresholds`` instead).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from worker.models.base import ModelLoadError
from worker.models.common import (
    AdapterConfig,
    ImagePreprocessing,
    TensorClassifier,
    card_of,
    read_config,
    sha256_files,
)
from worker.models.pacs_ai_cnn import resolve_device

FORMAT = "torchxrayvision"

# torchxrayvision.datasets.default_pathologies, in the order the 18 outputs have.
DEFAULT_PATHOLOGIES: tuple[str, ...] = (
    "Atelectasis",
    "Consolidation",
    "Infiltration",
    "Pneumothorax",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Effusion",
    "Pneumonia",
    "Pleural_Thickening",
    "Cardiomegaly",
    "Nodule",
    "Mass",
    "Hernia",
    "Lung Lesion",
    "Fracture",
    "Lung Opacity",
    "Enlarged Cardiomediastinum",
)

Architecture = Literal["densenet121-res224", "resnet50-res512"]
NATIVE_SIZE: dict[str, int] = {"densenet121-res224": 224, "resnet50-res512": 512}


# --- DenseNet-121 (torchxrayvision.models.DenseNet) ----------------------------------------------


class _DenseLayer(nn.Sequential):
    def __init__(self, num_input_features: int, growth_rate: int, bn_size: int) -> None:
        super().__init__()
        self.add_module("norm1", nn.BatchNorm2d(num_input_features))
        self.add_module("relu1", nn.ReLU(inplace=True))
        self.add_module(
            "conv1",
            nn.Conv2d(num_input_features, bn_size * growth_rate, 1, stride=1, bias=False),
        )
        self.add_module("norm2", nn.BatchNorm2d(bn_size * growth_rate))
        self.add_module("relu2", nn.ReLU(inplace=True))
        self.add_module(
            "conv2",
            nn.Conv2d(bn_size * growth_rate, growth_rate, 3, stride=1, padding=1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, super().forward(x)], 1)


class _DenseBlock(nn.Sequential):
    def __init__(
        self, num_layers: int, num_input_features: int, bn_size: int, growth_rate: int
    ) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = _DenseLayer(num_input_features + i * growth_rate, growth_rate, bn_size)
            self.add_module(f"denselayer{i + 1}", layer)


class _Transition(nn.Sequential):
    def __init__(self, num_input_features: int, num_output_features: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(num_input_features))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module(
            "conv", nn.Conv2d(num_input_features, num_output_features, 1, stride=1, bias=False)
        )
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(nn.Module):
    """DenseNet-BC with one input channel, as torchxrayvision defines it (121: the defaults)."""

    def __init__(
        self,
        num_classes: int = len(DEFAULT_PATHOLOGIES),
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            OrderedDict(
                [
                    (
                        "conv0",
                        nn.Conv2d(
                            in_channels, num_init_features, 7, stride=2, padding=3, bias=False
                        ),
                    ),
                    ("norm0", nn.BatchNorm2d(num_init_features)),
                    ("relu0", nn.ReLU(inplace=True)),
                    ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
                ]
            )
        )
        num_features = num_init_features
        for i, num_layers in enumerate(block_config):
            block = _DenseBlock(num_layers, num_features, bn_size, growth_rate)
            self.features.add_module(f"denseblock{i + 1}", block)
            num_features += num_layers * growth_rate
            if i != len(block_config) - 1:
                self.features.add_module(
                    f"transition{i + 1}", _Transition(num_features, num_features // 2)
                )
                num_features //= 2
        self.features.add_module("norm5", nn.BatchNorm2d(num_features))
        self.classifier = nn.Linear(num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.features(x))
        out = F.adaptive_avg_pool2d(out, (1, 1)).flatten(1)
        return self.classifier(out)


# --- ResNet-50 (torchvision.models.resnet50 with a one-channel conv1) ----------------------------


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        width = planes
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        # torchvision (v1.5) strides in the 3x3 convolution.
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * self.expansion:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * self.expansion, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * self.expansion),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet (Bottleneck blocks); 50 layers by default, one input channel."""

    def __init__(
        self,
        num_classes: int = len(DEFAULT_PATHOLOGIES),
        layers: tuple[int, int, int, int] = (3, 4, 6, 3),
        in_channels: int = 1,
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers, strict=True)):
            stride = 1 if index == 0 else 2
            stage = [Bottleneck(inplanes, planes, stride)]
            inplanes = planes * Bottleneck.expansion
            stage += [Bottleneck(inplanes, planes) for _ in range(1, blocks)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for name in ("layer1", "layer2", "layer3", "layer4"):
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def build_network(architecture: Architecture, num_classes: int) -> nn.Module:
    """A fresh (random-weight) network of the named torchxrayvision architecture."""
    if architecture == "densenet121-res224":
        return DenseNet(num_classes=num_classes)
    return ResNet(num_classes=num_classes)


# --- weights files -------------------------------------------------------------------------------

# What a pickled torchxrayvision DenseNet file names, and nothing more: torchxrayvision's own
# classes are rebuilt as the ones above (their __init__ never runs, only their state is set).
_XRV = "torchxrayvision.models"
_PICKLED_MODEL_GLOBALS: list[Callable[..., Any] | tuple[Callable[..., Any], str]] = [
    (DenseNet, f"{_XRV}.DenseNet"),
    (_DenseBlock, f"{_XRV}._DenseBlock"),
    (_DenseLayer, f"{_XRV}._DenseLayer"),
    (_Transition, f"{_XRV}._Transition"),
    nn.Conv2d,
    nn.BatchNorm2d,
    nn.ReLU,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Linear,
    nn.Sequential,
    nn.Upsample,
    set,
]
# Buffers and modules of torchxrayvision's wrapper that are not part of the network's weights.
_NOT_WEIGHTS = ("op_threshs", "upsample.")


def _tensors_of(module: nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    # Walk the unpickled object's own dictionaries: files from old torch versions lack attributes
    # that nn.Module.state_dict() expects.
    state = vars(module)
    tensors: dict[str, torch.Tensor] = {}
    for kind in ("_parameters", "_buffers"):
        for name, value in (state.get(kind) or {}).items():
            if isinstance(value, torch.Tensor):
                tensors[prefix + name] = value.detach()
    for name, child in (state.get("_modules") or {}).items():
        if isinstance(child, nn.Module):
            tensors.update(_tensors_of(child, f"{prefix}{name}."))
    return tensors


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torchxrayvision weights file (pickled DenseNet or state_dict)."""
    if not path.is_file():
        raise ModelLoadError(f"weights file {path} does not exist")
    try:
        with torch.serialization.safe_globals(_PICKLED_MODEL_GLOBALS):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises pickle, zip and runtime errors for a bad file
        raise ModelLoadError(
            f"{path} is not a readable torchxrayvision weights file (a state_dict or a pickled "
            f"torchxrayvision DenseNet): {exc}"
        ) from exc
    if isinstance(loaded, nn.Module):
        state = _tensors_of(loaded)
    elif isinstance(loaded, dict) and all(isinstance(v, torch.Tensor) for v in loaded.values()):
        state = dict(loaded)
    else:
        raise ModelLoadError(f"{path} holds neither a state_dict nor a torchxrayvision model")
    state = {k: v for k, v in state.items() if not k.startswith(_NOT_WEIGHTS)}
    for prefix in ("module.", "model."):
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix) :]: value for key, value in state.items()}
    return state


class TorchXRayVisionConfig(AdapterConfig):
    """pacs-ai.json of a torchxrayvision model folder."""

    architecture: Architecture
    weights: str = Field(default="weights.pt", min_length=1)
    # The weights' output labels in order; "" marks an output the weights were not trained for.
    outputs: tuple[str, ...] = DEFAULT_PATHOLOGIES
    # None: torchxrayvision's own (centred square, native size, one channel in [-1024, 1024]).
    preprocessing: ImagePreprocessing | None = None

    @model_validator(mode="after")
    def _known_outputs(self) -> TorchXRayVisionConfig:
        unknown = sorted(set(self.findings) - set(self.outputs) - {""})
        if unknown or "" in self.findings:
            raise ValueError(f"findings names labels not in outputs: {unknown or ['']}")
        return self

    def input_preprocessing(self) -> ImagePreprocessing:
        if self.preprocessing is not None:
            return self.preprocessing
        side = NATIVE_SIZE[self.architecture]
        return ImagePreprocessing(
            input_size=(side, side),
            resize="area",
            fit="crop",
            value_range=(-1024.0, 1024.0),
            channels=1,
        )


def load(folder: Path, device: str = "auto") -> TensorClassifier:
    """Load a torchxrayvision model folder onto `device`."""
    config = read_config(folder, TorchXRayVisionConfig, FORMAT)
    weights = folder / config.weights
    state = read_weights(weights)
    target = resolve_device(device)
    # Built without memory or random init: every tensor comes from the file (strict).
    with torch.device("meta"):
        net = build_network(config.architecture, len(config.outputs))
    try:
        net.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ModelLoadError(
            f"{weights} does not hold {config.architecture} weights with "
            f"{len(config.outputs)} outputs: {exc}"
        ) from exc
    net = net.to(target).eval()
    preprocessing = config.input_preprocessing()
    if preprocessing.channels != 1:
        raise ModelLoadError(f"{folder}: torchxrayvision networks take one channel")
    classifier = TensorClassifier(
        card=card_of(config, config.outputs, sha256_files([weights])),
        default_thresholds=config.default_thresholds,
        forward=net,
        outputs=config.outputs,
        label_to_finding=config.findings,
        activation="sigmoid",
        preprocessing=preprocessing,
        device=target,
        batch_size=config.batch_size,
    )
    classifier.check()
    return classifier
