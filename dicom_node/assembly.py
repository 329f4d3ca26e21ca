"""Study assembly: complete studies whose time has come, route them and hand their jobs over.

Runs as one thread beside the listener. Completion timers are rows in the index, so a study in
flight when the process dies completes after restart; jobs the broker never accepted (broker down,
crash between commit and publish) stay ``created`` and are handed over on a later pass.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Protocol

from dicom_node.index import Index
from dicom_node.routing import route_study
from dicom_node.settings import CompletionSettings, QueueSettings

log = logging.getLogger(__name__)


class JobSender(Protocol):
    def send(self, job_id: str, queue: str) -> None: ...


class StudyAssembler:
    """Completes due studies and publishes their jobs; wake it early with ``wake()``."""

    def __init__(
        self,
        index: Index,
        sender: JobSender,
        completion: CompletionSettings,
        queues: QueueSettings,
    ) -> None:
        self.index = index
        self.sender = sender
        self.completion = completion
        self.queues = queues
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._broker_down_since: float | None = None

    def wake(self) -> None:
        self._wake.set()

    def run_once(self, now: float | None = None) -> int:
        """Complete due studies and publish pending jobs; return the number of jobs published."""
        now = time.time() if now is None else now
        for study in self.index.due_studies(now):
            route = route_study(study, self.queues)
            if route.pipeline is None:
                self.index.ignore_study(study.study_instance_uid, route.reason, now)
                log.info("study %s ignored: %s", study.study_instance_uid, route.reason)
                continue
            job_id = self.index.create_job(
                study.study_instance_uid, route.pipeline, route.queue, now
            )
            log.info(
                "study %s complete: %s (job %s)", study.study_instance_uid, route.reason, job_id
            )
        return self._publish_pending()

    def _publish_pending(self) -> int:
        published = 0
        for job in self.index.jobs_to_enqueue():
            try:
                self.sender.send(job.job_id, job.queue)
            except Exception as exc:
                error = f"broker unavailable: {type(exc).__name__}: {exc}"
                self.index.mark_job_error(job.job_id, error)
                if self._broker_down_since is None:
                    self._broker_down_since = time.time()
                    log.error("cannot enqueue jobs, will retry: %s", error)
                return published
            if self._broker_down_since is not None:
                log.warning("broker back after %.1f s", time.time() - self._broker_down_since)
                self._broker_down_since = None
            self.index.mark_job_enqueued(job.job_id, time.time())
            published += 1
        return published

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.run_once()
            except Exception:
                log.exception("study assembly pass failed; retrying")
            self._wake.wait(self.completion.poll_interval_s)
            self._wake.clear()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="study-assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
