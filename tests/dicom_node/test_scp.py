"""The listener: success only after file and index row exist; bad input refused and kept aside."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.index import Index, JobStatus, StudyStatus
from dicom_node.node import DicomNode
from tests.dicom_node.helpers import (
    c_echo,
    dataset_bytes,
    send_raw,
    small_study,
    wait_for_queued_job,
)
from tests.servers import free_port, storescu

REAL = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "real"
    / "siim_cr_jpeg_baseline.dcm"
)


def test_storescu_instance_is_on_disk_and_indexed_when_success_returns(
    node: DicomNode, tmp_path: Path
) -> None:
    files = small_study(tmp_path / "in", views=("PA", "LL"))
    result = storescu(files, host="127.0.0.1", port=node.port, called_aet="PACSAI")
    assert result.returncode == 0, result.stderr
    for f in files:
        ds = pydicom.dcmread(f)
        record = node.index.instance(ds.SOPInstanceUID)
        assert record is not None
        stored = pydicom.dcmread(record.path)
        assert stored.SOPInstanceUID == ds.SOPInstanceUID
        assert stored.PixelData == ds.PixelData
    study = node.index.study(str(pydicom.dcmread(files[0]).StudyInstanceUID))
    assert study is not None and study.instance_count == 2


def test_real_jpeg_baseline_file_is_stored_as_sent(node: DicomNode) -> None:
    if not REAL.is_file():
        pytest.fail(f"real test file missing: {REAL}")
    # -xy: propose JPEG baseline, so the file travels compressed exactly as a PACS would send it.
    result = storescu(
        [REAL], host="127.0.0.1", port=node.port, called_aet="PACSAI", extra_args=("-xy",)
    )
    assert result.returncode == 0, result.stderr
    original = pydicom.dcmread(REAL)
    record = node.index.instance(original.SOPInstanceUID)
    assert record is not None
    assert record.transfer_syntax_uid == "1.2.840.10008.1.2.4.50"
    assert record.modality == "CR"
    assert pydicom.dcmread(record.path).PixelData == original.PixelData


def test_cr_study_completes_at_release_and_its_job_reaches_the_broker(
    node: DicomNode, tmp_path: Path, redis_url: str
) -> None:
    import redis

    files = small_study(tmp_path / "in", kind="pneumothorax", modality="CR")
    assert storescu(files, host="127.0.0.1", port=node.port, called_aet="PACSAI").returncode == 0
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    jobs = wait_for_queued_job(node.index, study_uid, timeout=10)
    assert [j.status for j in jobs] == [JobStatus.QUEUED], (
        "released CR study was not queued well before the 30 s quiet period"
    )
    assert jobs[0].pipeline == "cxr" and jobs[0].queue == "routine"
    message = redis.Redis.from_url(redis_url).lindex("routine", 0)
    assert message is not None and jobs[0].job_id.encode() in message


def test_resending_an_instance_is_an_idempotent_success(node: DicomNode, tmp_path: Path) -> None:
    files = small_study(tmp_path / "in")
    for _ in range(2):
        assert (
            storescu(files, host="127.0.0.1", port=node.port, called_aet="PACSAI").returncode == 0
        )
    study = node.index.study(str(pydicom.dcmread(files[0]).StudyInstanceUID))
    assert study is not None and study.instance_count == 1


def test_stat_priority_marks_the_study_urgent_at_the_top_level_or_in_a_requested_procedure(
    node: DicomNode, tmp_path: Path
) -> None:
    from pydicom.dataset import Dataset

    def requested(priority: str) -> Dataset:
        item = Dataset()
        item.RequestedProcedureID = "RP1"
        item.RequestedProcedurePriority = priority
        return item

    variants = {
        "plain": lambda ds: None,
        "top-level STAT": lambda ds: setattr(ds, "RequestedProcedurePriority", "STAT"),
        "STAT in a requested procedure": lambda ds: setattr(
            ds, "RequestAttributesSequence", [requested("ROUTINE"), requested("STAT")]
        ),
        "ROUTINE in a requested procedure": lambda ds: setattr(
            ds, "RequestAttributesSequence", [requested("ROUTINE")]
        ),
    }
    studies = {}
    for seed, (name, mark) in enumerate(variants.items(), start=1):
        path = small_study(tmp_path / name, seed=seed, patient_id=f"T-{seed:04d}")[0]
        ds = pydicom.dcmread(path)
        mark(ds)
        ds.save_as(path)
        result = storescu([path], host="127.0.0.1", port=node.port, called_aet="PACSAI")
        assert result.returncode == 0, result.stderr
        studies[name] = node.index.study(str(ds.StudyInstanceUID))
    urgent = {name: study is not None and study.urgent for name, study in studies.items()}
    assert urgent == {
        "plain": False,
        "top-level STAT": True,
        "STAT in a requested procedure": True,
        "ROUTINE in a requested procedure": False,
    }


def test_truncated_instance_gets_failure_status_is_quarantined_and_listener_keeps_serving(
    node: DicomNode, tmp_path: Path
) -> None:
    good = small_study(tmp_path / "in")[0]
    raw = good.read_bytes()
    bad = tmp_path / "truncated.dcm"
    bad.write_bytes(raw[: len(raw) - 3000])
    ds = pydicom.dcmread(good, stop_before_pixels=True)
    status = send_raw(bad, node.port, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assert status == 0xC000
    assert node.index.instance(ds.SOPInstanceUID) is None
    assert not list(node.spool.root.rglob("*.dcm")), "a truncated instance must not reach the spool"
    [entry] = node.index.list_quarantine()
    assert "truncated" in entry.reason
    assert entry.status_code == 0xC000
    note = json.loads((Path(entry.path) / "reason.json").read_text())
    assert note["reason"] == entry.reason
    # The data set is kept exactly as sent (the file meta header is the listener's own).
    kept = (Path(entry.path) / "instance.dcm").read_bytes()
    assert dataset_bytes(kept) == dataset_bytes(bad.read_bytes())
    # The next association is served as if nothing happened.
    assert c_echo(node.port) == 0x0000
    assert storescu([good], host="127.0.0.1", port=node.port, called_aet="PACSAI").returncode == 0
    assert node.index.instance(ds.SOPInstanceUID) is not None


def test_garbage_bytes_are_refused_and_quarantined(node: DicomNode, tmp_path: Path) -> None:
    good = small_study(tmp_path / "in")[0]
    ds = pydicom.dcmread(good)
    raw = good.read_bytes()
    # Keep the preamble and file meta, replace the data set with noise.
    meta_end = len(raw) - len(ds.PixelData) - 2000
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(raw[: meta_end // 2] + os.urandom(3000))
    status = send_raw(garbage, node.port, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assert status in (0xC000, 0xA900)
    assert len(node.index.list_quarantine()) == 1
    assert c_echo(node.port) == 0x0000


def test_image_without_pixel_data_is_refused(node: DicomNode, tmp_path: Path) -> None:
    good = small_study(tmp_path / "in")[0]
    ds = pydicom.dcmread(good)
    del ds.PixelData
    path = tmp_path / "nopixels.dcm"
    ds.save_as(path, enforce_file_format=True)
    status = send_raw(path, node.port, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assert status == 0xA900
    assert "pixel data" in node.index.list_quarantine()[0].reason


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_uid_ending_in_a_newline_is_refused_and_makes_no_folder(
    node: DicomNode, tmp_path: Path, keyword: str
) -> None:
    good = small_study(tmp_path / "in")[0]
    ds = pydicom.dcmread(good)
    # pydicom strips a UID it writes, so the newline goes into the bytes: the last digit of the
    # UID (in the file meta too, for the SOP Instance UID) becomes "\n", its length unchanged.
    uid = str(ds.data_element(keyword).value).encode()
    raw = good.read_bytes()
    assert uid in raw
    path = tmp_path / "newline.dcm"
    path.write_bytes(raw.replace(uid, uid[:-1] + b"\n"))
    status = send_raw(path, node.port, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assert status == 0xA900
    assert "not a valid UID" in node.index.list_quarantine()[0].reason
    made = [p for p in node.spool.root.rglob("*") if "\n" in p.name]
    assert made == [], f"a UID with a newline became a path: {made}"
    assert node.index.list_studies() == []


def test_association_with_only_unsupported_sop_classes_is_refused_and_listener_keeps_serving(
    node: DicomNode, tmp_path: Path
) -> None:
    from pynetdicom import AE

    ae = AE(ae_title="RTSCU")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.481.5")  # RT Plan Storage
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSAI")
    refused = not assoc.is_established or not assoc.accepted_contexts
    if assoc.is_established:
        assoc.release()
    assert refused
    assert c_echo(node.port) == 0x0000


def test_wrong_called_ae_title_is_rejected(node: DicomNode) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="SOMEONEELSE")
    assert assoc.is_rejected


def _wait_port(port: int, timeout: float = 30.0) -> None:
    import socket

    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


def _start_node_process(config: Path, tmp_path: Path) -> subprocess.Popen[bytes]:
    log = open(tmp_path / "node.log", "ab")  # noqa: SIM115 - lives as long as the process
    return subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "node", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_instances_acknowledged_before_kill_9_survive_and_their_study_completes_after_restart(
    tmp_path: Path, redis_url: str
) -> None:
    from worker.settings import Settings, write_settings

    port = free_port()
    settings = Settings()
    settings.listener.port = port
    settings.storage.data_dir = tmp_path / "data"
    settings.queue.broker_url = redis_url
    # The association is aborted, so the study completes only by its fallback timer: the larger
    # of the quiet period and the network timeout, counted from the last instance.
    settings.completion.quiet_period_s = 2.0
    settings.listener.network_timeout_s = 1.0
    settings.completion.poll_interval_s = 0.1
    config = tmp_path / "site.yaml"
    write_settings(settings, config)
    files = small_study(tmp_path / "in", views=("PA", "LL"), modality="CR")
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)

    proc = _start_node_process(config, tmp_path)
    try:
        _wait_port(port)
        # --abort: the association never releases, so the study stays in flight.
        result = storescu(
            files, host="127.0.0.1", port=port, called_aet="PACSAI", extra_args=("--abort",)
        )
        assert result.returncode == 0, result.stderr
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()

    index = Index(settings.index_url)
    for f in files:
        record = index.instance(str(pydicom.dcmread(f).SOPInstanceUID))
        assert record is not None, (
            "an acknowledged instance is missing from the index after kill -9"
        )
        assert pydicom.dcmread(record.path).SOPInstanceUID == record.sop_instance_uid
    study = index.study(study_uid)
    assert study is not None and study.status == StudyStatus.RECEIVING

    proc = _start_node_process(config, tmp_path)
    try:
        _wait_port(port)
        deadline = time.time() + 30
        while time.time() < deadline:
            jobs = index.study_jobs(study_uid)
            if jobs and jobs[0].status == JobStatus.QUEUED:
                break
            time.sleep(0.2)
        assert [j.status for j in index.study_jobs(study_uid)] == [JobStatus.QUEUED]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    index.close()
