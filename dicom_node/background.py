"""A pass that runs in a background thread: every interval, and at once when woken.

The study assembler, the alert dispatcher and the SR outbox all work this way: their state is in
the index, each pass does what is due, and a pass that fails is logged and tried again.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class BackgroundPass:
    """Subclasses implement ``run_once()`` and name the thread and its interval."""

    def __init__(self, name: str, interval_s: float) -> None:
        self._name = name
        self._interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> object:
        raise NotImplementedError

    def wake(self) -> None:
        """Run the next pass now instead of at the end of the interval."""
        self._wake.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("%s pass failed; retrying", self._name)
            self._wake.wait(self._interval_s)
            self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
