"""Success only for what is kept: a full disk, an unwritable spool or an unreachable index answers
0xA700 and leaves nothing half-written; a repeated instance is an idempotent success (keep or
replace)."""

from __future__ import annotations

import shutil
import sqlite3
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from dicom_node.node import DicomNode, NodeConfig
from dicom_node.spool import disk_used_fraction
from tests.dicom_node.conftest import StartNode
from tests.dicom_node.helpers import NO_ANSWER, send_raw, small_study
from tests.servers import storescu

OUT_OF_RESOURCES = 0xA700


def _send(node: DicomNode, path: Path) -> int:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return send_raw(path, node.port, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)


def _files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()]


def _sop(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_disk_above_watermark_refuses_with_0xA700_and_accepts_again_below_it(
    start_node: StartNode, tmp_path: Path
) -> None:
    [image] = small_study(tmp_path / "in")
    used = disk_used_fraction(tmp_path)

    def full(config: NodeConfig) -> None:
        config.storage.max_disk_used_fraction = used / 2

    node = start_node(full)
    assert _send(node, image) == OUT_OF_RESOURCES
    assert node.index.instance(_sop(image)) is None
    assert _files_under(node.spool.root) == [], "nothing may reach the spool above the watermark"
    assert node.index.list_quarantine() == [], "a full disk is not the sender's fault"
    node.stop()

    # The admin frees space (here: raises the watermark) and restarts; the retry is accepted.
    node = start_node()
    assert _send(node, image) == 0x0000
    record = node.index.instance(_sop(image))
    assert record is not None and Path(record.path).is_file()


def test_unwritable_spool_refuses_with_0xA700_and_leaves_nothing(
    start_node: StartNode, tmp_path: Path
) -> None:
    [image] = small_study(tmp_path / "in")
    node = start_node()
    spool = node.spool.root
    # chmod does not stop root: put a file where the spool folder should be.
    shutil.rmtree(spool)
    spool.write_bytes(b"not a folder")
    assert _send(node, image) == OUT_OF_RESOURCES
    assert node.index.instance(_sop(image)) is None
    spool.unlink()
    spool.mkdir()
    assert _files_under(spool) == []
    assert _send(node, image) == 0x0000
    assert node.index.instance(_sop(image)) is not None


def test_index_that_refuses_the_row_answers_0xA700_and_the_written_file_is_removed(
    start_node: StartNode, tmp_path: Path
) -> None:
    [image] = small_study(tmp_path / "in")
    node = start_node()
    database = node.config.index_url.removeprefix("sqlite:///")
    # The lookup still works, the insert fails: the file is already written when the index fails.
    with sqlite3.connect(database) as db:
        db.execute(
            "CREATE TRIGGER index_offline BEFORE INSERT ON instances "
            "BEGIN INSERT INTO table_that_is_gone VALUES (1); END"
        )
    assert _send(node, image) == OUT_OF_RESOURCES
    assert _files_under(node.spool.root) == [], "an unindexed file stayed in the spool"


def test_index_that_recovers_accepts_again_without_a_restart(
    start_node: StartNode, tmp_path: Path
) -> None:
    [image] = small_study(tmp_path / "in")
    node = start_node()
    database = node.config.index_url.removeprefix("sqlite:///")
    with sqlite3.connect(database) as db:
        db.execute(
            "CREATE TRIGGER index_offline BEFORE INSERT ON instances "
            "BEGIN INSERT INTO table_that_is_gone VALUES (1); END"
        )
    assert _send(node, image) == OUT_OF_RESOURCES
    with sqlite3.connect(database) as db:
        db.execute("DROP TRIGGER index_offline")
    assert _send(node, image) == 0x0000


def test_unreachable_postgresql_index_answers_0xA700_and_keeps_no_file(
    start_node: StartNode, tmp_path: Path, postgres_url: str, _postgres_server: object
) -> None:
    import psycopg
    from psycopg import sql

    first, second = small_study(tmp_path / "in", views=("PA", "LL"))

    def on_postgres(config: NodeConfig) -> None:
        object.__setattr__(config, "index_url", postgres_url)

    node = start_node(on_postgres)
    assert _send(node, first) == 0x0000
    kept = _files_under(node.spool.root)
    dbname = postgres_url.rsplit("/", 1)[1]
    admin = postgres_url.rsplit("/", 1)[0].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(f"{admin}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(dbname)))
    assert _send(node, second) == OUT_OF_RESOURCES
    assert _files_under(node.spool.root) == kept


def _edited_copy(path: Path, folder: Path) -> Path:
    """The same instance (same UIDs) with different content, as a modality re-sends it."""
    ds = pydicom.dcmread(path)
    ds.ImageComments = "corrected"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / path.name
    ds.save_as(out, enforce_file_format=True)
    return out


def test_repeated_instance_is_kept_by_default(start_node: StartNode, tmp_path: Path) -> None:
    [image] = small_study(tmp_path / "in")
    node = start_node()
    assert _send(node, image) == 0x0000
    record = node.index.instance(_sop(image))
    assert record is not None
    first = Path(record.path).read_bytes()
    assert _send(node, _edited_copy(image, tmp_path / "again")) == 0x0000
    assert Path(record.path).read_bytes() == first
    study = node.index.study(record.study_instance_uid)
    assert study is not None and study.instance_count == 1


def test_repeated_instance_replaces_the_file_and_the_index_row_when_configured(
    start_node: StartNode, tmp_path: Path
) -> None:
    [image] = small_study(tmp_path / "in")

    def replace(config: NodeConfig) -> None:
        config.storage.on_duplicate = "replace"

    node = start_node(replace)
    assert _send(node, image) == 0x0000
    edited = _edited_copy(image, tmp_path / "again")
    assert _send(node, edited) == 0x0000
    record = node.index.instance(_sop(image))
    assert record is not None
    stored = pydicom.dcmread(record.path)
    assert stored.ImageComments == "corrected"
    assert record.size_bytes == Path(record.path).stat().st_size
    assert [p.name for p in _files_under(node.spool.root)] == [Path(record.path).name]
    study = node.index.study(record.study_instance_uid)
    assert study is not None and study.instance_count == 1


def test_known_instance_whose_file_is_gone_is_stored_again(
    start_node: StartNode, tmp_path: Path
) -> None:
    [image] = small_study(tmp_path / "in")
    node = start_node()
    assert _send(node, image) == 0x0000
    record = node.index.instance(_sop(image))
    assert record is not None
    Path(record.path).unlink()
    assert _send(node, image) == 0x0000
    assert pydicom.dcmread(record.path).SOPInstanceUID == record.sop_instance_uid


def test_known_instance_sent_again_under_another_series_is_kept_where_it_was(
    start_node: StartNode, tmp_path: Path
) -> None:
    [image] = small_study(tmp_path / "in")
    node = start_node()
    assert _send(node, image) == 0x0000
    record = node.index.instance(_sop(image))
    assert record is not None
    moved = tmp_path / "moved.dcm"
    ds = pydicom.dcmread(image)
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(moved, enforce_file_format=True)

    assert _send(node, moved) == 0x0000
    again = node.index.instance(_sop(image))
    assert again == record, "the index row still describes the first copy"
    assert _files_under(node.spool.root) == [Path(record.path)], "no second copy is left"


def test_known_instance_sent_again_under_another_series_moves_when_replace_is_configured(
    start_node: StartNode, tmp_path: Path
) -> None:
    [image] = small_study(tmp_path / "in")

    def replace(config: NodeConfig) -> None:
        config.storage.on_duplicate = "replace"

    node = start_node(replace)
    assert _send(node, image) == 0x0000
    moved = tmp_path / "moved.dcm"
    ds = pydicom.dcmread(image)
    ds.SeriesInstanceUID = generate_uid()
    ds.save_as(moved, enforce_file_format=True)

    assert _send(node, moved) == 0x0000
    record = node.index.instance(_sop(image))
    assert record is not None and record.series_instance_uid == ds.SeriesInstanceUID
    assert _files_under(node.spool.root) == [Path(record.path)], "the old copy is removed"
    assert pydicom.dcmread(record.path).SeriesInstanceUID == ds.SeriesInstanceUID


def test_staged_file_starts_writing_out_each_piece_as_it_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import sys

    from dicom_node import spool

    if sys.platform.startswith("linux"):
        assert spool._writeback_starter() is not None, "sync_file_range not found in libc"
    started: list[tuple[int, int]] = []

    def record(fd: int, offset: int, length: int, flags: int) -> int:
        started.append((offset, length))
        return 0

    monkeypatch.setattr(spool, "_start_writeback", record)
    piece = os.urandom(100_000)
    staged = spool.Spool(tmp_path / "spool").stage()
    for _ in range(8):
        staged.write(piece)
    step = spool.WRITEBACK_STEP
    assert [offset for offset, _ in started] == [0, 300_000]  # at 300 000 and 600 000 bytes
    assert all(step <= length < step + len(piece) for _, length in started)
    target = tmp_path / "spool" / "1.2" / "1.2.3" / "1.2.3.4.dcm"
    staged.publish(target)
    assert target.read_bytes() == piece * 8


@pytest.mark.parametrize("on_duplicate", ["keep", "replace"])
def test_two_copies_of_one_instance_arriving_at_once_leave_the_row_describing_the_file(
    start_node: StartNode, tmp_path: Path, on_duplicate: str
) -> None:
    """Two associations send one SOP Instance UID with different content at the same moment.

    Whichever copy ends up on disk, the index row must describe it (its size, its transfer
    syntax), and the spool must hold one file for it. Each round is a new SOP Instance UID.
    """

    def configure(config: NodeConfig) -> None:
        config.storage.on_duplicate = on_duplicate  # type: ignore[assignment]

    node = start_node(configure)
    [image] = small_study(tmp_path / "in", size=256)
    ds = pydicom.dcmread(image)
    explicit, implicit = ExplicitVRLittleEndian, ImplicitVRLittleEndian
    senders = [_Sender(node.port, ds.SOPClassUID, ts) for ts in (explicit, implicit)]
    try:
        for round_ in range(25):
            ds.SOPInstanceUID = generate_uid()
            copies = []
            for number, ts in enumerate((explicit, implicit)):
                copy = pydicom.Dataset(ds)
                copy.file_meta = pydicom.dataset.FileMetaDataset(ds.file_meta)
                copy.file_meta.TransferSyntaxUID = ts
                copy.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
                copy.ImageComments = "x" * (10 + 1000 * number)  # the copies differ in size
                copies.append(copy)
            barrier = threading.Barrier(2)
            statuses: list[int] = [0, 0]

            def send(
                i: int,
                barrier: threading.Barrier,
                copies: list[pydicom.Dataset],
                statuses: list[int],
            ) -> None:
                barrier.wait()
                statuses[i] = senders[i].send(copies[i])

            threads = [
                threading.Thread(target=send, args=(i, barrier, copies, statuses)) for i in range(2)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert statuses == [0, 0], f"round {round_}"
            record = node.index.instance(str(ds.SOPInstanceUID))
            assert record is not None
            on_disk = Path(record.path)
            stored = pydicom.dcmread(on_disk, stop_before_pixels=True)
            assert record.size_bytes == on_disk.stat().st_size, f"round {round_}: size"
            assert record.transfer_syntax_uid == stored.file_meta.TransferSyntaxUID, (
                f"round {round_}: the row describes the other copy than the file"
            )
            found = list(node.spool.root.rglob(f"{ds.SOPInstanceUID}.dcm"))
            assert found == [on_disk]
    finally:
        for sender in senders:
            sender.close()


class _Sender:
    """One association kept open, proposing one transfer syntax, sending data sets on demand."""

    def __init__(self, port: int, sop_class: str, transfer_syntax: str) -> None:
        ae = AE(ae_title="RACER")
        ae.add_requested_context(sop_class, transfer_syntax)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
        assert self.assoc.is_established

    def send(self, ds: pydicom.Dataset) -> int:
        return int(self.assoc.send_c_store(ds).Status)

    def close(self) -> None:
        self.assoc.release()


# --- limits while an instance arrives ---------------------------------------------------------


def _large_image(folder: Path, rows: int, columns: int) -> Path:
    """A valid DX image of ``rows`` x ``columns`` 16-bit pixels, uncompressed."""
    [path] = small_study(folder)
    ds = pydicom.dcmread(path)
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = b"\x10\x02" * (rows * columns)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = folder / "large.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


def _left_in_spool(node: DicomNode) -> list[Path]:
    return _files_under(node.spool.root)


def test_an_instance_above_max_instance_bytes_is_cut_off_and_leaves_nothing(
    start_node: StartNode, tmp_path: Path
) -> None:
    def small_limit(config: NodeConfig) -> None:
        config.listener.max_instance_bytes = 1 << 20

    node = start_node(small_limit)
    big = _large_image(tmp_path / "in", 1024, 1024)  # 2 MB of pixels
    result = storescu([big], host="127.0.0.1", port=node.port, called_aet="PACSAI")
    assert result.returncode != 0, "the sender must not hear success"
    assert node.index.instance(_sop(big)) is None
    assert _left_in_spool(node) == [], "nothing of it may stay behind"
    # The same limit on pynetdicom's path, and the listener serves on.
    assert _send(node, big) == NO_ANSWER
    assert _left_in_spool(node) == []
    [small] = small_study(tmp_path / "ok")
    assert _send(node, small) == 0x0000


def test_a_disk_that_crosses_its_watermark_during_receipt_stops_the_instance_at_once(
    start_node: StartNode, tmp_path: Path
) -> None:
    """One sender must not fill the disk: the watermark holds while the bytes arrive."""
    big = _large_image(tmp_path / "in", 4096, 8192)  # 64 MiB of pixels
    usage = shutil.disk_usage(tmp_path)
    used = usage.total - usage.free
    # The watermark lies 16 MiB above what is used now: the instance crosses it a quarter in.
    watermark = (used + (16 << 20)) / usage.total

    def tight(config: NodeConfig) -> None:
        config.storage.max_disk_used_fraction = watermark

    node = start_node(tight)
    peak = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            now = shutil.disk_usage(tmp_path)
            peak[0] = max(peak[0], now.total - now.free)
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        status = _send(node, big)
    finally:
        done.set()
        watcher.join()
    assert status == OUT_OF_RESOURCES
    assert _left_in_spool(node) == []
    assert node.index.list_quarantine() == [], "a full disk is not the sender's fault"
    grew_mib = (peak[0] - used) / (1 << 20)
    print(f"\nthe disk grew by at most {grew_mib:.1f} MiB while a refused 64 MiB instance arrived")
    # The instance is 64 MiB; the spool stopped writing it about when the watermark was crossed.
    assert grew_mib < 40, f"the disk took {grew_mib:.0f} MiB of a refused instance"


def test_an_image_declaring_more_pixels_than_any_pipeline_decodes_is_refused_at_receipt(
    start_node: StartNode, tmp_path: Path
) -> None:
    from tests.images import rle_bomb

    node = start_node()
    bomb = rle_bomb(tmp_path / "in", 12000, 12000)  # 2.3 MB on the wire, 288 MB decoded
    status = _send(node, bomb)
    assert status == 0xC000
    assert node.index.instance(_sop(bomb)) is None
    [entry] = node.index.list_quarantine()
    assert "images.max_frame_pixels" in entry.reason and "12000 x 12000" in entry.reason
