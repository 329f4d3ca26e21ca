"""The SR outbox against a real Orthanc (and strict pynetdicom SCPs): objects made while the PACS is
down arrive exactly once when it returns, re-runs leave one copy, refusals are dead letters an
operator sees and revives, and a dead destination's circuit opens and closes.

The dispatcher runs on an injected clock: hours of backoff pass in a few passes, nobody sleeps.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt

from dicom_node.index import DeliveryStatus, Index
from dicom_node.scu import STUDY_ROOT_FIND
from dicom_node.settings import DestinationSettings, DestinationTLSSettings
from tests.dicom_node.helpers import small_study
from tests.pki import make_pki
from tests.servers import Orthanc, free_port
from worker.cli import main
from worker.findings import FindingResult, ModelCard
from worker.outbox import OutboxDispatcher, enqueue_outputs
from worker.outputs.sr import build_findings_sr
from worker.settings import OutputSettings

CARD = ModelCard(
    "pacs-ai-demo-cxr-triage", "1.0.0", "pacs-ai-worker", ("pneumothorax",), True, "ab" * 32
)
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
T0 = 1_700_000_000.0


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    yield index
    index.close()


def make_output(index: Index, folder: Path, seed: int, now: float = T0) -> str:
    """A findings SR of a phantom study, written and recorded as a job would; return its UID."""
    paths = small_study(folder / f"study-{seed}", seed=seed, patient_id=f"T-{seed:04d}")
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    uids = tuple(str(s.SOPInstanceUID) for s in sources)
    sr = build_findings_sr(
        sources,
        [FindingResult("pneumothorax", 0.93, 0.5, True, uids)],
        CARD,
        manufacturer="pacs-ai-worker",
    )
    path = folder / "outputs" / f"{sr.SOPInstanceUID}.dcm"
    path.parent.mkdir(parents=True, exist_ok=True)
    sr.save_as(path, enforce_file_format=True)
    uid = str(sr.SOPInstanceUID)
    index.record_output(uid, str(sr.StudyInstanceUID), f"job-{seed}", "findings-sr", str(path), now)
    return uid


def destination(port: int, ae_title: str = "ORTHANC", name: str = "pacs") -> DestinationSettings:
    return DestinationSettings(
        name=name, ae_title=ae_title, host="127.0.0.1", port=port, timeout_s=5
    )


def outputs_to(*dests: DestinationSettings, **options: Any) -> OutputSettings:
    return OutputSettings(destinations=list(dests), **options)


def rows(index: Index, uid: str) -> list[dict[str, Any]]:
    return index.deliveries_of(uid)


def next_due(index: Index, dest: str) -> float:
    """When the dispatcher would next do something: the earliest due row, or the circuit's end."""
    due = [
        d["next_attempt_at"]
        for d in index.list_deliveries(DeliveryStatus.PENDING, limit=1000)
        if d["destination"] == dest
    ]
    circuit = index.delivery_circuit(dest)
    start = min(due)
    if circuit is not None and circuit["open_until"] is not None:
        start = max(start, circuit["open_until"])
    return float(start)


@contextmanager
def store_scp(
    sop_classes: list[str],
    answer: Callable[[Dataset], int] = lambda _: 0x0000,
    ssl_context: ssl.SSLContext | None = None,
) -> Iterator[tuple[int, list[Dataset]]]:
    """A real pynetdicom storage SCP that supports only ``sop_classes`` and answers ``answer``."""
    received: list[Dataset] = []

    def handle(event: Any) -> int:
        ds = event.dataset
        received.append(ds)
        return answer(ds)

    ae = AE(ae_title="STRICT")
    for sop_class in sop_classes:
        ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, handle)],
        ssl_context=ssl_context,
    )
    assert server is not None
    try:
        yield port, received
    finally:
        server.shutdown()


def cli(tmp_path: Path, index: Index, *args: str) -> int:
    config = tmp_path / "site.yaml"
    config.write_text(f"index:\n  url: {index.url}\n")
    return main([*args, "--config", str(config)])


def test_objects_made_while_the_pacs_is_down_arrive_exactly_once_when_it_returns(
    tmp_path: Path, index: Index, orthanc: Orthanc
) -> None:
    settings = outputs_to(destination(orthanc.dicom_port))
    dispatcher = OutboxDispatcher(index, settings)
    orthanc.stop()
    uids = [make_output(index, tmp_path, seed) for seed in (1, 2, 3)]
    assert enqueue_outputs(index, settings, [(u, "findings-sr") for u in uids], now=T0) == 3

    # The PACS is down for two minutes; the dispatcher keeps polling every 5 s.
    now = T0
    while now < T0 + 120:
        assert dispatcher.run_once(now).delivered == 0
        now += 5
    for uid in uids:
        [row] = rows(index, uid)
        assert row["status"] == "pending" and row["attempts"] >= 2
        assert row["last_status"] is None and "association with ORTHANC@" in row["last_error"]
    assert index.delivery_circuit("pacs")["consecutive_failures"] >= settings.circuit_failures

    orthanc.start()
    delivered_in_one_pass = []
    while now < T0 + 3600 and index.list_deliveries(DeliveryStatus.PENDING):
        result = dispatcher.run_once(now)
        if result.delivered:
            delivered_in_one_pass.append(result.delivered)
        now += 5
    assert delivered_in_one_pass == [3], "all three on the one association of one pass"
    assert dispatcher.run_once(now + 86400).delivered == 0, "nothing is sent twice"

    assert len(orthanc.instances()) == 3
    for uid in uids:
        assert orthanc.find_sop(uid) is not None
        [row] = rows(index, uid)
        assert row["status"] == "delivered" and row["last_status"] == 0x0000
        assert row["delivered_at"] >= T0 + 120
    circuit = index.delivery_circuit("pacs")
    assert circuit["consecutive_failures"] == 0 and circuit["open_until"] is None


def test_running_the_same_study_twice_leaves_one_copy_in_the_pacs(
    tmp_path: Path, index: Index, orthanc: Orthanc
) -> None:
    settings = outputs_to(destination(orthanc.dicom_port))
    dispatcher = OutboxDispatcher(index, settings)
    first = make_output(index, tmp_path / "run-1", seed=7)
    enqueue_outputs(index, settings, [(first, "findings-sr")], now=T0)
    assert dispatcher.run_once(T0).delivered == 1
    second = make_output(index, tmp_path / "run-2", seed=7, now=T0 + 60)
    assert second == first, "same inputs and model: same SOP Instance UID"
    assert enqueue_outputs(index, settings, [(second, "findings-sr")], now=T0 + 60) == 0
    assert dispatcher.run_once(T0 + 60).delivered == 0

    assert len(orthanc.instances()) == 1
    [row] = rows(index, first)
    assert row["status"] == "delivered" and row["attempts"] == 1


def test_a_destination_that_refuses_sr_makes_a_dead_letter_the_cli_shows_and_revives(
    tmp_path: Path, index: Index, orthanc: Orthanc, capsys: pytest.CaptureFixture[str]
) -> None:
    uid = make_output(index, tmp_path, seed=4)
    with store_scp([CTImageStorage]) as (port, received):
        settings = outputs_to(destination(port, ae_title="STRICT"))
        enqueue_outputs(index, settings, [(uid, "findings-sr")], now=T0)
        result = OutboxDispatcher(index, settings).run_once(T0)
    assert (result.delivered, result.retrying, result.dead) == (0, 0, 1)
    assert received == []
    [row] = rows(index, uid)
    assert row["status"] == "dead" and row["attempts"] == 1
    assert COMPREHENSIVE_SR in row["last_error"]
    circuit = index.delivery_circuit("pacs")
    assert circuit["consecutive_failures"] == 0, (
        "the destination answered: not a connection failure"
    )

    assert cli(tmp_path, index, "outbox", "list", "--state", "dead") == 0
    out = capsys.readouterr().out
    assert f"{row['id']:>6}" in out and "dead" in out and uid in out
    assert "accepts no presentation context" in out
    assert cli(tmp_path, index, "outbox", "list", "--state", "pending") == 0
    assert uid not in capsys.readouterr().out

    # The admin points the destination at the right PACS and revives the dead letter.
    fixed = outputs_to(destination(orthanc.dicom_port))
    assert cli(tmp_path, index, "outbox", "retry", str(row["id"])) == 0
    [revived] = rows(index, uid)
    assert revived["status"] == "pending"
    assert OutboxDispatcher(index, fixed).run_once(revived["next_attempt_at"]).delivered == 1
    assert orthanc.find_sop(uid) is not None
    [row] = rows(index, uid)
    assert row["status"] == "delivered" and row["attempts"] == 2


def test_failure_statuses_that_will_not_change_are_dead_at_once_and_out_of_resources_waits(
    tmp_path: Path, index: Index
) -> None:
    bad, busy = make_output(index, tmp_path, seed=5), make_output(index, tmp_path, seed=6)
    answers = {bad: 0xA900, busy: 0xA700}
    with store_scp([COMPREHENSIVE_SR], lambda ds: answers[str(ds.SOPInstanceUID)]) as (port, got):
        settings = outputs_to(destination(port, ae_title="STRICT"))
        enqueue_outputs(index, settings, [(bad, "findings-sr"), (busy, "findings-sr")], now=T0)
        result = OutboxDispatcher(index, settings).run_once(T0)
    assert len(got) == 2, "both sent on the one association"
    assert (result.delivered, result.retrying, result.dead) == (0, 1, 1)
    [dead] = rows(index, bad)
    assert dead["status"] == "dead" and dead["last_status"] == 0xA900
    [waiting] = rows(index, busy)
    assert waiting["status"] == "pending" and waiting["last_status"] == 0xA700
    assert waiting["next_attempt_at"] > T0


def test_circuit_opens_after_repeated_connection_failures_and_closes_after_the_cooldown(
    tmp_path: Path, index: Index, orthanc: Orthanc
) -> None:
    settings = outputs_to(
        destination(orthanc.dicom_port), circuit_failures=3, circuit_cooldown_s=600
    )
    dispatcher = OutboxDispatcher(index, settings)
    orthanc.stop()
    uid = make_output(index, tmp_path, seed=8)
    enqueue_outputs(index, settings, [(uid, "findings-sr")], now=T0)
    now = T0
    for _ in range(3):
        now = next_due(index, "pacs")
        assert dispatcher.run_once(now).retrying == 1
    circuit = index.delivery_circuit("pacs")
    assert circuit["open_until"] == pytest.approx(now + 600)

    orthanc.start()
    [row] = rows(index, uid)
    assert row["next_attempt_at"] < circuit["open_until"], "the row is due, the circuit holds it"
    held = dispatcher.run_once(circuit["open_until"] - 1)
    assert held.held_back == 1 and held.delivered == 0
    assert rows(index, uid)[0]["attempts"] == 3, "no attempt while the circuit is open"
    assert orthanc.instances() == []

    # Cool-down over: one probe (and only one) may go.
    after = circuit["open_until"]
    assert dispatcher.run_once(after).delivered == 1
    assert orthanc.find_sop(uid) is not None
    circuit = index.delivery_circuit("pacs")
    assert circuit["consecutive_failures"] == 0 and circuit["open_until"] is None


def test_only_one_sender_probes_a_cooled_down_destination(index: Index) -> None:
    for _ in range(3):
        index.record_destination_result("pacs", T0, error="refused", open_after=3, cooldown_s=60)
    assert not index.admit_to_destination("pacs", T0 + 59, probe_until=T0 + 100)
    assert index.admit_to_destination("pacs", T0 + 60, probe_until=T0 + 100)
    assert not index.admit_to_destination("pacs", T0 + 61, probe_until=T0 + 101), "probe running"
    index.record_destination_result("pacs", T0 + 62, error="refused", open_after=3, cooldown_s=60)
    assert not index.admit_to_destination("pacs", T0 + 63, probe_until=T0 + 110), "reopened"
    assert index.admit_to_destination("pacs", T0 + 122, probe_until=T0 + 150)


def test_a_destination_down_past_the_retry_horizon_makes_dead_letters_then_purge_removes_them(
    tmp_path: Path, index: Index, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = outputs_to(
        destination(free_port()), retry_horizon_s=6 * 3600, retry_max_delay_s=1800
    )
    dispatcher = OutboxDispatcher(index, settings)
    uid = make_output(index, tmp_path, seed=9)
    enqueue_outputs(index, settings, [(uid, "findings-sr")], now=T0)
    for _ in range(200):
        if rows(index, uid)[0]["status"] != "pending":
            break
        dispatcher.run_once(next_due(index, "pacs"))
    [row] = rows(index, uid)
    assert row["status"] == "dead" and "gave up" in row["last_error"]
    assert T0 + 6 * 3600 <= row["dead_at"] <= T0 + 6 * 3600 + 60, "given up at the horizon"
    assert 10 < row["attempts"] < 60, "backoff: far fewer tries than polls over six hours"

    assert cli(tmp_path, index, "outbox", "purge", "--dead", "--older-than", "1") == 0
    assert rows(index, uid) == [], "dead since 2027: older than a day"
    capsys.readouterr()


def test_with_find_verification_a_delivery_counts_only_once_the_pacs_finds_the_object(
    tmp_path: Path, index: Index, orthanc: Orthanc
) -> None:
    uid = make_output(index, tmp_path, seed=10)
    dest = destination(orthanc.dicom_port).model_copy(update={"verify": "find"})
    settings = outputs_to(dest)
    enqueue_outputs(index, settings, [(uid, "findings-sr")], now=T0)
    assert OutboxDispatcher(index, settings).run_once(T0).delivered == 1
    [row] = rows(index, uid)
    assert row["status"] == "delivered" and row["last_error"] is None


def test_with_find_verification_a_pacs_that_loses_what_it_acknowledged_gets_it_again(
    tmp_path: Path, index: Index
) -> None:
    """A node that answers 0x0000 to C-STORE but whose C-FIND never finds the object."""
    uid = make_output(index, tmp_path, seed=11)
    ae = AE(ae_title="LOSSY")
    ae.add_supported_context(COMPREHENSIVE_SR, ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(STUDY_ROOT_FIND)
    stored: list[str] = []

    def on_store(event: Any) -> int:
        stored.append(str(event.dataset.SOPInstanceUID))
        return 0x0000

    def on_find(event: Any) -> Iterator[tuple[int, Dataset | None]]:
        yield 0x0000, None

    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_C_FIND, on_find)],
    )
    try:
        dest = destination(port, ae_title="LOSSY").model_copy(update={"verify": "find"})
        settings = outputs_to(dest)
        enqueue_outputs(index, settings, [(uid, "findings-sr")], now=T0)
        dispatcher = OutboxDispatcher(index, settings)
        assert dispatcher.run_once(T0).retrying == 1
        [row] = rows(index, uid)
        assert row["status"] == "pending" and "does not find" in row["last_error"]
        dispatcher.run_once(row["next_attempt_at"])
    finally:
        server.shutdown()
    assert stored == [uid, uid], "sent again on the next attempt"


def test_key_object_selections_go_only_to_destinations_that_ask_for_them(index: Index) -> None:
    plain = destination(104, name="plain")
    keen = destination(105, name="keen").model_copy(update={"kos": True})
    settings = outputs_to(plain, keen)
    created = enqueue_outputs(index, settings, [("2.25.1", "findings-sr"), ("2.25.2", "kos")], T0)
    assert created == 3
    assert {r["destination"] for r in rows(index, "2.25.1")} == {"plain", "keen"}
    assert {r["destination"] for r in rows(index, "2.25.2")} == {"keen"}


def test_delivery_over_mutual_tls_reaches_a_tls_pacs_and_plain_tcp_does_not(
    tmp_path: Path, index: Index
) -> None:
    pki = make_pki(tmp_path / "pki")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki.ca))
    server.load_cert_chain(pki.server.cert, pki.server.key)
    server.verify_mode = ssl.CERT_REQUIRED  # the PACS wants our client certificate
    with store_scp([COMPREHENSIVE_SR], ssl_context=server) as (port, received):
        tls = DestinationTLSSettings(
            enabled=True, ca_file=pki.ca, cert_file=pki.client.cert, key_file=pki.client.key
        )
        secure = destination(port, "STRICT", "secure").model_copy(update={"tls": tls})
        plain = destination(port, "STRICT", "plain")
        settings = outputs_to(secure, plain)
        uid = make_output(index, tmp_path, seed=11)
        enqueue_outputs(index, settings, [(uid, "findings-sr")], now=T0)
        OutboxDispatcher(index, settings).run_once(T0)

    status = {row["destination"]: row["status"] for row in rows(index, uid)}
    assert status == {"secure": "delivered", "plain": "pending"}
    assert [str(ds.SOPInstanceUID) for ds in received] == [uid]
