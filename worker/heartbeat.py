"""A worker process's heartbeat in the index, and what a worker does about predecessors that died.

The index records which worker process runs each job (``host:pid``). While a worker lives it
writes a heartbeat every ``queue.worker_heartbeat_s``; the node's assembler hands a running job
whose worker fell silent for ``queue.worker_lost_after_s`` back to its queue. ``pacs-ai serve``
sees its own workers exit and does the same at once (``Index.worker_gone``), and a worker that
starts does it for the workers of its host that are no longer running (a worker restarted by
systemd finds its predecessor's job).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence

from dicom_node.assembly import report_lost_jobs
from dicom_node.background import BackgroundPass
from dicom_node.index import Index
from dicom_node.settings import QueueSettings

log = logging.getLogger(__name__)


def worker_id(pid: int | None = None, host: str | None = None) -> str:
    """How the index names a worker process: ``host:pid``."""
    return f"{host or socket.gethostname()}:{os.getpid() if pid is None else pid}"


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # somebody else's process: running
        return True
    return True


class Heartbeat(BackgroundPass):
    """Writes this worker process's heartbeat into the index."""

    def __init__(self, index: Index, queue: QueueSettings, queues: Sequence[str]) -> None:
        super().__init__("worker-heartbeat", queue.worker_heartbeat_s)
        self.index = index
        self.queue = queue
        self.queues = list(queues)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.worker_id = worker_id(self.pid, self.host)

    def run_once(self) -> None:
        self.index.worker_heartbeat(self.worker_id, self.host, self.pid, self.queues, time.time())

    def reap_predecessors(self) -> None:
        """Hand back the running jobs of this host's workers that are no longer running."""
        for row in self.index.workers_on(self.host):
            if row["worker_id"] == self.worker_id or _running(int(row["pid"])):
                continue
            report_lost_jobs(
                self.index.worker_gone(
                    str(row["worker_id"]),
                    "is no longer running",
                    time.time(),
                    self.queue.max_worker_losses,
                )
            )

    def stop(self) -> None:
        super().stop()
        try:
            self.index.remove_worker(self.worker_id)
        except Exception:  # the index may be gone with the machine; the timeout covers it
            log.warning("could not deregister worker %s", self.worker_id)
