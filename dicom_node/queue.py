"""Handing jobs to the broker by task name: the node never imports worker code."""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery import Celery

from dicom_node.settings import QueueSettings

log = logging.getLogger(__name__)

TASK_PROCESS_STUDY = "pacs_ai.process_study"
# Brokers whose run can be told apart: Redis and Valkey report a new run_id at every start.
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def celery_config(queues: QueueSettings, broker_url: str) -> dict[str, Any]:
    """Broker settings shared by the producer (node) and the consumers (workers)."""
    return {
        "broker_url": broker_url,
        "broker_transport_options": {
            # Above the longest job, or Redis redelivers a running job to a second worker.
            "visibility_timeout": queues.visibility_timeout_s,
        },
        "broker_connection_retry_on_startup": True,
        "task_default_queue": queues.routine_queue,
        "task_serializer": "json",
        "accept_content": ["json"],
        "result_backend": None,
        "task_ignore_result": True,
    }


class JobQueue:
    """Producer side of the queue."""

    def __init__(self, queues: QueueSettings, broker_url: str) -> None:
        self.app = Celery("pacs_ai_node", set_as_current=False)
        self.app.conf.update(celery_config(queues, broker_url))
        self._redis: redis.Redis | None = None
        if broker_url.startswith(_REDIS_SCHEMES):
            self._redis = redis.Redis.from_url(
                broker_url, socket_timeout=2.0, socket_connect_timeout=2.0
            )

    def broker_epoch(self) -> str | None:
        """The broker's current run (Redis ``run_id``); None when unknown or unreachable.

        A message handed to an earlier run may be gone: see ``Index.requeue_lost_jobs``.
        """
        if self._redis is None:
            return None
        try:
            run_id = self._redis.info("server").get("run_id")
        except redis.RedisError as exc:
            log.debug("broker run unknown: %s", exc)
            return None
        return str(run_id) if run_id else None

    def send(self, job_id: str, queue: str) -> None:
        """Publish one study job; raises when the broker does not take it."""
        self.app.send_task(
            TASK_PROCESS_STUDY,
            kwargs={"job_id": job_id},
            queue=queue,
            task_id=job_id,
            # Fail fast: the job stays in the index and the reconciler hands it over later.
            retry=True,
            retry_policy={"max_retries": 1, "interval_start": 0.2, "interval_step": 0.2},
        )

    def close(self) -> None:
        if self._redis is not None:
            self._redis.close()
        self.app.close()
