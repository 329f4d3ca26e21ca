"""The HTTP acknowledgement endpoint, against the real server: the link in an alert stops escalation."""

from __future__ import annotations

import socket
import struct
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.index import Index
from tests.servers import MllpReceiver, connect_from, free_port, seconds_until_closed
from worker.ackserver import AckServer, ack_url
from worker.alerting import AlertDispatcher, raise_alerts
from worker.demo.sink import WebhookSink
from worker.findings import FindingResult, ModelCard
from worker.settings import AlertSettings

CARD = ModelCard(
    "pacs-ai-demo-cxr-triage", "1.0.0", "pacs-ai-worker", ("pneumothorax",), True, "ab" * 32
)


def _sr(study: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.StudyInstanceUID = study
    ds.SOPInstanceUID = "2.25.99"
    ds.AccessionNumber = "ACC-9"
    ds.PatientID = "MRN-9"
    ds.PatientName = "DOE^JANE"
    return ds


def _urgent() -> list[FindingResult]:
    return [FindingResult("pneumothorax", 0.97, 0.5, True, ("1.2.3",))]


def _request(url: str, data: bytes | None = None) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=5) as r:
            return int(r.status), r.read().decode()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read().decode()


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = Index(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    yield idx
    idx.close()


@pytest.fixture
def settings(webhook_sink: WebhookSink) -> AlertSettings:
    s = AlertSettings()
    s.webhook.url = webhook_sink.url
    s.webhook.secret = "test-secret"
    s.escalation.after_s = 60
    s.escalation.webhook_url = webhook_sink.url.replace("/alerts", "/escalations")
    s.ack.secret = "ack-secret"
    s.ack.port = free_port()
    return s


@pytest.fixture
def server(index: Index, settings: AlertSettings) -> Iterator[AckServer]:
    srv = AckServer(index, settings.ack).start()
    yield srv
    srv.stop()


def _delivered_link(
    index: Index, settings: AlertSettings, sink: WebhookSink, study: str = "2.25.1"
) -> str:
    """Raise an alert, deliver it to the webhook and return the ack link the receiver got."""
    raise_alerts(index, settings, _urgent(), CARD, _sr(study), "main-pacs", now=1000.0)
    assert AlertDispatcher(index, settings).run_once(now=1000.0) == (1, 0)
    [(_, body)] = [r for r in sink.received() if r[1]["study_instance_uid"] == study]
    return str(body["ack_url"])


def test_the_link_in_the_alert_acknowledges_it_and_escalation_never_fires(
    index: Index, settings: AlertSettings, server: AckServer, webhook_sink: WebhookSink
) -> None:
    link = _delivered_link(index, settings, webhook_sink)
    assert link.startswith(f"http://127.0.0.1:{server.port}/alerts/")

    # Opening the link shows what is acknowledged, without patient identifiers, and changes nothing.
    status, page = _request(link)
    assert status == 200 and "Pneumothorax" in page and "ACC-9" in page
    assert "DOE" not in page and "MRN-9" not in page
    assert [r["acknowledged_at"] for r in index.list_alerts()] == [None]

    status, page = _request(link + "&by=dr.house&confirm=1")
    assert status == 200 and "dr.house" in page
    [row] = index.list_alerts()
    assert row["acknowledged_by"] == "dr.house"

    # An hour later the escalation pass finds nothing to escalate.
    AlertDispatcher(index, settings).run_once(now=1000.0 + 3600)
    assert len(webhook_sink.received()) == 1, "the alert, and no escalation"
    assert len(index.list_alerts()) == 1


def test_the_form_on_the_confirmation_page_acknowledges_by_post(
    index: Index, settings: AlertSettings, server: AckServer, webhook_sink: WebhookSink
) -> None:
    link = _delivered_link(index, settings, webhook_sink)
    path, _, query = link.partition("?")
    status, page = _request(path, data=(query + "&by=charge-radiologist").encode())
    assert status == 200 and "No escalation" in page
    assert index.list_alerts()[0]["acknowledged_by"] == "charge-radiologist"


def test_an_unacknowledged_alert_escalates(
    index: Index, settings: AlertSettings, webhook_sink: WebhookSink
) -> None:
    _delivered_link(index, settings, webhook_sink)
    AlertDispatcher(index, settings).run_once(now=1000.0 + 3600)
    assert len(webhook_sink.received()) == 2, "the alert, then its escalation"


def test_a_wrong_or_missing_token_is_forbidden_and_acknowledges_nothing(
    index: Index, settings: AlertSettings, server: AckServer, webhook_sink: WebhookSink
) -> None:
    link = _delivered_link(index, settings, webhook_sink)
    alert_id = index.list_alerts()[0]["id"]
    base = f"http://127.0.0.1:{server.port}/alerts/{alert_id}/ack"
    assert _request(base + "?confirm=1")[0] == 403
    assert _request(base + "?token=" + "0" * 64 + "&confirm=1")[0] == 403
    # A valid token of another alert does not open this one.
    other = ack_url(settings.ack, alert_id + 1).partition("?")[2]
    assert _request(f"{base}?{other}&confirm=1")[0] == 403
    assert _request(base, data=b"token=nope&by=x")[0] == 403
    status, page = _request(link.replace("token=", "token=x"))
    assert status == 403 and "ACC-9" not in page
    assert index.list_alerts()[0]["acknowledged_at"] is None


def test_an_unknown_alert_with_a_valid_token_is_not_found(
    settings: AlertSettings, server: AckServer
) -> None:
    status, _ = _request(ack_url(settings.ack, 424242) + "&confirm=1")
    assert status == 404


def test_alerts_carry_no_link_when_the_endpoint_is_not_configured(
    index: Index, settings: AlertSettings, webhook_sink: WebhookSink
) -> None:
    settings.ack.secret = None
    raise_alerts(index, settings, _urgent(), CARD, _sr("2.25.5"), "main-pacs", now=1000.0)
    AlertDispatcher(index, settings).run_once(now=1000.0)
    [(_, body)] = webhook_sink.received()
    assert "ack_url" not in body


def test_the_hl7_message_carries_the_link(index: Index, settings: AlertSettings) -> None:
    receiver = MllpReceiver().start()
    try:
        settings.webhook.url = None
        settings.hl7.host, settings.hl7.port = "127.0.0.1", receiver.port
        raise_alerts(index, settings, _urgent(), CARD, _sr("2.25.6"), "main-pacs", now=1000.0)
        assert AlertDispatcher(index, settings).run_once(now=1000.0) == (1, 0)
        [message] = receiver.messages
        notes = [str(n[3]) for n in message.segments("NTE")]
        alert_id = index.list_alerts()[0]["id"]
        assert any(ack_url(settings.ack, alert_id) in n for n in notes)
    finally:
        receiver.stop()


# --- hostile clients ------------------------------------------------------------------------------


@pytest.fixture
def bounded(index: Index, settings: AlertSettings) -> Iterator[AckServer]:
    settings.ack.request_timeout_s = 1.0
    settings.ack.max_connections_per_address = 3
    srv = AckServer(index, settings.ack).start()
    yield srv
    srv.stop()


def test_idle_and_trickling_requests_are_closed_by_the_deadline_while_others_are_served(
    index: Index, settings: AlertSettings, bounded: AckServer, webhook_sink: WebhookSink
) -> None:
    link = _delivered_link(index, settings, webhook_sink)
    idle = connect_from(bounded.port, "127.0.0.2")
    half = connect_from(bounded.port, "127.0.0.2")
    half.sendall(b"GET /alerts/1/ack?tok")  # a request line that never ends
    trickle = connect_from(bounded.port, "127.0.0.3")
    started = time.monotonic()
    # One byte every 0.3 s: each read returns before the read timeout, the request never ends.
    for byte in b"GET /alerts/1/ack HTTP/1.0\r\n":
        try:
            trickle.sendall(bytes([byte]))
        except OSError:
            break
        time.sleep(0.3)
        if time.monotonic() - started > 3:
            break
    assert time.monotonic() - started < 3, "the trickling request was not cut off"
    status, _ = _request(link + "&by=dr.house&confirm=1")
    assert status == 200, "a real request is served beside them"
    for sock in (idle, half, trickle):
        assert seconds_until_closed(sock, 3.0) < 3.0
    assert index.list_alerts()[0]["acknowledged_by"] == "dr.house"


def test_a_negative_or_huge_content_length_is_refused_at_once(bounded: AckServer) -> None:
    for length, status in (("-1", 400), ("abc", 400), ("99999999", 413)):
        sock = connect_from(bounded.port, "127.0.0.1")
        sock.sendall(f"POST /alerts/1/ack HTTP/1.0\r\nContent-Length: {length}\r\n\r\n".encode())
        started = time.monotonic()
        reply = sock.recv(4096).decode()
        sock.close()
        assert reply.startswith(f"HTTP/1.0 {status}"), reply
        assert time.monotonic() - started < 0.9, "answered before the deadline, not by it"


def test_connections_beyond_the_per_address_limit_are_closed_and_others_still_served(
    index: Index, settings: AlertSettings, bounded: AckServer, webhook_sink: WebhookSink
) -> None:
    link = _delivered_link(index, settings, webhook_sink)
    held = [connect_from(bounded.port, "127.0.0.2") for _ in range(3)]
    time.sleep(0.2)  # let the server take them
    extra = connect_from(bounded.port, "127.0.0.2")
    assert seconds_until_closed(extra, 0.5) < 0.5, "a fourth connection from the address is closed"
    assert _request(link)[0] == 200, "another address is served"
    for sock in held:
        sock.close()


def test_a_client_that_drops_mid_request_leaves_no_traceback_on_stderr(
    bounded: AckServer, capfd: pytest.CaptureFixture[str]
) -> None:
    sock = connect_from(bounded.port, "127.0.0.1")
    sock.sendall(b"GET /alerts/1/a")
    # Reset, not close: the server's read fails with ECONNRESET.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    time.sleep(0.5)
    assert _request(f"http://127.0.0.1:{bounded.port}/")[0] == 404, "still serving"
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err, err
