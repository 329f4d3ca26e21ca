"""Handing jobs to the broker by task name: the node never imports worker code."""

from __future__ import annotations

from typing import Any

from celery import Celery

from dicom_node.settings import QueueSettings

TASK_PROCESS_STUDY = "pacs_ai.process_study"


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
        self.app.close()
