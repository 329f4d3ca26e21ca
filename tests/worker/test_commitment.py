"""Storage Commitment (``verify: commitment``) against a real Orthanc and the real listener.

Orthanc 1.10 answers the N-ACTION at once and sends the N-EVENT-REPORT later, on a new association
to the modality it knows by our calling AE title: here the node's listener (``dicom_node.scp``),
which records the report in the index. A row is delivered only then; without a report in time, or
with its object among the failed ones, it goes back to pending and is sent again.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, build_role, evt

from dicom_node.index import DeliveryStatus, Index
from dicom_node.quarantine import Quarantine
from dicom_node.scp import StorageSCP, build_ae, handlers
from dicom_node.scu import STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
from dicom_node.settings import CompletionSettings, DestinationSettings, ListenerSettings
from dicom_node.spool import Spool
from tests.servers import Orthanc, free_port
from tests.worker.test_outbox import COMPREHENSIVE_SR, T0, make_output, outputs_to, store_scp
from worker.outbox import OutboxDispatcher, enqueue_outputs

NODE_AET = "PACSAI"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    yield index
    index.close()


@pytest.fixture
def listener(tmp_path: Path, index: Index) -> Iterator[int]:
    """The node's real listener (AE PACSAI) on the test's index; yields its port."""
    settings = ListenerSettings(ae_title=NODE_AET, host="127.0.0.1", port=free_port())
    scp = StorageSCP(
        settings,
        CompletionSettings(),
        index,
        Spool(tmp_path / "spool"),
        Quarantine(tmp_path / "quarantine", index),
    )
    server = build_ae(settings).start_server(
        (settings.host, settings.port), block=False, evt_handlers=handlers(scp)
    )
    try:
        yield settings.port
    finally:
        server.shutdown()


def committing(port: int, timeout_s: float = 60.0) -> DestinationSettings:
    return DestinationSettings(
        name="pacs",
        ae_title="ORTHANC",
        host="127.0.0.1",
        port=port,
        timeout_s=5,
        calling_ae_title=NODE_AET,
        verify="commitment",
        commitment_timeout_s=timeout_s,
    )


def row_of(index: Index, uid: str) -> dict[str, Any]:
    [row] = index.deliveries_of(uid)
    return row


def wait_for_status(index: Index, uid: str, status: str, timeout: float = 15.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row = row_of(index, uid)
        if row["status"] == status or time.monotonic() > deadline:
            return row
        time.sleep(0.1)


def test_rows_are_delivered_only_when_orthanc_reports_the_commitment(
    tmp_path: Path, index: Index, listener: int, orthanc: Orthanc
) -> None:
    orthanc.add_modality("ai", (NODE_AET, "127.0.0.1", listener))
    settings = outputs_to(committing(orthanc.dicom_port))
    uids = [make_output(index, tmp_path, seed) for seed in (1, 2)]
    enqueue_outputs(index, settings, [(u, "findings-sr") for u in uids], now=T0)

    result = OutboxDispatcher(index, settings).run_once(T0)

    assert (result.delivered, result.committing, result.retrying) == (0, 2, 0)
    for uid in uids:
        assert orthanc.find_sop(uid) is not None
        row = wait_for_status(index, uid, "delivered")
        assert row["status"] == "delivered", (row, orthanc.log_tail())
        assert row["attempts"] == 1 and row["transaction_uid"] and row["last_error"] is None
    # Nothing is sent again.
    assert OutboxDispatcher(index, settings).run_once(T0 + 3600).committing == 0


def test_no_report_in_time_sends_again_and_the_next_report_delivers(
    tmp_path: Path, index: Index, listener: int, orthanc: Orthanc
) -> None:
    # Orthanc knows our node at a port where nobody listens: it commits, but cannot tell us.
    # (Orthanc refuses the N-ACTION of an AE title it does not know at all.)
    orthanc.add_modality("ai", (NODE_AET, "127.0.0.1", free_port()))
    settings = outputs_to(committing(orthanc.dicom_port, timeout_s=60))
    dispatcher = OutboxDispatcher(index, settings)
    uid = make_output(index, tmp_path, 3)
    enqueue_outputs(index, settings, [(uid, "findings-sr")], now=T0)

    assert dispatcher.run_once(T0).committing == 1
    time.sleep(2)  # long enough for Orthanc's report job to try and fail
    assert row_of(index, uid)["status"] == "committing"
    assert dispatcher.run_once(T0 + 30).retrying == 0  # still within the timeout
    assert row_of(index, uid)["status"] == "committing"

    assert dispatcher.run_once(T0 + 61).retrying == 1
    row = row_of(index, uid)
    assert row["status"] == "pending" and row["attempts"] == 1
    assert "no Storage Commitment report" in row["last_error"]

    orthanc.add_modality("ai", (NODE_AET, "127.0.0.1", listener))
    assert dispatcher.run_once(row["next_attempt_at"]).committing == 1
    row = wait_for_status(index, uid, "delivered")
    assert row["status"] == "delivered" and row["attempts"] == 2, (row, orthanc.log_tail())


@contextmanager
def failing_commitment_scp(listener_port: int) -> Iterator[int]:
    """A pynetdicom PACS that stores, then reports every object of a commitment as failed
    (reason 0x0110) on a new association to the listener, as Storage Commitment SCP."""
    ae = AE(ae_title="FAILING")
    ae.add_supported_context(COMPREHENSIVE_SR, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(STORAGE_COMMITMENT)
    ae.add_requested_context(STORAGE_COMMITMENT)

    def report(request: Dataset) -> None:
        info = Dataset()
        info.TransactionUID = request.TransactionUID
        failed = []
        for ref in request.ReferencedSOPSequence:
            item = Dataset()
            item.ReferencedSOPClassUID = ref.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = ref.ReferencedSOPInstanceUID
            item.FailureReason = 0x0110
            failed.append(item)
        info.FailedSOPSequence = failed
        assoc = ae.associate(
            "127.0.0.1",
            listener_port,
            ae_title=NODE_AET,
            ext_neg=[build_role(STORAGE_COMMITMENT, scp_role=True)],
        )
        assert assoc.is_established
        assoc.send_n_event_report(info, 2, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE)
        assoc.release()

    def handle_action(event: Any) -> tuple[int, None]:
        threading.Thread(target=report, args=(event.action_information,)).start()
        return 0x0000, None

    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, lambda _e: 0x0000), (evt.EVT_N_ACTION, handle_action)],
    )
    try:
        yield port
    finally:
        server.shutdown()


def test_objects_the_destination_fails_to_commit_are_sent_again_with_the_reason(
    tmp_path: Path, index: Index, listener: int
) -> None:
    with failing_commitment_scp(listener) as port:
        dest = committing(port).model_copy(update={"ae_title": "FAILING"})
        settings = outputs_to(dest)
        dispatcher = OutboxDispatcher(index, settings)
        uid = make_output(index, tmp_path, 4)
        enqueue_outputs(index, settings, [(uid, "findings-sr")], now=T0)

        assert dispatcher.run_once(T0).committing == 1
        deadline = time.monotonic() + 10
        while row_of(index, uid)["last_error"] is None and time.monotonic() < deadline:
            time.sleep(0.1)
        # The report made the row due at once; the next pass schedules the retry.
        assert dispatcher.run_once(T0 + 1).retrying == 1
    row = row_of(index, uid)
    assert row["status"] == DeliveryStatus.PENDING and row["attempts"] == 1
    assert "failed Storage Commitment with reason 0x0110" in row["last_error"]


def test_a_destination_without_storage_commitment_is_trusted_on_its_store_status(
    tmp_path: Path, index: Index
) -> None:
    # A strict SCP: SR storage only, neither Storage Commitment nor C-FIND.
    with store_scp([COMPREHENSIVE_SR]) as (port, received):
        dest = committing(port).model_copy(update={"ae_title": "STRICT"})
        settings = outputs_to(dest)
        uid = make_output(index, tmp_path, 5)
        enqueue_outputs(index, settings, [(uid, "findings-sr")], now=T0)
        result = OutboxDispatcher(index, settings).run_once(T0)
    assert (result.delivered, result.committing) == (1, 0)
    assert [str(ds.SOPInstanceUID) for ds in received] == [uid]
    assert row_of(index, uid)["status"] == "delivered"
