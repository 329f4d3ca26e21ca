"""``pacs-ai evaluate classifier``: metrics on scores whose answers are known, then the whole
command on labelled phantoms with the demo model."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pydicom
import pytest

from worker.cli import main
from worker.demo.phantoms import write_synthetic_study
from worker.evaluation import (
    EvaluationError,
    auc,
    bootstrap_auc_ci,
    evaluate_scores,
    operating_point,
    read_labels,
    threshold_for_ppv,
    threshold_for_sensitivity,
)
from worker.findings import DEMO_LABEL

# Positives 0.9, 0.8, 0.4; negatives 0.7, 0.3, 0.2, 0.1: 11 of the 12 pairs are ordered right.
SCORES = [0.9, 0.7, 0.8, 0.3, 0.4, 0.2, 0.1]
LABELS = [1, 0, 1, 0, 1, 0, 0]


def test_auc_of_known_scores() -> None:
    assert auc(SCORES, LABELS) == pytest.approx(11 / 12)
    assert auc([0.5, 0.5], [1, 0]) == 0.5  # a tie counts half
    assert auc([0.1, 0.9], [1, 0]) == 0.0
    assert auc([0.1, 0.9], [1, 1]) is None  # no negatives: undefined, not a number


def test_operating_point_at_a_threshold() -> None:
    point = operating_point(SCORES, LABELS, 0.5)
    assert (point.true_positives, point.false_positives) == (2, 1)
    assert (point.true_negatives, point.false_negatives) == (3, 1)
    assert point.sensitivity == pytest.approx(2 / 3)
    assert point.specificity == pytest.approx(3 / 4)
    assert point.ppv == pytest.approx(2 / 3)
    assert point.npv == pytest.approx(3 / 4)
    # A score equal to the threshold is positive, as in the SR.
    assert operating_point(SCORES, LABELS, 0.8).true_positives == 2


def test_suggested_thresholds_for_target_sensitivity_and_ppv() -> None:
    assert threshold_for_sensitivity(SCORES, LABELS, 1.0) == 0.4
    assert threshold_for_sensitivity(SCORES, LABELS, 0.95) == 0.4
    assert threshold_for_sensitivity(SCORES, LABELS, 0.6) == 0.8  # 2 of 3 positives
    assert threshold_for_ppv(SCORES, LABELS, 1.0) == 0.8  # 0.7 would let a negative in
    assert threshold_for_ppv(SCORES, LABELS, 0.75) == 0.4  # 3 TP, 1 FP
    assert threshold_for_ppv([0.9, 0.1], [0, 1], 0.6) is None  # at best 1 TP, 1 FP


def test_bootstrap_ci_is_seeded_and_brackets_the_auc() -> None:
    first = bootstrap_auc_ci(SCORES, LABELS, resamples=500, seed=7)
    assert first == bootstrap_auc_ci(SCORES, LABELS, resamples=500, seed=7)
    assert first is not None and first[0] <= 11 / 12 <= first[1] <= 1.0
    assert bootstrap_auc_ci([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0], resamples=200, seed=0) == (
        1.0,
        1.0,
    )


def test_evaluate_scores_per_finding() -> None:
    (metrics,) = evaluate_scores(
        {"pneumothorax": SCORES},
        {"pneumothorax": LABELS},
        {"pneumothorax": 0.5},
        target_sensitivity=1.0,
        target_ppv=1.0,
        bootstrap=100,
    )
    assert (metrics.positives, metrics.negatives) == (3, 4)
    assert metrics.auc == pytest.approx(11 / 12)
    assert metrics.configured.threshold == 0.5
    assert metrics.for_target_sensitivity is not None
    assert metrics.for_target_sensitivity.threshold == 0.4
    assert metrics.for_target_sensitivity.sensitivity == 1.0
    assert metrics.for_target_ppv is not None and metrics.for_target_ppv.ppv == 1.0


def test_labels_file_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    path.write_text("name,pneumothorax\na.dcm,1\n")
    with pytest.raises(EvaluationError, match="key column"):
        read_labels(path)
    path.write_text("file,pneumothorax,cardiomegaly\na.dcm,1,\nb.dcm,yes,0\n")
    with pytest.raises(EvaluationError, match=r"labels\.csv:3: pneumothorax is 'yes'"):
        read_labels(path)
    path.write_text("file,pneumothorax,cardiomegaly\na.dcm,1,\nb.dcm,0,1\n")
    assert read_labels(path) == (
        "file",
        {"a.dcm": {"pneumothorax": 1}, "b.dcm": {"pneumothorax": 0, "cardiomegaly": 1}},
    )


# --- the command, end to end on phantoms with the demo model -----------------------------------

FINDING_OF_KIND = {
    "pneumothorax": "pneumothorax",
    "effusion": "pleural_effusion",
    "cardiomegaly": "cardiomegaly",
}
SEEDS = range(3_000_000, 3_000_003)  # never used in training


@pytest.fixture(scope="module")
def labelled_phantoms(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Twelve phantoms labelled by SOP Instance UID, plus an unlabelled one and a non-DICOM file."""
    root = tmp_path_factory.mktemp("evaluate")
    data = root / "data"
    rows = []
    for kind in ("normal", *FINDING_OF_KIND):
        for seed in SEEDS:
            (path,) = write_synthetic_study(
                data / f"{kind}-{seed}", kind, seed, patient_id=f"EVAL{seed}", rows=256, cols=256
            )
            uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
            row = {"sop_instance_uid": uid}
            row.update({f: str(int(k == kind)) for k, f in FINDING_OF_KIND.items()})
            rows.append(row)
    write_synthetic_study(data / "extra", "normal", 1, patient_id="EVALX", rows=256, cols=256)
    (data / "notes.txt").write_text("not DICOM")
    labels = root / "labels.csv"
    with open(labels, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return data, labels


def site_file(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(
        f"storage: {{data_dir: {tmp_path / 'state'}}}\n"
        f"models:\n  cxr_triage:\n    path: {model}\n    device: cpu\n"
        "    thresholds: {pneumothorax: 0.3}\n"
    )
    return path


def test_evaluate_classifier_on_labelled_phantoms(
    demo_model_dir: Path,
    labelled_phantoms: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, labels = labelled_phantoms
    out_json, out_csv = tmp_path / "eval.json", tmp_path / "eval.csv"
    argv = ["evaluate", "classifier", "--config", str(site_file(tmp_path, demo_model_dir))]
    argv += ["--data", str(data), "--labels", str(labels), "--target-sensitivity", "0.95"]
    argv += ["--bootstrap", "200", "--json", str(out_json), "--csv", str(out_csv)]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"*** {DEMO_LABEL} ***")
    assert "scored 12 image(s)" in captured.err  # progress on stderr, not in the table
    assert "1 image(s) had no row in the labels file" in captured.out
    assert "1 file(s) were not readable DICOM images" in captured.out

    report = json.loads(out_json.read_text())
    assert report["label"] == DEMO_LABEL and report["images"] == 12
    by_finding = {m["finding"]: m for m in report["findings"]}
    assert list(by_finding) == ["pneumothorax", "pleural_effusion", "cardiomegaly"]
    for finding, metrics in by_finding.items():
        # The demo model separates held-out phantoms (tests/worker/test_models.py).
        assert (metrics["positives"], metrics["negatives"]) == (3, 9)
        assert metrics["auc"] == 1.0 and metrics["auc_ci95"] == [1.0, 1.0]
        assert metrics["configured"]["sensitivity"] == 1.0
        assert metrics["configured"]["specificity"] == 1.0
        assert metrics["for_target_sensitivity"]["sensitivity"] == 1.0
        line = next(ln for ln in captured.out.splitlines() if ln.startswith(finding))
        assert "1.000" in line and "100.0%" in line
    # The site's threshold wins over the model's default.
    assert by_finding["pneumothorax"]["configured"]["threshold"] == 0.3
    assert by_finding["cardiomegaly"]["configured"]["threshold"] == 0.5
    with open(out_csv, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["finding"], r["kind"]) for r in rows[:2]] == [
        ("pneumothorax", "configured"),
        ("pneumothorax", "target_sensitivity"),
    ]
    assert {r["label"] for r in rows} == {DEMO_LABEL}


def test_evaluate_refuses_labels_without_model_findings(
    demo_model_dir: Path,
    labelled_phantoms: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data, _ = labelled_phantoms
    labels = tmp_path / "labels.csv"
    labels.write_text("file,fracture\na.dcm,1\n")
    argv = ["evaluate", "classifier", "--config", str(site_file(tmp_path, demo_model_dir))]
    assert main([*argv, "--data", str(data), "--labels", str(labels)]) == 2
    assert "labels none of the model's findings" in capsys.readouterr().err
