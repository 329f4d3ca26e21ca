"""The index behaves the same on SQLite (default) and PostgreSQL (scaled out)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from dicom_node.errors import OutOfResources
from dicom_node.index import Index, InstanceRecord, JobStatus, StudyStatus


@pytest.fixture(params=["sqlite", "postgresql"])
def index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Index]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
    else:
        url = request.getfixturevalue("postgres_url")
    idx = Index(url)
    yield idx
    idx.close()


def record(
    sop: str, study: str = "1.2.3", modality: str = "CR", at: float = 100.0
) -> InstanceRecord:
    return InstanceRecord(
        sop_instance_uid=sop,
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality=modality,
        path=f"/spool/{sop}.dcm",
        size_bytes=10,
        calling_aet="MODALITY",
        received_at=at,
    )


def test_study_is_created_by_its_first_instance_and_counts_later_ones(index: Index) -> None:
    assert index.record_instance(record("1.2.3.1.1"), urgent=False, complete_after=130.0)
    assert index.record_instance(record("1.2.3.1.2", at=101.0), urgent=True, complete_after=131.0)
    assert not index.record_instance(
        record("1.2.3.1.2", at=102.0), urgent=False, complete_after=132.0
    )
    study = index.study("1.2.3")
    assert study is not None
    assert study.instance_count == 2
    assert study.urgent
    assert study.status == StudyStatus.RECEIVING
    assert study.complete_after == 131.0


def test_release_makes_a_study_due_and_completion_creates_exactly_one_job(index: Index) -> None:
    index.record_instance(record("1.2.3.1.1"), urgent=False, complete_after=1000.0)
    assert index.due_studies(now=200.0) == []
    index.release_studies(["1.2.3"], now=150.0)
    [due] = index.due_studies(now=200.0)
    job_id = index.create_job(due.study_instance_uid, "cxr", "routine", now=200.0)
    assert index.due_studies(now=300.0) == []
    assert [j.job_id for j in index.jobs_to_enqueue()] == [job_id]
    index.mark_job_enqueued(job_id, now=201.0)
    assert index.jobs_to_enqueue() == []
    job = index.start_job(job_id, now=202.0)
    assert job is not None and job.status == JobStatus.RUNNING and job.attempts == 1
    index.finish_job(job_id, now=203.0, result={"ok": True})
    assert index.start_job(job_id, now=204.0) is None, "a finished job must not run again"
    study = index.study("1.2.3")
    assert study is not None and study.status == StudyStatus.DONE and study.runs == 1


def test_only_jobs_stranded_by_an_earlier_run_of_the_broker_are_handed_over_again(
    index: Index,
) -> None:
    def queued(study: str, epoch: str | None) -> str:
        index.record_instance(record(study + ".1", study=study), urgent=False, complete_after=1.0)
        job_id = index.create_job(study, "cxr", "routine", now=2.0)
        assert job_id is not None
        index.mark_job_enqueued(job_id, now=3.0, broker_epoch=epoch)
        return job_id

    before = queued("1.2.3", "run-a")
    unknown = queued("1.2.4", None)  # queued before runs were recorded: nothing to compare
    current = queued("1.2.5", "run-b")
    running = queued("1.2.6", "run-a")
    index.start_job(running, now=100.0)  # its worker has the message, and may still run it
    dead = queued("1.2.7", "run-a")
    index.start_job(dead, now=4.0)  # started longer than the visibility timeout ago

    assert set(index.requeue_lost_jobs("run-b", running_started_before=50.0)) == {before, dead}
    assert {j.job_id for j in index.jobs_to_enqueue()} == {before, dead}
    assert {j.job_id: j.status for j in map(index.job, [unknown, current, running]) if j} == {
        unknown: JobStatus.QUEUED,
        current: JobStatus.QUEUED,
        running: JobStatus.RUNNING,
    }
    assert index.requeue_lost_jobs("run-b", running_started_before=50.0) == [], "once"


def test_a_job_a_worker_started_before_its_hand_over_was_recorded_keeps_the_hand_over(
    index: Index,
) -> None:
    index.record_instance(record("1.2.3.1.1"), urgent=False, complete_after=1.0)
    job_id = index.create_job("1.2.3", "cxr", "routine", now=2.0)
    assert job_id is not None
    # The worker took the message the moment the broker had it, before the assembler wrote so.
    index.start_job(job_id, now=3.0)
    index.mark_job_enqueued(job_id, now=3.5, broker_epoch="run-a")
    job = index.job(job_id)
    assert job is not None and job.status == JobStatus.RUNNING
    assert job.enqueued_at == 3.5
    # Its worker lost with the broker, the job is found and handed over again.
    assert index.requeue_lost_jobs("run-b", running_started_before=50.0) == [job_id]


def test_late_instance_reopens_a_finished_study(index: Index) -> None:
    index.record_instance(record("1.2.3.1.1"), urgent=False, complete_after=100.0)
    job_id = index.create_job("1.2.3", "cxr", "routine", now=101.0)
    index.start_job(job_id, now=102.0)
    index.finish_job(job_id, now=103.0, result={})
    index.record_instance(record("1.2.3.1.9", at=200.0), urgent=False, complete_after=230.0)
    study = index.study("1.2.3")
    assert study is not None and study.status == StudyStatus.RECEIVING
    assert [s.study_instance_uid for s in index.due_studies(now=231.0)] == ["1.2.3"]


def test_alert_is_claimed_once_per_study_finding_and_channel(index: Index) -> None:
    first, created = index.claim_alert("1.2.3", "pneumothorax", "webhook", 0.9, now=1.0)
    assert created
    index.record_alert_attempt(first, now=2.0, error=None)
    again, created = index.claim_alert("1.2.3", "pneumothorax", "webhook", 0.95, now=3.0)
    assert again == first and not created


def test_failed_alert_is_due_again_after_its_backoff_and_leased_by_one_sender(index: Index) -> None:
    alert_id, _ = index.claim_alert("1.2.3", "pneumothorax", "hl7", 0.9, now=10.0, payload={})
    [due] = index.due_alerts(now=10.0)
    assert index.lease_alert(alert_id, due["next_attempt_at"], until=50.0)
    assert not index.lease_alert(alert_id, due["next_attempt_at"], until=50.0), "only one sender"
    index.record_alert_attempt(alert_id, now=11.0, error="down", next_attempt_at=13.0)
    assert index.due_alerts(now=12.0) == []
    assert [a["id"] for a in index.due_alerts(now=13.0)] == [alert_id]


def test_acknowledging_one_channel_acknowledges_the_finding_everywhere(index: Index) -> None:
    webhook, _ = index.claim_alert("1.2.3", "pneumothorax", "webhook", 0.9, now=1.0)
    index.claim_alert("1.2.3", "pneumothorax", "email", 0.9, now=1.0)
    assert index.acknowledge_alert(webhook, by="dr.er", now=5.0) == 2
    assert index.due_alerts(now=100.0) == []
    assert index.unacknowledged_before(100.0) == []


def test_concurrent_instances_of_one_study_are_all_counted(index: Index) -> None:
    def store(i: int) -> None:
        index.record_instance(
            record(f"1.2.3.1.{i}", at=100.0 + i), urgent=False, complete_after=200.0
        )

    threads = [threading.Thread(target=store, args=(i,)) for i in range(1, 21)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    study = index.study("1.2.3")
    assert study is not None and study.instance_count == 20
    assert len(index.study_instances("1.2.3")) == 20


class _Commits:
    """Counts the transactions the index's instance rows went in (the real commit still runs)."""

    def __init__(self, index: Index) -> None:
        self.count = 0
        self.rows = 0
        self._group = group = index._rows
        real = group._commit

        def counted(take: Callable[[], list[Any]]) -> None:
            def counted_take() -> list[Any]:
                rows = take()
                self.rows += len(rows)
                return rows

            self.count += 1
            real(counted_take)

        group._commit = counted

    def wait_all_in(self, count: int) -> None:
        """Until ``count`` rows are queued or inside a transaction (their threads are waiting)."""
        deadline = time.monotonic() + 30
        while self.rows + len(self._group._queue) < count:
            assert time.monotonic() < deadline, "the stores never reached the index"
            time.sleep(0.01)


def _store_at_once(index: Index, sops: list[str]) -> tuple[list[threading.Thread], list[Any]]:
    """One thread per instance, as associations would; each one's result, in the same order."""
    results: list[Any] = [None] * len(sops)

    def store(position: int, sop: str) -> None:
        try:
            results[position] = index.record_instance(
                record(sop), urgent=False, complete_after=200.0
            )
        except OutOfResources as exc:
            results[position] = exc

    threads = [threading.Thread(target=store, args=item) for item in enumerate(sops)]
    for t in threads:
        t.start()
    return threads, results


@contextmanager
def _index_busy(index: Index) -> Iterator[None]:
    """Another writer holds the index (another listener process committing, say)."""
    if index.engine.dialect.name == "sqlite":
        other = sqlite3.connect(str(index.engine.url.database), isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            yield
        finally:
            other.execute("ROLLBACK")
            other.close()
        return
    with index.engine.connect() as conn, conn.begin():
        conn.exec_driver_sql("LOCK TABLE instances IN EXCLUSIVE MODE")
        yield


def test_instances_stored_at_once_share_commits_and_each_returns_recorded(index: Index) -> None:
    commits = _Commits(index)
    sops = [f"1.2.3.1.{i}" for i in range(1, 9)]
    with _index_busy(index):
        threads, results = _store_at_once(index, sops)
        commits.wait_all_in(len(sops))
        assert results == [None] * 8, "a store returned before its row could be committed"
    for t in threads:
        t.join()
    assert results == [True] * 8
    assert commits.count <= 2, f"{commits.count} commits for 8 rows stored at once"
    study = index.study("1.2.3")
    assert study is not None and study.instance_count == 8
    assert {i.sop_instance_uid for i in index.study_instances("1.2.3")} == set(sops)


def test_a_row_the_index_refuses_fails_alone_in_its_group(tmp_path: Path) -> None:
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    with sqlite3.connect(tmp_path / "index.sqlite3") as db:
        db.execute(
            "CREATE TRIGGER refuse_one BEFORE INSERT ON instances "
            "WHEN NEW.sop_instance_uid = '1.2.3.1.4' BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    sops = [f"1.2.3.1.{i}" for i in range(1, 7)]
    commits = _Commits(index)
    try:
        with _index_busy(index):
            threads, results = _store_at_once(index, sops)
            commits.wait_all_in(len(sops))
        for t in threads:
            t.join()
        assert isinstance(results.pop(3), OutOfResources)  # 1.2.3.1.4
        assert results == [True] * 5
        assert index.instance("1.2.3.1.4") is None
        study = index.study("1.2.3")
        assert study is not None and study.instance_count == 5
    finally:
        index.close()


def test_a_duplicate_in_the_same_group_is_recorded_once(index: Index) -> None:
    commits = _Commits(index)
    with _index_busy(index):
        threads, results = _store_at_once(index, ["1.2.3.1.1", "1.2.3.1.2", "1.2.3.1.1"])
        commits.wait_all_in(3)
    for t in threads:
        t.join()
    assert sorted(results) == [False, True, True], "the second copy is a known instance"
    assert len(index.study_instances("1.2.3")) == 2
    study = index.study("1.2.3")
    assert study is not None and study.instance_count == 2


def test_only_instance_rows_commit_without_waiting_for_the_disk(tmp_path: Path) -> None:
    # SQLite: an instance row is committed with synchronous=NORMAL (a power loss may take it; its
    # file is in the spool and dicom_node.recovery indexes it again). Every other write on the
    # same pooled connections still waits for the disk (FULL), which also flushes the rows
    # before it.
    index = Index(f"sqlite:///{tmp_path / 'index.sqlite3'}")
    try:
        assert not index.rows_wait_for_disk
        seen: list[tuple[int, sqlite3.Connection]] = []
        run = index._record.insert_instance.run

        def spy(cursor: Any, values: Mapping[str, Any]) -> Any:
            seen.append((cursor.execute("PRAGMA synchronous").fetchone()[0], cursor.connection))
            return run(cursor, values)

        index._record.insert_instance.run = spy  # type: ignore[method-assign]
        assert index.record_instance(record("1.2.3.1.1"), urgent=False, complete_after=130.0)
        [(mode, connection)] = seen
        assert mode == 1  # NORMAL
        # The same connection, back in the pool for any other write: FULL again.
        assert connection.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        index.close()


# --- jobs whose worker died ----------------------------------------------------------------------


def _running_job(index: Index, study: str, worker: str, at: float = 200.0) -> str:
    index.record_instance(record(study + ".1.1", study=study), urgent=True, complete_after=130.0)
    job_id = index.create_job(study, "cxr", "stat", now=at)
    assert job_id is not None
    index.mark_job_enqueued(job_id, at)
    assert index.start_job(job_id, at + 1, worker=worker) is not None
    return job_id


def test_a_job_whose_worker_died_goes_back_to_its_queue_and_after_three_deaths_is_dead(
    index: Index,
) -> None:
    job_id = _running_job(index, "1.2.7", "host-a:101")
    other = _running_job(index, "1.2.8", "host-a:202")
    workers = ("host-a:101", "host-a:303", "host-a:404")
    for death, worker in enumerate(workers, start=1):
        assert index.worker_gone(worker, "killed by SIGABRT", 300.0 + death, max_losses=3) == [
            (job_id, JobStatus.CREATED if death < 3 else JobStatus.DEAD)
        ]
        job = index.job(job_id)
        assert job is not None and job.losses == death and job.worker is None
        if death < 3:
            assert job.status == JobStatus.CREATED
            assert [j.job_id for j in index.jobs_to_enqueue()] == [job_id]
            assert f"handed over again ({death} of 3)" in (job.error or "")
            index.mark_job_enqueued(job_id, 301.0 + death)
            index.start_job(job_id, 302.0 + death, worker=workers[death])
    job = index.job(job_id)
    assert job is not None and job.status == JobStatus.DEAD
    assert "its worker died 3 times while running it" in (job.error or "")
    assert "killed by SIGABRT" in (job.error or "")
    study = index.study("1.2.7")
    assert study is not None and study.status == StudyStatus.FAILED
    assert study.reason == job.error
    # A late copy of its message does not run it again; the other worker's job was never touched.
    assert index.start_job(job_id, 400.0, worker="host-a:505") is None
    assert index.jobs_to_enqueue() == []
    still = index.job(other)
    assert still is not None and still.status == JobStatus.RUNNING and still.losses is None


def test_a_job_whose_worker_stopped_sending_heartbeats_goes_back_to_its_queue(
    index: Index,
) -> None:
    index.worker_heartbeat("host-b:1", "host-b", 1, ["stat"], now=200.0)
    index.worker_heartbeat("host-c:1", "host-c", 1, ["stat"], now=200.0)
    silent = _running_job(index, "1.2.9", "host-b:1", at=200.0)
    alive = _running_job(index, "1.2.10", "host-c:1", at=200.0)
    unregistered = _running_job(index, "1.2.11", "host-d:1", at=200.0)
    index.worker_heartbeat("host-c:1", "host-c", 1, ["stat"], now=209.0)
    assert index.requeue_jobs_of_lost_workers(205.0, lost_after_s=8.0, max_losses=3) == []
    lost = index.requeue_jobs_of_lost_workers(209.5, lost_after_s=8.0, max_losses=3)
    assert sorted(lost) == sorted([(silent, JobStatus.CREATED), (unregistered, JobStatus.CREATED)])
    job = index.job(alive)
    assert job is not None and job.status == JobStatus.RUNNING
    assert [w["worker_id"] for w in index.workers_on("host-b")] == [], "the silent one is gone"
    assert "sent no heartbeat for 8 s" in (index.job(silent).error or "")  # type: ignore[union-attr]
