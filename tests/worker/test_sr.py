"""The chest X-ray findings SR: built from real and synthetic studies, validated by dicom3tools
``dciodvfy``, parsed by dcmtk (``dsrdump``, ``dsr2html``) and read back with highdicom."""

from __future__ import annotations

import dataclasses
import io
import pickle
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.servers import dciodvfy, require, require_tool
from worker.findings import FindingResult, ModelCard
from worker.imaging.decode import decode_instance
from worker.outputs.kos import build_key_object_selection
from worker.outputs.report import build_report_sr
from worker.outputs.sr import (
    DEMO_LABEL,
    FindingsSRError,
    build_findings_sr,
    derive_uid,
    read_findings_sr,
)
from worker.outputs.summary import build_summary_sc
from worker.templates import (
    TEMPLATES_DIR_ENV,
    CodeMapError,
    UnknownFinding,
    code_map,
    load_code_map,
    templates_dir,
)

REAL_CR = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "real"
    / "siim_cr_jpeg_baseline.dcm"
)

CARD = ModelCard(
    name="cxr-triage",
    version="1.4.2",
    manufacturer="Example AI Lab",
    findings=("pneumothorax", "pleural_effusion", "cardiomegaly"),
    demo=False,
    weights_sha256="3f" * 32,
)


# --- tools (fail in CI, skip elsewhere: tests.servers.require) --------------------------------


def _assert_valid(path: Path) -> None:
    lines = dciodvfy(path).output.splitlines()
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(lines)
    # The one attribute outside dicom3tools' IOD tables is ours on purpose: Device UID in the
    # Contributing Equipment item (added to the standard after dicom3tools' 2022 tables).
    extra = [line for line in lines if "Attribute is not present in standard DICOM IOD" in line]
    assert all("Device UID" in line for line in extra), "\n".join(lines)


def _dsrdump(path: Path) -> str:
    """dcmtk's dump of the SR, long values in full (+Pl)."""
    dump = subprocess.run(
        [require_tool("dsrdump"), "+Pl", str(path)], capture_output=True, text=True, timeout=60
    )
    assert dump.returncode == 0, dump.stderr
    assert not [line for line in dump.stderr.splitlines() if line.startswith("E:")], dump.stderr
    return dump.stdout


def _assert_dcmtk_parses(path: Path, *expected_text: str) -> None:
    """dsrdump and dsr2html both read the document and show ``expected_text``."""
    dump = _dsrdump(path)
    html = subprocess.run(
        [require_tool("dsr2html"), str(path)], capture_output=True, text=True, timeout=60
    )
    assert html.returncode == 0, html.stderr
    assert "<html" in html.stdout.lower()
    for text in expected_text:
        assert text in dump, dump
        assert text in html.stdout


# --- inputs ------------------------------------------------------------------------------------


def _real_cr() -> pydicom.Dataset:
    require(REAL_CR.is_file(), f"real test image missing: {REAL_CR}")
    return pydicom.dcmread(REAL_CR)


def _cr_image(study_uid: str, series_uid: str, view: str, number: int) -> pydicom.Dataset:
    """A small but complete CR Image (headers of a real chest X-ray, 64x64 pixels)."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = ComputedRadiographyImageStorage
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[study_uid, view])
    ds.PatientName = "Synthetic^Patient"
    ds.PatientID = "SYN-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "F"
    ds.PatientAge = "054Y"
    ds.StudyInstanceUID = study_uid
    ds.StudyDate = "20240102"
    ds.StudyTime = "101500"
    ds.StudyID = "1"
    ds.AccessionNumber = "ACC0001"
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = 1
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view
    ds.Manufacturer = "Synthetic Modality"
    ds.InstanceNumber = number
    # PA: the patient's left is on the image's right; lateral: anterior to the image's right.
    ds.PatientOrientation = ["L", "F"] if view == "PA" else ["A", "F"]
    ds.ImagerPixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 64
    ds.Columns = 64
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(64 * 64, dtype=np.uint16) % 4096).tobytes()
    return ds


def _two_view_study() -> list[pydicom.Dataset]:
    study = generate_uid(entropy_srcs=["synthetic two-view chest study"])
    series = generate_uid(entropy_srcs=[study, "series"])
    return [_cr_image(study, series, "PA", 1), _cr_image(study, series, "LL", 2)]


def _round_trip(ds: pydicom.Dataset) -> pydicom.Dataset:
    """``ds`` as the worker reads it: encoded to bytes and parsed again."""
    encoded = io.BytesIO()
    ds.save_as(encoded, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(encoded.getvalue()))


def _write(sr: pydicom.Dataset, path: Path) -> Path:
    pydicom.dcmwrite(path, sr, enforce_file_format=True)
    return path


def _results(*source_uids: str) -> list[FindingResult]:
    return [
        FindingResult("pneumothorax", 0.91, 0.5, True, tuple(source_uids)),
        FindingResult("pleural_effusion", 0.07, 0.35, False),
        FindingResult("cardiomegaly", 0.5, 0.5, False),
    ]


def _assert_round_trip(
    path: Path, results: list[FindingResult], sources: list[pydicom.Dataset]
) -> None:
    read = {f.finding: f for f in read_findings_sr(pydicom.dcmread(path))}
    assert set(read) == {r.finding for r in results}
    all_sources = tuple(str(ds.SOPInstanceUID) for ds in sources)
    for result in results:
        found = read[result.finding]
        assert found.probability == pytest.approx(result.probability, abs=1e-6)
        assert found.present is result.present
        assert found.threshold == result.threshold
        assert found.source_sop_instance_uids == (result.source_sop_instance_uids or all_sources)
        assert found.tracking_uid.startswith("2.25.")


# --- the SR ------------------------------------------------------------------------------------


def test_real_siim_cr_sr_passes_dciodvfy_parses_in_dcmtk_and_round_trips(tmp_path: Path) -> None:
    source = _real_cr()
    results = _results(str(source.SOPInstanceUID))
    sr = build_findings_sr([source], results, CARD, manufacturer="pacs-ai-worker")
    path = _write(sr, tmp_path / "sr.dcm")

    _assert_valid(path)
    _assert_dcmtk_parses(path, "Pneumothorax", "XR Chest Single view", "91.0", "Present")
    assert "Certainty of Finding" in _dsrdump(path)
    _assert_round_trip(path, results, [source])


def test_real_siim_cr_sr_leaves_out_the_malformed_patient_age(tmp_path: Path) -> None:
    # The SIIM file says Patient's Age "62"; copying it verbatim fails AS validation.
    source = _real_cr()
    sr = build_findings_sr([source], _results(), CARD, manufacturer="pacs-ai-worker")
    assert "PatientAge" not in sr
    assert sr.PatientID == source.PatientID
    assert sr.StudyInstanceUID == source.StudyInstanceUID


def _every_output(
    sources: list[pydicom.Dataset], results: list[FindingResult], folder: Path
) -> dict[str, pydicom.Dataset]:
    """Findings SR, draft SR, KOS and summary image of ``sources``, each written, checked with
    ``dciodvfy`` and read back."""
    sr = build_findings_sr(sources, results, CARD, manufacturer="pacs-ai-worker")
    built = {
        "findings": sr,
        "draft": build_report_sr(sources, results, CARD, sr, manufacturer="pacs-ai-worker"),
        "kos": build_key_object_selection(
            sources, results, CARD, sr, manufacturer="pacs-ai-worker"
        ),
        "summary": build_summary_sc(
            sources[0],
            decode_instance(sources[0]),
            results,
            CARD,
            sr,
            manufacturer="pacs-ai-worker",
        ),
    }
    written = {}
    for kind, output in built.items():
        path = _write(output, folder / f"{kind}.dcm")
        validation = dciodvfy(path)
        errors = [line for line in validation.output.splitlines() if line.startswith("Error")]
        assert not errors, f"{kind}: {validation.output}"
        written[kind] = pydicom.dcmread(path)
    return written


def test_malformed_patient_and_study_values_are_left_out_of_every_output_which_still_validates(
    tmp_path: Path,
) -> None:
    # Values real PACS traffic carries and highdicom cannot convert: before, building the SR
    # failed, and the study got no SR and no alert.
    sources = _two_view_study()
    for ds in sources:
        ds.PatientName = "Synthetic"  # one component: valid, only unusual
        ds.PatientBirthDate = "1961-07-04"
        ds.PatientSex = "male"
        ds.StudyDate = "2024-01-02"
        ds.StudyTime = "10:15"
        ds.PatientAge = "62"
        ds.ReferringPhysicianName = "Doe^John^A^Dr^MD^PhD"  # six components, five allowed
    results = _results(str(sources[0].SOPInstanceUID))
    for kind, written in _every_output(sources, results, tmp_path).items():
        # Type 2: present and empty; Type 3: left out. The patient is still who the images say.
        for keyword in (
            "PatientBirthDate",
            "PatientSex",
            "StudyDate",
            "StudyTime",
            "ReferringPhysicianName",
        ):
            assert keyword in written and not written[keyword].value, f"{kind}: {keyword}"
        assert "PatientAge" not in written, kind
        assert str(written.PatientName) == "Synthetic", kind
        assert written.PatientID == sources[0].PatientID, kind
        assert written.StudyInstanceUID == sources[0].StudyInstanceUID, kind
    # The images themselves keep what they arrived with.
    assert sources[0].PatientBirthDate == "1961-07-04"
    assert sources[0].PatientSex == "male"


def test_absent_patient_and_study_attributes_are_present_and_empty_in_every_output(
    tmp_path: Path,
) -> None:
    # Type 2 in the images too, yet some senders leave them out: before, the job failed.
    absent = ("PatientName", "PatientID", "StudyID", "AccessionNumber", "StudyDate", "StudyTime")
    sources = _two_view_study()
    for ds in sources:
        for keyword in absent:
            delattr(ds, keyword)
    results = _results(str(sources[0].SOPInstanceUID))
    for kind, written in _every_output(sources, results, tmp_path).items():
        for keyword in absent:
            assert keyword in written and not written[keyword].value, f"{kind}: {keyword}"


def test_japanese_names_in_the_standard_character_set_form_reach_every_output(
    tmp_path: Path,
) -> None:
    # PS3.5 H.3.1: value 1 of Specific Character Set empty (ISO 2022 IR 6), then ISO 2022 IR 87.
    # highdicom refuses the empty value 1: before, a study sent this way failed its job.
    name = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    sources = []
    for ds in _two_view_study():
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
        ds.PatientName = name
        sources.append(_round_trip(ds))
    assert str(sources[0].PatientName) == name
    results = _results(str(sources[0].SOPInstanceUID))
    for kind, written in _every_output(sources, results, tmp_path).items():
        assert str(written.PatientName) == name, kind
        assert written.SpecificCharacterSet == ["ISO 2022 IR 6", "ISO 2022 IR 87"], kind


def test_two_view_synthetic_study_sr_is_valid_and_keeps_per_finding_sources(
    tmp_path: Path,
) -> None:
    sources = _two_view_study()
    lateral = str(sources[1].SOPInstanceUID)
    results = _results(lateral)
    sr = build_findings_sr(
        sources, results, CARD, manufacturer="pacs-ai-worker", institution_name="General Hospital"
    )
    path = _write(sr, tmp_path / "sr.dcm")

    _assert_valid(path)
    _assert_dcmtk_parses(path, "Pleural effusion", "Cardiomegaly", "XR Chest 2 Views")
    _assert_round_trip(path, results, sources)

    written = pydicom.dcmread(path)
    assert written.StudyInstanceUID == sources[0].StudyInstanceUID
    assert written.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in sources}
    evidence = written.CurrentRequestedProcedureEvidenceSequence[0]
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in evidence.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert referenced == {ds.SOPInstanceUID for ds in sources}


def test_procedure_reported_names_the_exam_by_number_of_views() -> None:
    sources = _two_view_study()
    one = build_findings_sr(sources[:1], _results(), CARD, manufacturer="m")
    two = build_findings_sr(sources, _results(), CARD, manufacturer="m")
    assert _procedure_codes(one) == ["36554-4"]
    assert _procedure_codes(two) == ["36643-5"]


def _procedure_codes(sr: pydicom.Dataset) -> list[str]:
    return [
        item.ConceptCodeSequence[0].CodeValue
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # Procedure reported
    ]


def test_ai_result_is_partial_preliminary_and_unverified() -> None:
    sr = build_findings_sr(_two_view_study(), _results(), CARD, manufacturer="m")
    assert sr.CompletionFlag == "PARTIAL"
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.PreliminaryFlag == "PRELIMINARY"
    assert sr.Modality == "SR"
    assert sr.SeriesNumber == 9001


def test_contributing_equipment_names_the_algorithm_with_its_device_uid() -> None:
    sr = build_findings_sr(_two_view_study(), _results(), CARD, manufacturer="pacs-ai-worker")
    algorithm = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
        and item.Manufacturer == CARD.manufacturer
    ]
    assert len(algorithm) == 1
    item = algorithm[0]
    assert item.ManufacturerModelName == CARD.name
    assert item.SoftwareVersions == CARD.version
    observer_uid = _device_observer_uid(sr)
    assert item.DeviceUID == observer_uid


def _device_observer_uid(sr: pydicom.Dataset) -> str:
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "121012":  # Device Observer UID
            return str(item.UID)
    raise AssertionError("no Device Observer UID")


def test_same_inputs_give_the_same_sr_uids_whatever_the_source_order() -> None:
    sources = _two_view_study()
    first = build_findings_sr(sources, _results(), CARD, manufacturer="m")
    again = build_findings_sr(list(reversed(sources)), _results(), CARD, manufacturer="m")
    assert first.SOPInstanceUID == again.SOPInstanceUID
    assert first.SeriesInstanceUID == again.SeriesInstanceUID
    assert _device_observer_uid(first) == _device_observer_uid(again)


def test_new_weights_give_a_new_sr_and_device_uid() -> None:
    sources = _two_view_study()
    first = build_findings_sr(sources, _results(), CARD, manufacturer="m")
    retrained = dataclasses.replace(CARD, weights_sha256="a0" * 32)
    second = build_findings_sr(sources, _results(), retrained, manufacturer="m")
    assert first.SOPInstanceUID != second.SOPInstanceUID
    assert first.SeriesInstanceUID != second.SeriesInstanceUID
    assert _device_observer_uid(first) != _device_observer_uid(second)


def test_demo_card_labels_the_sr_and_a_clinical_card_does_not(tmp_path: Path) -> None:
    sources = _two_view_study()
    demo = dataclasses.replace(CARD, demo=True)
    demo_path = _write(
        build_findings_sr(sources, _results(), demo, manufacturer="m"), tmp_path / "demo.dcm"
    )
    clinical_path = _write(
        build_findings_sr(sources, _results(), CARD, manufacturer="m"), tmp_path / "clinical.dcm"
    )

    _assert_valid(demo_path)
    written = pydicom.dcmread(demo_path)
    assert DEMO_LABEL in written.SeriesDescription
    _assert_dcmtk_parses(demo_path, "DEMO")
    dump = _dsrdump(demo_path)
    algorithm_names = [line for line in dump.splitlines() if '"Algorithm Name")=' in line]
    assert algorithm_names and all(DEMO_LABEL in line for line in algorithm_names)
    assert all(DEMO_LABEL in f.tracking_identifier for f in read_findings_sr(written))

    assert DEMO_LABEL.encode() not in clinical_path.read_bytes()
    assert b"DEMO" not in clinical_path.read_bytes()


def test_unknown_finding_is_a_key_error_naming_the_known_ones() -> None:
    results = [FindingResult("pneumonia", 0.4, 0.5, False)]
    with pytest.raises(UnknownFinding) as caught:
        build_findings_sr(_two_view_study(), results, CARD, manufacturer="m")
    assert isinstance(caught.value, KeyError)
    assert "pneumothorax" in str(caught.value)


def test_result_pointing_at_an_image_outside_the_study_is_refused() -> None:
    results = [FindingResult("pneumothorax", 0.9, 0.5, True, ("1.2.3.4",))]
    with pytest.raises(FindingsSRError, match="not among"):
        build_findings_sr(_two_view_study(), results, CARD, manufacturer="m")


def test_sources_from_two_studies_are_refused() -> None:
    first = _two_view_study()[0]
    other = _cr_image(generate_uid(entropy_srcs=["other study"]), "1.2.3", "PA", 1)
    with pytest.raises(FindingsSRError, match="studies"):
        build_findings_sr([first, other], _results(), CARD, manufacturer="m")


@pytest.mark.parametrize("probability", [-0.1, 1.5, float("nan")])
def test_probability_outside_zero_one_is_refused(probability: float) -> None:
    results = [FindingResult("pneumothorax", probability, 0.5, True)]
    with pytest.raises(FindingsSRError, match="probability"):
        build_findings_sr(_two_view_study(), results, CARD, manufacturer="m")


def test_same_finding_twice_is_refused() -> None:
    results = [FindingResult("pneumothorax", 0.9, 0.5, True)] * 2
    with pytest.raises(FindingsSRError, match="twice"):
        build_findings_sr(_two_view_study(), results, CARD, manufacturer="m")


# --- derived UIDs ------------------------------------------------------------------------------


def test_derived_uid_is_a_deterministic_valid_2_25_uid() -> None:
    uid = derive_uid("a", "b")
    assert uid == derive_uid("a", "b")
    assert uid.startswith("2.25.")
    assert len(uid) <= 64
    assert int(uid.removeprefix("2.25.")) < 2**128  # the integer of a UUID
    assert pydicom.uid.UID(uid).is_valid


def test_derived_uid_does_not_confuse_part_boundaries() -> None:
    assert derive_uid("ab", "c") != derive_uid("a", "bc")
    assert derive_uid("abc") != derive_uid("ab", "c")


# --- the code map ------------------------------------------------------------------------------


def test_code_map_holds_the_design_codes() -> None:
    codes = code_map()
    assert codes.finding("pneumothorax").value == "36118008"
    assert codes.finding("pneumothorax").scheme_designator == "SCT"
    assert (codes.present.value, codes.absent.value) == ("52101004", "2667000")
    assert codes.procedure_for_views(1).value == "36554-4"
    assert codes.procedure_for_views(2).value == "36643-5"
    assert codes.procedure_for_views(4).value == "30745-4"
    with pytest.raises(ValueError):
        codes.procedure_for_views(0)


def test_code_map_is_cached_per_path() -> None:
    assert code_map() is code_map()


def test_templates_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert (templates_dir() / "codes.yaml").is_file()
    monkeypatch.setenv(TEMPLATES_DIR_ENV, str(tmp_path))
    assert templates_dir() == tmp_path.resolve()


def test_code_map_rejects_unknown_keys(tmp_path: Path) -> None:
    text = (templates_dir() / "codes.yaml").read_text(encoding="utf-8")
    bad = tmp_path / "codes.yaml"
    bad.write_text(text + "\nextra_section: {}\n", encoding="utf-8")
    with pytest.raises(CodeMapError, match="unknown keys"):
        load_code_map(bad)


def test_code_map_rejects_unquoted_code_values(tmp_path: Path) -> None:
    text = (templates_dir() / "codes.yaml").read_text(encoding="utf-8")
    bad = tmp_path / "codes.yaml"
    bad.write_text(text.replace('value: "36118008"', "value: 36118008"), encoding="utf-8")
    with pytest.raises(CodeMapError, match="quoted"):
        load_code_map(bad)


def test_unknown_finding_survives_pickling() -> None:
    # Celery carries a task's exception back to the caller pickled.
    error = pickle.loads(pickle.dumps(UnknownFinding("pneumonia", ("pneumothorax",))))
    assert isinstance(error, UnknownFinding)
    assert error.name == "pneumonia"
