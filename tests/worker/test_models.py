"""Classifier loading (the pacs-ai-cnn folder format) and the demo model trained on phantoms."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from worker.demo.train import (
    FINDINGS,
    HELD_OUT_SEED_START,
    KIND_OF_FINDING,
    phantom_image,
)
from worker.findings import DEMO_LABEL, DecodedImage
from worker.models import ModelLoadError, load_classifier
from worker.models.pacs_ai_cnn import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    Architecture,
    PacsAiCnn,
    Preprocessing,
    preprocess,
    save_model,
)
from worker.settings import ClassifierSettings

TINY_PREPROCESSING = Preprocessing(input_size=(32, 32), resize="bilinear", value_range=(-1.0, 1.0))


def image(rows: int, cols: int, seed: int) -> DecodedImage:
    pixels = np.random.default_rng(seed).random((rows, cols), dtype=np.float32)
    return DecodedImage(
        sop_instance_uid=f"1.2.3.{seed}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", pixels=pixels
    )


@pytest.fixture
def tiny_model(tmp_path: Path) -> Path:
    """A random-weight model of the real class, saved in the real folder format."""
    torch.manual_seed(0)
    net = PacsAiCnn(len(FINDINGS), Architecture(widths=(4, 8)))
    # Non-trivial batch-norm statistics, so eval mode really differs from train mode.
    with torch.no_grad():
        net.train()(torch.rand(8, 1, 32, 32))
    return save_model(
        tmp_path / "tiny",
        net.eval(),
        name="tiny-test-cnn",
        version="0.0.1",
        manufacturer="tests",
        findings=FINDINGS,
        default_thresholds={"pneumothorax": 0.3, "pleural_effusion": 0.5, "cardiomegaly": 0.6},
        preprocessing=TINY_PREPROCESSING,
    )


def settings(path: Path | None, **extra: object) -> ClassifierSettings:
    return ClassifierSettings.model_validate({"path": path, "device": "cpu", **extra})


def test_model_folder_round_trip_through_load_classifier(tiny_model: Path, tmp_path: Path) -> None:
    classifier = load_classifier(settings(tiny_model), demo_dir=tmp_path / "no-demo-here")
    card = classifier.card
    assert card.findings == FINDINGS
    assert (card.name, card.version, card.manufacturer, card.demo) == (
        "tiny-test-cnn",
        "0.0.1",
        "tests",
        False,
    )
    assert (
        card.weights_sha256 == hashlib.sha256((tiny_model / WEIGHTS_FILE).read_bytes()).hexdigest()
    )
    assert classifier.default_thresholds == {
        "pneumothorax": 0.3,
        "pleural_effusion": 0.5,
        "cardiomegaly": 0.6,
    }
    assert not (tmp_path / "no-demo-here").exists()  # a configured path never builds the demo

    images = [image(64, 64, 1), image(100, 80, 2), image(32, 48, 3)]
    results = classifier.predict(images)
    assert len(results) == 3
    for result in results:
        assert list(result) == list(FINDINGS)
        assert all(0.0 <= p <= 1.0 for p in result.values())
    # Same numbers as the saved network run by hand, and independent of batching.
    net = PacsAiCnn(len(FINDINGS), Architecture(widths=(4, 8)))
    net.load_state_dict(torch.load(tiny_model / WEIGHTS_FILE, weights_only=True))
    net.eval()
    with torch.no_grad():
        for img, result in zip(images, results, strict=True):
            expected = torch.sigmoid(net(preprocess(img.pixels, TINY_PREPROCESSING)[None]))[0]
            assert np.allclose(list(result.values()), expected.numpy(), atol=1e-5)
            assert classifier.predict([img])[0] == pytest.approx(result, abs=1e-5)
    assert classifier.predict([]) == []


def test_preprocessing_can_keep_the_aspect_ratio() -> None:
    wide = np.ones((50, 100), dtype=np.float32)
    padded = preprocess(wide, Preprocessing(input_size=(20, 20), keep_aspect=True))
    stretched = preprocess(wide, Preprocessing(input_size=(20, 20), keep_aspect=False))
    assert padded.shape == stretched.shape == (1, 20, 20)
    assert float(stretched.min()) == 1.0  # all white, mapped onto value_range (-1, 1)
    assert float(padded[0, 0, 0]) == -1.0 and float(padded[0, 10, 10]) == 1.0


def test_missing_folder_and_missing_config_are_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_classifier(settings(tmp_path / "absent"), demo_dir=tmp_path / "demo")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match=r"has no config\.json"):
        load_classifier(settings(tmp_path / "empty"), demo_dir=tmp_path / "demo")


@pytest.mark.parametrize(
    ("corruption", "message"),
    [
        (lambda c: "{not json", "not readable JSON"),
        (lambda c: json.dumps({**c, "format": "huggingface"}), "format is 'huggingface'"),
        (lambda c: json.dumps({**c, "surprise": 1}), "surprise"),
        (lambda c: json.dumps({k: v for k, v in c.items() if k != "findings"}), "findings"),
        (lambda c: json.dumps({**c, "default_thresholds": {}}), "one threshold per finding"),
        (lambda c: json.dumps({**c, "demo": True}), "DEMO / NOT FOR CLINICAL USE"),
    ],
)
def test_invalid_config_is_a_load_error(
    tiny_model: Path, corruption: Callable[[dict[str, Any]], str], message: str
) -> None:
    config = json.loads((tiny_model / CONFIG_FILE).read_text())
    (tiny_model / CONFIG_FILE).write_text(corruption(config))
    with pytest.raises(ModelLoadError, match=message):
        load_classifier(settings(tiny_model), demo_dir=tiny_model.parent / "demo")


def test_missing_or_corrupt_weights_are_load_errors(tiny_model: Path) -> None:
    weights = tiny_model / WEIGHTS_FILE
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ModelLoadError, match="not a readable weights file"):
        load_classifier(settings(tiny_model), demo_dir=tiny_model.parent / "demo")
    weights.unlink()
    with pytest.raises(ModelLoadError, match=r"has no weights\.pt"):
        load_classifier(settings(tiny_model), demo_dir=tiny_model.parent / "demo")


def test_weights_of_another_architecture_are_a_load_error(tiny_model: Path) -> None:
    config = json.loads((tiny_model / CONFIG_FILE).read_text())
    config["architecture"]["widths"] = [4, 16]
    (tiny_model / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="does not match the architecture"):
        load_classifier(settings(tiny_model), demo_dir=tiny_model.parent / "demo")


def test_settings_naming_findings_the_model_lacks_are_refused(tiny_model: Path) -> None:
    with pytest.raises(ModelLoadError, match="pneumothorx"):
        load_classifier(
            settings(tiny_model, thresholds={"pneumothorx": 0.2}),
            demo_dir=tiny_model.parent / "demo",
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA refusal")
def test_cuda_requested_without_cuda_is_a_load_error(tiny_model: Path) -> None:
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_classifier(settings(tiny_model, device="cuda"), demo_dir=tiny_model.parent / "demo")


# --- the demo model, trained by the shared session fixture (tests/conftest.py) ---------------

HELD_OUT_SEEDS = range(HELD_OUT_SEED_START, HELD_OUT_SEED_START + 4)


@pytest.fixture(scope="module")
def demo_dir(demo_model_dir: Path) -> Path:
    """The demo model folder, trained once through train_demo_model (seed 0)."""
    return demo_model_dir


@pytest.fixture(scope="module")
def held_out(demo_dir: Path) -> dict[str, list[dict[str, float]]]:
    """Probabilities on phantoms the model never saw (new seeds, full 1024 matrix)."""
    # No path configured: load_classifier picks the demo model in demo_dir.
    classifier = load_classifier(settings(None), demo_dir=demo_dir)
    return {
        kind: classifier.predict([phantom_image(kind, seed, 1024) for seed in HELD_OUT_SEEDS])
        for kind in ("normal", *KIND_OF_FINDING.values())
    }


def test_demo_model_is_written_whole_and_labelled_demo(demo_dir: Path) -> None:
    assert sorted(p.name for p in demo_dir.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]
    assert [p.name for p in demo_dir.parent.iterdir()] == [demo_dir.name]  # no staging left
    config = json.loads((demo_dir / CONFIG_FILE).read_text())
    assert config["demo"] is True and config["label"] == DEMO_LABEL
    assert config["findings"] == list(FINDINGS)
    classifier = load_classifier(settings(None), demo_dir=demo_dir)
    assert classifier.card.demo


@pytest.mark.parametrize("finding", FINDINGS)
def test_demo_model_separates_held_out_phantoms(
    finding: str, held_out: dict[str, list[dict[str, float]]]
) -> None:
    positives = [result[finding] for result in held_out[KIND_OF_FINDING[finding]]]
    negatives = [
        result[finding]
        for kind, results in held_out.items()
        if kind != KIND_OF_FINDING[finding]
        for result in results
    ]
    assert min(positives) > 0.8, positives
    assert max(negatives) < 0.2, negatives


def test_a_finished_model_replaces_the_old_one_only_when_asked(tmp_path: Path) -> None:
    from worker.demo.train import _move_into_place

    def folder(name: str, content: str) -> Path:
        path = tmp_path / name
        path.mkdir()
        (path / CONFIG_FILE).write_text(content)
        return path

    target = folder("demo-cxr", "old")
    _move_into_place(folder("staging-1", "new"), target, replace=False)
    assert (target / CONFIG_FILE).read_text() == "old"  # the first model to arrive stays
    _move_into_place(folder("staging-2", "newer"), target, replace=True)
    assert (target / CONFIG_FILE).read_text() == "newer"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # old one removed
