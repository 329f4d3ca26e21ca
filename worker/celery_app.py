"""The Celery application: task settings for long GPU jobs and the two queues."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.signals import worker_ready
from kombu import Queue

from dicom_node.queue import TASK_PROCESS_STUDY, celery_config
from worker import tasks
from worker.context import WorkerContext
from worker.settings import Settings

log = logging.getLogger(__name__)

TASK_DELIVER_PENDING = "pacs_ai.deliver_pending"
# Delivery retries back off from 2 s to at most 5 min; with 500 attempts that is about 40 hours.
RETRY_MAX_DELAY_S = 300
RETRY_MAX_ATTEMPTS = 500


def retry_delay(attempt: int) -> int:
    return int(min(RETRY_MAX_DELAY_S, 2 ** min(attempt + 1, 16)))


def create_app(settings: Settings, broker_url: str) -> Celery:
    """A Celery app bound to one worker context (models load once per worker process)."""
    app = Celery("pacs_ai_worker", set_as_current=False)
    queue = settings.queue
    app.conf.update(celery_config(queue, broker_url))
    app.conf.update(
        # A job is acknowledged only when it finished: a worker that dies mid-job leaves it queued.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # One job at a time per process: a GPU worker must not hoard the urgent lane's jobs.
        worker_prefetch_multiplier=1,
        task_queues=(Queue(queue.urgent_queue), Queue(queue.routine_queue)),
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        task_track_started=False,
    )
    context = WorkerContext(settings)

    def warm_up(**_: Any) -> None:
        # Load the model before the first job: an urgent study must not pay for the load.
        card = context.cxr_classifier().card
        log.info("model %s %s loaded%s", card.name, card.version, " (DEMO)" if card.demo else "")
        # Retries and escalations of urgent alerts, independent of the job queue.
        context.dispatcher.start()

    worker_ready.connect(warm_up, weak=False)

    @app.task(name=TASK_PROCESS_STUDY, bind=True, max_retries=None)
    def process_study(self: Task, job_id: str) -> None:
        pending = tasks.process_study(context, job_id)
        if not pending.done:
            _schedule_delivery(app, job_id, self.request.delivery_info, attempt=0)

    @app.task(name=TASK_DELIVER_PENDING, bind=True, max_retries=RETRY_MAX_ATTEMPTS)
    def deliver_pending(self: Task, job_id: str) -> None:
        pending = tasks.deliver_pending(context, job_id)
        if not pending.done:
            raise self.retry(countdown=retry_delay(self.request.retries))

    return app


def _schedule_delivery(app: Celery, job_id: str, delivery_info: Any, attempt: int) -> None:
    queue = (delivery_info or {}).get("routing_key") or None
    app.send_task(
        TASK_DELIVER_PENDING, kwargs={"job_id": job_id}, queue=queue, countdown=retry_delay(attempt)
    )
