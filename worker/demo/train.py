"""Train the demo triage model on synthetic phantoms, deterministically, in about a minute on a CPU.

The demo model exists so that the one-command demo produces real outputs without downloading
anything. It has only ever seen phantoms: every output it feeds says DEMO / NOT FOR CLINICAL USE.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from pydicom.uid import generate_uid

from worker.demo.phantoms import make_cxr_dataset, make_cxr_pixels
from worker.findings import DecodedImage
from worker.imaging.decode import decode_instance
from worker.models.pacs_ai_cnn import (
    Architecture,
    PacsAiCnn,
    Preprocessing,
    load,
    preprocess,
    save_model,
)

DEMO_NAME = "pacs-ai-demo-cxr-triage"
DEMO_VERSION = "1.0.0"
DEMO_MANUFACTURER = "pacs-ai-worker"
FINDINGS = ("pneumothorax", "pleural_effusion", "cardiomegaly")
# The phantom kind behind each finding; "normal" phantoms are negative for all three.
KIND_OF_FINDING = {
    "pneumothorax": "pneumothorax",
    "pleural_effusion": "effusion",
    "cardiomegaly": "cardiomegaly",
}
PREPROCESSING = Preprocessing(
    input_size=(128, 128), resize="area", keep_aspect=False, value_range=(-1.0, 1.0)
)
ARCHITECTURE = Architecture(in_channels=1, widths=(8, 16, 32, 64, 64))
# Phantoms are drawn at twice the input size and go through the real decode + resize path, so the
# network sees what it will see at inference (where images arrive at 1024 and more).
PHANTOM_SIZE = 256
TRAINING_SEEDS = range(0, 100)
# Held-out phantoms for evaluation use seeds from here on; training never does.
HELD_OUT_SEED_START = 1_000_000
EPOCHS = 10
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
# Fixed thread count: the reduction order, hence the weights, must not depend on the core count.
TRAINING_THREADS = 2

Progress = Callable[[str], None]


def phantom_image(kind: str, seed: int, size: int = PHANTOM_SIZE) -> DecodedImage:
    """A phantom as the worker would see it: DICOM instance, then the production decoder."""
    pixels = make_cxr_pixels(kind, seed, size, size)
    ds = make_cxr_dataset(
        pixels,
        patient_id="DEMO-TRAIN",
        patient_name="DEMO^TRAINING",
        study_instance_uid=generate_uid(entropy_srcs=["train-study", kind, str(seed)]),
        series_instance_uid=generate_uid(entropy_srcs=["train-series", kind, str(seed)]),
        sop_instance_uid=generate_uid(entropy_srcs=["train-instance", kind, str(seed)]),
        accession_number="DEMOTRAIN",
    )
    return decode_instance(ds)


def labels_of(kind: str) -> list[float]:
    """Target vector of a phantom kind, in FINDINGS order."""
    return [1.0 if KIND_OF_FINDING[finding] == kind else 0.0 for finding in FINDINGS]


def _training_set(seeds: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, targets = [], []
    for seed in seeds:
        # Every seed in every kind: the same "patient" normal and abnormal, so the network has
        # to look at the finding and not at the anatomy.
        for kind in ("normal", *KIND_OF_FINDING.values()):
            inputs.append(preprocess(phantom_image(kind, seed).pixels, PREPROCESSING))
            targets.append(labels_of(kind))
    return torch.stack(inputs), torch.tensor(targets, dtype=torch.float32)


def _augment(batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Contrast, brightness and noise jitter: real windows and detectors differ more than phantoms."""
    n = batch.shape[0]
    gain = 0.8 + 0.4 * torch.rand(n, 1, 1, 1, generator=generator)
    shift = 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    noise = 0.03 * torch.rand(n, 1, 1, 1, generator=generator)
    jitter = torch.randn(batch.shape, generator=generator) * noise
    return batch * gain + shift + jitter


def train_demo_model(
    out_dir: Path, *, seed: int = 0, progress: Progress | None = None, replace: bool = True
) -> Path:
    """Train the demo model and write it to `out_dir` atomically; returns `out_dir`.

    An existing model there is replaced, unless `replace` is False (then the first one to finish
    stays: workers that start together may all train, and all get the same model).
    """
    report = progress or (lambda message: None)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.training-", dir=out_dir.parent))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(TRAINING_THREADS)
        # Late in training, gradients underflow into denormals, which are very slow on CPUs.
        torch.set_flush_denormal(True)
        started = time.monotonic()
        with torch.random.fork_rng(devices=[]):
            net = _train(seed, report)
        save_model(
            staging,
            net,
            name=DEMO_NAME,
            version=DEMO_VERSION,
            manufacturer=DEMO_MANUFACTURER,
            findings=FINDINGS,
            default_thresholds=dict.fromkeys(FINDINGS, 0.5),
            preprocessing=PREPROCESSING,
            demo=True,
            training={
                "data": "synthetic phantoms (worker.demo.phantoms)",
                "phantom_size": PHANTOM_SIZE,
                "phantom_seeds": [TRAINING_SEEDS.start, TRAINING_SEEDS.stop],
                "images": len(TRAINING_SEEDS) * 4,
                "epochs": EPOCHS,
                "seed": seed,
            },
        )
        _move_into_place(staging, out_dir, replace=replace)
        report(f"done in {time.monotonic() - started:.0f} s: {out_dir}")
        return out_dir
    finally:
        torch.set_num_threads(threads)
        torch.set_flush_denormal(False)
        shutil.rmtree(staging, ignore_errors=True)


def _train(seed: int, report: Progress) -> PacsAiCnn:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    report(f"drawing {len(TRAINING_SEEDS) * 4} training phantoms")
    inputs, targets = _training_set(TRAINING_SEEDS)
    net = PacsAiCnn(len(FINDINGS), ARCHITECTURE)
    optimiser = torch.optim.AdamW(net.parameters(), lr=LEARNING_RATE, weight_decay=1e-4)
    steps = EPOCHS * ((len(inputs) + BATCH_SIZE - 1) // BATCH_SIZE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, LEARNING_RATE, total_steps=steps)
    loss_function = torch.nn.BCEWithLogitsLoss()
    net.train()
    for epoch in range(1, EPOCHS + 1):
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for start in range(0, len(order), BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            batch = _augment(inputs[index], generator)
            loss = loss_function(net(batch), targets[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(index)
        report(f"epoch {epoch}/{EPOCHS} loss {total / len(inputs):.4f}")
    return net.eval()


def _move_into_place(staging: Path, out_dir: Path, *, replace: bool) -> None:
    """Rename the finished model into place, so readers see a whole model or none, never half."""
    try:
        staging.rename(out_dir)  # atomic; refused when out_dir exists and is not empty
        return
    except OSError:
        if not out_dir.exists():
            raise
    if not replace:
        return  # another process finished first; its model (the same weights) stays
    retired = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
    out_dir.rename(retired / out_dir.name)
    try:
        staging.rename(out_dir)
    except OSError:
        (retired / out_dir.name).rename(out_dir)
        raise
    finally:
        shutil.rmtree(retired, ignore_errors=True)


def held_out_probabilities(
    model_dir: Path, seeds: Sequence[int], *, size: int = 1024
) -> dict[str, np.ndarray]:
    """Probabilities on held-out phantoms (seeds offset by HELD_OUT_SEED_START), per kind.

    kind -> array (len(seeds), len(FINDINGS)); the images are `size` square, like real inputs.
    """
    classifier = load(model_dir, "cpu")
    results = {}
    for kind in ("normal", *KIND_OF_FINDING.values()):
        images = [phantom_image(kind, HELD_OUT_SEED_START + s, size) for s in seeds]
        scores = classifier.predict(images)
        results[kind] = np.array([[row[f] for f in FINDINGS] for row in scores])
    return results
