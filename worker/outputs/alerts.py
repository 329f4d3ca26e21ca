"""Urgent-finding alerts: one JSON webhook channel, de-duplicated per study and finding.

The payload carries what a clinician needs to act (finding, probability, study and accession, where
the result is) and no more patient data than that.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from typing import Any

from dicom_node.errors import DestinationUnavailable
from worker.findings import DEMO_LABEL


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

    def payload(self) -> dict[str, Any]:
        body = asdict(self)
        body["type"] = "urgent-finding"
        if self.demo:
            body["label"] = DEMO_LABEL
        return body


def post_webhook(url: str, alert: Alert, timeout_s: float) -> None:
    """POST the alert as JSON; raise ``DestinationUnavailable`` unless the sink answers 2xx."""
    data = json.dumps(alert.payload()).encode("utf-8")
    request = urllib.request.Request(
        url,
        data=data,
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "pacs-ai-worker"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = int(response.status)
    except (urllib.error.URLError, OSError) as exc:
        raise DestinationUnavailable(f"webhook unreachable: {exc}") from exc
    if not 200 <= status < 300:
        raise DestinationUnavailable(f"webhook answered HTTP {status}")
