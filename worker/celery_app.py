"""The Celery application: task settings for long GPU jobs and the two queues."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery
from celery.signals import worker_ready, worker_shutdown
from kombu import Queue

from dicom_node.queue import TASK_PROCESS_STUDY, celery_config
from worker import tasks
from worker.context import WorkerContext
from worker.imaging.isolated import IsolatedDecoder
from worker.settings import Settings

log = logging.getLogger(__name__)


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
        # First: jobs left running by this host's workers that died go back to their queue,
        # and this worker says it is alive before it takes a job.
        context.heartbeat.run_once()
        context.heartbeat.start()
        context.heartbeat.reap_predecessors()
        # Load the model before the first job: an urgent study must not pay for the load.
        card = context.cxr_classifier().card
        log.info("model %s %s loaded%s", card.name, card.version, " (DEMO)" if card.demo else "")
        if isinstance(context.decoder, IsolatedDecoder):
            context.decoder.start()
        # Retries and escalations of urgent alerts, independent of the job queue.
        context.dispatcher.start()
        # SR deliveries: retries with backoff, the circuit breaker and dead letters (worker.outbox).
        context.outbox.start()

    def shut_down(**_: Any) -> None:
        # An orderly stop: no job runs here any more (the heartbeat row goes), decoders end.
        context.close()

    worker_ready.connect(warm_up, weak=False)
    worker_shutdown.connect(shut_down, weak=False)

    @app.task(name=TASK_PROCESS_STUDY, max_retries=None)
    def process_study(job_id: str) -> None:
        tasks.process_study(context, job_id)

    return app
