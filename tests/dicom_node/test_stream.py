"""Data sets written into the spool as they arrive: byte for byte what the sender encoded; a sender
that dies mid-image or a disk that fails mid-image leaves nothing behind, and the sender of a
failed write gets 0xA700."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF

from dicom_node.node import DicomNode
from tests.dicom_node.conftest import make_config
from tests.dicom_node.helpers import c_echo, dataset_bytes, send_raw, small_study
from tests.servers import free_port, storescu

OUT_OF_RESOURCES = 0xA700


def _leftovers(node_data: Path) -> list[Path]:
    return [p for p in (node_data / "spool" / ".incoming").glob("*") if p.is_file()]


def _wait(condition: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return True
        time.sleep(0.05)
    return False


def _assert_cut_off_left_nothing(node: DicomNode, sop_instance_uid: str) -> None:
    """After a data set was cut off: no staged file, no index row, and the listener answers."""
    data_dir = node.config.storage.data_dir
    assert _wait(lambda: _leftovers(data_dir) == []), "the cut-off data set stayed in the spool"
    assert node.index.instance(sop_instance_uid) is None
    assert c_echo(node.port) == 0x0000


def _cut_off_store(node: DicomNode, image: Path, calling_aet: str) -> Any:
    """An association that sent a C-STORE command and the first few PDUs of its data set only."""
    assoc, sock, pdus = _raw_store(node, image, calling_aet)
    for pdu in pdus[:5]:
        sock.sendall(pdu)
    return assoc, sock, pdus


def _raw_store(node: DicomNode, image: Path, calling_aet: str) -> tuple[Any, Any, list[bytes]]:
    """An association to ``node``, its socket, and the encoded PDUs of a C-STORE of ``image``.

    The test writes the PDUs itself, so it can stop part-way or send something else instead.
    """
    ds = pydicom.dcmread(image)
    ae = AE(ae_title=calling_aet)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSAI")
    assert assoc.is_established
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = ds.SOPClassUID
    request.AffectedSOPInstanceUID = ds.SOPInstanceUID
    request.Priority = 2
    request.DataSet = BytesIO(dataset_bytes(image.read_bytes()))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    assert context_id is not None
    assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    pdus = [P_DATA_TF(p).encode() for p in message.encode_msg(context_id, 16384)]
    return assoc, assoc.dul.socket.socket, pdus


def test_large_image_is_stored_byte_for_byte_as_sent(node: DicomNode, tmp_path: Path) -> None:
    # 1600x1600, 16 bit: about 5 MB, so forty-odd PDUs at the listener's 128 KiB maximum.
    [image] = small_study(tmp_path / "in", size=1600)
    result = storescu([image], host="127.0.0.1", port=node.port, called_aet="PACSAI")
    assert result.returncode == 0, result.stderr

    record = node.index.instance(
        str(pydicom.dcmread(image, stop_before_pixels=True).SOPInstanceUID)
    )
    assert record is not None
    stored = Path(record.path).read_bytes()
    assert dataset_bytes(stored) == dataset_bytes(image.read_bytes())
    assert record.size_bytes == len(stored)
    meta = pydicom.dcmread(record.path, stop_before_pixels=True).file_meta
    assert (
        meta.TransferSyntaxUID
        == pydicom.dcmread(image, stop_before_pixels=True).file_meta.TransferSyntaxUID
    )
    assert _leftovers(node.config.storage.data_dir) == []


def test_sender_that_dies_mid_image_leaves_nothing_and_the_listener_keeps_serving(
    node: DicomNode, tmp_path: Path
) -> None:
    [image] = small_study(tmp_path / "in", size=1600)
    ds = pydicom.dcmread(image)
    assoc, sock, pdus = _raw_store(node, image, "HALFSCU")
    # The command and the first part of the data set, never the rest: the sender then dies.
    for pdu in pdus[: len(pdus) // 2]:
        sock.sendall(pdu)
    data_dir = node.config.storage.data_dir
    assert _wait(lambda: any(p.stat().st_size > 1_000_000 for p in _leftovers(data_dir))), (
        "the data set was not being written into the spool as it arrived"
    )
    assoc.abort()

    _assert_cut_off_left_nothing(node, str(ds.SOPInstanceUID))
    assert send_raw(image, node.port, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) == 0x0000
    assert node.index.instance(str(ds.SOPInstanceUID)) is not None


def _limit_file_size() -> None:
    # Files may not grow past 2 MB in this process: a disk that fails in the middle of an image.
    resource.setrlimit(resource.RLIMIT_FSIZE, (2_000_000, 2_000_000))
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a signal


def test_write_failing_mid_image_answers_0xA700_and_leaves_nothing(
    tmp_path: Path, redis_url: str
) -> None:
    from worker.settings import Settings, write_settings

    port = free_port()
    settings = Settings()
    settings.listener.port = port
    settings.storage.data_dir = tmp_path / "data"
    settings.queue.broker_url = redis_url
    config = tmp_path / "site.yaml"
    write_settings(settings, config)
    [big] = small_study(tmp_path / "big", size=1600)
    [small] = small_study(tmp_path / "small", seed=2)
    log = tmp_path / "node.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "node", "--config", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).resolve().parents[2],
            preexec_fn=_limit_file_size,
        )
    try:
        assert _wait(lambda: _answers(port), timeout=60), log.read_text()
        for image, expected in ((big, OUT_OF_RESOURCES), (small, 0x0000)):
            ds = pydicom.dcmread(image, stop_before_pixels=True)
            status = send_raw(image, port, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            assert status == expected, log.read_text()
        assert _leftovers(settings.storage.data_dir) == []
        stored = [p.name for p in (settings.storage.data_dir / "spool").rglob("*.dcm")]
        small_uid = str(pydicom.dcmread(small, stop_before_pixels=True).SOPInstanceUID)
        assert stored == [f"{small_uid}.dcm"], "only the instance that got success is kept"
        assert "File too large" in log.read_text(), "the operator is not told why"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _answers(port: int) -> bool:
    try:
        return c_echo(port) == 0x0000
    except AssertionError:
        return False


def test_file_meta_written_for_a_streamed_data_set_is_what_pynetdicom_would_write() -> None:
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta, encode_file_meta

    from dicom_node.stream import file_preamble

    for sop_class, sop_instance, syntax in (
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", "1.2.840.10008.1.2.1"),  # odd lengths
        ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4", "1.2.840.10008.1.2"),  # even lengths
    ):
        meta = create_file_meta(
            sop_class_uid=UID(sop_class),
            sop_instance_uid=UID(sop_instance),
            transfer_syntax=UID(syntax),
        )
        expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
        assert file_preamble(sop_class, sop_instance, syntax) == expected
        # With the AE titles of the association: pydicom's encoding of the same file meta.
        meta.SendingApplicationEntityTitle = "MODALITY1"
        meta.ReceivingApplicationEntityTitle = "PACSAI"
        expected = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
        assert file_preamble(sop_class, sop_instance, syntax, "MODALITY1", "PACSAI") == expected


def test_c_store_response_written_directly_is_what_pynetdicom_would_send() -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP

    from dicom_node.stream import store_response_command

    for message_id, sop_class, sop_instance, status in (
        (1, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45", 0x0000),
        (65535, "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4", OUT_OF_RESOURCES),
    ):
        response = C_STORE()
        response.MessageIDBeingRespondedTo = message_id
        response.AffectedSOPClassUID = sop_class
        response.AffectedSOPInstanceUID = sop_instance
        response.Status = status
        message = C_STORE_RSP()
        message.primitive_to_message(response)
        [pdata] = list(message.encode_msg(1, 16384))
        [(_context_id, fragment)] = pdata.presentation_data_value_list
        assert fragment == b"\x03" + store_response_command(
            message_id, sop_class, sop_instance, status
        )


def test_pdu_announcing_gigabytes_ends_the_association_at_once(
    node: DicomNode, tmp_path: Path
) -> None:
    import socket
    import struct

    [image] = small_study(tmp_path / "in")
    assoc, sock, [command, *_data] = _raw_store(node, image, "BIGPDU")
    sock.sendall(command)
    # A P-DATA-TF header announcing 3 GB, and nothing after it.
    sock.sendall(struct.pack(">BBL", 0x04, 0, 3_000_000_000))
    raw = socket.socket(fileno=os.dup(sock.fileno()))
    raw.settimeout(10)
    try:
        assert raw.recv(1) == b"", "the listener kept waiting for the announced gigabytes"
    except ConnectionResetError:
        pass
    finally:
        raw.close()
        assoc.abort()
    assert _wait(lambda: _leftovers(node.config.storage.data_dir) == [])
    assert c_echo(node.port) == 0x0000


# --- C-STORE requests the reader answers itself ----------------------------------------------


@pytest.fixture
def one_process_node(tmp_path: Path, redis_url: str) -> Iterator[DicomNode]:
    """A node serving associations on threads of this process, where the test can watch them.

    Its network timeout is 2 s, so a stalled sender is dropped within the test.
    """
    config = make_config(tmp_path, redis_url)
    config.listener.processes = 1
    config.listener.network_timeout_s = 2.0
    n = DicomNode(config)
    n.start()
    yield n
    n.stop()


def _count_direct_answers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the message ID of every C-STORE the streaming reader answers itself."""
    from dicom_node.stream import DirectStore, StreamingDUL

    answered: list[int] = []
    original = StreamingDUL._answer

    def counting(self: StreamingDUL, direct: DirectStore) -> Any:
        answered.append(direct.message_id)
        return original(self, direct)

    monkeypatch.setattr(StreamingDUL, "_answer", counting)
    return answered


def test_store_request_read_off_the_wire_is_what_pynetdicom_decodes() -> None:
    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO

    from dicom_node.stream import parse_store_request

    def encoded(primitive: Any, message: Any) -> bytes:
        message.primitive_to_message(primitive)
        [pdata, *_] = list(message.encode_msg(1, 0))
        return bytes(pdata.presentation_data_value_list[0][1][1:])  # without the control byte

    request = C_STORE()
    request.MessageID = 7
    request.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    request.AffectedSOPInstanceUID = "1.2.3.45"
    request.Priority = 2
    request.DataSet = BytesIO(b"\x08\x00\x16\x00\x00\x00\x00\x00")
    command = encoded(request, C_STORE_RQ())
    assert parse_store_request(command) == (7, "1.2.840.10008.5.1.4.1.1.2", "1.2.3.45")

    # A C-STORE sub-operation of a C-MOVE names its originator; still a plain C-STORE.
    request.MoveOriginatorApplicationEntityTitle = "MOVER"
    request.MoveOriginatorMessageID = 3
    assert parse_store_request(encoded(request, C_STORE_RQ()))[0] == 7  # type: ignore[index]

    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    assert parse_store_request(encoded(echo, C_ECHO_RQ())) is None
    # An element a C-STORE-RQ does not have (retired Length to End) leaves it to pynetdicom.
    assert (
        parse_store_request(command + b"\x00\x00\x01\x00\x04\x00\x00\x00\x00\x00\x00\x00") is None
    )
    assert parse_store_request(command[:-3]) is None  # cut short


def test_sender_with_a_tiny_maximum_pdu_gets_its_answer_in_pieces(
    one_process_node: DicomNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    answered = _count_direct_answers(monkeypatch)
    [image] = small_study(tmp_path / "in")
    ds = pydicom.dcmread(image)
    ae = AE(ae_title="TINYPDU")
    ae.maximum_pdu_size = 64  # the C-STORE-RSP command set is longer than that
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", one_process_node.port, ae_title="PACSAI")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    assert status.Status == 0x0000
    assert answered == [1], "the listener did not answer this C-STORE in its reader"
    assert one_process_node.index.instance(str(ds.SOPInstanceUID)) is not None


def test_association_with_its_own_message_handler_takes_pynetdicoms_path(
    one_process_node: DicomNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom import evt

    answered = _count_direct_answers(monkeypatch)
    seen: list[str] = []
    server = one_process_node.pool.local
    assert server is not None
    server.bind(evt.EVT_DIMSE_RECV, lambda event: seen.append(type(event.message).__name__))
    [image] = small_study(tmp_path / "in")
    ds = pydicom.dcmread(image)
    result = storescu([image], host="127.0.0.1", port=one_process_node.port, called_aet="PACSAI")
    assert result.returncode == 0, result.stderr
    assert seen == ["C_STORE_RQ"], "a bound DIMSE handler did not see the C-STORE request"
    assert answered == []
    assert one_process_node.index.instance(str(ds.SOPInstanceUID)) is not None


def test_command_in_the_middle_of_a_data_set_aborts_and_leaves_nothing(
    one_process_node: DicomNode, tmp_path: Path
) -> None:
    [image] = small_study(tmp_path / "in", size=1600)
    ds = pydicom.dcmread(image)
    assoc, sock, pdus = _cut_off_store(one_process_node, image, "MIXEDUP")
    sock.sendall(pdus[0])  # a new C-STORE command before the data set is complete
    try:
        assert _wait(lambda: assoc.is_aborted), "the listener did not abort the association"
    finally:
        assoc.abort()
    _assert_cut_off_left_nothing(one_process_node, str(ds.SOPInstanceUID))


def test_echo_between_stores_on_one_association_is_answered(
    one_process_node: DicomNode, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    answered = _count_direct_answers(monkeypatch)
    images = small_study(tmp_path / "in", views=("PA", "LL"))
    first, second = (pydicom.dcmread(p) for p in images)
    ae = AE(ae_title="MIXSCU")
    ae.add_requested_context(first.SOPClassUID, first.file_meta.TransferSyntaxUID)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", one_process_node.port, ae_title="PACSAI")
    assert assoc.is_established
    try:
        # C-STOREs answered by the reader, a C-ECHO answered by pynetdicom in between.
        assert assoc.send_c_store(first).Status == 0x0000
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(second).Status == 0x0000
    finally:
        assoc.release()
    assert assoc.is_released
    assert len(answered) == 2
    for ds in (first, second):
        assert one_process_node.index.instance(str(ds.SOPInstanceUID)) is not None


def test_sender_stalling_mid_image_is_dropped_at_the_network_timeout(
    one_process_node: DicomNode, tmp_path: Path
) -> None:
    [image] = small_study(tmp_path / "in", size=1600)
    ds = pydicom.dcmread(image)
    assoc, _sock, _pdus = _cut_off_store(one_process_node, image, "STALLED")
    # Nothing more, and the connection stays open.
    try:
        assert _wait(lambda: not assoc.is_established, timeout=30), (
            "the stalled association was still open 30 s later (network timeout 2 s)"
        )
    finally:
        assoc.abort()
    _assert_cut_off_left_nothing(one_process_node, str(ds.SOPInstanceUID))


def test_cheap_copy_of_the_supported_contexts_is_a_whole_deep_copy() -> None:
    import copy

    from dicom_node.scp import build_ae
    from dicom_node.settings import ListenerSettings
    from dicom_node.stream import CheapCopyContexts

    contexts = build_ae(ListenerSettings()).supported_contexts
    cheap = copy.deepcopy(CheapCopyContexts(contexts))
    deep = copy.deepcopy(contexts)
    assert [vars(c) for c in cheap] == [vars(c) for c in deep]
    assert all(a is not b for a, b in zip(cheap, contexts, strict=True))
    cheap[0].add_transfer_syntax("1.2.840.10008.1.2.4.201")  # HTJ2K lossless
    cheap[0].context_id = 1
    assert "1.2.840.10008.1.2.4.201" not in contexts[0].transfer_syntax
    assert contexts[0].context_id is None


def test_remembered_uid_verdicts_are_pynetdicoms(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom import config as pydicom_config
    from pydicom.uid import UID
    from pynetdicom import _config
    from pynetdicom._validators import validate_ui

    from dicom_node import stream
    from dicom_node.stream import lighter_uid_checks

    monkeypatch.setitem(_config.VALIDATORS, "UI", validate_ui)
    # pydicom's own property (a node started by an earlier test may have replaced it already).
    pydicom_is_valid = stream._PYDICOM_IS_VALID
    monkeypatch.setattr(UID, "is_valid", pydicom_is_valid)
    saved_mode = pydicom_config.settings.reading_validation_mode
    try:
        lighter_uid_checks()
        lighter_uid_checks()  # twice: wraps once
        assert pydicom_config.settings.reading_validation_mode == pydicom_config.IGNORE
    finally:
        pydicom_config.settings.reading_validation_mode = saved_mode
    remembered = _config.VALIDATORS["UI"]
    assert remembered is not validate_ui
    assert remembered.validate is validate_ui  # type: ignore[attr-defined]
    samples = ["1.2.840.10008.1.1", "1.02.3", "1." + "2" * 64, "1.2.abc", ""]
    for enforce in (False, True, False):
        monkeypatch.setattr(_config, "ENFORCE_UID_CONFORMANCE", enforce)
        for value in samples * 2:
            assert remembered(UID(value)) == validate_ui(UID(value)), (value, enforce)
    assert remembered(42) == validate_ui(42)  # type: ignore[arg-type]
    # pydicom's own is_valid, remembered per string, says what it said.
    assert UID.__dict__["is_valid"] is not pydicom_is_valid
    for value in samples * 2:
        assert UID(value).is_valid == pydicom_is_valid.fget(UID(value)), value


def test_pynetdicom_log_asked_for_still_shows_the_listeners_associations(
    one_process_node: DicomNode, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    [image] = small_study(tmp_path / "in")
    caplog.set_level(logging.INFO, logger="pynetdicom")
    result = storescu([image], host="127.0.0.1", port=one_process_node.port, called_aet="PACSAI")
    assert result.returncode == 0, result.stderr
    assert _wait(lambda: "Association Released" in caplog.text)
    assert "Received Store Request" in caplog.text
