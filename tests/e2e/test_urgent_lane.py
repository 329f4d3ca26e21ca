"""The urgent lane: a STAT pneumothorax is alerted while a routine backlog queued ahead still waits.

The stack runs as ``pacs-ai serve`` does: one worker reserved for the ``stat`` queue and one for
``stat`` and ``routine``. Real parts throughout: dcmtk ``storescu``, the listener, Redis, the demo
model, a webhook sink.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from dicom_node.index import Index, JobRow, JobStatus
from tests.dicom_node.helpers import small_study
from tests.servers import free_port, storescu
from worker.demo.sink import WebhookSink
from worker.service import Stack
from worker.settings import Settings, write_settings

BACKLOG = 20


def _stat(path: Path) -> None:
    """Mark the study STAT the way an RIS order does (Request Attributes Sequence)."""
    ds = pydicom.dcmread(path)
    item = pydicom.Dataset()
    item.RequestedProcedurePriority = "STAT"
    item.RequestedProcedureID = "RP-ER-1"
    item.ScheduledProcedureStepID = "SPS-ER-1"
    ds.RequestAttributesSequence = [item]
    ds.save_as(path, enforce_file_format=True)


def _jobs(index: Index, study_uids: list[str]) -> list[JobRow]:
    return [job for uid in study_uids for job in index.study_jobs(uid)]


def _wait(what: str, condition: Callable[[], bool], timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.e2e
def test_stat_pneumothorax_alerts_before_a_routine_backlog_queued_ahead_is_done(
    tmp_path: Path, redis_url: str, demo_model_dir: Path, webhook_sink: WebhookSink
) -> None:
    settings = Settings()
    settings.listener.port = free_port()
    settings.storage.data_dir = tmp_path / "data"
    settings.queue.broker_url = redis_url
    settings.completion.poll_interval_s = 0.1
    settings.models.cxr_triage.path = demo_model_dir
    settings.alerts.webhook.url = webhook_sink.url
    settings.alerts.webhook.secret = "test-secret"
    config = tmp_path / "site.yaml"
    write_settings(settings, config)

    routine = [
        small_study(
            tmp_path / f"routine-{i}", "pneumothorax", seed=100 + i, patient_id=f"R-{i}", size=256
        )[0]
        for i in range(BACKLOG)
    ]
    [stat] = small_study(tmp_path / "stat", "pneumothorax", seed=7, patient_id="ER-1", size=256)
    _stat(stat)
    routine_uids = [str(pydicom.dcmread(p).StudyInstanceUID) for p in routine]
    stat_uid = str(pydicom.dcmread(stat).StudyInstanceUID)

    lanes = [
        [settings.queue.urgent_queue],
        [settings.queue.urgent_queue, settings.queue.routine_queue],
    ]
    with Stack(settings, config, lanes, log_dir=tmp_path / "logs") as stack:
        assert stack.node is not None
        assert stack.wait_for_workers() == 2, f"workers did not start: {tmp_path / 'logs'}"
        index = Index(settings.index_url)
        port = stack.node.port

        # The routine backlog goes in first and is queued before the STAT study is even sent.
        assert storescu(routine, host="127.0.0.1", port=port, called_aet="PACSAI").returncode == 0
        _wait(
            "the routine backlog to be queued",
            lambda: sum(j.enqueued_at is not None for j in _jobs(index, routine_uids)) == BACKLOG,
        )
        assert {j.queue for j in _jobs(index, routine_uids)} == {settings.queue.routine_queue}
        assert storescu([stat], host="127.0.0.1", port=port, called_aet="PACSAI").returncode == 0

        def stat_alerted() -> bool:
            return any(b["study_instance_uid"] == stat_uid for _, b in webhook_sink.received())

        _wait("the STAT alert", stat_alerted)
        [stat_job] = index.study_jobs(stat_uid)
        assert stat_job.queue == settings.queue.urgent_queue
        # When the STAT alert arrives, the routine backlog is still being worked through.
        still_waiting = [j for j in _jobs(index, routine_uids) if j.status != JobStatus.DONE]
        _wait(
            "the routine backlog to finish",
            lambda: all(j.status == JobStatus.DONE for j in _jobs(index, routine_uids)),
        )
        index.close()

    arrivals = {b["study_instance_uid"]: at for at, b in webhook_sink.received()}
    order = sorted(arrivals, key=arrivals.__getitem__)
    assert set(routine_uids) <= set(order), "every routine pneumothorax alerts too"
    after_stat = order[order.index(stat_uid) + 1 :]
    # Queued behind 20 studies, the STAT alert still comes out ahead of most of them.
    assert len(still_waiting) >= BACKLOG // 2, f"only {len(still_waiting)} routine jobs left"
    assert len(after_stat) >= BACKLOG // 2, f"STAT alert came after {order.index(stat_uid)} others"
