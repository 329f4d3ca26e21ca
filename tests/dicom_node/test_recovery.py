"""Instances acknowledged just before a power loss: their rows may be gone, their files are not.

On SQLite the listener commits an instance row without waiting for the disk, so a power loss can
take the last rows (never the files, flushed and renamed into place before the row). The first
start after the machine booted indexes those files again. A power loss cannot be staged in a
test; what it leaves can: the rows deleted from the index, and a boot mark from another boot.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.index import InstanceRecord, JobStatus
from dicom_node.node import DicomNode, NodeConfig
from dicom_node.recovery import BOOT_MARK, current_boot
from tests.dicom_node.conftest import make_config
from tests.dicom_node.helpers import small_study, wait_for_queued_job
from tests.servers import storescu


@pytest.fixture
def config(tmp_path: Path, redis_url: str) -> NodeConfig:
    config = make_config(tmp_path, redis_url, quiet=0.5)
    # A recovered CR study has no association to release: it completes after this.
    config.listener.network_timeout_s = 1.0
    return config


@pytest.fixture
def run_node(config: NodeConfig) -> Iterator[list[DicomNode]]:
    started: list[DicomNode] = []
    yield started
    for node in started:
        node.stop()


def _start(config: NodeConfig, started: list[DicomNode]) -> DicomNode:
    node = DicomNode(config)
    node.start()
    started.append(node)
    return node


def _received_then_stopped(
    config: NodeConfig, started: list[DicomNode], files: list[Path], calling_aet: str = "STORESCU"
) -> dict[str, InstanceRecord]:
    """Start a node, send ``files`` to it, stop it; the index rows it had for them."""
    node = _start(config, started)
    result = storescu(
        files, host="127.0.0.1", port=node.port, called_aet="PACSAI", calling_aet=calling_aet
    )
    assert result.returncode == 0, result.stderr
    records = {}
    for f in files:
        sop = str(pydicom.dcmread(f).SOPInstanceUID)
        record = node.index.instance(sop)
        assert record is not None
        records[sop] = record
    node.stop()
    started.remove(node)
    return records


def _lose_rows(config: NodeConfig, study_uid: str) -> None:
    """What a power loss can leave: the study's rows gone from the index, the machine rebooted.

    The rows lost are the last ones written, so whatever came after the study's instance rows
    goes too: its study row and, if its association's release completed it before the node
    stopped, its job.
    """
    db = sqlite3.connect(config.index_url.removeprefix("sqlite:///"))
    try:
        with db:
            db.execute("DELETE FROM instances WHERE study_instance_uid = ?", (study_uid,))
            db.execute("DELETE FROM studies WHERE study_instance_uid = ?", (study_uid,))
            db.execute("DELETE FROM jobs WHERE study_instance_uid = ?", (study_uid,))
    finally:
        db.close()
    (config.storage.data_dir / BOOT_MARK).write_text("an-earlier-boot\n")


def test_files_whose_rows_a_power_loss_took_are_indexed_at_the_first_start_after_boot(
    config: NodeConfig, run_node: list[DicomNode], tmp_path: Path
) -> None:
    kept = small_study(tmp_path / "kept", seed=1, patient_id="T-0001", modality="CR")
    lost = small_study(
        tmp_path / "lost", seed=2, patient_id="T-0002", modality="CR", views=("PA", "LL")
    )
    before = _received_then_stopped(config, run_node, kept + lost, calling_aet="MODALITY1")
    lost_study = str(pydicom.dcmread(lost[0]).StudyInstanceUID)

    _lose_rows(config, lost_study)
    node = _start(config, run_node)

    for sop, was in before.items():
        now = node.index.instance(sop)
        assert now is not None, "an acknowledged instance is not indexed"
        assert now.path == was.path and Path(now.path).is_file()
        assert (now.calling_aet, now.called_aet) == ("MODALITY1", "PACSAI")
        assert (now.size_bytes, now.modality, now.transfer_syntax_uid) == (
            was.size_bytes,
            was.modality,
            was.transfer_syntax_uid,
        )
        assert abs(now.received_at - was.received_at) < 2.0  # when the file was written
    study = node.index.study(lost_study)
    assert study is not None and study.instance_count == 2
    # The study then completes and its job is queued, as for any study.
    jobs = wait_for_queued_job(node.index, lost_study, timeout=20)
    assert [j.status for j in jobs] == [JobStatus.QUEUED]
    if current_boot() is not None:
        assert (config.storage.data_dir / BOOT_MARK).read_text().strip() == current_boot()


def test_a_file_that_is_not_a_whole_instance_is_left_in_place_and_not_indexed(
    config: NodeConfig, run_node: list[DicomNode], tmp_path: Path
) -> None:
    files = small_study(tmp_path / "in", modality="CR")
    ds = pydicom.dcmread(files[0])
    record = _received_then_stopped(config, run_node, files)[str(ds.SOPInstanceUID)]

    _lose_rows(config, str(ds.StudyInstanceUID))
    stored = Path(record.path)
    cut = stored.read_bytes()[:-100]  # the pixel data cut short
    stored.write_bytes(cut)
    node = _start(config, run_node)

    assert node.index.instance(str(ds.SOPInstanceUID)) is None
    assert stored.read_bytes() == cut, "the file was changed or removed"
    # The node serves: the same instance sent again is stored whole.
    assert storescu(files, host="127.0.0.1", port=node.port, called_aet="PACSAI").returncode == 0
    again = node.index.instance(str(ds.SOPInstanceUID))
    assert again is not None and pydicom.dcmread(again.path).PixelData == ds.PixelData


def test_an_index_that_refuses_rows_at_the_first_start_after_boot_does_not_stop_the_node(
    config: NodeConfig, run_node: list[DicomNode], tmp_path: Path
) -> None:
    files = small_study(tmp_path / "in", modality="CR")
    sop = str(pydicom.dcmread(files[0]).SOPInstanceUID)
    _received_then_stopped(config, run_node, files)

    _lose_rows(config, str(pydicom.dcmread(files[0]).StudyInstanceUID))
    database = config.index_url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as db:  # the index takes no instance row (a full disk, say)
        db.execute(
            "CREATE TRIGGER index_offline BEFORE INSERT ON instances "
            "BEGIN INSERT INTO table_that_is_gone VALUES (1); END"
        )
    stored = next(config.storage.spool_dir.rglob(f"{sop}.dcm"))
    kept = stored.read_bytes()
    node = _start(config, run_node)  # starts, serves
    # The sender retries and is refused (0xA700); the file it was acknowledged for stays whole.
    assert storescu(files, host="127.0.0.1", port=node.port, called_aet="PACSAI").returncode != 0
    assert node.index.instance(sop) is None
    assert stored.read_bytes() == kept
    assert (config.storage.data_dir / BOOT_MARK).read_text() == "an-earlier-boot\n"
    node.stop()
    run_node.remove(node)

    with sqlite3.connect(database) as db:  # space freed: the next start indexes the file
        db.execute("DROP TRIGGER index_offline")
    node = _start(config, run_node)
    record = node.index.instance(sop)
    assert record is not None and Path(record.path).is_file()
