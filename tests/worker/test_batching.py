"""Micro-batching: concurrent studies share forward passes and get exactly their own answers."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from worker.demo.train import phantom_image
from worker.models import load_classifier
from worker.models.batching import BatchingClassifier
from worker.settings import ClassifierSettings

KINDS = ["normal", "pneumothorax", "effusion", "cardiomegaly"]


def test_concurrent_predictions_are_batched_and_each_caller_gets_its_own_scores(
    demo_model_dir: Path,
) -> None:
    model = load_classifier(
        ClassifierSettings(path=demo_model_dir, device="cpu"), demo_dir=demo_model_dir
    )
    studies = [[phantom_image(KINDS[i % 4], 9000 + i, size=128)] for i in range(12)]
    expected = [model.predict(images) for images in studies]
    batching = BatchingClassifier(model, max_images=16, wait_ms=200)
    results: list[list[dict[str, float]] | None] = [None] * len(studies)
    start = threading.Barrier(len(studies))

    def job(i: int) -> None:
        start.wait()
        results[i] = batching.predict(studies[i])

    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(studies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batching.close()
    assert batching.images == len(studies)
    assert batching.calls < len(studies), "concurrent studies must share forward passes"
    for got, want in zip(results, expected, strict=True):
        assert got is not None
        for g, w in zip(got, want, strict=True):
            assert g.keys() == w.keys()
            for finding in w:
                assert g[finding] == pytest.approx(w[finding], abs=1e-5)


def test_a_failing_model_call_reaches_every_waiting_caller(demo_model_dir: Path) -> None:
    model = load_classifier(
        ClassifierSettings(path=demo_model_dir, device="cpu"), demo_dir=demo_model_dir
    )
    batching = BatchingClassifier(model, wait_ms=0)
    broken = phantom_image("normal", 1, size=128)
    object.__setattr__(broken, "pixels", broken.pixels[:0])  # an empty frame cannot be resized
    with pytest.raises(Exception) as direct:  # the model's own error, whatever it is
        model.predict([broken])
    with pytest.raises(direct.type):
        batching.predict([broken])
    # The batcher keeps serving after a failure.
    assert len(batching.predict([phantom_image("normal", 2, size=128)])) == 1
    batching.close()
