"""Classifier adapters for real model formats: each loads a random-weight model written in its
real format through load_classifier and reports the right findings, in order, with the numbers
the network itself gives."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from worker.findings import DecodedImage
from worker.models import ModelLoadError, load_classifier
from worker.models import torchxrayvision as xrv
from worker.models.common import CONFIG_FILE, ImagePreprocessing, preprocess
from worker.settings import ClassifierSettings

CARD = {"name": "test-model", "version": "0.0.1", "manufacturer": "tests"}
XRV_FINDINGS = {
    "Pneumothorax": "pneumothorax",
    "Effusion": "pleural_effusion",
    "Cardiomegaly": "cardiomegaly",
}
THRESHOLDS = {"pneumothorax": 0.3, "pleural_effusion": 0.5, "cardiomegaly": 0.6}
# Small inputs keep the full-size networks quick on a CPU; they are fully convolutional.
SMALL_XRV = {"input_size": [64, 64], "fit": "crop", "value_range": [-1024, 1024]}


def image(rows: int, cols: int, seed: int) -> DecodedImage:
    pixels = np.random.default_rng(seed).random((rows, cols), dtype=np.float32)
    return DecodedImage(
        sop_instance_uid=f"1.2.3.{seed}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", pixels=pixels
    )


IMAGES = [image(80, 64, 1), image(64, 64, 2)]


def write_config(folder: Path, **fields: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(json.dumps({**CARD, **fields}))
    return folder


def load(adapter: str, folder: Path) -> Any:
    settings = ClassifierSettings.model_validate(
        {"adapter": adapter, "path": folder, "device": "cpu"}
    )
    return load_classifier(settings, demo_dir=folder.parent / "no-demo")


def reference(
    net: Any, preprocessing: ImagePreprocessing, columns: list[int], activation: str = "sigmoid"
) -> np.ndarray:
    """What the network itself says for IMAGES, at the given output columns."""
    with torch.no_grad():
        batch = torch.stack([preprocess(i.pixels, preprocessing) for i in IMAGES])
        logits = net(batch)
        scores = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, 1)
    return scores[:, columns].numpy()


def assert_predicts(classifier: Any, findings: tuple[str, ...], expected: np.ndarray) -> None:
    results = classifier.predict(IMAGES)
    assert len(results) == len(IMAGES)
    for result, row in zip(results, expected, strict=True):
        assert tuple(result) == findings
        assert np.allclose(list(result.values()), row, atol=1e-5)
    assert classifier.predict([]) == []


# --- torchxrayvision ---------------------------------------------------------------------------


def xrv_net(architecture: xrv.Architecture) -> nn.Module:
    torch.manual_seed(0)
    net = xrv.build_network(architecture, len(xrv.DEFAULT_PATHOLOGIES))
    with torch.no_grad():  # non-trivial batch-norm statistics
        net.train()(torch.rand(2, 1, 64, 64) * 2048 - 1024)
    return net.eval()


@pytest.fixture(scope="module")
def densenet() -> nn.Module:
    return xrv_net("densenet121-res224")


def xrv_folder(folder: Path, architecture: str, weights: str, **extra: Any) -> Path:
    return write_config(
        folder,
        format="torchxrayvision",
        architecture=architecture,
        weights=weights,
        findings=XRV_FINDINGS,
        default_thresholds=THRESHOLDS,
        preprocessing=SMALL_XRV,
        **extra,
    )


def test_torchxrayvision_densenet_state_dict_reports_findings_in_published_order(
    tmp_path: Path, densenet: nn.Module
) -> None:
    folder = xrv_folder(tmp_path / "xrv", "densenet121-res224", "densenet.pt")
    torch.save(densenet.state_dict(), folder / "densenet.pt")
    classifier = load("torchxrayvision", folder)
    # Pneumothorax, Effusion and Cardiomegaly are outputs 3, 7 and 10 of the 18.
    assert classifier.card.findings == ("pneumothorax", "pleural_effusion", "cardiomegaly")
    assert classifier.default_thresholds == THRESHOLDS
    expected = reference(densenet, ImagePreprocessing.model_validate(SMALL_XRV), [3, 7, 10])
    assert_predicts(classifier, classifier.card.findings, expected)


def test_torchxrayvision_all_18_outputs_keep_their_order(
    tmp_path: Path, densenet: nn.Module
) -> None:
    every = {label: f"finding_{i:02d}" for i, label in enumerate(xrv.DEFAULT_PATHOLOGIES)}
    folder = write_config(
        tmp_path / "xrv18",
        format="torchxrayvision",
        architecture="densenet121-res224",
        findings=every,
        default_thresholds=dict.fromkeys(every.values(), 0.5),
        preprocessing=SMALL_XRV,
    )
    torch.save(densenet.state_dict(), folder / "weights.pt")
    # The adapter alone: these keys have no SNOMED code, so load_classifier would refuse them.
    classifier = xrv.load(folder, "cpu")
    assert classifier.card.findings == tuple(every.values())
    expected = reference(densenet, ImagePreprocessing.model_validate(SMALL_XRV), list(range(18)))
    assert_predicts(classifier, classifier.card.findings, expected)


def test_torchxrayvision_pickled_densenet_file_loads_without_running_its_code(
    tmp_path: Path, densenet: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The published DenseNet files are a whole pickled torchxrayvision.models.DenseNet."""
    package = types.ModuleType("torchxrayvision")
    models = types.ModuleType("torchxrayvision.models")
    package.models = models  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torchxrayvision", package)
    monkeypatch.setitem(sys.modules, "torchxrayvision.models", models)
    for cls in (xrv.DenseNet, xrv._DenseBlock, xrv._DenseLayer, xrv._Transition):
        monkeypatch.setattr(cls, "__module__", "torchxrayvision.models")
        setattr(models, cls.__name__, cls)
    folder = xrv_folder(tmp_path / "xrv-pickle", "densenet121-res224", "best.pt")
    torch.save(densenet, folder / "best.pt")
    monkeypatch.undo()

    names = set(torch.serialization.get_unsafe_globals_in_checkpoint(folder / "best.pt"))
    assert "torchxrayvision.models.DenseNet" in names  # really the pickled-model format
    classifier = load("torchxrayvision", folder)
    expected = reference(densenet, ImagePreprocessing.model_validate(SMALL_XRV), [3, 7, 10])
    assert_predicts(classifier, classifier.card.findings, expected)


def test_torchxrayvision_resnet50_state_dict(tmp_path: Path) -> None:
    net = xrv_net("resnet50-res512")
    folder = xrv_folder(tmp_path / "xrv-resnet", "resnet50-res512", "resnet.pt")
    # torchxrayvision's ResNet wraps torchvision's as .model; either key layout loads.
    torch.save({f"model.{k}": v for k, v in net.state_dict().items()}, folder / "resnet.pt")
    classifier = load("torchxrayvision", folder)
    expected = reference(net, ImagePreprocessing.model_validate(SMALL_XRV), [3, 7, 10])
    assert_predicts(classifier, ("pneumothorax", "pleural_effusion", "cardiomegaly"), expected)


def test_torchxrayvision_default_preprocessing_is_centre_crop_native_size_1024() -> None:
    config = xrv.TorchXRayVisionConfig.model_validate(
        {
            **CARD,
            "format": "torchxrayvision",
            "architecture": "resnet50-res512",
            "findings": XRV_FINDINGS,
            "default_thresholds": THRESHOLDS,
        }
    )
    wide = np.zeros((600, 1000), dtype=np.float32)
    wide[:, 200:800] = 1.0  # black bars left and right, outside the centred square
    tensor = preprocess(wide, config.input_preprocessing())
    assert tuple(tensor.shape) == (1, 512, 512)
    assert float(tensor.min()) == float(tensor.max()) == 1024.0


def test_torchxrayvision_wrong_architecture_or_corrupt_weights_are_load_errors(
    tmp_path: Path, densenet: nn.Module
) -> None:
    folder = xrv_folder(tmp_path / "xrv-bad", "resnet50-res512", "weights.pt")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load("torchxrayvision", folder)
    torch.save(densenet.state_dict(), folder / "weights.pt")
    with pytest.raises(ModelLoadError, match="does not hold resnet50-res512 weights"):
        load("torchxrayvision", folder)
    (folder / "weights.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelLoadError, match="not a readable torchxrayvision weights file"):
        load("torchxrayvision", folder)


def test_pickled_file_naming_other_classes_is_refused(tmp_path: Path) -> None:
    folder = xrv_folder(tmp_path / "xrv-evil", "densenet121-res224", "weights.pt")
    torch.save({"a": torch.zeros(1), "surprise": np.zeros(2)}, folder / "weights.pt")
    with pytest.raises(ModelLoadError, match="not a readable torchxrayvision weights file"):
        load("torchxrayvision", folder)


# --- TorchScript -------------------------------------------------------------------------------


class TinyRgbNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


TS_PREPROCESSING = {
    "input_size": [32, 48],
    "fit": "pad",
    "resize": "bilinear",
    "channels": 3,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
}


@pytest.fixture
def torchscript_folder(tmp_path: Path) -> tuple[Path, nn.Module]:
    torch.manual_seed(1)
    net = TinyRgbNet().eval()
    folder = write_config(
        tmp_path / "ts",
        format="torchscript",
        weights="model.pt",
        outputs=["normal", "PTX", "cardiomegaly"],
        activation="softmax",
        findings={"PTX": "pneumothorax", "cardiomegaly": "cardiomegaly"},
        default_thresholds={"pneumothorax": 0.4, "cardiomegaly": 0.5},
        preprocessing=TS_PREPROCESSING,
    )
    torch.jit.save(torch.jit.script(net), str(folder / "model.pt"))
    return folder, net


def test_torchscript_file_with_configured_preprocessing_and_softmax(
    torchscript_folder: tuple[Path, nn.Module],
) -> None:
    folder, net = torchscript_folder
    classifier = load("torchscript", folder)
    assert classifier.card.findings == ("pneumothorax", "cardiomegaly")
    preprocessing = ImagePreprocessing.model_validate(TS_PREPROCESSING)
    assert tuple(preprocess(IMAGES[0].pixels, preprocessing).shape) == (3, 32, 48)
    expected = reference(net, preprocessing, [1, 2], activation="softmax")
    assert_predicts(classifier, ("pneumothorax", "cardiomegaly"), expected)


def test_findings_without_a_code_are_refused_at_load(
    torchscript_folder: tuple[Path, nn.Module],
) -> None:
    folder, _ = torchscript_folder
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["findings"]["normal"] = "no_finding"
    config["default_thresholds"]["no_finding"] = 0.5
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"no code in templates/codes\.yaml: no_finding"):
        load("torchscript", folder)


def test_torchscript_wrong_output_count_or_corrupt_file_are_load_errors(
    torchscript_folder: tuple[Path, nn.Module],
) -> None:
    folder, _ = torchscript_folder
    config = json.loads((folder / CONFIG_FILE).read_text())
    (folder / CONFIG_FILE).write_text(json.dumps({**config, "outputs": ["a", "PTX"]}))
    with pytest.raises(ModelLoadError, match=r"findings names labels not in outputs: cardiomegaly"):
        load("torchscript", folder)
    (folder / CONFIG_FILE).write_text(
        json.dumps({**config, "outputs": ["a", "PTX", "cardiomegaly", "d"]})
    )
    with pytest.raises(ModelLoadError, match=r"expected outputs of shape \(1, 4\).*got \(1, 3\)"):
        load("torchscript", folder)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    (folder / "model.pt").write_bytes(b"garbage")
    with pytest.raises(ModelLoadError, match="not a readable TorchScript file"):
        load("torchscript", folder)


# --- Hugging Face ------------------------------------------------------------------------------


def hf_folder(folder: Path, config: Any, preprocessing: dict[str, Any], **extra: Any) -> Any:
    from transformers import AutoModelForImageClassification

    torch.manual_seed(2)
    model = AutoModelForImageClassification.from_config(config).eval()
    model.save_pretrained(folder)
    write_config(
        folder,
        format="huggingface",
        default_thresholds={"pneumothorax": 0.5, "pleural_effusion": 0.5},
        findings={"Pneumothorax": "pneumothorax", "Effusion": "pleural_effusion"},
        preprocessing=preprocessing,
        **extra,
    )
    return model


LABELS = {0: "No Finding", 1: "Effusion", 2: "Pneumothorax"}


def test_huggingface_multi_label_vit_folder(tmp_path: Path) -> None:
    from transformers import ViTConfig

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        num_channels=1,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
        problem_type="multi_label_classification",
    )
    preprocessing = {"input_size": [32, 32], "value_range": [-1, 1]}
    model = hf_folder(tmp_path / "vit", config, preprocessing)
    classifier = load("huggingface", tmp_path / "vit")
    # Model order (id2label), not the order of the mapping in pacs-ai.json.
    assert classifier.card.findings == ("pleural_effusion", "pneumothorax")
    expected = reference(
        lambda x: model(pixel_values=x).logits,
        ImagePreprocessing.model_validate(preprocessing),
        [1, 2],
    )
    assert_predicts(classifier, ("pleural_effusion", "pneumothorax"), expected)


def test_huggingface_single_label_convnext_uses_softmax(tmp_path: Path) -> None:
    from transformers import ConvNextConfig

    config = ConvNextConfig(
        num_channels=3,
        hidden_sizes=[8, 16],
        depths=[1, 1],
        num_stages=2,
        id2label=LABELS,
        label2id={v: k for k, v in LABELS.items()},
    )
    preprocessing = {"input_size": [32, 32], "channels": 3, "mean": [0.5], "std": [0.5]}
    model = hf_folder(tmp_path / "convnext", config, preprocessing)
    classifier = load("huggingface", tmp_path / "convnext")
    expected = reference(
        lambda x: model(pixel_values=x).logits,
        ImagePreprocessing.model_validate(preprocessing),
        [1, 2],
        activation="softmax",
    )
    assert_predicts(classifier, ("pleural_effusion", "pneumothorax"), expected)


def test_huggingface_missing_or_corrupt_weights_are_load_errors(tmp_path: Path) -> None:
    from transformers import ConvNextConfig

    config = ConvNextConfig(
        num_channels=1, hidden_sizes=[8], depths=[1], num_stages=1, id2label=LABELS
    )
    folder = tmp_path / "hf"
    hf_folder(folder, config, {"input_size": [32, 32], "channels": 3})
    with pytest.raises(ModelLoadError, match="takes 1 channel"):
        load("huggingface", folder)
    config_file = json.loads((folder / CONFIG_FILE).read_text())
    config_file["preprocessing"]["channels"] = 1
    (folder / CONFIG_FILE).write_text(json.dumps(config_file))
    assert load("huggingface", folder).card.findings == ("pleural_effusion", "pneumothorax")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="not a loadable image-classification model"):
        load("huggingface", folder)
    weights.unlink()
    with pytest.raises(ModelLoadError, match="has no weights"):
        load("huggingface", folder)


# --- shared ------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", ["torchxrayvision", "torchscript", "huggingface"])
def test_folder_without_description_or_path_is_a_load_error(adapter: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(adapter, tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no pacs-ai\.json"):
        load(adapter, tmp_path / "empty")
    write_config(tmp_path / "other", format="pacs-ai-cnn")
    with pytest.raises(ModelLoadError, match=f"format is 'pacs-ai-cnn', expected '{adapter}'"):
        load(adapter, tmp_path / "other")
    settings = ClassifierSettings.model_validate({"adapter": adapter, "device": "cpu"})
    with pytest.raises(ModelLoadError, match="needs a model path"):
        load_classifier(settings, demo_dir=tmp_path / "demo")


def test_description_with_thresholds_for_unmapped_findings_is_a_load_error(
    tmp_path: Path,
) -> None:
    folder = xrv_folder(
        tmp_path / "x", "densenet121-res224", "weights.pt", label="ignored"
    )  # label without demo is allowed; a threshold set that does not match is not
    config = json.loads((folder / CONFIG_FILE).read_text())
    config["default_thresholds"] = {"pneumothorax": 0.5}
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="one threshold per mapped finding"):
        load("torchxrayvision", folder)
