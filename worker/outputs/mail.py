"""E-mail alerts over SMTP: the finding, the accession and where to look; no patient identifiers."""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage

from dicom_node.errors import DestinationUnavailable
from worker.outputs.alerts import Alert


def alert_email(
    alert: Alert, *, sender: str, recipients: list[str], escalation: bool = False
) -> EmailMessage:
    """The alert as an e-mail; an escalation says that nobody acknowledged it in time."""
    message = EmailMessage()
    prefix = "ESCALATION (not acknowledged): " if escalation else ""
    message["Subject"] = f"{prefix}{alert.title} - accession {alert.accession_number or 'n/a'}"
    message["From"] = sender
    message["To"] = ", ".join(recipients)
    message["X-PACS-AI-Alert-Id"] = str(alert.alert_id)
    message.set_content(
        "\n".join(
            [
                alert.title,
                "",
                f"Finding:      {alert.finding_meaning or alert.finding} (probability {alert.probability:.2f}, threshold {alert.threshold:.2f})",
                f"Accession:    {alert.accession_number or 'n/a'}",
                f"Study UID:    {alert.study_instance_uid}",
                f"AI report:    SR {alert.sr_sop_instance_uid}",
                f"Where:        {alert.where}",
                f"Model:        {alert.model_name} {alert.model_version}",
                *([f"Acknowledge:  {alert.ack_url}"] if alert.ack_url else []),
                "",
                "Preliminary AI result, not verified by a radiologist. Open the study in the viewer.",
            ]
        )
    )
    return message


def send_email(
    message: EmailMessage,
    *,
    host: str,
    port: int,
    starttls: bool,
    username: str | None,
    password: str | None,
    timeout_s: float,
) -> None:
    """Hand the message to the SMTP server; raise ``DestinationUnavailable`` when it does not take it."""
    try:
        with smtplib.SMTP(host, port, timeout=timeout_s) as smtp:
            if starttls:
                smtp.starttls(context=ssl.create_default_context())
            if username:
                smtp.login(username, password or "")
            refused = smtp.send_message(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise DestinationUnavailable(f"SMTP {host}:{port}: {exc}") from exc
    if refused:
        raise DestinationUnavailable(f"SMTP {host}:{port} refused {', '.join(refused)}")
