"""Site validation of a triage classifier on local labelled images, before go-live.

``pacs-ai evaluate classifier --data FOLDER --labels labels.csv`` runs the configured classifier
over every DICOM image in FOLDER and compares its scores with the labels:

- per finding: AUC (Mann-Whitney, ties count half) with a seeded percentile-bootstrap 95% CI;
- sensitivity, specificity, PPV and NPV at the configured operating point (the site's threshold,
  else the model's default; positive means score >= threshold, as in the SR);
- suggested thresholds: the highest that reaches a target sensitivity, and the lowest that reaches
  a target PPV (the most sensitive one that still does), each with what it would give here.

labels.csv has a header row: one key column (``sop_instance_uid``, or ``file`` holding the file
name or its path relative to FOLDER) and one column per finding key with 1 (present), 0 (absent)
or empty (not labelled). Images are scored one by one, as the pipeline scores each radiograph.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.errors import InvalidDicomError

from worker.findings import DEMO_LABEL, DecodedImage
from worker.models.base import Classifier

if TYPE_CHECKING:
    from worker.imaging.decode import FrameDecoder

KEY_COLUMNS = ("sop_instance_uid", "file")
DEFAULT_BOOTSTRAP = 1000
BATCH = 16

Progress = Callable[[str], None]


class EvaluationError(Exception):
    """The labels or the data cannot be evaluated; the message says what to fix."""


@dataclass(frozen=True)
class OperatingPoint:
    """What a threshold gives on the evaluated images."""

    threshold: float
    sensitivity: float | None
    specificity: float | None
    ppv: float | None
    npv: float | None
    true_positives: int
    false_positives: int
    true_negatives: int
    false_negatives: int


@dataclass(frozen=True)
class FindingMetrics:
    finding: str
    positives: int
    negatives: int
    auc: float | None
    auc_ci95: tuple[float, float] | None
    configured: OperatingPoint
    # The highest threshold that reaches the target sensitivity (None: no target given).
    for_target_sensitivity: OperatingPoint | None = None
    # The lowest threshold whose PPV reaches the target (None: no target, or none reaches it).
    for_target_ppv: OperatingPoint | None = None


@dataclass(frozen=True)
class Evaluation:
    model: str
    version: str
    demo: bool
    images: int
    findings: list[FindingMetrics]
    bootstrap: int
    seed: int
    target_sensitivity: float | None
    target_ppv: float | None
    # Labelled images that were not found in the data folder, and images that could not be read.
    missing: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    unlabelled: int = 0


# --- metrics -------------------------------------------------------------------------------------


def auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float | None:
    """Area under the ROC curve: P(score of a positive > score of a negative), ties half."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    positives, negatives = int(y.sum()), int((~y).sum())
    if positives == 0 or negatives == 0:
        return None
    # Mann-Whitney U from average ranks (ties get their mean rank).
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_scores = s[order]
    start = 0
    while start < len(s):
        end = start
        while end + 1 < len(s) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2.0 + 1.0
        start = end + 1
    u = ranks[y].sum() - positives * (positives + 1) / 2.0
    return float(u / (positives * negatives))


def bootstrap_auc_ci(
    scores: npt.ArrayLike, labels: npt.ArrayLike, *, resamples: int, seed: int
) -> tuple[float, float] | None:
    """Percentile 95% CI of the AUC over `resamples` resamples of the images (seeded)."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    if resamples <= 0 or y.all() or not y.any():
        return None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        pick = rng.integers(0, len(s), len(s))
        value = auc(s[pick], y[pick])
        if value is not None:  # a resample with one class only has no AUC
            values.append(value)
    if not values:
        return None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def _ratio(numerator: int, denominator: int) -> float | None:
    return numerator / denominator if denominator else None


def operating_point(
    scores: npt.ArrayLike, labels: npt.ArrayLike, threshold: float
) -> OperatingPoint:
    """Counts and rates when score >= threshold is called positive."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    called = s >= threshold
    tp, fp = int((called & y).sum()), int((called & ~y).sum())
    tn, fn = int((~called & ~y).sum()), int((~called & y).sum())
    return OperatingPoint(
        threshold=float(threshold),
        sensitivity=_ratio(tp, tp + fn),
        specificity=_ratio(tn, tn + fp),
        ppv=_ratio(tp, tp + fp),
        npv=_ratio(tn, tn + fn),
        true_positives=tp,
        false_positives=fp,
        true_negatives=tn,
        false_negatives=fn,
    )


def threshold_for_sensitivity(
    scores: npt.ArrayLike, labels: npt.ArrayLike, target: float
) -> float | None:
    """The highest threshold whose sensitivity is at least `target`."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    positive_scores = np.sort(s[y])[::-1]
    if len(positive_scores) == 0:
        return None
    needed = max(1, math.ceil(target * len(positive_scores) - 1e-9))
    return float(positive_scores[needed - 1])


def threshold_for_ppv(scores: npt.ArrayLike, labels: npt.ArrayLike, target: float) -> float | None:
    """The lowest threshold (most sensitive) whose PPV is at least `target`; None if none is."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    for threshold in np.unique(s):  # ascending: the first that reaches the target is the lowest
        point = operating_point(s, y, float(threshold))
        if point.ppv is not None and point.ppv >= target:
            return float(threshold)
    return None


def evaluate_scores(
    scores: Mapping[str, Sequence[float]],
    labels: Mapping[str, Sequence[int]],
    thresholds: Mapping[str, float],
    *,
    target_sensitivity: float | None = None,
    target_ppv: float | None = None,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
) -> list[FindingMetrics]:
    """Metrics per finding from parallel lists of scores and 0/1 labels."""
    results = []
    for finding, finding_scores in scores.items():
        s = np.asarray(finding_scores, dtype=np.float64)
        y = np.asarray(labels[finding]).astype(bool)
        point = None
        if target_sensitivity is not None:
            t = threshold_for_sensitivity(s, y, target_sensitivity)
            point = operating_point(s, y, t) if t is not None else None
        ppv_point = None
        if target_ppv is not None:
            t = threshold_for_ppv(s, y, target_ppv)
            ppv_point = operating_point(s, y, t) if t is not None else None
        results.append(
            FindingMetrics(
                finding=finding,
                positives=int(y.sum()),
                negatives=int((~y).sum()),
                auc=auc(s, y),
                auc_ci95=bootstrap_auc_ci(s, y, resamples=bootstrap, seed=seed),
                configured=operating_point(s, y, thresholds[finding]),
                for_target_sensitivity=point,
                for_target_ppv=ppv_point,
            )
        )
    return results


# --- data ----------------------------------------------------------------------------------------


def read_labels(path: Path) -> tuple[str, dict[str, dict[str, int]]]:
    """(key column, key -> finding -> 0/1) from labels.csv; empty cells are left out."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
            header = rows[0].keys() if rows else []
    except OSError as exc:
        raise EvaluationError(f"cannot read labels file {path}: {exc}") from exc
    columns = [c.strip() for c in header]
    key = next((c for c in KEY_COLUMNS if c in columns), None)
    if key is None:
        raise EvaluationError(
            f"{path}: needs a header row with a key column ({' or '.join(KEY_COLUMNS)}) "
            "and one column per finding"
        )
    labels: dict[str, dict[str, int]] = {}
    for line, row in enumerate(rows, start=2):
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        name = row.pop(key)
        if not name:
            raise EvaluationError(f"{path}:{line}: empty {key}")
        if name in labels:
            raise EvaluationError(f"{path}:{line}: {key} {name} is listed twice")
        values = {}
        for finding, cell in row.items():
            if cell == "":
                continue
            if cell not in ("0", "1"):
                raise EvaluationError(
                    f"{path}:{line}: {finding} is {cell!r}, expected 0, 1 or empty"
                )
            values[finding] = int(cell)
        labels[name] = values
    return key, labels


@dataclass(frozen=True)
class LabelledImage:
    key: str
    image: DecodedImage
    labels: dict[str, int]


def _decode(path: Path, decoder: FrameDecoder | None) -> DecodedImage | None:
    from worker.imaging.decode import UndecodableImage, UnsupportedImage, decode_instance

    try:
        ds = pydicom.dcmread(path)
        return decode_instance(ds, decoder=decoder)
    except (
        InvalidDicomError,
        UnsupportedImage,
        UndecodableImage,
        OSError,
        ValueError,
        AttributeError,
        KeyError,
        TypeError,
    ):
        # Not DICOM, truncated, no pixels, an unsupported encoding: reported, not fatal.
        return None


def _candidates(data: Path) -> list[Path]:
    if not data.is_dir():
        raise EvaluationError(f"data folder {data} does not exist or is not a folder")
    return sorted(p for p in data.rglob("*") if p.is_file() and p.suffix.lower() != ".csv")


# --- the command ---------------------------------------------------------------------------------


def evaluate_classifier(
    classifier: Classifier,
    data: Path,
    labels_path: Path,
    thresholds: Mapping[str, float],
    *,
    target_sensitivity: float | None = None,
    target_ppv: float | None = None,
    bootstrap: int = DEFAULT_BOOTSTRAP,
    seed: int = 0,
    progress: Progress | None = None,
    decoder: FrameDecoder | None = None,
) -> Evaluation:
    """Score every labelled DICOM image under `data` and compute the metrics per finding.

    Compressed frames are decoded through ``decoder`` (in this process when None).
    """
    say = progress or (lambda message: None)
    key_column, labels = read_labels(labels_path)
    card = classifier.card
    labelled_findings = {finding for values in labels.values() for finding in values}
    findings = [f for f in card.findings if f in labelled_findings]
    if not findings:
        raise EvaluationError(
            f"{labels_path} labels none of the model's findings ({', '.join(card.findings)}); "
            f"its columns: {', '.join(sorted(labelled_findings)) or 'none'}"
        )
    merged = {**classifier.default_thresholds, **thresholds}
    files = _candidates(data)
    say(f"{len(files)} file(s) under {data}; {len(labels)} labelled image(s)")

    scores: dict[str, list[float]] = {f: [] for f in findings}
    truth: dict[str, list[int]] = {f: [] for f in findings}
    found: set[str] = set()
    unreadable: list[str] = []
    unlabelled = 0
    pending: list[LabelledImage] = []
    started = time.monotonic()
    done = 0

    def flush() -> None:
        nonlocal done
        if not pending:
            return
        for item, result in zip(
            pending, classifier.predict([p.image for p in pending]), strict=True
        ):
            for finding in findings:
                if finding in item.labels:
                    scores[finding].append(result[finding])
                    truth[finding].append(item.labels[finding])
        done += len(pending)
        pending.clear()
        rate = done / max(time.monotonic() - started, 1e-9)
        say(f"scored {done} image(s) ({rate:.1f}/s)")

    for path in files:
        image = _decode(path, decoder)
        if image is None:
            unreadable.append(str(path.relative_to(data)))
            continue
        relative = path.relative_to(data).as_posix()
        if key_column == "sop_instance_uid":
            key = image.sop_instance_uid
        else:
            key = relative if relative in labels else path.name
        if key not in labels:
            unlabelled += 1
            continue
        found.add(key)
        pending.append(LabelledImage(key, image, labels[key]))
        if len(pending) >= BATCH:
            flush()
    flush()
    if done == 0:
        raise EvaluationError(
            f"no labelled image found under {data} (labels keyed by {key_column}; "
            f"{len(unreadable)} unreadable, {unlabelled} unlabelled file(s))"
        )
    say(f"computing metrics ({bootstrap} bootstrap resamples, seed {seed})")
    metrics = evaluate_scores(
        scores,
        truth,
        merged,
        target_sensitivity=target_sensitivity,
        target_ppv=target_ppv,
        bootstrap=bootstrap,
        seed=seed,
    )
    return Evaluation(
        model=card.name,
        version=card.version,
        demo=card.demo,
        images=done,
        findings=metrics,
        bootstrap=bootstrap,
        seed=seed,
        target_sensitivity=target_sensitivity,
        target_ppv=target_ppv,
        missing=sorted(set(labels) - found),
        unreadable=unreadable,
        unlabelled=unlabelled,
    )


# --- reports -------------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(evaluation: Evaluation) -> str:
    """The human-readable report the command prints."""
    lines = []
    if evaluation.demo:
        lines.append(f"*** {DEMO_LABEL} ***")
    lines.append(
        f"model {evaluation.model} {evaluation.version}: {evaluation.images} image(s); "
        f"AUC 95% CI from {evaluation.bootstrap} bootstrap resamples (seed {evaluation.seed})"
    )
    lines.append("")
    header = (
        f"{'finding':18} {'pos':>4} {'neg':>4} {'AUC':>6} {'95% CI':>13}  "
        f"{'threshold':>9} {'sens':>6} {'spec':>6} {'PPV':>6} {'NPV':>6}"
    )
    lines += [header, "-" * len(header)]
    for m in evaluation.findings:
        ci = "-" if m.auc_ci95 is None else f"{m.auc_ci95[0]:.3f}-{m.auc_ci95[1]:.3f}"
        c = m.configured
        lines.append(
            f"{m.finding:18} {m.positives:>4} {m.negatives:>4} {_num(m.auc):>6} {ci:>13}  "
            f"{c.threshold:>9.4f} {_pct(c.sensitivity):>6} {_pct(c.specificity):>6} "
            f"{_pct(c.ppv):>6} {_pct(c.npv):>6}"
        )
    for label, target, attribute in (
        ("sensitivity", evaluation.target_sensitivity, "for_target_sensitivity"),
        ("PPV", evaluation.target_ppv, "for_target_ppv"),
    ):
        if target is None:
            continue
        lines += ["", f"suggested thresholds for {label} >= {_pct(target)}:"]
        for m in evaluation.findings:
            point: OperatingPoint | None = getattr(m, attribute)
            if point is None:
                lines.append(f"  {m.finding:18} none reaches it on these images")
                continue
            lines.append(
                f"  {m.finding:18} threshold {point.threshold:.4f}: "
                f"sens {_pct(point.sensitivity)}, spec {_pct(point.specificity)}, "
                f"PPV {_pct(point.ppv)}"
            )
    notes = []
    if evaluation.missing:
        notes.append(f"{len(evaluation.missing)} labelled image(s) not found in the data folder")
    if evaluation.unreadable:
        notes.append(f"{len(evaluation.unreadable)} file(s) were not readable DICOM images")
    if evaluation.unlabelled:
        notes.append(f"{evaluation.unlabelled} image(s) had no row in the labels file")
    if notes:
        lines += ["", *notes]
    if evaluation.demo:
        lines.append(f"*** {DEMO_LABEL} ***")
    return "\n".join(lines)


def to_json(evaluation: Evaluation) -> dict[str, Any]:
    data = asdict(evaluation)
    data["label"] = DEMO_LABEL if evaluation.demo else None
    return data


def write_json(evaluation: Evaluation, path: Path) -> None:
    path.write_text(json.dumps(to_json(evaluation), indent=2) + "\n", encoding="utf-8")


CSV_COLUMNS = (
    "finding",
    "kind",
    "positives",
    "negatives",
    "auc",
    "auc_ci95_low",
    "auc_ci95_high",
    "threshold",
    "sensitivity",
    "specificity",
    "ppv",
    "npv",
    "model",
    "label",
)


def write_csv(evaluation: Evaluation, path: Path) -> None:
    """One row per finding and operating point (configured, target sensitivity, target PPV)."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for m in evaluation.findings:
            for kind, point in (
                ("configured", m.configured),
                ("target_sensitivity", m.for_target_sensitivity),
                ("target_ppv", m.for_target_ppv),
            ):
                if point is None:
                    continue
                writer.writerow(
                    {
                        "finding": m.finding,
                        "kind": kind,
                        "positives": m.positives,
                        "negatives": m.negatives,
                        "auc": m.auc,
                        "auc_ci95_low": m.auc_ci95[0] if m.auc_ci95 else None,
                        "auc_ci95_high": m.auc_ci95[1] if m.auc_ci95 else None,
                        "threshold": point.threshold,
                        "sensitivity": point.sensitivity,
                        "specificity": point.specificity,
                        "ppv": point.ppv,
                        "npv": point.npv,
                        "model": f"{evaluation.model} {evaluation.version}",
                        "label": DEMO_LABEL if evaluation.demo else "",
                    }
                )
