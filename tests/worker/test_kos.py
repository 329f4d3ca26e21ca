"""Key Object Selection: viewers that do not render SR still show which images the AI flagged."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from dicom_node.settings import DestinationSettings
from tests.dicom_node.helpers import small_study
from tests.servers import dciodvfy, require
from tests.worker.test_amend import CARD, REAL, Site
from worker.findings import FindingResult
from worker.outputs.kos import KeyObjectError, build_key_object_selection
from worker.outputs.sr import build_findings_sr


def selected(kos: pydicom.Dataset) -> set[str]:
    """SOP Instance UIDs the KOS content selects."""
    return {
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for item in kos.ContentSequence
        if "ReferencedSOPSequence" in item
    }


def test_kos_of_the_real_file_selects_it_validates_and_says_what_was_found(tmp_path: Path) -> None:
    require(REAL.is_file(), f"real test file missing: {REAL}")
    real = pydicom.dcmread(REAL)
    uid = str(real.SOPInstanceUID)
    found = [
        FindingResult("pneumothorax", 0.93, 0.5, True, (uid,)),
        FindingResult("pleural_effusion", 0.1, 0.5, False, (uid,)),
    ]
    sr = build_findings_sr([real], found, CARD, manufacturer="pacs-ai-worker")
    kos = build_key_object_selection([real], found, CARD, sr, manufacturer="pacs-ai-worker")
    path = tmp_path / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    validation = dciodvfy(path)
    assert validation.ok, validation.output

    stored = pydicom.dcmread(path)
    assert stored.Modality == "KO" and stored.StudyInstanceUID == real.StudyInstanceUID
    assert selected(stored) == {uid}
    title = stored.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113000", "DCM")
    read = hd.ko.KeyObjectSelectionDocument.from_dataset(stored)
    assert read.resolve_reference(uid) == (real.StudyInstanceUID, real.SeriesInstanceUID, uid)
    description = " ".join(
        str(item.TextValue) for item in stored.ContentSequence if "TextValue" in item
    )
    assert "pneumothorax (URGENT)" in description and "unverified" in description
    assert "pleural effusion" not in description
    assert "DEMO / NOT FOR CLINICAL USE" in description
    # Same inputs and model, same KOS UID: a re-run replaces it in the PACS.
    again = build_key_object_selection([real], found, CARD, sr, manufacturer="pacs-ai-worker")
    assert again.SOPInstanceUID == kos.SOPInstanceUID


def test_kos_selects_only_the_images_behind_present_findings(tmp_path: Path) -> None:
    frontal, lateral = (pydicom.dcmread(p) for p in small_study(tmp_path, views=("PA", "LL")))
    found = [
        FindingResult("pneumothorax", 0.2, 0.5, True, (str(lateral.SOPInstanceUID),)),
        FindingResult("cardiomegaly", 0.8, 0.5, False, (str(frontal.SOPInstanceUID),)),
    ]
    sr = build_findings_sr([frontal, lateral], found, CARD, manufacturer="m")
    kos = build_key_object_selection([frontal, lateral], found, CARD, sr, manufacturer="m")
    assert selected(kos) == {str(frontal.SOPInstanceUID)}
    path = tmp_path / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    assert dciodvfy(path).ok


def test_nothing_present_means_no_key_images(tmp_path: Path) -> None:
    images = [pydicom.dcmread(p) for p in small_study(tmp_path)]
    found = [FindingResult("pneumothorax", 0.1, 0.5, True, (str(images[0].SOPInstanceUID),))]
    sr = build_findings_sr(images, found, CARD, manufacturer="m")
    with pytest.raises(KeyObjectError):
        build_key_object_selection(images, found, CARD, sr, manufacturer="m")


@pytest.mark.parametrize("asked", [True, False])
def test_job_records_a_kos_only_when_a_destination_asks(
    asked: bool, tmp_path: Path, demo_model_dir: Path
) -> None:
    site = Site(tmp_path, demo_model_dir)
    try:
        site.ctx.settings.outputs.destinations = [
            DestinationSettings(name="pacs", ae_title="PACS", host="127.0.0.1", port=104, kos=asked)
        ]
        paths = small_study(tmp_path / "ptx", kind="pneumothorax", seed=7, size=256)
        study_uid = str(pydicom.dcmread(paths[0]).StudyInstanceUID)
        site.receive(paths)
        summary = site.run(site.complete(study_uid))
        kinds = sorted(o["kind"] for o in site.index.study_outputs(study_uid))
        if not asked:
            assert kinds == ["findings-sr", "report-sr"]
            assert summary["kos_sop_instance_uid"] is None
            return
        assert kinds == ["findings-sr", "kos", "report-sr"]
        kos_row = site.output(study_uid, str(summary["kos_sop_instance_uid"]))
        assert dciodvfy(kos_row["path"]).ok
        assert any(f["present"] for f in summary["findings"]), "the phantom shows pneumothorax"
        # One frontal image: it is the key image.
        assert selected(pydicom.dcmread(kos_row["path"])) == {
            str(pydicom.dcmread(paths[0]).SOPInstanceUID)
        }
    finally:
        site.close()
