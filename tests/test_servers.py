"""The shared test servers and tools really work: Orthanc, dcmtk, dciodvfy, Redis, PostgreSQL."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from tests.servers import (
    Modality,
    Orthanc,
    dciodvfy,
    echoscu,
    free_port,
    free_ports,
    require,
    storescu,
)


def secondary_capture(path: Path, *, patient_sex: str | None = "O") -> Dataset:
    """Write a small, IOD-valid Secondary Capture image (8x8, MONOCHROME2) to ``path``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.PatientName = "Servers^Test"
    ds.PatientID = "SERVERS-TEST"
    ds.PatientBirthDate = ""
    if patient_sex is not None:
        ds.PatientSex = patient_sex
    ds.StudyInstanceUID = generate_uid()
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = generate_uid()
    ds.SeriesNumber = 1
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.Laterality = ""
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = 8
    ds.Columns = 8
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.arange(64, dtype=np.uint8).reshape(8, 8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


@pytest.fixture
def sc_file(tmp_path: Path) -> tuple[Path, Dataset]:
    path = tmp_path / "sc.dcm"
    return path, secondary_capture(path)


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(3)
    assert len(set(ports)) == 3
    assert 0 < free_port() < 65536


def test_orthanc_answers_rest_and_echo(orthanc: Orthanc) -> None:
    system = orthanc.rest("GET", "/system")
    assert system["DicomAet"] == "ORTHANC"
    assert system["DicomPort"] == orthanc.dicom_port
    assert orthanc.instances() == []

    echo = echoscu(orthanc.host, orthanc.dicom_port, orthanc.aet)
    assert echo.returncode == 0, echo.stderr


def test_storescu_lands_in_orthanc(orthanc: Orthanc, sc_file: tuple[Path, Dataset]) -> None:
    path, ds = sc_file
    result = storescu([path], host=orthanc.host, port=orthanc.dicom_port, called_aet=orthanc.aet)
    assert result.returncode == 0, result.stdout + result.stderr

    orthanc_id = orthanc.find_sop(ds.SOPInstanceUID)
    assert orthanc_id is not None
    assert orthanc.instances() == [orthanc_id]
    stored = pydicom.dcmread(io.BytesIO(orthanc.get_dicom(orthanc_id)))
    assert stored.SOPInstanceUID == ds.SOPInstanceUID
    assert stored.PixelData == ds.PixelData
    assert orthanc.find_sop("1.2.3.4.5.6.7.8.9") is None


def test_storescu_to_a_closed_port_returns_failure_without_raising(
    sc_file: tuple[Path, Dataset],
) -> None:
    path, _ = sc_file
    result = storescu([path], host="127.0.0.1", port=free_port(), called_aet="NOBODY")
    assert result.returncode != 0


def test_orthanc_keeps_its_instances_across_stop_and_start(
    orthanc: Orthanc, sc_file: tuple[Path, Dataset]
) -> None:
    path, ds = sc_file
    storescu([path], host=orthanc.host, port=orthanc.dicom_port, called_aet=orthanc.aet)
    ports = (orthanc.dicom_port, orthanc.http_port)

    orthanc.stop()
    assert not orthanc.running
    orthanc.start()

    assert (orthanc.dicom_port, orthanc.http_port) == ports
    assert pydicom.dcmread(io.BytesIO(orthanc.wait_for_sop(ds.SOPInstanceUID))).PatientID == (
        "SERVERS-TEST"
    )


def test_orthanc_stores_to_a_configured_modality(
    orthanc_factory: Callable[..., Orthanc], sc_file: tuple[Path, Dataset]
) -> None:
    # The receiving node is a second Orthanc here; in other tests it is the node under test.
    receiver = orthanc_factory("RECEIVER")
    sender = orthanc_factory(
        "SENDER",
        modalities={"receiver": Modality(receiver.aet, receiver.host, receiver.dicom_port)},
    )
    path, ds = sc_file
    storescu([path], host=sender.host, port=sender.dicom_port, called_aet=sender.aet)
    orthanc_id = sender.find_sop(ds.SOPInstanceUID)

    sender.rest("POST", "/modalities/receiver/store", {"Resources": [orthanc_id]})

    assert receiver.wait_for_sop(ds.SOPInstanceUID, timeout=10)


def test_modality_added_while_running_is_used(
    orthanc_factory: Callable[..., Orthanc], sc_file: tuple[Path, Dataset]
) -> None:
    receiver = orthanc_factory("LATE")
    sender = orthanc_factory("SENDER")
    sender.add_modality("late", (receiver.aet, receiver.host, receiver.dicom_port))
    path, ds = sc_file
    storescu([path], host=sender.host, port=sender.dicom_port, called_aet=sender.aet)

    sender.rest(
        "POST", "/modalities/late/store", {"Resources": [sender.find_sop(ds.SOPInstanceUID)]}
    )

    assert receiver.wait_for_sop(ds.SOPInstanceUID)


def test_wait_for_sop_times_out_with_a_clear_error(orthanc: Orthanc) -> None:
    with pytest.raises(TimeoutError, match=r"1\.2\.3\.999"):
        orthanc.wait_for_sop("1.2.3.999", timeout=0.2)


def test_dciodvfy_passes_a_valid_file_and_names_a_missing_attribute(tmp_path: Path) -> None:
    valid = tmp_path / "valid.dcm"
    secondary_capture(valid)
    result = dciodvfy(valid)
    assert result.ok, result.output
    assert "SCImage" in result.output

    invalid = tmp_path / "invalid.dcm"
    secondary_capture(invalid, patient_sex=None)
    result = dciodvfy(invalid)
    assert not result.ok
    assert any("PatientSex" in line for line in result.errors), result.output


def test_redis_url_answers_ping_in_an_empty_database(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    assert client.ping()
    assert client.dbsize() == 0
    client.set("pacs-ai-worker:tests:probe", "1")  # flushed after the test


def test_postgres_url_is_a_fresh_database(postgres_url: str) -> None:
    import psycopg

    with psycopg.connect(postgres_url.replace("+psycopg", "")) as conn:
        tables = conn.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchone()
        assert tables == (0,)
        conn.execute("CREATE TABLE probe (id integer)")


def test_require_skips_outside_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PACS_AI_REQUIRE_ALL", raising=False)
    with pytest.raises(pytest.skip.Exception, match="not here"):
        require(False, "not here")


@pytest.mark.parametrize(("name", "value"), [("CI", "true"), ("PACS_AI_REQUIRE_ALL", "1")])
def test_require_fails_in_ci(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("PACS_AI_REQUIRE_ALL", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(pytest.fail.Exception, match="not here"):
        require(False, "not here")
