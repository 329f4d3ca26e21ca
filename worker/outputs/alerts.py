"""Urgent-finding alerts and the channels that carry them: JSON webhook, HL7 v2, e-mail.

Each channel gets what it needs and no more: the webhook and the e-mail carry the finding, the
study and accession and where to look, never the patient's name; the HL7 result message carries the
patient identifiers a receiving RIS/EMR needs to file it against the right patient.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from dicom_node.errors import DestinationUnavailable
from worker.findings import DEMO_LABEL

SIGNATURE_HEADER = "X-PACS-AI-Signature"
TIMESTAMP_HEADER = "X-PACS-AI-Timestamp"


@dataclass(frozen=True)
class Alert:
    """An urgent finding on a study, as sent to a channel."""

    alert_id: int
    finding: str
    probability: float
    threshold: float
    study_instance_uid: str
    accession_number: str
    sr_sop_instance_uid: str
    where: str
    model_name: str
    model_version: str
    demo: bool
    created_at: float
    # Coded finding (SNOMED CT) and its display name, for HL7 OBX and readable texts.
    finding_code: str = ""
    finding_meaning: str = ""
    # Only the HL7 channel uses these; they never go into the webhook body, an e-mail or a log.
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    # The acknowledgement link (worker/ackserver.py), "" when no endpoint is configured.
    ack_url: str = ""

    @property
    def title(self) -> str:
        name = self.finding_meaning or self.finding.replace("_", " ")
        label = f" [{DEMO_LABEL}]" if self.demo else ""
        return f"URGENT AI finding: {name} (probability {self.probability:.2f}){label}"

    def payload(self) -> dict[str, Any]:
        """The webhook body: no patient identifiers."""
        body: dict[str, Any] = {
            "type": "urgent-finding",
            "alert_id": self.alert_id,
            "finding": self.finding,
            "finding_code": self.finding_code,
            "finding_meaning": self.finding_meaning,
            "probability": self.probability,
            "threshold": self.threshold,
            "study_instance_uid": self.study_instance_uid,
            "accession_number": self.accession_number,
            "sr_sop_instance_uid": self.sr_sop_instance_uid,
            "where": self.where,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "demo": self.demo,
            "created_at": self.created_at,
        }
        if self.ack_url:
            body["ack_url"] = self.ack_url
        if self.demo:
            body["label"] = DEMO_LABEL
        return body


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """HMAC-SHA256 over ``timestamp.body``: the receiver rejects forged and replayed alerts."""
    mac = hmac.new(secret.encode("utf-8"), timestamp.encode("ascii") + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify_signature(secret: str, timestamp: str, body: bytes, signature: str) -> bool:
    """What a receiver does with the two headers (constant-time comparison)."""
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


def post_webhook(url: str, alert: Alert, timeout_s: float, secret: str | None = None) -> None:
    """POST the alert as JSON; raise ``DestinationUnavailable`` unless the sink answers 2xx."""
    data = json.dumps(alert.payload()).encode("utf-8")
    headers = {"Content-Type": "application/json", "User-Agent": "pacs-ai-worker"}
    if secret:
        timestamp = str(int(time.time()))
        headers[TIMESTAMP_HEADER] = timestamp
        headers[SIGNATURE_HEADER] = sign(secret, timestamp, data)
    request = urllib.request.Request(url, data=data, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = int(response.status)
    except urllib.error.HTTPError as exc:
        raise DestinationUnavailable(f"webhook answered HTTP {exc.code}") from exc
    except (urllib.error.URLError, OSError) as exc:
        raise DestinationUnavailable(f"webhook unreachable: {exc}") from exc
    if not 200 <= status < 300:
        raise DestinationUnavailable(f"webhook answered HTTP {status}")
