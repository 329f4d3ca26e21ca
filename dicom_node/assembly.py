"""Study assembly: complete studies whose time has come, route them and hand their jobs over.

Runs as one thread beside the listener. Completion is a state machine kept in the index:

    receiving --(released CR/DX, or quiet period over)--> routed by the rules:
        no rule / rule ignores ........................ ignored (reason)
        rule matched, required series present ......... queued (a job is created)
        rule matched, a required series missing ....... waiting (until series_wait_s has passed)
    waiting --(a new instance)--> receiving
    waiting --(deadline)--> incomplete (reason), or queued when the rule says when_series_missing: run
    queued / processing / done / failed / ignored / incomplete --(a late instance)--> receiving

Timers are rows in the index, so a study in flight when the process dies completes after restart;
jobs the broker never accepted (broker down, crash between commit and publish) stay ``created`` and
are handed over on a later pass. Queued jobs whose message went to an earlier run of the broker (it
restarted, and may have lost it) go back to ``created`` and are handed over again, as do running
ones of an earlier run that started more than the visibility timeout ago (their worker died). A
running job whose worker sent no heartbeat for ``queue.worker_lost_after_s`` goes back to
``created`` too (or to ``dead`` after ``queue.max_worker_losses`` such deaths). A study that gets
an instance while it is being routed is left open and routed again after its new completion time.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from dicom_node.background import BackgroundPass
from dicom_node.index import Index, JobStatus, StudyRow
from dicom_node.routing import read_study_headers, route_study
from dicom_node.settings import CompletionSettings, QueueSettings, RoutingSettings

log = logging.getLogger(__name__)


class JobSender(Protocol):
    def send(self, job_id: str, queue: str) -> None: ...

    def broker_epoch(self) -> str | None: ...


def report_lost_jobs(lost: list[tuple[str, JobStatus]]) -> None:
    """Log what became of the running jobs of a worker that died."""
    for job_id, status in lost:
        if status == JobStatus.DEAD:
            log.error("job %s failed for good: its worker died running it too often", job_id)
        else:
            log.warning("job %s goes back to its queue: its worker died running it", job_id)


class StudyAssembler(BackgroundPass):
    """Completes due studies and publishes their jobs; wake it early with ``wake()``."""

    def __init__(
        self,
        index: Index,
        sender: JobSender,
        completion: CompletionSettings,
        queues: QueueSettings,
        routing: RoutingSettings | None = None,
    ) -> None:
        super().__init__("study-assembler", completion.poll_interval_s)
        self.index = index
        self.sender = sender
        self.completion = completion
        self.queues = queues
        self.routing = routing if routing is not None else RoutingSettings()
        self._broker_down_since: float | None = None

    def run_once(self, now: float | None = None) -> int:
        """Complete due studies and publish pending jobs; return the number of jobs published."""
        now = time.time() if now is None else now
        for study in self.index.due_studies(now):
            try:
                self._complete(study, now)
            except Exception:  # one study that cannot be routed must not hold up the others
                log.exception("routing study %s failed; retrying", study.study_instance_uid)
        self._requeue_jobs_of_lost_workers(now)
        return self._publish_pending()

    def _complete(self, study: StudyRow, now: float) -> None:
        """Route one due study and move it to ignored, waiting, incomplete or queued."""
        uid = study.study_instance_uid
        seen = study.last_received_at
        headers = read_study_headers(self.index.study_instances(uid))
        route = route_study(headers, self.routing, self.queues)
        rule = route.rule
        if rule is None or route.pipeline is None:
            if self.index.ignore_study(
                uid, route.reason, now, rule=route.rule_name, seen_last_received_at=seen
            ):
                log.info("study %s ignored: %s", uid, route.reason)
            return
        note = None
        if route.missing_series:
            missing = ", ".join(route.missing_series)
            until = study.wait_until if study.wait_until is not None else now + rule.series_wait_s
            if now < until:
                if self.index.wait_for_series(
                    uid,
                    rule=rule.name,
                    reason=f"waiting up to {rule.series_wait_s:g} s for required series: {missing}",
                    until=until,
                    seen_last_received_at=seen,
                ):
                    log.info("study %s waits for series %s (rule %s)", uid, missing, rule.name)
                return
            if rule.when_series_missing == "incomplete":
                reason = (
                    f"incomplete: required series missing after {rule.series_wait_s:g} s: "
                    f"{missing} (rule {rule.name}); a new instance reopens the study"
                )
                if self.index.mark_incomplete(
                    uid, reason, now, rule=rule.name, seen_last_received_at=seen
                ):
                    log.warning("study %s %s", uid, reason)
                return
            note = f"ran without required series: {missing}"
        job_id = self.index.create_job(
            uid,
            route.pipeline,
            route.queue,
            now,
            rule=rule.name,
            route_reason=route.reason,
            reason=note,
            seen_last_received_at=seen,
        )
        if job_id is not None:
            # The rule's name, not its conditions: the logs withhold the quoted values those show
            # (dicom_node.logs); the index keeps the whole reason (pacs-ai studies, route explain).
            urgent = f"; urgent: {route.urgent_because}" if route.urgent_because else ""
            log.info(
                "study %s complete: rule %s → %s (%s%s, job %s)",
                uid,
                rule.name,
                route.pipeline,
                route.priority,
                urgent,
                job_id,
            )

    def _requeue_jobs_of_lost_workers(self, now: float) -> None:
        queues = self.queues
        lost = self.index.requeue_jobs_of_lost_workers(
            now, queues.worker_lost_after_s, queues.max_worker_losses
        )
        report_lost_jobs(lost)

    def _publish_pending(self) -> int:
        published = 0
        epoch = self.sender.broker_epoch()
        if epoch is not None:
            lost = self.index.requeue_lost_jobs(
                epoch, running_started_before=time.time() - self.queues.visibility_timeout_s
            )
            if lost:
                log.warning(
                    "the broker restarted: %d job(s) it may have lost are handed over again",
                    len(lost),
                )
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
            self.index.mark_job_enqueued(job.job_id, time.time(), epoch)
            published += 1
        return published
