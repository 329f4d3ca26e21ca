"""Triage classifier speed on CPU and, where there is one, CUDA; and whether both agree.

Loads the demo model through the real adapter (``worker.models.load_classifier``) once per device,
runs the same phantoms through ``predict`` in batches, and prints images/s and the largest
difference between CPU and CUDA probabilities. Run on demand:

    python tests/benchmarks/classifier.py --model pacs-ai-demo/models/demo-cxr [--images 64]

Without --model the demo model is trained into a temporary folder first.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from worker.demo.train import phantom_image, train_demo_model
from worker.findings import DecodedImage
from worker.models import load_classifier
from worker.settings import ClassifierSettings


def measure(
    model_dir: Path, device: str, images: list[DecodedImage], batch: int, repeats: int
) -> tuple[list[float], np.ndarray]:
    settings = ClassifierSettings(path=model_dir, device=device)
    started = time.perf_counter()
    classifier = load_classifier(settings, demo_dir=model_dir)
    load_s = time.perf_counter() - started
    classifier.predict(images[:batch])  # warm-up: kernels, allocator
    rates = []
    scores: list[dict[str, float]] = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        scores = []
        for i in range(0, len(images), batch):
            scores += classifier.predict(images[i : i + batch])
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        rates.append(len(images) / (time.perf_counter() - t0))
    findings = classifier.card.findings
    print(
        f"{device:6} load {load_s:.2f} s; {statistics.median(rates):8.1f} images/s (min {min(rates):.1f}, max {max(rates):.1f})"
    )
    return rates, np.array([[s[f] for f in findings] for s in scores])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=Path, default=None, help="model folder (default: train the demo model)"
    )
    parser.add_argument("--images", type=int, default=64, help="phantoms per pass (default 64)")
    parser.add_argument("--size", type=int, default=1024, help="phantom matrix (default 1024)")
    parser.add_argument(
        "--batch", type=int, default=16, help="images per predict call (default 16)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed passes (default 5)")
    args = parser.parse_args()
    model_dir = args.model or train_demo_model(
        Path(tempfile.mkdtemp()) / "demo-cxr", progress=print
    )
    kinds = ["normal", "pneumothorax", "effusion", "cardiomegaly"]
    images = [phantom_image(kinds[i % 4], 5000 + i, size=args.size) for i in range(args.images)]
    print(
        f"torch {torch.__version__}; {args.images} phantoms of {args.size}x{args.size}, batch {args.batch}"
    )
    _, cpu = measure(model_dir, "cpu", images, args.batch, args.repeats)
    if torch.cuda.is_available():
        print(f"CUDA device: {torch.cuda.get_device_name(0)}")
        _, gpu = measure(model_dir, "cuda", images, args.batch, args.repeats)
        print(f"largest |CPU - CUDA| probability difference: {np.abs(cpu - gpu).max():.2e}")
        auto = load_classifier(
            ClassifierSettings(path=model_dir, device="auto"), demo_dir=model_dir
        )
        print(f"device 'auto' resolves to: {getattr(auto, 'device', '?')}")
    else:
        print("no CUDA device: CPU only")


if __name__ == "__main__":
    main()
