"""HL7 v2.5.1 ORU^R01 for an urgent finding, sent over MLLP.

OBX-8 abnormal flag AA (critical), OBX-11 and OBR-25 result status P (preliminary): an AI result
is never final. Patient and accession come from the DICOM header of the study.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

from dicom_node.errors import DestinationRejected, DestinationUnavailable
from worker.findings import DEMO_LABEL
from worker.outputs.alerts import Alert

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
SEGMENT_END = "\r"


def escape(text: str) -> str:
    """HL7 escape sequences for the delimiters (| ^ ~ \\ &) and line breaks in a text value."""
    out = text.replace("\\", "\\E\\")
    for char, code in (("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\")):
        out = out.replace(char, code)
    return out.replace("\r", " ").replace("\n", " ")


def _ts(epoch: float) -> str:
    return time.strftime("%Y%m%d%H%M%S", time.gmtime(epoch)) + "+0000"


def _segment(name: str, fields: Sequence[str]) -> str:
    return "|".join([name, *fields])


def _person_name(dicom_name: str) -> list[str]:
    """HL7 XPN family^given^middle from a DICOM PN.

    A DICOM name may hold three groups, alphabetic=ideographic=phonetic (Japanese, Korean,
    Chinese names); HL7 gets the alphabetic one, or the ideographic one where that is all there is.
    """
    groups = dicom_name.split("=")
    group = groups[0] if groups[0] or len(groups) == 1 else groups[1]
    parts = group.split("^")[:3]
    while len(parts) > 1 and not parts[-1]:
        parts.pop()
    return parts


def oru_r01(
    alert: Alert,
    *,
    control_id: str,
    sending_application: str = "PACSAI",
    sending_facility: str = "",
    receiving_application: str = "",
    receiving_facility: str = "",
) -> str:
    """The ORU^R01 message (segments separated by carriage returns)."""
    now = _ts(alert.created_at)
    name = alert.finding_meaning or alert.finding.replace("_", " ")
    coded = (
        f"{escape(alert.finding_code)}^{escape(name)}^SCT" if alert.finding_code else escape(name)
    )
    person = _person_name(alert.patient_name)
    segments = [
        "MSH|^~\\&|"
        + "|".join(
            [
                escape(sending_application),
                escape(sending_facility),
                escape(receiving_application),
                escape(receiving_facility),
                now,
                "",
                "ORU^R01^ORU_R01",
                escape(control_id),
                "P",
                "2.5.1",
            ]
        ),
        _segment(
            "PID",
            [
                "1",
                "",
                f"{escape(alert.patient_id)}^^^^MR",
                "",
                "^".join(escape(part) for part in person),
            ],
        ),
        _segment("ORC", ["RE", "", escape(alert.accession_number)]),
        _segment(
            "OBR",
            [
                "1",
                "",
                escape(alert.accession_number),
                f"AI^{escape(alert.model_name)} triage^L",
                "",
                "",
                now,
            ]
            + [""] * 17
            + ["P"],
        ),
        _segment("OBX", ["1", "CWE", coded, "", coded, "", "", "AA", "", "", "P", "", "", now]),
        _segment(
            "OBX",
            [
                "2",
                "NM",
                f"{escape(alert.finding_code)}-P^Probability of {escape(name)}^L",
                "",
                f"{alert.probability:.4f}",
                "1^^UCUM",
                f"<{alert.threshold:.2f}",
                "AA",
                "",
                "",
                "P",
                "",
                "",
                now,
            ],
        ),
        _segment(
            "NTE",
            [
                "1",
                "L",
                escape(
                    f"Study {alert.study_instance_uid}; AI report SR {alert.sr_sop_instance_uid}; see {alert.where}. Preliminary AI result, not verified by a radiologist."
                ),
            ],
        ),
    ]
    if alert.demo:
        segments.append(_segment("NTE", ["2", "L", escape(DEMO_LABEL)]))
    if alert.ack_url:
        nte_id = str(sum(1 for s in segments if s.startswith("NTE|")) + 1)
        segments.append(_segment("NTE", [nte_id, "L", escape(f"Acknowledge: {alert.ack_url}")]))
    if not all(segment.isascii() for segment in segments):
        # MSH-13..17 empty, MSH-18 the character set: without it a receiver reads ASCII.
        segments[0] += "|" * 6 + "UNICODE UTF-8"
    return SEGMENT_END.join(segments) + SEGMENT_END


def send_mllp(host: str, port: int, message: str, timeout_s: float = 10.0) -> str:
    """Send one message framed by MLLP and return the ACK; raise unless MSA-1 is AA or CA."""
    payload = START_BLOCK + message.encode("utf-8") + END_BLOCK
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(payload)
            received = b""
            while END_BLOCK not in received:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                received += chunk
    except OSError as exc:
        raise DestinationUnavailable(f"HL7 receiver {host}:{port} unreachable: {exc}") from exc
    if END_BLOCK not in received:
        raise DestinationUnavailable(
            f"HL7 receiver {host}:{port} closed without an acknowledgement"
        )
    ack = received.split(START_BLOCK, 1)[-1].split(END_BLOCK, 1)[0].decode("utf-8", "replace")
    msa = next((seg for seg in ack.split("\r") if seg.startswith("MSA|")), "")
    code = msa.split("|")[1] if "|" in msa else ""
    if code not in ("AA", "CA"):
        raise DestinationRejected(f"HL7 receiver answered {code or 'no MSA'}: {msa}", status=0)
    return ack
