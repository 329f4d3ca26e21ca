"""The README's first command: ``pacs-ai demo`` runs end to end and says what it did."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from tests.servers import dciodvfy, require

REAL = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "real"
    / "siim_cr_jpeg_baseline.dcm"
)


@pytest.mark.e2e
def test_demo_delivers_an_sr_for_every_study_and_alerts_the_pneumothorax(
    tmp_path: Path, demo_model_dir: Path
) -> None:
    require(REAL.is_file(), f"real test file missing: {REAL}")
    workdir = tmp_path / "demo"
    # The model the demo would train on first use, already trained by the same code.
    shutil.copytree(demo_model_dir, workdir / "models" / "demo-cxr")
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo", "--workdir", str(workdir)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "every study produced a delivered SR" in out
    assert "DEMO / NOT FOR CLINICAL USE" in out
    assert "real SIIM chest X-ray" in out
    assert "pneumothorax (synthetic, PA)" in out
    assert "alert sent" in out
    srs = [pydicom.dcmread(p) for p in sorted((workdir / "pacs").glob("*.dcm"))]
    findings = [sr for sr in srs if sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"]
    drafts = [sr for sr in srs if sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.22"]
    # Per study (four synthetic studies and the real file): a findings SR and a narrative draft.
    assert (len(findings), len(drafts)) == (5, 5)
    for sr in findings:
        assert sr.SOPInstanceUID in out, "the table names every findings SR instance UID"
    for sr in srs:
        assert "DEMO / NOT FOR CLINICAL USE" in sr.SeriesDescription
    for path in sorted((workdir / "pacs").glob("*.dcm")):
        assert dciodvfy(path).ok
