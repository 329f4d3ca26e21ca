"""Model adapters: classifiers loaded from local folders named in the settings, never from a hub.

Each adapter is one module with a ``load(folder, device) -> Classifier`` function, registered in
CLASSIFIER_ADAPTERS under the name ``ClassifierSettings.adapter`` uses.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType

from worker.models.base import Classifier, ModelLoadError
from worker.settings import ClassifierSettings
from worker.templates import code_map

__all__ = ["CLASSIFIER_ADAPTERS", "Classifier", "ModelLoadError", "load_classifier"]

logger = logging.getLogger(__name__)

AdapterLoader = Callable[[Path, str], Classifier]


def _load_pacs_ai_cnn(folder: Path, device: str) -> Classifier:
    # Imported on use: torch is heavy and only workers that run a model need it.
    from worker.models import pacs_ai_cnn

    return pacs_ai_cnn.load(folder, device)


def _load_torchxrayvision(folder: Path, device: str) -> Classifier:
    from worker.models import torchxrayvision

    return torchxrayvision.load(folder, device)


def _load_torchscript(folder: Path, device: str) -> Classifier:
    from worker.models import torchscript

    return torchscript.load(folder, device)


def _load_huggingface(folder: Path, device: str) -> Classifier:
    from worker.models import huggingface

    return huggingface.load(folder, device)


CLASSIFIER_ADAPTERS: Mapping[str, AdapterLoader] = MappingProxyType(
    {
        "pacs-ai-cnn": _load_pacs_ai_cnn,
        "torchxrayvision": _load_torchxrayvision,
        "torchscript": _load_torchscript,
        "huggingface": _load_huggingface,
    }
)
"""Adapter name -> loader. A new adapter is one more entry (and one module)."""


def _demo_model(demo_dir: Path) -> Path:
    """The demo model folder, trained from phantoms on first use (about a minute on a CPU)."""
    if (demo_dir / "config.json").is_file():
        return demo_dir
    from worker.demo.train import train_demo_model

    logger.warning("no demo model in %s: training one from synthetic phantoms", demo_dir)
    return train_demo_model(
        demo_dir,
        progress=lambda message: logger.info("demo model: %s", message),
        replace=False,
    )


def load_classifier(settings: ClassifierSettings, *, demo_dir: Path) -> Classifier:
    """Load the classifier the settings name; with no path, the demo model in `demo_dir`."""
    loader = CLASSIFIER_ADAPTERS.get(settings.adapter)
    if loader is None:
        known = ", ".join(sorted(CLASSIFIER_ADAPTERS))
        raise ModelLoadError(f"unknown classifier adapter {settings.adapter!r} (known: {known})")
    if settings.path is not None:
        folder = settings.path
    elif settings.adapter == "pacs-ai-cnn":
        folder = _demo_model(demo_dir)
    else:
        raise ModelLoadError(
            f"adapter {settings.adapter!r} needs a model path; the demo is pacs-ai-cnn"
        )
    classifier = loader(folder, settings.device)
    # The SR codes every finding it reports; a finding without a code would fail on the first
    # study instead of at start-up.
    coded = code_map().findings
    uncoded = [finding for finding in classifier.card.findings if finding not in coded]
    if uncoded:
        raise ModelLoadError(
            f"model {classifier.card.name} outputs findings with no code in templates/codes.yaml: "
            f"{', '.join(uncoded)} (map them to one of {', '.join(coded)} or leave them out)"
        )
    # A misspelt finding in the site's operating points would silently fall back to the model
    # default; refuse it at start-up instead.
    findings = set(classifier.card.findings)
    unknown = sorted((set(settings.thresholds) | set(settings.urgent_findings)) - findings)
    if unknown:
        raise ModelLoadError(
            f"settings name findings the model {classifier.card.name} does not output: "
            f"{', '.join(unknown)} (it outputs {', '.join(classifier.card.findings)})"
        )
    logger.info(
        "loaded classifier %s %s (demo=%s, weights sha256 %s)",
        classifier.card.name,
        classifier.card.version,
        classifier.card.demo,
        classifier.card.weights_sha256[:12],
    )
    return classifier
