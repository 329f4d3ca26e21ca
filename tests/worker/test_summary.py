"""The optional Secondary Capture summary: valid, findings burned in, only where a site asks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_node.settings import DestinationSettings
from tests.dicom_node.helpers import small_study
from tests.servers import dciodvfy, require
from tests.worker.test_amend import CARD, REAL, Site
from worker.findings import FindingResult
from worker.imaging.decode import decode_instance
from worker.outbox import wants
from worker.outputs.sr import build_findings_sr
from worker.outputs.summary import build_summary_sc, summary_lines


def test_summary_of_the_real_file_validates_and_carries_the_findings(tmp_path: Path) -> None:
    require(REAL.is_file(), f"real test file missing: {REAL}")
    real = pydicom.dcmread(REAL)
    found = [
        FindingResult("pneumothorax", 0.91, 0.5, True, (real.SOPInstanceUID,)),
        FindingResult("pleural_effusion", 0.1, 0.5, False, (real.SOPInstanceUID,)),
    ]
    sr = build_findings_sr([real], found, CARD, manufacturer="pacs-ai-worker")
    sc = build_summary_sc(
        real, decode_instance(real), found, CARD, sr, manufacturer="pacs-ai-worker"
    )
    path = tmp_path / "summary.dcm"
    sc.save_as(path, enforce_file_format=True)
    validation = dciodvfy(path)
    assert validation.ok, validation.output
    assert sc.StudyInstanceUID == real.StudyInstanceUID
    assert sc.BurnedInAnnotation == "YES"
    assert "DEMO / NOT FOR CLINICAL USE" in sc.SeriesDescription
    assert "pneumothorax: 0.91 PRESENT  URGENT" in sc.ImageComments
    assert max(sc.Rows, sc.Columns) <= 1024 + 200
    # The text band above the image is not empty: the findings are burned in.
    band = sc.pixel_array[: 24 * len(summary_lines(found, CARD))]
    assert np.count_nonzero(band) > 100
    again = build_summary_sc(
        real, decode_instance(real), found, CARD, sr, manufacturer="pacs-ai-worker"
    )
    assert again.SOPInstanceUID == sc.SOPInstanceUID


@pytest.mark.parametrize("asked", [False, True], ids=["not-asked", "asked"])
def test_job_makes_a_summary_only_for_destinations_that_ask(
    asked: bool, tmp_path: Path, demo_model_dir: Path
) -> None:
    site = Site(tmp_path, demo_model_dir)
    try:
        dest = DestinationSettings(
            name="pacs", ae_title="PACS", host="127.0.0.1", port=104, summary_image=asked
        )
        site.ctx.settings.outputs.destinations = [dest]
        paths = small_study(tmp_path / "ptx", kind="pneumothorax", seed=7, size=256)
        study_uid = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
        site.receive(paths)
        summary = site.run(site.complete(study_uid))
        kinds = sorted(o["kind"] for o in site.index.study_outputs(study_uid))
        assert ("summary-sc" in kinds) is asked
        assert wants(dest, "summary-sc") is asked
        if asked:
            row = site.output(study_uid, str(summary["summary_sop_instance_uid"]))
            assert dciodvfy(row["path"]).ok
    finally:
        site.close()
