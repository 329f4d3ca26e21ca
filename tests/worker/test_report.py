"""The narrative draft (text SR): valid, readable in dcmtk, flagged preliminary, linked to findings."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from tests.servers import dciodvfy, require, require_tool, run_tool
from worker.findings import FindingResult, ModelCard
from worker.outputs.report import build_report_sr, write_narrative
from worker.outputs.sr import build_findings_sr

REAL = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "real"
    / "siim_cr_jpeg_baseline.dcm"
)
CARD = ModelCard(
    "pacs-ai-demo-cxr-triage",
    "1.0.0",
    "pacs-ai-worker",
    ("pneumothorax", "pleural_effusion", "cardiomegaly"),
    True,
    "ab" * 32,
)


def results(uid: str, pneumothorax: float) -> list[FindingResult]:
    return [
        FindingResult("pneumothorax", pneumothorax, 0.5, True, (uid,)),
        FindingResult("pleural_effusion", 0.1, 0.5, False, (uid,)),
        FindingResult("cardiomegaly", 0.2, 0.5, False, (uid,)),
    ]


@pytest.fixture
def source() -> pydicom.Dataset:
    require(REAL.is_file(), f"real test file missing: {REAL}")
    return pydicom.dcmread(REAL)


def test_urgent_finding_leads_the_impression_and_every_finding_has_a_sentence() -> None:
    narrative = write_narrative(results("1.2.3", 0.93), CARD)
    assert narrative.impression.startswith("URGENT: Pneumothorax")
    assert narrative.findings[0] == "Appearance suggestive of pneumothorax (AI probability 93%)."
    assert "No pleural effusion identified." in narrative.findings
    assert narrative.notices[0].startswith("AI-generated draft report")
    assert any("DEMO / NOT FOR CLINICAL USE" in n for n in narrative.notices)


def test_normal_study_gets_the_normal_impression() -> None:
    assert (
        write_narrative(results("1.2.3", 0.05), CARD).impression
        == "No acute abnormality detected by the AI triage model."
    )


def test_draft_sr_of_the_real_file_is_valid_preliminary_and_points_at_its_findings_sr(
    source: pydicom.Dataset, tmp_path: Path
) -> None:
    found = results(source.SOPInstanceUID, 0.9)
    findings_sr = build_findings_sr([source], found, CARD, manufacturer="pacs-ai-worker")
    draft = build_report_sr([source], found, CARD, findings_sr, manufacturer="pacs-ai-worker")
    path = tmp_path / "draft.dcm"
    draft.save_as(path, enforce_file_format=True)
    validation = dciodvfy(path)
    assert validation.ok, validation.output
    assert draft.PreliminaryFlag == "PRELIMINARY"
    assert draft.VerificationFlag == "UNVERIFIED" and draft.CompletionFlag == "PARTIAL"
    assert draft.StudyInstanceUID == source.StudyInstanceUID
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in draft.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {source.SOPInstanceUID, findings_sr.SOPInstanceUID}
    require_tool("dsr2html")
    html = run_tool("dsr2html", [path])
    assert html.returncode == 0, html.stderr
    assert "AI-generated draft report" in html.stdout and "URGENT: Pneumothorax" in html.stdout
    again = build_report_sr([source], found, CARD, findings_sr, manufacturer="pacs-ai-worker")
    assert again.SOPInstanceUID == draft.SOPInstanceUID, (
        "a re-run replaces the draft, it does not duplicate it"
    )
