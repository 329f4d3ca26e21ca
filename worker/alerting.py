"""Urgent alerts as an outbox: rows in the index, sent on every configured channel, retried with
backoff until delivered, acknowledged by a person, escalated when nobody acknowledges in time.

The job that finds an urgent finding only creates the rows and gives the dispatcher a push; the
dispatcher (one thread per worker process, rows leased so two never send the same one) does the
sending, so a channel that is down delays nothing else and loses nothing.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import asdict

from pydicom.dataset import Dataset

from dicom_node.background import BackgroundPass
from dicom_node.errors import DestinationRejected, DestinationUnavailable
from dicom_node.index import Index
from worker.ackserver import ack_url
from worker.findings import FindingResult, ModelCard
from worker.outputs.alerts import Alert, post_webhook
from worker.outputs.hl7 import oru_r01, send_mllp
from worker.outputs.mail import alert_email, send_email
from worker.settings import AlertSettings
from worker.templates import UnknownFinding, code_map

log = logging.getLogger(__name__)

WEBHOOK, HL7, EMAIL = "webhook", "hl7", "email"
ESCALATION_EMAIL, ESCALATION_WEBHOOK = "escalation-email", "escalation-webhook"
# A sender holds a row this long past its channel timeout before another may retry it.
LEASE_MARGIN_S = 30.0


def configured_channels(settings: AlertSettings) -> list[str]:
    """The channels every urgent finding goes to."""
    channels = []
    if settings.webhook.url:
        channels.append(WEBHOOK)
    if settings.hl7.host:
        channels.append(HL7)
    if settings.email.host and settings.email.recipients:
        channels.append(EMAIL)
    return channels


def escalation_channels(settings: AlertSettings) -> list[str]:
    channels = []
    if settings.escalation.email_recipients and settings.email.host:
        channels.append(ESCALATION_EMAIL)
    if settings.escalation.webhook_url:
        channels.append(ESCALATION_WEBHOOK)
    return channels


def raise_alerts(
    index: Index,
    settings: AlertSettings,
    findings: Sequence[FindingResult],
    card: ModelCard,
    sr: Dataset,
    where: str,
    now: float | None = None,
) -> list[int]:
    """Create the alert rows of a study's urgent findings; return the ids of new rows.

    One row per study, finding and channel: a re-run of the same study alerts nobody again.
    """
    now = time.time() if now is None else now
    created = []
    codes = code_map()
    for finding in findings:
        if not finding.urgent:
            continue
        try:
            entry = codes.finding_entry(finding.finding)
            code, meaning = entry.code.value, entry.display_name
        except UnknownFinding:
            code, meaning = "", finding.finding.replace("_", " ")
        for channel in configured_channels(settings):
            alert = Alert(
                alert_id=0,
                finding=finding.finding,
                probability=round(finding.probability, 4),
                threshold=finding.threshold,
                study_instance_uid=str(sr.StudyInstanceUID),
                accession_number=str(sr.get("AccessionNumber", "") or ""),
                sr_sop_instance_uid=str(sr.SOPInstanceUID),
                where=where,
                model_name=card.name,
                model_version=card.version,
                demo=card.demo,
                created_at=now,
                finding_code=code,
                finding_meaning=meaning,
                patient_id=str(sr.get("PatientID", "") or ""),
                patient_name=str(sr.get("PatientName", "") or ""),
                study_date=str(sr.get("StudyDate", "") or ""),
            )
            alert_id, is_new = index.claim_alert(
                alert.study_instance_uid,
                finding.finding,
                channel,
                alert.probability,
                now,
                asdict(alert),
            )
            if is_new:
                created.append(alert_id)
    return created


def send(settings: AlertSettings, channel: str, alert: Alert) -> None:
    """Deliver one alert on one channel; raise DestinationUnavailable/DestinationRejected."""
    if channel == WEBHOOK:
        assert settings.webhook.url is not None
        post_webhook(
            settings.webhook.url, alert, settings.webhook.timeout_s, settings.webhook.secret
        )
    elif channel == ESCALATION_WEBHOOK:
        assert settings.escalation.webhook_url is not None
        post_webhook(
            settings.escalation.webhook_url,
            alert,
            settings.webhook.timeout_s,
            settings.webhook.secret,
        )
    elif channel == HL7:
        h = settings.hl7
        assert h.host is not None
        message = oru_r01(
            alert,
            control_id=f"PACSAI{alert.alert_id}",
            sending_application=h.sending_application,
            sending_facility=h.sending_facility,
            receiving_application=h.receiving_application,
            receiving_facility=h.receiving_facility,
        )
        send_mllp(h.host, h.port, message, h.timeout_s)
    elif channel in (EMAIL, ESCALATION_EMAIL):
        e = settings.email
        assert e.host is not None
        recipients = e.recipients if channel == EMAIL else settings.escalation.email_recipients
        mail = alert_email(
            alert,
            sender=e.sender,
            recipients=list(recipients),
            escalation=channel == ESCALATION_EMAIL,
        )
        send_email(
            mail,
            host=e.host,
            port=e.port,
            starttls=e.starttls,
            username=e.username,
            password=e.password,
            timeout_s=e.timeout_s,
        )
    else:
        raise DestinationRejected(f"unknown alert channel {channel!r}", status=0)


def retry_delay(attempts: int, max_delay_s: float) -> float:
    """Exponential backoff with jitter: 1 s, 2 s, 4 s, ... up to the configured maximum."""
    base = min(max_delay_s, 2.0 ** min(attempts, 20))
    return float(base * (0.8 + 0.4 * random.random()))


class AlertDispatcher(BackgroundPass):
    """Sends due alert rows and escalates unacknowledged ones; safe to run in every worker."""

    def __init__(self, index: Index, settings: AlertSettings) -> None:
        super().__init__("alert-dispatcher", settings.poll_interval_s)
        self.index = index
        self.settings = settings

    def run_once(self, now: float | None = None) -> tuple[int, int]:
        """One pass: escalate, then send what is due. Return (delivered, failed)."""
        now = time.time() if now is None else now
        self._escalate(now)
        delivered = failed = 0
        for row in self.index.due_alerts(now):
            channel_timeout = max(
                self.settings.webhook.timeout_s,
                self.settings.hl7.timeout_s,
                self.settings.email.timeout_s,
            )
            if not self.index.lease_alert(
                row["id"], row["next_attempt_at"], now + channel_timeout + LEASE_MARGIN_S
            ):
                continue  # another worker took it
            alert = Alert(
                **{
                    **json.loads(row["payload_json"] or "{}"),
                    "alert_id": row["id"],
                    # The link's token is made from the row id, known only once the row exists.
                    "ack_url": ack_url(self.settings.ack, row["id"]),
                }
            )
            try:
                send(self.settings, row["channel"], alert)
            except (DestinationUnavailable, DestinationRejected) as exc:
                failed += 1
                delay = retry_delay(row["attempts"], self.settings.retry_max_delay_s)
                self.index.record_alert_attempt(
                    row["id"], time.time(), error=str(exc), next_attempt_at=time.time() + delay
                )
                log.warning(
                    "alert %d on %s not delivered (attempt %d), retry in %.0f s: %s",
                    row["id"],
                    row["channel"],
                    row["attempts"] + 1,
                    delay,
                    exc,
                )
                continue
            delivered += 1
            self.index.record_alert_attempt(row["id"], time.time(), error=None)
            late = time.time() - row["created_at"]
            log.warning(
                "URGENT %s on study %s: alert %d delivered on %s after %.2f s",
                row["finding"],
                row["study_instance_uid"],
                row["id"],
                row["channel"],
                late,
            )
        return delivered, failed

    def _escalate(self, now: float) -> None:
        channels = escalation_channels(self.settings)
        if not channels:
            return
        for row in self.index.unacknowledged_before(now - self.settings.escalation.after_s):
            if row["channel"].startswith("escalation"):
                continue
            payload = json.loads(row["payload_json"] or "{}")
            for channel in channels:
                alert_id, is_new = self.index.claim_alert(
                    row["study_instance_uid"],
                    row["finding"],
                    channel,
                    row["probability"],
                    now,
                    payload,
                )
                if is_new:
                    log.warning(
                        "alert %d not acknowledged after %.0f s: escalating on %s (alert %d)",
                        row["id"],
                        now - row["created_at"],
                        channel,
                        alert_id,
                    )
