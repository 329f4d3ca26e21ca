"""The HTTP acknowledgement endpoint, against the real server: the link in an alert stops escalation."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.index import Index
from tests.servers import MllpReceiver, free_port
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
