"""Hugging Face image-classification folders (``save_pretrained`` output), read from disk only.

The folder is what ``save_pretrained`` writes (``config.json`` plus ``model.safetensors`` or
sharded weights) and a ``pacs-ai.json`` beside it with ``"format": "huggingface"``, the card,
the mapping from the model's labels (``config.id2label``) to finding keys, the thresholds and the
preprocessing (see ``worker.models.common``). The output labels come from ``config.id2label``;
sigmoid or softmax from ``config.problem_type`` (multi-label: sigmoid; single-label or unset:
softmax), unless ``"activation"`` says otherwise.

Loading never touches the network (``local_files_only=True``) and never runs code shipped with
a model (``trust_remote_code=False``): architectures must be ones ``transformers`` itself knows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

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

FORMAT = "huggingface"
HF_CONFIG_FILE = "config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class HuggingFaceConfig(AdapterConfig):
    """pacs-ai.json of a Hugging Face image-classification folder."""

    preprocessing: ImagePreprocessing
    # None: from config.problem_type.
    activation: Activation | None = None


def _activation(problem_type: str | None, folder: Path) -> Activation:
    if problem_type == "multi_label_classification":
        return "sigmoid"
    if problem_type in (None, "single_label_classification"):
        return "softmax"
    raise ModelLoadError(
        f"{folder}: problem_type {problem_type!r} is not a classification; "
        'set "activation" in pacs-ai.json if the outputs are still per-label scores'
    )


def load(folder: Path, device: str = "auto") -> TensorClassifier:
    """Load a Hugging Face image-classification folder onto `device`."""
    config = read_config(folder, HuggingFaceConfig, FORMAT)
    if not (folder / HF_CONFIG_FILE).is_file():
        raise ModelLoadError(f"{folder} has no {HF_CONFIG_FILE} (not a save_pretrained folder)")
    weight_files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not weight_files:
        raise ModelLoadError(f"{folder} has no weights (*.safetensors or *.bin)")
    target = resolve_device(device)
    # Imported on use: transformers is large and only this adapter needs it.
    import transformers

    transformers.logging.disable_progress_bar()
    try:
        model: Any = transformers.AutoModelForImageClassification.from_pretrained(
            folder, local_files_only=True, trust_remote_code=False
        )
    except Exception as exc:  # OSError, ValueError, safetensors errors: all mean "cannot load"
        raise ModelLoadError(
            f"{folder} is not a loadable image-classification model: {exc}"
        ) from exc
    model = model.to(target).eval()
    hf_config = model.config
    outputs = tuple(str(hf_config.id2label[i]) for i in range(len(hf_config.id2label)))
    num_channels = getattr(hf_config, "num_channels", None)
    if num_channels is not None and num_channels != config.preprocessing.channels:
        raise ModelLoadError(
            f"{folder}: the model takes {num_channels} channel(s) but preprocessing.channels "
            f"is {config.preprocessing.channels}"
        )

    def forward(batch: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = model(pixel_values=batch).logits
        return logits

    classifier = TensorClassifier(
        card=card_of(config, outputs, sha256_files([folder / HF_CONFIG_FILE, *weight_files])),
        default_thresholds=config.default_thresholds,
        forward=forward,
        outputs=outputs,
        label_to_finding=config.findings,
        activation=config.activation or _activation(hf_config.problem_type, folder),
        preprocessing=config.preprocessing,
        device=target,
        batch_size=config.batch_size,
    )
    try:
        classifier.check()
    except ModelLoadError:
        raise
    except Exception as exc:  # the model refused the configured input size
        raise ModelLoadError(
            f"{folder} does not run on a {config.preprocessing.input_size} input: {exc}"
        ) from exc
    return classifier
