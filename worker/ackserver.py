"""The HTTP acknowledgement endpoint: the link in an alert that a person opens to say "seen".

Each alert carries ``{base_url}/alerts/{id}/ack?token=...``; the token is an HMAC of the alert id
under ``alerts.ack.secret``, so the link itself is the credential and nothing else needs a login.
GET shows a confirmation page (the finding and the accession, no patient identifiers); POST, or GET
with ``confirm=1``, acknowledges the study's finding on every channel, which stops escalation. A
request without a valid token gets 403 and learns nothing about the alert.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import html
import logging
import re
import socket
import sys
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import sqlalchemy as sa

from dicom_node.index import Index, alerts
from worker.findings import DEMO_LABEL
from worker.settings import AckSettings

log = logging.getLogger(__name__)

_PATH = re.compile(r"/alerts/(\d{1,18})/ack")
_MAX_BY = 64
# The confirmation form holds a token and a name: a few hundred bytes.
_MAX_FORM = 4096


def _content_length(value: str | None) -> int | None:
    """A request's declared body length; None when it is not a plain non-negative number."""
    if value is None:
        return 0
    value = value.strip()
    return int(value) if value.isascii() and value.isdigit() else None


class _BoundedHTTPServer(ThreadingHTTPServer):
    """A threaded HTTP server that serves a bounded number of connections, also per address.

    Connections beyond either limit are closed at once rather than given a thread. A request
    that fails (a client that went away, a timeout) is logged in one line through the log
    filter, instead of the traceback ``socketserver`` prints to standard error.
    """

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        max_connections: int,
        max_per_address: int,
    ) -> None:
        super().__init__(address, handler)
        self.max_connections = max_connections
        self.max_per_address = max_per_address
        self._open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        with self._lock:
            if (
                self._open.total() >= self.max_connections
                or self._open[host] >= self.max_per_address
            ):
                log.warning("ack endpoint: connection from %s refused: too many open", host)
                return False
            self._open[host] += 1
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except Exception:
            self._closed(client_address)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed(client_address)

    def _closed(self, client_address: Any) -> None:
        host = str(client_address[0])
        with self._lock:
            self._open[host] -= 1
            if self._open[host] <= 0:
                del self._open[host]

    def handle_error(self, request: Any, client_address: Any) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):  # gone, reset, timed out: the client's business
            log.info("ack endpoint: request from %s ended: %s", client_address[0], error)
        else:
            log.exception("ack endpoint: request from %s failed", client_address[0])


def ack_token(secret: str, alert_id: int) -> str:
    """The token of one alert's link: HMAC-SHA256 of the alert id under the endpoint's secret."""
    mac = hmac.new(secret.encode("utf-8"), f"pacs-ai-ack:{alert_id}".encode(), hashlib.sha256)
    return mac.hexdigest()


def base_url(settings: AckSettings) -> str:
    if settings.base_url:
        return settings.base_url.rstrip("/")
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def ack_url(settings: AckSettings, alert_id: int) -> str:
    """The alert's acknowledgement link, or "" when the endpoint is not configured."""
    if not settings.secret:
        return ""
    token = ack_token(settings.secret, alert_id)
    return f"{base_url(settings)}/alerts/{alert_id}/ack?token={token}"


def _page(title: str, body: str) -> bytes:
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title></head><body><h1>{html.escape(title)}</h1>"
        f"{body}</body></html>"
    ).encode()


class AckServer:
    """A threaded HTTP server acknowledging alerts in the index; one per ``pacs-ai serve``."""

    def __init__(self, index: Index, settings: AckSettings) -> None:
        if not settings.secret:
            raise ValueError("the acknowledgement endpoint needs alerts.ack.secret")
        self.index = index
        self.settings = settings
        self._secret = settings.secret
        server = self

        class Handler(BaseHTTPRequestHandler):
            server_version = "pacs-ai-ack"
            # Each read waits at most this long; the whole request is bounded by the deadline.
            timeout = settings.request_timeout_s

            def setup(self) -> None:
                super().setup()
                # A request that trickles in (a byte now and then) never trips the read
                # timeout: past the deadline its connection is shut, whatever it is doing.
                self._deadline = threading.Timer(settings.request_timeout_s, self._expire)
                self._deadline.daemon = True
                self._deadline.start()

            def _expire(self) -> None:
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def finish(self) -> None:
                self._deadline.cancel()
                with contextlib.suppress(OSError):
                    super().finish()

            def do_GET(self) -> None:
                server._handle(self, post=False)

            def do_POST(self) -> None:
                length = _content_length(self.headers.get("Content-Length"))
                if length is None:
                    self._refuse(400, "Bad request", "Content-Length is missing or not a number.")
                    return
                if length > _MAX_FORM:
                    self._refuse(413, "Too large", "The form is larger than this page sends.")
                    return
                form = self.rfile.read(length).decode("utf-8", "replace") if length else ""
                server._handle(self, post=True, form=form)

            def _refuse(self, status: int, title: str, text: str) -> None:
                self.close_connection = True
                server._reply(self, status, _page(title, f"<p>{html.escape(text)}</p>"))

            def log_message(self, format: str, *args: Any) -> None:
                # The query string holds the token: log the method and status only.
                log.debug("ack endpoint: %s", args[1] if len(args) > 1 else "")

        self._httpd = _BoundedHTTPServer(
            (settings.host, settings.port),
            Handler,
            settings.max_connections,
            settings.max_connections_per_address,
        )
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="ack-server", daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    def start(self) -> AckServer:
        self._thread.start()
        log.info("alert acknowledgement endpoint on %s:%d", self.settings.host, self.port)
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    # --- requests ---------------------------------------------------------------------------

    def _alert(self, alert_id: int) -> dict[str, Any] | None:
        with self.index.engine.connect() as conn:
            row = conn.execute(sa.select(alerts).where(alerts.c.id == alert_id)).first()
        return dict(row._mapping) if row is not None else None

    def _handle(self, request: BaseHTTPRequestHandler, *, post: bool, form: str = "") -> None:
        url = urllib.parse.urlsplit(request.path)
        params = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        params.update({k: v[-1] for k, v in urllib.parse.parse_qs(form).items()})
        match = _PATH.fullmatch(url.path)
        if match is None:
            self._reply(request, 404, _page("Not found", "<p>No such page.</p>"))
            return
        alert_id = int(match.group(1))
        token = params.get("token", "")
        if not hmac.compare_digest(ack_token(self._secret, alert_id), token):
            self._reply(request, 403, _page("Forbidden", "<p>This link is not valid.</p>"))
            return
        row = self._alert(alert_id)
        if row is None:
            self._reply(request, 404, _page("Unknown alert", "<p>No such alert.</p>"))
            return
        by = (params.get("by") or "ack-link").strip()[:_MAX_BY] or "ack-link"
        if post or params.get("confirm") == "1":
            count = self.index.acknowledge_alert(alert_id, by, time.time())
            if count:
                log.warning("alert %d acknowledged over HTTP (%d channel row(s))", alert_id, count)
            self._reply(request, 200, self._done_page(row, by, count))
            return
        self._reply(request, 200, self._confirm_page(row, alert_id, token, by))

    @staticmethod
    def _summary(row: dict[str, Any]) -> str:
        import json

        payload = json.loads(row.get("payload_json") or "{}")
        finding = payload.get("finding_meaning") or str(row["finding"]).replace("_", " ")
        demo = f"<p><strong>{html.escape(DEMO_LABEL)}</strong></p>" if payload.get("demo") else ""
        return (
            f"<p>Finding: <strong>{html.escape(finding)}</strong>"
            f" (probability {float(row['probability']):.2f})</p>"
            f"<p>Accession: {html.escape(str(payload.get('accession_number') or 'n/a'))}"
            f"<br>Study UID: {html.escape(str(row['study_instance_uid']))}</p>{demo}"
        )

    def _confirm_page(self, row: dict[str, Any], alert_id: int, token: str, by: str) -> bytes:
        if row["acknowledged_at"] is not None:
            return self._done_page(row, str(row["acknowledged_by"] or ""), 0)
        hidden = "".join(
            f"<input type='hidden' name='{k}' value='{html.escape(v, quote=True)}'>"
            for k, v in (("token", token),)
        )
        form = (
            f"<form method='post' action='/alerts/{alert_id}/ack'>{hidden}"
            f"<label>Your name: <input name='by' value='{html.escape(by, quote=True)}'></label> "
            "<button type='submit'>Acknowledge</button></form>"
        )
        return _page("Acknowledge urgent AI finding", self._summary(row) + form)

    def _done_page(self, row: dict[str, Any], by: str, count: int) -> bytes:
        note = (
            f"<p>Acknowledged by {html.escape(by)}. No escalation will be sent.</p>"
            if count
            else "<p>This alert was already acknowledged"
            + (f" by {html.escape(str(row['acknowledged_by']))}" if row["acknowledged_by"] else "")
            + ".</p>"
        )
        return _page("Alert acknowledged", self._summary(row) + note)

    @staticmethod
    def _reply(request: BaseHTTPRequestHandler, status: int, body: bytes) -> None:
        request.send_response(status)
        request.send_header("Content-Type", "text/html; charset=utf-8")
        request.send_header("Content-Length", str(len(body)))
        request.send_header("Cache-Control", "no-store")
        request.send_header("Referrer-Policy", "no-referrer")
        request.end_headers()
        request.wfile.write(body)
