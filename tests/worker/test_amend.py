"""Replace vs amend: a re-run replaces the outputs (same UIDs), a late image amends them.

The amended findings SR and draft get new UIDs and a Predecessor Documents Sequence naming the
ones they replace, so the PACS holds both, linked, and a viewer shows the newest.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from dicom_node.index import Index, InstanceRecord
from dicom_node.scu import RemoteNode, send_datasets
from tests.dicom_node.helpers import small_study
from tests.servers import Orthanc, dciodvfy, require
from worker.context import WorkerContext
from worker.findings import FindingResult, ModelCard
from worker.outputs.report import build_report_sr
from worker.outputs.sr import build_findings_sr, read_findings_sr
from worker.settings import Settings
from worker.tasks import _run_cxr

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
FINDINGS_SR, REPORT_SR = "findings-sr", "report-sr"


def results(uid: str, pneumothorax: float = 0.9) -> list[FindingResult]:
    return [
        FindingResult("pneumothorax", pneumothorax, 0.5, True, (uid,)),
        FindingResult("pleural_effusion", 0.1, 0.5, False, (uid,)),
        FindingResult("cardiomegaly", 0.2, 0.5, False, (uid,)),
    ]


def predecessors(ds: pydicom.Dataset) -> set[tuple[str, str, str, str]]:
    """(study, series, SOP class, SOP instance) of every Predecessor Documents item."""
    return {
        (
            str(study.StudyInstanceUID),
            str(series.SeriesInstanceUID),
            str(ref.ReferencedSOPClassUID),
            str(ref.ReferencedSOPInstanceUID),
        )
        for study in ds.get("PredecessorDocumentsSequence", [])
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }


def reference(ds: pydicom.Dataset) -> tuple[str, str, str, str]:
    return (
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
    )


@pytest.fixture
def real() -> pydicom.Dataset:
    require(REAL.is_file(), f"real test file missing: {REAL}")
    return pydicom.dcmread(REAL)


def late_image_of(study: pydicom.Dataset, folder: Path) -> pydicom.Dataset:
    """A phantom lateral view that joins ``study`` after its outputs were made."""
    lateral = pydicom.dcmread(small_study(folder, seed=5, views=("LL",))[0])
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber"):
        setattr(lateral, keyword, study.get(keyword, ""))
    return lateral


def test_same_images_and_model_give_the_same_uids_whatever_the_order(tmp_path: Path) -> None:
    images = [pydicom.dcmread(p) for p in small_study(tmp_path, views=("PA", "LL"))]
    found = results(str(images[0].SOPInstanceUID))
    first = build_findings_sr(images, found, CARD, manufacturer="m")
    again = build_findings_sr(list(reversed(images)), found, CARD, manufacturer="m")
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    draft = build_report_sr(images, found, CARD, first, manufacturer="m")
    assert (
        draft.SOPInstanceUID
        == build_report_sr(images, found, CARD, again, manufacturer="m").SOPInstanceUID
    )
    # Naming itself as the previous version (a re-run) does not make it an amendment.
    rerun = build_findings_sr(images, found, CARD, manufacturer="m", previous_version=first)
    assert rerun.SOPInstanceUID == first.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in rerun


def test_late_image_amends_the_real_files_sr_and_draft_which_validate_and_read_back(
    real: pydicom.Dataset, tmp_path: Path
) -> None:
    found = results(str(real.SOPInstanceUID))
    sr = build_findings_sr([real], found, CARD, manufacturer="pacs-ai-worker")
    draft = build_report_sr([real], found, CARD, sr, manufacturer="pacs-ai-worker")

    late = late_image_of(real, tmp_path / "late")
    sources = [real, late]
    amended = build_findings_sr(
        sources, found, CARD, manufacturer="pacs-ai-worker", previous_version=sr
    )
    amended_draft = build_report_sr(
        sources, found, CARD, amended, manufacturer="pacs-ai-worker", previous_version=draft
    )

    assert amended.SOPInstanceUID != sr.SOPInstanceUID
    assert amended_draft.SOPInstanceUID != draft.SOPInstanceUID
    assert predecessors(amended) == {reference(sr)}
    assert predecessors(amended_draft) == {reference(draft)}
    for name, ds in (("amended-sr", amended), ("amended-draft", amended_draft)):
        path = tmp_path / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        validation = dciodvfy(path)
        assert validation.ok, validation.output

    stored = pydicom.dcmread(tmp_path / "amended-sr.dcm")
    read = hd.sr.ComprehensiveSR.from_dataset(stored)
    assert predecessors(read) == {reference(sr)}
    assert {f.finding for f in read_findings_sr(stored)} == set(CARD.findings)
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in stored.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert evidence == {real.SOPInstanceUID, late.SOPInstanceUID}


def test_previous_version_of_another_study_is_refused(
    real: pydicom.Dataset, tmp_path: Path
) -> None:
    other = [pydicom.dcmread(p) for p in small_study(tmp_path, seed=9)]
    other_sr = build_findings_sr(
        other, results(str(other[0].SOPInstanceUID)), CARD, manufacturer="m"
    )
    with pytest.raises(ValueError, match="another study"):
        build_findings_sr(
            [real],
            results(str(real.SOPInstanceUID)),
            CARD,
            manufacturer="m",
            previous_version=other_sr,
        )


# --- the worker job: index, outputs folder, pipeline ---------------------------------------------


class Site:
    """A worker with its index and the demo model; images 'arrive' as index rows, as the SCP
    records them, and each run is the job the node creates for the (re)completed study."""

    def __init__(
        self,
        tmp_path: Path,
        model_dir: Path,
        configure: Callable[[Settings], None] | None = None,
    ) -> None:
        settings = Settings()
        settings.storage.data_dir = tmp_path / "data"
        settings.models.cxr_triage.path = model_dir
        if configure is not None:
            configure(settings)
        self.ctx = WorkerContext(settings)
        self.index: Index = self.ctx.index

    def receive(self, paths: list[Path]) -> None:
        for path in paths:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            now = time.time()
            self.index.record_instance(
                InstanceRecord(
                    sop_instance_uid=str(ds.SOPInstanceUID),
                    study_instance_uid=str(ds.StudyInstanceUID),
                    series_instance_uid=str(ds.SeriesInstanceUID),
                    sop_class_uid=str(ds.SOPClassUID),
                    transfer_syntax_uid=str(ds.file_meta.TransferSyntaxUID),
                    modality=str(ds.Modality),
                    path=str(path),
                    size_bytes=path.stat().st_size,
                    calling_aet="MODALITY",
                    received_at=now,
                ),
                urgent=False,
                complete_after=now,
            )

    def complete(self, study_uid: str) -> str:
        """The study is complete: the node creates its job."""
        job_id = self.index.create_job(study_uid, "cxr", "routine", time.time())
        assert job_id is not None, "the study was not open"
        return job_id

    def run(self, job_id: str) -> dict[str, Any]:
        """Run (or, for a redelivered job, run again) the chest X-ray job."""
        job = self.index.job(job_id)
        assert job is not None
        return _run_cxr(self.ctx, job)

    def output(self, study_uid: str, sop_uid: str) -> dict[str, Any]:
        rows = [o for o in self.index.study_outputs(study_uid) if o["sop_instance_uid"] == sop_uid]
        assert len(rows) == 1, f"output {sop_uid} recorded {len(rows)} times"
        return rows[0]

    def dataset(self, study_uid: str, sop_uid: str) -> pydicom.Dataset:
        return pydicom.dcmread(self.output(study_uid, sop_uid)["path"])

    def close(self) -> None:
        self.ctx.close()


@pytest.fixture
def site(tmp_path: Path, demo_model_dir: Path) -> Any:
    s = Site(tmp_path, demo_model_dir)
    yield s
    s.close()


def test_job_rerun_replaces_and_late_lateral_amends_with_linked_outputs(
    site: Site, tmp_path: Path
) -> None:
    paths = small_study(tmp_path / "study", kind="pneumothorax", seed=3, views=("PA", "LL"))
    frontal, lateral = paths
    study_uid = str(pydicom.dcmread(frontal).StudyInstanceUID)

    site.receive([frontal])
    job = site.complete(study_uid)
    first = site.run(job)
    again = site.run(job)  # a redelivered job
    assert (again["sr_sop_instance_uid"], again["report_sop_instance_uid"]) == (
        first["sr_sop_instance_uid"],
        first["report_sop_instance_uid"],
    )
    assert first["amends"] == {} and again["amends"] == {}
    assert len(site.index.study_outputs(study_uid)) == 2, "a re-run must not add outputs"

    site.receive([lateral])  # late: the study reopens and the node makes a new job
    amended = site.run(site.complete(study_uid))
    sr_uid, report_uid = amended["sr_sop_instance_uid"], amended["report_sop_instance_uid"]
    assert sr_uid != first["sr_sop_instance_uid"]
    assert report_uid != first["report_sop_instance_uid"]
    assert amended["amends"] == {
        FINDINGS_SR: first["sr_sop_instance_uid"],
        REPORT_SR: first["report_sop_instance_uid"],
    }
    old_sr = site.dataset(study_uid, str(first["sr_sop_instance_uid"]))
    old_report = site.dataset(study_uid, str(first["report_sop_instance_uid"]))
    new_sr, new_report = site.dataset(study_uid, sr_uid), site.dataset(study_uid, report_uid)
    assert predecessors(new_sr) == {reference(old_sr)}
    assert predecessors(new_report) == {reference(old_report)}
    for uid in (sr_uid, report_uid):
        validation = dciodvfy(site.output(study_uid, uid)["path"])
        assert validation.ok, validation.output
    # The index knows which output is current.
    assert site.output(study_uid, str(first["sr_sop_instance_uid"]))["replaced_by"] == sr_uid
    assert site.output(study_uid, sr_uid)["replaced_by"] is None
    assert site.output(study_uid, sr_uid)["predecessor_uid"] == first["sr_sop_instance_uid"]

    # Running the amending job again keeps the link: same UIDs, same predecessors.
    rerun = site.run(site.index.study_jobs(study_uid)[-1].job_id)
    assert rerun["sr_sop_instance_uid"] == sr_uid and rerun["amends"] == amended["amends"]
    assert predecessors(site.dataset(study_uid, sr_uid)) == {reference(old_sr)}
    assert len(site.index.study_outputs(study_uid)) == 4


def test_orthanc_holds_the_original_and_the_amendment_linked_and_one_copy_of_a_rerun(
    site: Site, tmp_path: Path, orthanc: Orthanc
) -> None:
    pacs = RemoteNode(orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    frontal, lateral = small_study(tmp_path / "study", seed=4, views=("PA", "LL"))
    study_uid = str(pydicom.dcmread(frontal).StudyInstanceUID)

    def run_and_send(job_id: str) -> dict[str, Any]:
        summary = site.run(job_id)
        send_datasets(
            pacs,
            [
                site.dataset(study_uid, str(summary[key]))
                for key in ("sr_sop_instance_uid", "report_sop_instance_uid")
            ],
        )
        return summary

    site.receive([frontal])
    job = site.complete(study_uid)
    first = run_and_send(job)
    run_and_send(job)
    assert len(orthanc.instances()) == 2, "a re-run must replace, not duplicate, in the PACS"

    site.receive([lateral])
    amended = run_and_send(site.complete(study_uid))
    assert len(orthanc.instances()) == 4, "the PACS keeps the original and the amendment"
    for old_key in ("sr_sop_instance_uid", "report_sop_instance_uid"):
        old_uid, new_uid = str(first[old_key]), str(amended[old_key])
        assert orthanc.find_sop(old_uid) is not None
        held = pydicom.dcmread(BytesIO(orthanc.wait_for_sop(new_uid)))
        linked = {ref[3] for ref in predecessors(held)}
        assert linked == {old_uid}
        old = pydicom.dcmread(BytesIO(orthanc.wait_for_sop(old_uid)))
        assert predecessors(held) == {reference(old)}
