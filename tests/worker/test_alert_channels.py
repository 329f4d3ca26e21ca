"""Alert channels against real local receivers: signed webhook, HL7 ORU^R01 over MLLP, SMTP."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dicom_node.errors import DestinationRejected, DestinationUnavailable
from tests.servers import MllpReceiver, free_port
from worker.demo.sink import WebhookSink
from worker.outputs.alerts import Alert, post_webhook, verify_signature
from worker.outputs.hl7 import escape, oru_r01, send_mllp
from worker.outputs.mail import alert_email, send_email

ALERT = Alert(
    alert_id=7,
    finding="pneumothorax",
    probability=0.9731,
    threshold=0.5,
    study_instance_uid="1.2.826.0.1.3680043.8.498.1",
    accession_number="ACC|123",
    sr_sop_instance_uid="2.25.1234",
    where="main-pacs",
    model_name="pacs-ai-demo-cxr-triage",
    model_version="1.0.0",
    demo=True,
    created_at=1_700_000_000.0,
    finding_code="36118008",
    finding_meaning="Pneumothorax",
    patient_id="MRN-0042",
    patient_name="DOE^JANE",
    study_date="20240101",
)


def test_webhook_body_is_signed_verifiable_and_free_of_patient_identifiers(
    webhook_sink: WebhookSink,
) -> None:
    post_webhook(webhook_sink.url, ALERT, timeout_s=5, secret="test-secret")
    [request] = webhook_sink.requests
    assert request.signature_ok
    assert verify_signature(
        "test-secret",
        request.headers["x-pacs-ai-timestamp"],
        request.raw,
        request.headers["x-pacs-ai-signature"],
    )
    assert request.body["finding"] == "pneumothorax"
    assert request.body["label"] == "DEMO / NOT FOR CLINICAL USE"
    assert b"MRN-0042" not in request.raw and b"DOE" not in request.raw


def test_webhook_with_the_wrong_secret_is_refused_by_the_receiver(
    webhook_sink: WebhookSink,
) -> None:
    with pytest.raises(DestinationUnavailable, match="401"):
        post_webhook(webhook_sink.url, ALERT, timeout_s=5, secret="not-the-secret")
    assert webhook_sink.received() == []


def test_webhook_down_is_reported_as_unavailable() -> None:
    with pytest.raises(DestinationUnavailable):
        post_webhook(f"http://127.0.0.1:{free_port()}/alerts", ALERT, timeout_s=2)


def _field(message: Any, segment: str, index: int) -> str:
    return str(message.segment(segment)[index])


def test_hl7_oru_r01_is_accepted_and_parses_with_critical_flag_and_preliminary_status(
    mllp_receiver: MllpReceiver,
) -> None:
    ack = send_mllp("127.0.0.1", mllp_receiver.port, oru_r01(ALERT, control_id="A7"))
    assert "MSA|AA|A7" in ack
    [message] = mllp_receiver.messages
    assert str(message.segment("MSH")[9]) == "ORU^R01^ORU_R01"
    assert _field(message, "PID", 3).startswith("MRN-0042")
    assert str(message.segment("PID")[5]) == "DOE^JANE"
    assert _field(message, "ORC", 3) == escape("ACC|123")
    assert message.unescape(_field(message, "ORC", 3)) == "ACC|123"
    obr = message.segment("OBR")
    assert str(obr[25]) == "P"
    observations = message.segments("OBX")
    assert [str(o[8]) for o in observations] == ["AA", "AA"]
    assert [str(o[11]) for o in observations] == ["P", "P"]
    assert str(observations[0][3]).startswith("36118008^Pneumothorax^SCT")
    assert float(str(observations[1][5])) == pytest.approx(0.9731)
    assert "DEMO / NOT FOR CLINICAL USE" in mllp_receiver.raw[0]


@pytest.mark.parametrize(
    ("dicom_name", "hl7_name"),
    [
        # PS3.5 H.3.1: alphabetic=ideographic=phonetic; HL7 gets the alphabetic group.
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "Yamada^Tarou"),
        ("=山田^太郎=やまだ^たろう", "山田^太郎"),  # no alphabetic group: the ideographic one
        ("Müller^Jürgen^Hans", "Müller^Jürgen^Hans"),
    ],
)
def test_hl7_patient_name_is_one_name_group_and_a_non_ascii_one_says_its_character_set(
    mllp_receiver: MllpReceiver, dicom_name: str, hl7_name: str
) -> None:
    alert = dataclasses.replace(ALERT, patient_name=dicom_name)
    ack = send_mllp("127.0.0.1", mllp_receiver.port, oru_r01(alert, control_id="A8"))
    assert "MSA|AA|A8" in ack
    [message] = mllp_receiver.messages
    assert str(message.segment("PID")[5]) == hl7_name
    msh = message.segment("MSH")
    if hl7_name.isascii():
        assert len(msh) <= 13  # no MSH-18: the default, ASCII
    else:
        assert str(msh[18]) == "UNICODE UTF-8"


def test_hl7_receiver_that_rejects_raises_with_its_answer() -> None:
    receiver = MllpReceiver(ack_code="AR").start()
    try:
        with pytest.raises(DestinationRejected, match="AR"):
            send_mllp("127.0.0.1", receiver.port, oru_r01(ALERT, control_id="A8"))
    finally:
        receiver.stop()


def test_hl7_receiver_down_is_reported_as_unavailable() -> None:
    with pytest.raises(DestinationUnavailable):
        send_mllp("127.0.0.1", free_port(), oru_r01(ALERT, control_id="A9"), timeout_s=2)


def test_email_reaches_the_smtp_server_without_patient_identifiers(smtp_sink: Any) -> None:
    message = alert_email(ALERT, sender="pacs-ai@example.org", recipients=["er@example.org"])
    send_email(
        message,
        host="127.0.0.1",
        port=smtp_sink.port,
        starttls=False,
        username=None,
        password=None,
        timeout_s=5,
    )
    [received] = smtp_sink.messages
    assert (
        "Pneumothorax" in received["Subject"]
        and "DEMO / NOT FOR CLINICAL USE" in received["Subject"]
    )
    body = received.get_content()
    assert "ACC|123" in body and ALERT.sr_sop_instance_uid in body
    assert "MRN-0042" not in received.as_string() and "DOE" not in received.as_string()
