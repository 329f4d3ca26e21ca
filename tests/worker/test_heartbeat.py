"""Running jobs of workers that died go back to their queue: found at a worker's start and by the
node's assembler when a worker's heartbeat stops (serve's own path is in tests/e2e)."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.assembly import StudyAssembler
from dicom_node.index import Index, JobStatus
from dicom_node.queue import JobQueue
from dicom_node.settings import CompletionSettings, QueueSettings
from tests.dicom_node.test_index import _running_job
from worker.heartbeat import Heartbeat, worker_id


@pytest.fixture
def index(tmp_path: Path) -> Iterator[Index]:
    idx = Index(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    yield idx
    idx.close()


def _dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_starting_worker_hands_back_the_jobs_of_its_host_s_dead_workers(index: Index) -> None:
    host = socket.gethostname()
    now = time.time()
    dead = _dead_pid()
    index.worker_heartbeat(worker_id(dead, host), host, dead, ["stat"], now=now)
    orphan = _running_job(index, "1.2.20", worker_id(dead, host), now)
    elsewhere = _running_job(index, "1.2.21", "other-host:1", now)
    index.worker_heartbeat("other-host:1", "other-host", 1, ["stat"], now=now)

    heartbeat = Heartbeat(index, QueueSettings(), ["stat"])
    heartbeat.run_once()
    heartbeat.reap_predecessors()

    job = index.job(orphan)
    assert job is not None and job.status == JobStatus.CREATED and job.losses == 1
    assert "is no longer running" in (job.error or "")
    other = index.job(elsewhere)
    assert other is not None and other.status == JobStatus.RUNNING, "another host's: not ours"
    assert [w["worker_id"] for w in index.workers_on(host)] == [heartbeat.worker_id]
    heartbeat.stop()
    assert index.workers_on(host) == [], "an orderly stop deregisters the worker"


def test_the_assembler_hands_over_again_a_job_whose_worker_went_silent(
    index: Index, redis_url: str
) -> None:
    queue_settings = QueueSettings(worker_heartbeat_s=1, worker_lost_after_s=3)
    queue = JobQueue(queue_settings, redis_url)
    try:
        assembler = StudyAssembler(index, queue, CompletionSettings(), queue_settings)
        started = time.time() - 10
        index.worker_heartbeat("far-host:7", "far-host", 7, ["stat"], now=started)
        silent = _running_job(index, "1.2.22", "far-host:7", started)
        index.worker_heartbeat("near-host:8", "near-host", 8, ["stat"], now=time.time())
        alive = _running_job(index, "1.2.23", "near-host:8", started)
        assert assembler.run_once() == 1, "the silent worker's job is published again"
        job = index.job(silent)
        assert job is not None and job.status == JobStatus.QUEUED and job.losses == 1
        assert "sent no heartbeat for 3 s" in (job.error or "")
        running = index.job(alive)
        assert running is not None and running.status == JobStatus.RUNNING
    finally:
        queue.close()
