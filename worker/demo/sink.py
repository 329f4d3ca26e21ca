"""A local webhook sink for the demo and the tests: an HTTP server on loopback keeping every alert.

With a secret it checks each alert's HMAC signature and refuses (401) what does not verify, as a
receiving system should.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from worker.outputs.alerts import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify_signature


@dataclass(frozen=True)
class Received:
    at: float
    body: dict[str, Any]
    raw: bytes
    headers: dict[str, str]
    signature_ok: bool | None


class WebhookSink:
    """Collects POSTed JSON bodies with their arrival time and headers."""

    def __init__(self, secret: str | None = None, port: int = 0) -> None:
        self.secret = secret
        self.requests: list[Received] = []
        self._lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                ok: bool | None = None
                if sink.secret is not None:
                    ok = verify_signature(
                        sink.secret,
                        self.headers.get(TIMESTAMP_HEADER, ""),
                        raw,
                        self.headers.get(SIGNATURE_HEADER, ""),
                    )
                with sink._lock:
                    sink.requests.append(
                        Received(
                            time.time(),
                            json.loads(raw or b"{}"),
                            raw,
                            {k.lower(): v for k, v in self.headers.items()},
                            ok,
                        )
                    )
                self.send_response(401 if ok is False else 204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the demo prints its own summary

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/alerts"

    def start(self) -> str:
        self._thread.start()
        return self.url

    def received(self) -> list[tuple[float, dict[str, Any]]]:
        """The accepted alerts (signature verified when a secret is set), oldest first."""
        with self._lock:
            return [(r.at, r.body) for r in self.requests if r.signature_ok is not False]

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
