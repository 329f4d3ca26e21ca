"""``pacs-ai route explain``: an operator sees which rule a study matches, why the rules before it
did not, and the pipeline and queue; ``pacs-ai studies`` shows why a study was ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_node.assembly import StudyAssembler
from dicom_node.index import Index, InstanceRecord, StudyStatus
from dicom_node.queue import JobQueue
from tests.servers import require
from worker.cli import main
from worker.settings import load_settings

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
SIIM = REAL / "siim_cr_jpeg_baseline.dcm"

SITE = """\
queue:
  urgent_calling_aets: [ER_CR1]
routing:
  rules:
    - name: brain-glioma
      when:
        - {tag: Modality, equals: MR}
        - {tag: BodyPartExamined, one_of: [BRAIN, HEAD]}
      pipeline: null
      require_series:
        - name: T1c
          when: [{tag: SeriesDescription, regex: 'T1.*(\\+C|POST|GD)'}]
        - name: FLAIR
          when: [{tag: SeriesDescription, regex: FLAIR}]
    - name: mr-research
      when:
        - {tag: Modality, equals: MR}
        - {tag: SliceThickness, range: {max: 2}}
      pipeline: cxr
      require_series:
        - name: FLAIR
          when: [{tag: SeriesDescription, regex: FLAIR}]
      series_wait_s: 300
    - name: chest-xray
      when: [{tag: Modality, one_of: [CR, DX]}]
      pipeline: cxr
"""


def write_mr(folder: Path, study_uid: str, description: str, **attributes: object) -> Path:
    sop_uid = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, generate_uid()
    ds.Modality, ds.SeriesDescription = "MR", description
    ds.PatientName, ds.PatientID = "DOE^JANE", "P-4711"
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(32)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{sop_uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def explain(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["route", "explain", *args])
    return code, capsys.readouterr().out


def test_real_siim_secondary_capture_cr_is_routed_to_the_chest_xray_pipeline(
    capsys: pytest.CaptureFixture[str],
) -> None:
    require(SIIM.is_file(), f"real test file missing: {SIIM} (see ../shared/data/real/README)")
    code, out = explain(capsys, str(SIIM))
    assert code == 0
    assert "1 instance(s) in 1 series, modality CR" in out
    assert "1. chest-xray-stat: no match — any of (RequestedProcedurePriority equals 'STAT'" in out
    assert "(not present)" in out
    assert "2. chest-xray: MATCH — Modality one of [CR, DX] (saw 'CR')" in out
    assert "→ pipeline cxr, priority routine, queue routine" in out


def test_explain_names_the_failed_condition_the_value_seen_and_the_missing_series(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE)
    study = generate_uid()
    folder = tmp_path / "study"
    write_mr(folder, study, "AX T1 +C", BodyPartExamined="PELVIS", SliceThickness="1.5")
    write_mr(folder, study, "AX T2", BodyPartExamined="PELVIS", SliceThickness="1.5")
    (folder / "notes.txt").write_text("not DICOM")

    code, out = explain(capsys, "--config", str(site), str(folder))
    assert code == 0
    assert "skipped" in out and "notes.txt" in out
    assert "2 instance(s) in 2 series, modality MR" in out
    assert "1. brain-glioma: no match — BodyPartExamined one of [BRAIN, HEAD] (saw 'PELVIS')" in out
    assert "2. mr-research: MATCH" in out
    assert "required series FLAIR: MISSING" in out
    assert "3. chest-xray: not tried (an earlier rule matched)" in out
    assert "but waits up to 300 s for FLAIR, then marked incomplete" in out
    assert "DOE" not in out and "P-4711" not in out


def test_explain_shows_an_er_calling_ae_sends_the_study_to_the_urgent_queue(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    require(SIIM.is_file(), f"real test file missing: {SIIM}")
    site = tmp_path / "site.yaml"
    site.write_text(SITE)
    code, out = explain(capsys, "--config", str(site), "--calling-aet", "ER_CR1", str(SIIM))
    assert code == 0
    assert "→ pipeline cxr, priority urgent, queue stat" in out
    assert "urgent because calling AE ER_CR1 is in queue.urgent_calling_aets" in out


def test_explain_without_dicom_files_says_so_and_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "readme.txt").write_text("nothing here")
    assert main(["route", "explain", str(tmp_path)]) == 2
    assert "no DICOM study found" in capsys.readouterr().err


def test_studies_shows_why_a_study_was_ignored(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, redis_url: str
) -> None:
    site = tmp_path / "site.yaml"
    site.write_text(SITE + f"storage:\n  data_dir: {tmp_path / 'data'}\n")
    settings = load_settings(site, environ={})
    study = generate_uid()
    path = write_mr(tmp_path / "spool", study, "AX T1", BodyPartExamined="KNEE")
    index = Index(settings.index_url)
    index.record_instance(
        InstanceRecord(
            sop_instance_uid=generate_uid(),
            study_instance_uid=study,
            series_instance_uid=generate_uid(),
            sop_class_uid=MRImageStorage,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            modality="MR",
            path=str(path),
            size_bytes=path.stat().st_size,
            calling_aet="MRI_3T",
            received_at=100.0,
        ),
        urgent=False,
        complete_after=130.0,
    )
    queue = JobQueue(settings.queue, redis_url)
    StudyAssembler(
        index, queue, settings.completion, settings.queue, routing=settings.routing
    ).run_once(now=130.0)
    queue.close()
    row = index.study(study)
    index.close()
    assert row is not None and row.status == StudyStatus.IGNORED

    assert main(["studies", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert "ignored" in out and study in out
    assert "no routing rule matched" in out
    assert "mr-research: SliceThickness at most 2 (not present)" in out


def test_example_site_file_spells_out_the_default_rules() -> None:
    from dicom_node.settings import RoutingSettings

    example = Path(__file__).resolve().parents[2] / "deploy" / "site.example.yaml"
    assert load_settings(example, environ={}).routing == RoutingSettings()
