"""The index database: the source of truth for every instance, study, job, output and alert.

SQLAlchemy Core over SQLite (default, WAL, synchronous FULL) or PostgreSQL. The queue only
dispatches; whatever the index says is unfinished is re-enqueued after a crash or restart.
Times are UTC seconds since the epoch.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError, SQLAlchemyError

from dicom_node.errors import OutOfResources


class StudyStatus(StrEnum):
    RECEIVING = "receiving"  # instances arriving; completes at release or after the quiet period
    QUEUED = "queued"  # a job was created and handed to the broker
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"
    IGNORED = "ignored"  # no routing rule applies (or the rule says ignore); the reason says why
    WAITING = "waiting"  # complete, but a required series is missing; waits until wait_until
    INCOMPLETE = "incomplete"  # a required series never came; a late instance reopens it


# A study in one of these states is handed to routing once complete_after has passed.
OPEN_STATUSES = (StudyStatus.RECEIVING, StudyStatus.WAITING)


class JobStatus(StrEnum):
    CREATED = "created"  # in the index, not yet accepted by the broker
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    # Failed for good, dead-letter style: its worker died running it queue.max_worker_losses
    # times. A late copy of its message does not run it again; a new instance makes a new job.
    DEAD = "dead"


class DeliveryStatus(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"
    # An output the destination will never take (refused SOP class, permanent failure status) or
    # that outlived the retry horizon; only an operator revives it (``pacs-ai outbox retry``).
    DEAD = "dead"
    # Stored; waiting for the destination's Storage Commitment report (until next_attempt_at).
    COMMITTING = "committing"


metadata = sa.MetaData()

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("series_instance_uid", sa.String(64), nullable=False),
    sa.Column("sop_class_uid", sa.String(64), nullable=False),
    sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
    sa.Column("modality", sa.String(16), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("calling_aet", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    # Nullable: rows written before the listener recorded it.
    sa.Column("called_aet", sa.String(16), nullable=True),
)

studies = sa.Table(
    "studies",
    metadata,
    sa.Column("study_instance_uid", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("modality", sa.String(16), nullable=False),
    sa.Column("urgent", sa.Boolean, nullable=False, default=False),
    sa.Column("calling_aet", sa.String(16), nullable=False),
    sa.Column("instance_count", sa.Integer, nullable=False),
    sa.Column("first_received_at", sa.Float, nullable=False),
    sa.Column("last_received_at", sa.Float, nullable=False),
    # When the study is due to complete; completion timers live here, not in memory.
    sa.Column("complete_after", sa.Float, nullable=True, index=True),
    sa.Column("completed_at", sa.Float, nullable=True),
    sa.Column("runs", sa.Integer, nullable=False, default=0),
    sa.Column("reason", sa.Text, nullable=True),
    # The last routing decision: the rule that matched (null when none did) and why.
    sa.Column("route_rule", sa.String(64), nullable=True),
    sa.Column("route_reason", sa.Text, nullable=True),
    # Deadline for required series, set at the first completion that found one missing.
    sa.Column("wait_until", sa.Float, nullable=True),
)

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("job_id", sa.String(36), primary_key=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("pipeline", sa.String(32), nullable=False),
    sa.Column("queue", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("enqueued_at", sa.Float, nullable=True),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("result_json", sa.Text, nullable=True),
    # Which broker instance took the job's message (Redis run_id): a broker that restarted
    # without it may have lost the message, and the job is handed over again.
    sa.Column("broker_epoch", sa.String(64), nullable=True),
    # The worker process running it ("host:pid"), and how often a worker died running it.
    sa.Column("worker", sa.String(128), nullable=True),
    sa.Column("losses", sa.Integer, nullable=True),
)

# Worker processes and their heartbeats: a running job whose worker went silent goes back to
# its queue (Index.requeue_jobs_of_lost_workers).
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("worker_id", sa.String(128), primary_key=True),
    sa.Column("host", sa.String(64), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("queues", sa.Text, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("heartbeat_at", sa.Float, nullable=False),
)

outputs = sa.Table(
    "outputs",
    metadata,
    sa.Column("sop_instance_uid", sa.String(64), primary_key=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False, index=True),
    sa.Column("job_id", sa.String(36), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    # Versions (replace vs amend): what the output was made from, by which model, which output
    # it amends and which one amended it. NULL in rows written before versions were tracked.
    sa.Column("input_digest", sa.String(64), nullable=True),
    sa.Column("model", sa.String(128), nullable=True),
    sa.Column("predecessor_uid", sa.String(64), nullable=True),
    sa.Column("replaced_by", sa.String(64), nullable=True),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("sop_instance_uid", sa.String(64), nullable=False),
    sa.Column("destination", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float, nullable=True),
    # Outbox columns (added to older indexes by _add_missing_columns).
    sa.Column("next_attempt_at", sa.Float, nullable=True, index=True),
    sa.Column("last_attempt_at", sa.Float, nullable=True),
    # The destination's last DIMSE status (C-STORE), None when it never answered one.
    sa.Column("last_status", sa.Integer, nullable=True),
    sa.Column("dead_at", sa.Float, nullable=True),
    # Set by an operator's retry: the retry horizon counts from here instead of created_at.
    sa.Column("revived_at", sa.Float, nullable=True),
    # The Storage Commitment transaction a committing row waits on.
    sa.Column("transaction_uid", sa.String(64), nullable=True, index=True),
    sa.UniqueConstraint("sop_instance_uid", "destination"),
)

# Circuit breaker per output destination, shared by every worker process.
delivery_circuits = sa.Table(
    "delivery_circuits",
    metadata,
    sa.Column("destination", sa.String(64), primary_key=True),
    sa.Column("consecutive_failures", sa.Integer, nullable=False, default=0),
    # While set and in the future, nobody sends to the destination.
    sa.Column("open_until", sa.Float, nullable=True),
    # A half-open probe in flight until then: one sender at a time tries a cooled-down destination.
    sa.Column("probe_until", sa.Float, nullable=True),
    sa.Column("last_error", sa.Text, nullable=True),
)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_instance_uid", sa.String(64), nullable=False),
    sa.Column("finding", sa.String(64), nullable=False),
    sa.Column("channel", sa.String(32), nullable=False),
    sa.Column("probability", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_error", sa.Text, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("delivered_at", sa.Float, nullable=True),
    # The alert as sent (JSON), so a retry hours later sends the same content.
    sa.Column("payload_json", sa.Text, nullable=True),
    # Retries back off; a sender leases a row by moving this forward before it sends.
    sa.Column("next_attempt_at", sa.Float, nullable=True, index=True),
    # Acknowledging any channel's alert acknowledges the study's finding on every channel.
    sa.Column("acknowledged_at", sa.Float, nullable=True),
    sa.Column("acknowledged_by", sa.String(64), nullable=True),
    # One alert per study, finding and channel: re-runs do not re-alert.
    sa.UniqueConstraint("study_instance_uid", "finding", "channel"),
)

quarantine = sa.Table(
    "quarantine",
    metadata,
    sa.Column("id", sa.String(36), primary_key=True),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("calling_aet", sa.String(16), nullable=False),
    sa.Column("status_code", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("sop_instance_uid", sa.String(64), nullable=True),
)


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str
    path: str
    size_bytes: int
    calling_aet: str
    received_at: float
    called_aet: str | None = None


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    status: StudyStatus
    modality: str
    urgent: bool
    calling_aet: str
    instance_count: int
    first_received_at: float
    last_received_at: float
    complete_after: float | None
    completed_at: float | None
    runs: int
    reason: str | None
    route_rule: str | None = None
    route_reason: str | None = None
    wait_until: float | None = None


@dataclass(frozen=True)
class JobRow:
    job_id: str
    study_instance_uid: str
    pipeline: str
    queue: str
    status: JobStatus
    created_at: float
    enqueued_at: float | None
    started_at: float | None
    finished_at: float | None
    attempts: int
    error: str | None
    result: dict[str, Any] | None
    broker_epoch: str | None = None
    worker: str | None = None
    losses: int | None = None


@dataclass(frozen=True)
class QuarantineRow:
    id: str
    received_at: float
    calling_aet: str
    status_code: int
    reason: str
    path: str
    sop_instance_uid: str | None


def _study(row: Any) -> StudyRow:
    m = row._mapping
    return StudyRow(**{**m, "status": StudyStatus(m["status"])})


def _job(row: Any) -> JobRow:
    m = dict(row._mapping)
    raw = m.pop("result_json")
    return JobRow(
        **{**m, "status": JobStatus(m["status"]), "result": json.loads(raw) if raw else None}
    )


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # pysqlite's own transaction handling opens and commits transactions behind SQLAlchemy's back
    # and breaks SAVEPOINTs: a failed insert could leave a pooled connection stuck in a stale
    # transaction. Autocommit at the driver, and SQLAlchemy's "begin" event emits BEGIN itself.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # Wait for a lock rather than fail: several listener processes open the index at once.
    cursor.execute("PRAGMA busy_timeout=30000")
    # WAL lets readers run beside the one writer; FULL makes a committed row survive power loss
    # (all but instance rows: Index.rows_wait_for_disk).
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.close()


_READ_ONLY = "pacs_ai_read_only"


def _sqlite_begin(conn: Connection) -> None:
    # IMMEDIATE takes the write lock up front: a transaction that reads then writes can never fail
    # with "database is locked" on the upgrade (busy_timeout does not retry that case), it waits.
    # A read-only transaction (Index._read) needs no lock: WAL readers see the last commit.
    if conn.get_execution_options().get(_READ_ONLY):
        conn.exec_driver_sql("BEGIN")
    else:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


class _DriverStatement:
    """A statement compiled once to the driver's SQL, run on a DBAPI cursor (no SQLAlchemy work)."""

    def __init__(self, statement: sa.ClauseElement, dialect: sa.Dialect) -> None:
        compiled = statement.compile(dialect=dialect)
        self.sql = str(compiled)
        # Plain values for the driver (psycopg would write an Enum by its name, not its value).
        self.defaults = {
            name: value.value if isinstance(value, Enum) else value
            for name, value in compiled.params.items()
        }
        self.order: list[str] | None = getattr(compiled, "positiontup", None)

    def run(self, cursor: Any, values: Mapping[str, Any]) -> Any:
        """Execute; return the first row (None when the statement returned none)."""
        merged = {**self.defaults, **values}
        if self.order is not None:
            cursor.execute(self.sql, tuple(merged[name] for name in self.order))
        else:
            cursor.execute(self.sql, merged)
        return cursor.fetchone() if cursor.description else None


class _RecordStatements:
    """The statements of ``Index.record_instance``, built once per dialect (SQLite, PostgreSQL)."""

    def __init__(self, dialect: sa.Dialect) -> None:
        self.insert_instance, self.insert_study, self.update_study = (
            _DriverStatement(statement, dialect) for statement in self._build(dialect.name)
        )

    @staticmethod
    def _build(dialect: str) -> tuple[sa.ClauseElement, sa.ClauseElement, sa.ClauseElement]:
        from sqlalchemy.dialects import postgresql, sqlite

        insert = sqlite.insert if dialect == "sqlite" else postgresql.insert
        greatest = sa.func.max if dialect == "sqlite" else sa.func.greatest
        p = sa.bindparam
        # RETURNING tells whether a row went in (rowcount is -1 with psycopg).
        insert_instance = (
            insert(instances)
            .on_conflict_do_nothing(index_elements=[instances.c.sop_instance_uid])
            .returning(instances.c.sop_instance_uid)
        )
        insert_study = (
            insert(studies)
            .values(
                study_instance_uid=p("uid"),
                status=StudyStatus.RECEIVING,
                modality=p("modality"),
                urgent=p("urgent"),
                calling_aet=p("calling_aet"),
                instance_count=1,
                first_received_at=p("received_at"),
                last_received_at=p("received_at"),
                complete_after=p("complete_after"),
                runs=0,
            )
            .on_conflict_do_nothing(index_elements=[studies.c.study_instance_uid])
            .returning(studies.c.study_instance_uid)
        )
        update_study = (
            studies.update()
            .where(studies.c.study_instance_uid == p("uid"))
            .values(
                status=StudyStatus.RECEIVING,
                urgent=sa.or_(studies.c.urgent, p("urgent")),
                instance_count=studies.c.instance_count + 1,
                last_received_at=p("received_at"),
                # A study still receiving keeps its latest timer; a study that was waiting or
                # finished starts a fresh one (not the wait deadline).
                complete_after=sa.case(
                    (
                        studies.c.status == StudyStatus.RECEIVING,
                        greatest(
                            sa.func.coalesce(studies.c.complete_after, 0), p("complete_after")
                        ),
                    ),
                    else_=p("complete_after"),
                ),
                reason=None,
            )
        )
        return insert_instance, insert_study, update_study


def _add_missing_columns(engine: Engine) -> None:
    """Add nullable columns introduced since an index was created (no data is rewritten)."""
    # Inspect first, alter after: the inspector has its own connection, and holding a write
    # transaction open while it reads would wait on ourselves.
    inspector = sa.inspect(engine)
    missing = []
    for table in metadata.sorted_tables:
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name in present:
                continue
            if not column.nullable:
                raise RuntimeError(f"index table {table.name} lacks required column {column.name}")
            missing.append((table.name, column.name, column.type.compile(dialect=engine.dialect)))
    if not missing:
        return
    with engine.begin() as conn:
        for table_name, column_name, kind in missing:
            conn.execute(sa.text(f'ALTER TABLE {table_name} ADD COLUMN "{column_name}" {kind}'))


def create_engine(url: str) -> Engine:
    """An engine for the index URL with the durability settings the index needs."""
    if url.startswith("sqlite"):
        database = sa.engine.make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        event.listen(engine, "begin", _sqlite_begin)
        return engine
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return sa.create_engine(url, pool_pre_ping=True, pool_size=20, max_overflow=20)


@dataclass(eq=False)
class _PendingRow:
    """An instance row waiting for its commit, and what became of it."""

    record: InstanceRecord
    urgent: bool
    complete_after: float
    done: threading.Event = field(default_factory=threading.Event)
    leads: bool = False  # set when this row's thread is to commit the next group
    fresh: bool | None = None  # None until its transaction ended
    error: Exception | None = None


class _GroupCommit:
    """Instance rows recorded at once by several associations share one transaction.

    A commit holds the index's one write lock (SQLite), and on PostgreSQL waits for the disk;
    when SQLite still flushed its log for each row, with eight associations each waiting its
    turn, a row waited 15-22 ms for the index (``rows_wait_for_disk``: it no longer does). Here
    the thread whose row finds no commit under way leads: it opens the transaction and, once the
    write lock is its own, takes every row queued by then, so rows that came while it waited for
    the lock go in with it. The others wait; when the commit ends each learns what became of its
    row, and the first row queued meanwhile leads the next group. Every thread still returns only
    after its own row is committed, and commits at most one group.
    """

    def __init__(self, commit: Callable[[Callable[[], list[_PendingRow]]], None]) -> None:
        # ``commit(take)`` runs one transaction over the rows ``take()`` hands it, and settles
        # each (``fresh`` or ``error``).
        self._commit = commit
        self._lock = threading.Lock()
        self._queue: list[_PendingRow] = []
        self._busy = False

    def record(self, row: _PendingRow) -> None:
        """Return once ``row`` is settled."""
        with self._lock:
            self._queue.append(row)
            leads = not self._busy
            self._busy = True
        if not leads:
            row.done.wait()
            if not row.leads:
                return
        group: list[_PendingRow] = []

        def take() -> list[_PendingRow]:
            with self._lock:
                taken, self._queue = self._queue, []
            group.extend(taken)
            return taken

        try:
            self._commit(take)
        finally:
            if row not in group:
                take()  # the transaction failed before it took the rows: they are settled here
            for other in group:
                if other.fresh is None and other.error is None:
                    other.error = RuntimeError("the index write was interrupted")
                if other is not row:
                    other.done.set()
            with self._lock:
                if self._queue:
                    self._queue[0].leads = True
                    self._queue[0].done.set()
                else:
                    self._busy = False


class Index:
    """Typed operations on the index database; every method is one transaction (instance rows
    recorded at the same moment by several associations share theirs)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self._create_schema()
        self._record = _RecordStatements(self.engine.dialect)
        self._driver_error: type[Exception] = self.engine.dialect.loaded_dbapi.Error
        self._rows = _GroupCommit(self._commit_rows)

    def _create_schema(self, timeout_s: float = 60.0) -> None:
        # Processes starting together race to create the tables; the loser waits and re-checks.
        deadline = time.time() + timeout_s
        while True:
            try:
                metadata.create_all(self.engine)
                _add_missing_columns(self.engine)
                return
            except OperationalError as exc:
                transient = "locked" in str(exc) or "already exists" in str(exc)
                if not transient or time.time() > deadline:
                    raise
                time.sleep(0.2)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _read(self) -> Iterator[Connection]:
        """A transaction that only reads: on SQLite it takes no write lock (WAL readers don't)."""
        with self.engine.connect() as conn:
            conn.execution_options(**{_READ_ONLY: True})
            with conn.begin():
                yield conn

    # --- instances and studies -------------------------------------------------------------

    def record_instance(self, rec: InstanceRecord, *, urgent: bool, complete_after: float) -> bool:
        """Record a stored instance and its study; return False for an already known instance.

        An instance that arrives for a study that already finished reopens it, so a new run sees
        the late image. Returns once the row is committed; raises ``OutOfResources`` when it
        could not be. This runs once per received instance, so its statements are built once
        (``_RecordStatements``), it takes three statements at most, and rows recorded at once by
        several associations share a commit (``_GroupCommit``).
        """
        row = _PendingRow(rec, urgent, complete_after)
        self._rows.record(row)
        if row.error is not None or row.fresh is None:
            error = row.error or RuntimeError("the index write was interrupted")
            raise OutOfResources(f"index unavailable: {type(error).__name__}") from error
        return row.fresh

    def _commit_rows(self, take: Callable[[], list[_PendingRow]]) -> None:
        """One transaction over the rows ``take()`` gives once the write lock is held.

        When a statement fails, the rows are tried again one transaction each, so that one bad
        row fails alone; when the index cannot be reached, every row fails.
        """
        rows: list[_PendingRow] = []
        try:
            with self._driver_tx(wait_for_disk=False) as cursor:
                rows = take()
                for row in rows:
                    row.fresh = self._insert_row(cursor, row)
        except (SQLAlchemyError, self._driver_error) as exc:
            for row in rows:
                row.fresh = None
            if len(rows) > 1:
                for row in rows:
                    self._commit_alone(row)
                return
            for row in rows or take():
                row.error = exc

    def _commit_alone(self, row: _PendingRow) -> None:
        self._commit_rows(lambda: [row])

    def _insert_row(self, cursor: Any, row: _PendingRow) -> bool:
        statements, rec = self._record, row.record
        # Only a row with the same SOP Instance UID makes this an idempotent duplicate; any
        # other constraint failure raises and is not acknowledged as stored.
        if statements.insert_instance.run(cursor, rec.__dict__) is None:
            return False
        values = {
            "uid": rec.study_instance_uid,
            "modality": rec.modality,
            "urgent": row.urgent,
            "calling_aet": rec.calling_aet,
            "received_at": rec.received_at,
            "complete_after": row.complete_after,
        }
        if statements.insert_study.run(cursor, values) is None:
            statements.update_study.run(cursor, values)
        return True

    @property
    def rows_wait_for_disk(self) -> bool:
        """False when an instance row's commit returns before the disk has it (SQLite).

        SQLite (WAL) commits instance rows with ``synchronous=NORMAL``: the row is in the
        write-ahead log and every connection sees it, a killed process loses nothing, but the
        log is flushed to the disk only by the next commit that waits for it (every other write
        here does, and so does each checkpoint). A power loss or kernel crash can thus lose the
        last rows, never their files, which were flushed and renamed into place before the row
        was written: ``dicom_node.recovery`` indexes such files again when the node next starts.
        On PostgreSQL every commit waits for the disk.
        """
        return self.engine.dialect.name != "sqlite"

    @contextmanager
    def _driver_tx(self, *, wait_for_disk: bool = True) -> Iterator[Any]:
        """A write transaction on the pooled DBAPI connection itself, for the per-instance row.

        ``wait_for_disk=False``: on SQLite, commit without flushing the log (``rows_wait_for_disk``).
        A connection whose statement failed is replaced: a SQLite connection whose statement
        failed inside a trigger went on failing after the trigger was dropped.
        """
        sqlite = self.engine.dialect.name == "sqlite"
        relaxed = sqlite and not wait_for_disk
        conn = self.engine.raw_connection()
        try:
            cursor = conn.cursor()
            try:
                if relaxed:
                    cursor.execute("PRAGMA synchronous=NORMAL")
                if sqlite:
                    cursor.execute("BEGIN IMMEDIATE")  # driver autocommit: see _sqlite_pragmas
                yield cursor
                conn.commit()
            except BaseException:
                with suppress(Exception):
                    conn.rollback()
                conn.invalidate()
                raise
            finally:
                if relaxed and conn.dbapi_connection is not None:
                    try:  # every other write on this pooled connection waits for the disk
                        cursor.execute("PRAGMA synchronous=FULL")
                    except Exception:
                        conn.invalidate()
                with suppress(Exception):
                    cursor.close()
        finally:
            conn.close()  # back to the pool (an invalidated one is replaced)

    def latest_received_at(self) -> float | None:
        """When the most recently received instance in the index arrived (None: none yet)."""
        with self._read() as conn:
            value = conn.execute(sa.select(sa.func.max(instances.c.received_at))).scalar()
        return None if value is None else float(value)

    def release_studies(self, study_uids: Sequence[str], now: float) -> None:
        """The sending association released: these (CR/DX) studies are complete now."""
        if not study_uids:
            return
        with self._tx() as conn:
            conn.execute(
                studies.update()
                .where(studies.c.study_instance_uid.in_(list(study_uids)))
                .where(studies.c.status == StudyStatus.RECEIVING)
                .values(complete_after=now)
            )

    def due_studies(self, now: float) -> list[StudyRow]:
        """Studies whose completion time (or wait for required series) has come."""
        with self._read() as conn:
            rows = conn.execute(
                sa.select(studies)
                .where(studies.c.status.in_(OPEN_STATUSES))
                .where(studies.c.complete_after <= now)
                .order_by(studies.c.urgent.desc(), studies.c.complete_after)
            ).all()
        return [_study(r) for r in rows]

    def study(self, study_uid: str) -> StudyRow | None:
        with self._read() as conn:
            row = conn.execute(
                sa.select(studies).where(studies.c.study_instance_uid == study_uid)
            ).first()
        return _study(row) if row else None

    def list_studies(self, limit: int = 100) -> list[StudyRow]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(studies).order_by(studies.c.last_received_at.desc()).limit(limit)
            ).all()
        return [_study(r) for r in rows]

    def study_instances(self, study_uid: str) -> list[InstanceRecord]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(instances)
                .where(instances.c.study_instance_uid == study_uid)
                .order_by(instances.c.received_at)
            ).all()
        return [InstanceRecord(**r._mapping) for r in rows]

    def instance(self, sop_uid: str) -> InstanceRecord | None:
        with self._read() as conn:
            row = conn.execute(
                sa.select(instances).where(instances.c.sop_instance_uid == sop_uid)
            ).first()
        return InstanceRecord(**row._mapping) if row else None

    def _settle(
        self,
        conn: Connection,
        study_uid: str,
        seen_last_received_at: float | None,
        values: dict[str, Any],
    ) -> bool:
        """Move an open study on, unless an instance arrived since routing looked at it."""
        query = (
            studies.update()
            .where(studies.c.study_instance_uid == study_uid)
            .where(studies.c.status.in_(OPEN_STATUSES))
        )
        if seen_last_received_at is not None:
            query = query.where(studies.c.last_received_at == seen_last_received_at)
        return conn.execute(query.values(**values)).rowcount == 1

    def ignore_study(
        self,
        study_uid: str,
        reason: str,
        now: float,
        *,
        rule: str | None = None,
        seen_last_received_at: float | None = None,
    ) -> bool:
        """No rule routes the study (or its rule says ignore); False if it changed meanwhile."""
        with self._tx() as conn:
            return self._settle(
                conn,
                study_uid,
                seen_last_received_at,
                {
                    "status": StudyStatus.IGNORED,
                    "reason": reason,
                    "completed_at": now,
                    "route_rule": rule,
                    "route_reason": reason,
                    "wait_until": None,
                },
            )

    def wait_for_series(
        self,
        study_uid: str,
        *,
        rule: str,
        reason: str,
        until: float,
        seen_last_received_at: float | None = None,
    ) -> bool:
        """A required series is missing: re-examine the study at ``until`` or at a new instance."""
        with self._tx() as conn:
            return self._settle(
                conn,
                study_uid,
                seen_last_received_at,
                {
                    "status": StudyStatus.WAITING,
                    "reason": reason,
                    "complete_after": until,
                    "wait_until": until,
                    "route_rule": rule,
                },
            )

    def mark_incomplete(
        self,
        study_uid: str,
        reason: str,
        now: float,
        *,
        rule: str,
        seen_last_received_at: float | None = None,
    ) -> bool:
        """Required series never came: nothing runs; a late instance reopens the study."""
        with self._tx() as conn:
            return self._settle(
                conn,
                study_uid,
                seen_last_received_at,
                {
                    "status": StudyStatus.INCOMPLETE,
                    "reason": reason,
                    "completed_at": now,
                    "route_rule": rule,
                    "wait_until": None,
                },
            )

    # --- jobs ------------------------------------------------------------------------------

    def create_job(
        self,
        study_uid: str,
        pipeline: str,
        queue: str,
        now: float,
        *,
        rule: str | None = None,
        route_reason: str | None = None,
        reason: str | None = None,
        seen_last_received_at: float | None = None,
    ) -> str | None:
        """Complete a study and create its job (status created) in one transaction.

        None when the study is no longer open, or got an instance after ``seen_last_received_at``
        (it is routed again after its new completion time).
        """
        job_id = str(uuid.uuid4())
        with self._tx() as conn:
            settled = self._settle(
                conn,
                study_uid,
                seen_last_received_at,
                {
                    "status": StudyStatus.QUEUED,
                    "completed_at": now,
                    "runs": studies.c.runs + 1,
                    "reason": reason,
                    "route_rule": rule,
                    "route_reason": route_reason,
                    "wait_until": None,
                },
            )
            if not settled:
                return None
            conn.execute(
                jobs.insert().values(
                    job_id=job_id,
                    study_instance_uid=study_uid,
                    pipeline=pipeline,
                    queue=queue,
                    status=JobStatus.CREATED,
                    created_at=now,
                    attempts=0,
                )
            )
        return job_id

    def mark_job_enqueued(self, job_id: str, now: float, broker_epoch: str | None = None) -> None:
        """The broker took the job's message; ``broker_epoch`` names that broker's run.

        A worker may take the message, and start or even finish the job, before this is
        written: the job then keeps its status, and the hand-over is recorded all the same (its
        time, and the broker run that a restart check compares with a running job's).
        """
        with self._tx() as conn:
            conn.execute(
                jobs.update()
                .where(jobs.c.job_id == job_id)
                .values(
                    status=sa.case(
                        (jobs.c.status == JobStatus.CREATED, JobStatus.QUEUED),
                        else_=jobs.c.status,
                    ),
                    enqueued_at=now,
                    broker_epoch=broker_epoch,
                )
            )

    def requeue_lost_jobs(
        self, broker_epoch: str, running_started_before: float | None = None
    ) -> list[str]:
        """Jobs whose message went to an earlier run of the broker go back to created.

        A broker that restarted may have lost them (Redis without persistence loses all; with
        append-only fsync every second, the last second): the assembler hands them over again.
        That is every such queued job, and a running one that started before
        ``running_started_before`` (the broker's visibility timeout ago, which exceeds the
        longest job: its worker is gone, and the message the broker would have handed to
        another worker went with the restart). Should an old message survive, the copy taken
        second finds the job done; two taken at once run it twice, which jobs are built to bear
        (their outputs and deliveries are keyed by deterministic UIDs). Returns the job ids.
        """
        stranded = jobs.c.status == JobStatus.QUEUED
        if running_started_before is not None:
            stranded = stranded | (
                (jobs.c.status == JobStatus.RUNNING) & (jobs.c.started_at < running_started_before)
            )
        lost = stranded & jobs.c.broker_epoch.is_not(None) & (jobs.c.broker_epoch != broker_epoch)
        with self._tx() as conn:
            ids = [r.job_id for r in conn.execute(sa.select(jobs.c.job_id).where(lost)).all()]
            if ids:
                conn.execute(
                    jobs.update()
                    .where(jobs.c.job_id.in_(ids))
                    .where(lost)
                    .values(
                        status=JobStatus.CREATED,
                        error="the broker restarted after it took the job; handed over again",
                    )
                )
        return ids

    def mark_job_error(self, job_id: str, error: str) -> None:
        """Record why a job could not be handed over (it stays created and is retried)."""
        with self._tx() as conn:
            conn.execute(jobs.update().where(jobs.c.job_id == job_id).values(error=error))

    def jobs_to_enqueue(self) -> list[JobRow]:
        """Jobs the broker never accepted (crash or broker down): the reconciler hands them over."""
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(jobs)
                .where(jobs.c.status == JobStatus.CREATED)
                .order_by(jobs.c.created_at)
            ).all()
        return [_job(r) for r in rows]

    def job(self, job_id: str) -> JobRow | None:
        with self._tx() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.job_id == job_id)).first()
        return _job(row) if row else None

    def study_jobs(self, study_uid: str) -> list[JobRow]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(jobs)
                .where(jobs.c.study_instance_uid == study_uid)
                .order_by(jobs.c.created_at)
            ).all()
        return [_job(r) for r in rows]

    def start_job(self, job_id: str, now: float, worker: str | None = None) -> JobRow | None:
        """Mark a job running on ``worker`` (one more attempt); None when it is unknown, done or
        dead (its worker died running it too often)."""
        with self._tx() as conn:
            row = conn.execute(
                sa.select(jobs).where(jobs.c.job_id == job_id).with_for_update()
            ).first()
            if row is None or row.status in (JobStatus.DONE, JobStatus.DEAD):
                return None
            conn.execute(
                jobs.update()
                .where(jobs.c.job_id == job_id)
                .values(
                    status=JobStatus.RUNNING,
                    started_at=now,
                    attempts=jobs.c.attempts + 1,
                    worker=worker,
                )
            )
            conn.execute(
                studies.update()
                .where(studies.c.study_instance_uid == row.study_instance_uid)
                .where(studies.c.status == StudyStatus.QUEUED)
                .values(status=StudyStatus.PROCESSING)
            )
            row = conn.execute(sa.select(jobs).where(jobs.c.job_id == job_id)).first()
        return _job(row)

    def finish_job(
        self, job_id: str, now: float, *, result: dict[str, Any] | None, error: str | None = None
    ) -> None:
        """Record the end of a job and move its study to done or failed."""
        status = JobStatus.DONE if error is None else JobStatus.FAILED
        with self._tx() as conn:
            row = conn.execute(
                sa.select(jobs.c.study_instance_uid).where(jobs.c.job_id == job_id)
            ).first()
            conn.execute(
                jobs.update()
                .where(jobs.c.job_id == job_id)
                .values(
                    status=status,
                    finished_at=now,
                    error=error,
                    result_json=json.dumps(result) if result is not None else None,
                )
            )
            if row is not None:
                conn.execute(
                    studies.update()
                    .where(studies.c.study_instance_uid == row.study_instance_uid)
                    .where(studies.c.status.in_([StudyStatus.QUEUED, StudyStatus.PROCESSING]))
                    .values(
                        status=StudyStatus.DONE if error is None else StudyStatus.FAILED,
                        reason=error,
                    )
                )

    # --- workers ---------------------------------------------------------------------------

    def worker_heartbeat(
        self, worker_id: str, host: str, pid: int, queues: Sequence[str], now: float
    ) -> None:
        """A worker process is alive (its first heartbeat registers it)."""
        with self._tx() as conn:
            updated = conn.execute(
                workers.update().where(workers.c.worker_id == worker_id).values(heartbeat_at=now)
            ).rowcount
            if not updated:
                conn.execute(
                    workers.insert().values(
                        worker_id=worker_id,
                        host=host,
                        pid=pid,
                        queues=",".join(queues),
                        started_at=now,
                        heartbeat_at=now,
                    )
                )

    def workers_on(self, host: str) -> list[dict[str, Any]]:
        """The registered worker processes of one host."""
        with self._read() as conn:
            rows = conn.execute(sa.select(workers).where(workers.c.host == host)).all()
        return [dict(r._mapping) for r in rows]

    def remove_worker(self, worker_id: str) -> None:
        """A worker that stopped in order: it runs no job any more."""
        with self._tx() as conn:
            conn.execute(workers.delete().where(workers.c.worker_id == worker_id))

    def worker_gone(
        self, worker_id: str, why: str, now: float, max_losses: int
    ) -> list[tuple[str, JobStatus]]:
        """A worker process is known to have died (``why``): its running jobs are lost.

        Each goes back to ``created`` to be handed over again, or, once a worker has died
        running it ``max_losses`` times, to ``dead`` with the reason. Returns (job id, new
        status) for each.
        """
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(jobs)
                .where(jobs.c.status == JobStatus.RUNNING, jobs.c.worker == worker_id)
                .with_for_update()
            ).all()
            lost = [self._lose(conn, row, f"{worker_id} {why}", now, max_losses) for row in rows]
            conn.execute(workers.delete().where(workers.c.worker_id == worker_id))
        return lost

    def requeue_jobs_of_lost_workers(
        self, now: float, lost_after_s: float, max_losses: int
    ) -> list[tuple[str, JobStatus]]:
        """Running jobs whose worker sent no heartbeat for ``lost_after_s`` are lost.

        For workers on other machines, whose end nobody sees: see ``worker_gone`` for what
        happens to the jobs. A worker that registered no heartbeat at all counts from the
        job's start. Jobs started by workers that record none (older versions) are left to the
        broker's visibility timeout.
        """
        silent_since = now - lost_after_s
        heartbeat = (
            sa.select(workers.c.heartbeat_at)
            .where(workers.c.worker_id == jobs.c.worker)
            .scalar_subquery()
        )
        lost_worker = sa.or_(
            heartbeat < silent_since,
            sa.and_(heartbeat.is_(None), jobs.c.started_at < silent_since),
        )
        lost_jobs = sa.select(jobs).where(
            jobs.c.status == JobStatus.RUNNING, jobs.c.worker.is_not(None), lost_worker
        )
        # The assembler asks on every pass: a look first, so that nothing is written (nor a
        # write lock taken) when, as nearly always, no worker is lost.
        with self._read() as conn:
            if conn.execute(lost_jobs.limit(1)).first() is None:
                return []
        with self._tx() as conn:
            rows = conn.execute(lost_jobs.with_for_update()).all()
            lost = [
                self._lose(
                    conn,
                    row,
                    f"{row.worker} sent no heartbeat for {lost_after_s:g} s",
                    now,
                    max_losses,
                )
                for row in rows
            ]
            gone = {row.worker for row in rows}
            if gone:
                conn.execute(workers.delete().where(workers.c.worker_id.in_(gone)))
        return lost

    @staticmethod
    def _lose(
        conn: Connection, row: Any, why: str, now: float, max_losses: int
    ) -> tuple[str, JobStatus]:
        losses = (row.losses or 0) + 1
        if losses >= max_losses:
            status = JobStatus.DEAD
            error = (
                f"its worker died {losses} times while running it (last: {why}); not run "
                "again: see the worker's log for what killed it"
            )
            study_status = StudyStatus.FAILED
        else:
            status = JobStatus.CREATED
            error = f"its worker died while running it ({why}); handed over again ({losses} of {max_losses})"
            study_status = StudyStatus.QUEUED
        conn.execute(
            jobs.update()
            .where(jobs.c.job_id == row.job_id)
            .values(
                status=status,
                losses=losses,
                error=error,
                worker=None,
                finished_at=now if status == JobStatus.DEAD else None,
            )
        )
        conn.execute(
            studies.update()
            .where(studies.c.study_instance_uid == row.study_instance_uid)
            .where(studies.c.status.in_([StudyStatus.QUEUED, StudyStatus.PROCESSING]))
            .values(
                status=study_status,
                reason=error if status == JobStatus.DEAD else studies.c.reason,
            )
        )
        return str(row.job_id), status

    # --- outputs and deliveries ----------------------------------------------------------

    def record_output(
        self, sop_uid: str, study_uid: str, job_id: str, kind: str, path: str, now: float
    ) -> None:
        """Record a produced object; a re-run with the same UID replaces the row."""
        with self._tx() as conn:
            conn.execute(outputs.delete().where(outputs.c.sop_instance_uid == sop_uid))
            conn.execute(
                outputs.insert().values(
                    sop_instance_uid=sop_uid,
                    study_instance_uid=study_uid,
                    job_id=job_id,
                    kind=kind,
                    path=path,
                    created_at=now,
                )
            )

    def study_outputs(self, study_uid: str) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(outputs).where(outputs.c.study_instance_uid == study_uid)
            ).all()
        return [dict(r._mapping) for r in rows]

    # --- delivery outbox (worker.outbox sends; these keep its state) --------------------------

    def enqueue_deliveries(self, sop_uid: str, destinations: Sequence[str], now: float) -> int:
        """Create the pending outbox rows of an output; return how many were new.

        A row that exists (delivered, pending or dead) is left alone: a re-run of the same job,
        whose output keeps its UID, never sends it again.
        """
        created = 0
        with self._tx() as conn:
            for destination in destinations:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            deliveries.insert().values(
                                sop_instance_uid=sop_uid,
                                destination=destination,
                                status=DeliveryStatus.PENDING,
                                attempts=0,
                                created_at=now,
                                next_attempt_at=now,
                            )
                        )
                        created += 1
                except IntegrityError:
                    continue
        return created

    def _delivery_select(self) -> sa.Select[Any]:
        return sa.select(
            deliveries,
            outputs.c.path,
            outputs.c.study_instance_uid,
            outputs.c.kind,
        ).select_from(
            deliveries.outerjoin(
                outputs, outputs.c.sop_instance_uid == deliveries.c.sop_instance_uid
            )
        )

    def due_deliveries(self, now: float, limit: int = 500) -> list[dict[str, Any]]:
        """Pending outbox rows whose next attempt is due, oldest first, with the output's path."""
        with self._tx() as conn:
            rows = conn.execute(
                self._delivery_select()
                .where(deliveries.c.status == DeliveryStatus.PENDING)
                .where(
                    sa.or_(
                        deliveries.c.next_attempt_at.is_(None),
                        deliveries.c.next_attempt_at <= now,
                    )
                )
                .order_by(deliveries.c.created_at, deliveries.c.id)
                .limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]

    def lease_delivery(
        self, delivery_id: int, seen_next_attempt: float | None, until: float
    ) -> bool:
        """Take an outbox row for sending: only one sender wins when several workers look at once."""
        seen = (
            deliveries.c.next_attempt_at.is_(None)
            if seen_next_attempt is None
            else deliveries.c.next_attempt_at == seen_next_attempt
        )
        with self._tx() as conn:
            result = conn.execute(
                deliveries.update()
                .where(deliveries.c.id == delivery_id)
                .where(deliveries.c.status == DeliveryStatus.PENDING)
                .where(seen)
                .values(next_attempt_at=until)
            )
        return bool(result.rowcount == 1)

    def record_delivery_attempt(
        self,
        delivery_id: int,
        now: float,
        *,
        status: DeliveryStatus,
        dimse_status: int | None = None,
        error: str | None = None,
        next_attempt_at: float | None = None,
        only_if: DeliveryStatus | None = None,
    ) -> None:
        """Record one attempt: delivered, pending again at ``next_attempt_at``, or dead.

        ``only_if``: leave the row alone unless it still has this status (a commitment report
        may have settled it meanwhile).
        """
        query = deliveries.update().where(deliveries.c.id == delivery_id)
        if only_if is not None:
            query = query.where(deliveries.c.status == only_if)
        with self._tx() as conn:
            conn.execute(
                query.values(
                    attempts=deliveries.c.attempts + 1,
                    status=status,
                    last_status=dimse_status,
                    last_error=error,
                    last_attempt_at=now,
                    delivered_at=now if status == DeliveryStatus.DELIVERED else None,
                    dead_at=now if status == DeliveryStatus.DEAD else None,
                    next_attempt_at=next_attempt_at if status == DeliveryStatus.PENDING else None,
                )
            )

    def await_commitment(
        self,
        delivery_ids: Sequence[int],
        transaction_uid: str,
        now: float,
        until: float,
        dimse_status: int | None = None,
    ) -> None:
        """Stored rows wait for the report of this Storage Commitment transaction until ``until``.

        Written before the N-ACTION goes out: the report may come back before its response.
        The attempt is counted when the report (or the timeout) settles the row.
        """
        if not delivery_ids:
            return
        with self._tx() as conn:
            conn.execute(
                deliveries.update()
                .where(deliveries.c.id.in_(list(delivery_ids)))
                .values(
                    status=DeliveryStatus.COMMITTING,
                    transaction_uid=transaction_uid,
                    last_status=dimse_status,
                    last_error=None,
                    last_attempt_at=now,
                    next_attempt_at=until,
                )
            )

    def record_commitment(
        self,
        transaction_uid: str,
        committed: Sequence[str],
        failed: Mapping[str, str],
        now: float,
    ) -> int:
        """Apply a Storage Commitment report; return how many waiting rows it settled.

        Committed objects are delivered (at ``now``). Failed ones become due at once, still
        committing, with the reason: the dispatcher's next pass schedules them again with its
        backoff.
        """
        waiting = (
            deliveries.update()
            .where(deliveries.c.transaction_uid == transaction_uid)
            .where(deliveries.c.status == DeliveryStatus.COMMITTING)
        )
        settled = 0
        with self._tx() as conn:
            if committed:
                result = conn.execute(
                    waiting.where(deliveries.c.sop_instance_uid.in_(list(committed))).values(
                        status=DeliveryStatus.DELIVERED,
                        attempts=deliveries.c.attempts + 1,
                        delivered_at=now,
                        next_attempt_at=None,
                        last_error=None,
                    )
                )
                settled += int(result.rowcount)
            for sop_uid, reason in failed.items():
                result = conn.execute(
                    # Due since the request went out, on the clock of whoever sent it.
                    waiting.where(deliveries.c.sop_instance_uid == sop_uid).values(
                        next_attempt_at=deliveries.c.last_attempt_at, last_error=reason
                    )
                )
                settled += int(result.rowcount)
        return settled

    def overdue_commitments(self, now: float, limit: int = 500) -> list[dict[str, Any]]:
        """Committing rows whose report failed them or never came in time."""
        with self._tx() as conn:
            rows = conn.execute(
                self._delivery_select()
                .where(deliveries.c.status == DeliveryStatus.COMMITTING)
                .where(deliveries.c.next_attempt_at <= now)
                .order_by(deliveries.c.next_attempt_at, deliveries.c.id)
                .limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]

    def deliveries_of(self, sop_uid: str) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(deliveries).where(deliveries.c.sop_instance_uid == sop_uid)
            ).all()
        return [dict(r._mapping) for r in rows]

    def list_deliveries(
        self, status: DeliveryStatus | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """Outbox rows, newest first, with the output's study and kind."""
        query = self._delivery_select().order_by(deliveries.c.created_at.desc()).limit(limit)
        if status is not None:
            query = query.where(deliveries.c.status == status)
        with self._tx() as conn:
            rows = conn.execute(query).all()
        return [dict(r._mapping) for r in rows]

    def retry_deliveries(
        self, now: float, *, ids: Sequence[int] = (), all_dead: bool = False
    ) -> int:
        """Make dead (or pending) rows due now with a fresh retry horizon; return rows revived."""
        query = deliveries.update().where(deliveries.c.status != DeliveryStatus.DELIVERED)
        if all_dead:
            query = query.where(deliveries.c.status == DeliveryStatus.DEAD)
        else:
            query = query.where(deliveries.c.id.in_(list(ids)))
        with self._tx() as conn:
            result = conn.execute(
                query.values(
                    status=DeliveryStatus.PENDING,
                    next_attempt_at=now,
                    revived_at=now,
                    dead_at=None,
                )
            )
        return int(result.rowcount)

    def purge_dead_deliveries(self, dead_before: float | None = None) -> int:
        """Delete dead rows (that died before ``dead_before`` if given); return rows deleted."""
        query = deliveries.delete().where(deliveries.c.status == DeliveryStatus.DEAD)
        if dead_before is not None:
            query = query.where(
                sa.func.coalesce(deliveries.c.dead_at, deliveries.c.created_at) < dead_before
            )
        with self._tx() as conn:
            result = conn.execute(query)
        return int(result.rowcount)

    # Circuit breaker: consecutive association failures per destination open it for a cool-down.

    def delivery_circuit(self, destination: str) -> dict[str, Any] | None:
        with self._tx() as conn:
            row = conn.execute(
                sa.select(delivery_circuits).where(delivery_circuits.c.destination == destination)
            ).first()
        return dict(row._mapping) if row is not None else None

    def admit_to_destination(self, destination: str, now: float, probe_until: float) -> bool:
        """May a sender talk to the destination now? Closed: yes. Open: no, until the cool-down
        is over; then one sender (and only one) gets to probe it until ``probe_until``."""
        with self._tx() as conn:
            row = conn.execute(
                sa.select(delivery_circuits).where(delivery_circuits.c.destination == destination)
            ).first()
            if row is None or row.open_until is None:
                return True
            if row.open_until > now or (row.probe_until is not None and row.probe_until > now):
                return False
            result = conn.execute(
                delivery_circuits.update()
                .where(delivery_circuits.c.destination == destination)
                .where(delivery_circuits.c.open_until == row.open_until)
                .where(
                    delivery_circuits.c.probe_until.is_(None)
                    if row.probe_until is None
                    else delivery_circuits.c.probe_until == row.probe_until
                )
                .values(probe_until=probe_until)
            )
        return bool(result.rowcount == 1)

    def release_destination_probe(self, destination: str) -> None:
        """Give back a probe slot that was not used (nothing could be sent)."""
        with self._tx() as conn:
            conn.execute(
                delivery_circuits.update()
                .where(delivery_circuits.c.destination == destination)
                .values(probe_until=None)
            )

    def record_destination_result(
        self,
        destination: str,
        now: float,
        *,
        error: str | None,
        open_after: int = 5,
        cooldown_s: float = 300.0,
    ) -> bool:
        """Count an association outcome; return True when the circuit is (still) open after it."""
        with self._tx() as conn:
            row = conn.execute(
                sa.select(delivery_circuits).where(delivery_circuits.c.destination == destination)
            ).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            delivery_circuits.insert().values(
                                destination=destination, consecutive_failures=0
                            )
                        )
                except IntegrityError:
                    pass
                failures = 0
            else:
                failures = int(row.consecutive_failures)
            if error is None:
                values: dict[str, Any] = {
                    "consecutive_failures": 0,
                    "open_until": None,
                    "probe_until": None,
                    "last_error": None,
                }
            else:
                failures += 1
                opened = failures >= open_after
                values = {
                    "consecutive_failures": failures,
                    "open_until": now + cooldown_s if opened else None,
                    "probe_until": None,
                    "last_error": error,
                }
            conn.execute(
                delivery_circuits.update()
                .where(delivery_circuits.c.destination == destination)
                .values(**values)
            )
        return values["open_until"] is not None

    # --- alerts ----------------------------------------------------------------------------

    def claim_alert(
        self,
        study_uid: str,
        finding: str,
        channel: str,
        probability: float,
        now: float,
        payload: dict[str, Any] | None = None,
    ) -> tuple[int, bool]:
        """Return (alert id, created) creating the pending alert row on first sight.

        The unique (study, finding, channel) row is what keeps a re-run from alerting again.
        """
        with self._tx() as conn:
            try:
                with conn.begin_nested():
                    result = conn.execute(
                        alerts.insert().values(
                            study_instance_uid=study_uid,
                            finding=finding,
                            channel=channel,
                            probability=probability,
                            status=DeliveryStatus.PENDING,
                            attempts=0,
                            created_at=now,
                            payload_json=json.dumps(payload) if payload is not None else None,
                            next_attempt_at=now,
                        )
                    )
                    pk = result.inserted_primary_key
                    assert pk is not None
                    return int(pk[0]), True
            except IntegrityError:
                row = conn.execute(
                    sa.select(alerts.c.id)
                    .where(alerts.c.study_instance_uid == study_uid)
                    .where(alerts.c.finding == finding)
                    .where(alerts.c.channel == channel)
                ).one()
                return int(row.id), False

    def due_alerts(self, now: float, limit: int = 50) -> list[dict[str, Any]]:
        """Pending, unacknowledged alerts whose next attempt is due, oldest first."""
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(alerts)
                .where(alerts.c.status == DeliveryStatus.PENDING)
                .where(alerts.c.acknowledged_at.is_(None))
                .where(alerts.c.next_attempt_at <= now)
                .order_by(alerts.c.next_attempt_at)
                .limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]

    def lease_alert(self, alert_id: int, seen_next_attempt: float, until: float) -> bool:
        """Take an alert for sending: only one sender wins when several workers look at once."""
        with self._tx() as conn:
            result = conn.execute(
                alerts.update()
                .where(alerts.c.id == alert_id)
                .where(alerts.c.status == DeliveryStatus.PENDING)
                .where(alerts.c.next_attempt_at == seen_next_attempt)
                .values(next_attempt_at=until)
            )
        return bool(result.rowcount == 1)

    def record_alert_attempt(
        self, alert_id: int, now: float, *, error: str | None, next_attempt_at: float | None = None
    ) -> None:
        """Record one delivery attempt; a failed one is retried at ``next_attempt_at``."""
        with self._tx() as conn:
            conn.execute(
                alerts.update()
                .where(alerts.c.id == alert_id)
                .values(
                    attempts=alerts.c.attempts + 1,
                    status=DeliveryStatus.DELIVERED if error is None else DeliveryStatus.PENDING,
                    last_error=error,
                    delivered_at=now if error is None else None,
                    next_attempt_at=None if error is None else next_attempt_at,
                )
            )

    def acknowledge_alert(self, alert_id: int, by: str, now: float) -> int:
        """Acknowledge the alert's study and finding on every channel; return rows acknowledged."""
        with self._tx() as conn:
            row = conn.execute(
                sa.select(alerts.c.study_instance_uid, alerts.c.finding).where(
                    alerts.c.id == alert_id
                )
            ).first()
            if row is None:
                return 0
            result = conn.execute(
                alerts.update()
                .where(alerts.c.study_instance_uid == row.study_instance_uid)
                .where(alerts.c.finding == row.finding)
                .where(alerts.c.acknowledged_at.is_(None))
                .values(acknowledged_at=now, acknowledged_by=by[:64])
            )
        return int(result.rowcount)

    def unacknowledged_before(self, created_before: float) -> list[dict[str, Any]]:
        """One alert row per study and finding still unacknowledged since before the given time."""
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(alerts)
                .where(alerts.c.acknowledged_at.is_(None))
                .where(alerts.c.created_at <= created_before)
                .order_by(alerts.c.created_at)
            ).all()
        seen: dict[tuple[str, str], dict[str, Any]] = {}
        for r in rows:
            seen.setdefault((r.study_instance_uid, r.finding), dict(r._mapping))
        return list(seen.values())

    def list_alerts(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(alerts).order_by(alerts.c.created_at.desc()).limit(limit)
            ).all()
        return [dict(r._mapping) for r in rows]

    def study_alerts(self, study_uid: str) -> list[dict[str, Any]]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(alerts).where(alerts.c.study_instance_uid == study_uid)
            ).all()
        return [dict(r._mapping) for r in rows]

    # --- quarantine ------------------------------------------------------------------------

    def record_quarantine(
        self,
        *,
        entry_id: str,
        calling_aet: str,
        status_code: int,
        reason: str,
        path: str,
        sop_uid: str | None,
        now: float | None = None,
    ) -> None:
        with self._tx() as conn:
            conn.execute(
                quarantine.insert().values(
                    id=entry_id,
                    received_at=time.time() if now is None else now,
                    calling_aet=calling_aet,
                    status_code=status_code,
                    reason=reason,
                    path=path,
                    sop_instance_uid=sop_uid,
                )
            )

    def list_quarantine(self, limit: int = 100) -> list[QuarantineRow]:
        with self._tx() as conn:
            rows = conn.execute(
                sa.select(quarantine).order_by(quarantine.c.received_at.desc()).limit(limit)
            ).all()
        return [QuarantineRow(**r._mapping) for r in rows]

    # --- duplicates and quarantine retries (listener durability) ---------------------------

    def replace_instance(self, rec: InstanceRecord, *, urgent: bool, complete_after: float) -> None:
        """A new version of a known instance: update its row and reopen its study, so that a new
        run sees the new version. Raises ``OutOfResources`` when the index is unavailable."""
        try:
            with self._tx() as conn:
                old = conn.execute(
                    sa.select(instances.c.study_instance_uid)
                    .where(instances.c.sop_instance_uid == rec.sop_instance_uid)
                    .with_for_update()
                ).first()
                if old is None:
                    conn.execute(instances.insert().values(**rec.__dict__))
                else:
                    conn.execute(
                        instances.update()
                        .where(instances.c.sop_instance_uid == rec.sop_instance_uid)
                        .values(**rec.__dict__)
                    )
                old_study = None if old is None else str(old.study_instance_uid)
                moved = old_study is not None and old_study != rec.study_instance_uid
                if moved:
                    conn.execute(
                        studies.update()
                        .where(studies.c.study_instance_uid == old_study)
                        .values(instance_count=studies.c.instance_count - 1)
                    )
                study = conn.execute(
                    sa.select(studies.c.study_instance_uid)
                    .where(studies.c.study_instance_uid == rec.study_instance_uid)
                    .with_for_update()
                ).first()
                if study is None:
                    conn.execute(
                        studies.insert().values(
                            study_instance_uid=rec.study_instance_uid,
                            status=StudyStatus.RECEIVING,
                            modality=rec.modality,
                            urgent=urgent,
                            calling_aet=rec.calling_aet,
                            instance_count=1,
                            first_received_at=rec.received_at,
                            last_received_at=rec.received_at,
                            complete_after=complete_after,
                            runs=0,
                        )
                    )
                    return
                conn.execute(
                    studies.update()
                    .where(studies.c.study_instance_uid == rec.study_instance_uid)
                    .values(
                        status=StudyStatus.RECEIVING,
                        urgent=sa.or_(studies.c.urgent, sa.literal(urgent)),
                        instance_count=studies.c.instance_count
                        + (1 if moved or old is None else 0),
                        last_received_at=rec.received_at,
                        complete_after=complete_after,
                        reason=None,
                    )
                )
        except SQLAlchemyError as exc:
            raise OutOfResources(f"index unavailable: {type(exc).__name__}") from exc

    def quarantine_entry(self, entry_id: str) -> QuarantineRow | None:
        with self._tx() as conn:
            row = conn.execute(sa.select(quarantine).where(quarantine.c.id == entry_id)).first()
        return QuarantineRow(**row._mapping) if row else None

    def update_quarantine(self, entry_id: str, *, status_code: int, reason: str) -> None:
        """A retried entry failed again: keep it with the new status and reason."""
        with self._tx() as conn:
            conn.execute(
                quarantine.update()
                .where(quarantine.c.id == entry_id)
                .values(status_code=status_code, reason=reason)
            )

    def delete_quarantine(self, entry_id: str) -> None:
        """A retried entry was accepted: it is no longer quarantined."""
        with self._tx() as conn:
            conn.execute(quarantine.delete().where(quarantine.c.id == entry_id))

    # --- output versions: a re-run replaces, a late image amends -----------------------------

    def output_predecessor(
        self, study_uid: str, kind: str, model: str, sop_uid: str
    ) -> dict[str, Any] | None:
        """The output that a new one (``sop_uid``) of this study, kind and model amends.

        That is the one already recorded as amended by ``sop_uid`` (a re-run of an amendment
        keeps its link), else the newest one not yet amended. An output never amends itself,
        so a re-run of the same inputs and model finds none. Rows from before versions were
        tracked (no model) count as the same model.
        """
        with self._tx() as conn:
            row = conn.execute(
                sa.select(outputs)
                .where(outputs.c.study_instance_uid == study_uid)
                .where(outputs.c.kind == kind)
                .where(sa.or_(outputs.c.model == model, outputs.c.model.is_(None)))
                .where(outputs.c.sop_instance_uid != sop_uid)
                .where(sa.or_(outputs.c.replaced_by.is_(None), outputs.c.replaced_by == sop_uid))
                .order_by(
                    sa.case((outputs.c.replaced_by == sop_uid, 0), else_=1),
                    outputs.c.created_at.desc(),
                )
                .limit(1)
            ).first()
        return dict(row._mapping) if row else None

    def link_output(
        self,
        sop_uid: str,
        *,
        input_digest: str | None,
        model: str | None,
        predecessor_uid: str | None,
    ) -> None:
        """Record what a recorded output was made from and the output it amends, which is
        marked as replaced by it; the output itself is current (not replaced)."""
        with self._tx() as conn:
            conn.execute(
                outputs.update()
                .where(outputs.c.sop_instance_uid == sop_uid)
                .values(
                    input_digest=input_digest,
                    model=model,
                    predecessor_uid=predecessor_uid,
                    replaced_by=None,
                )
            )
            if predecessor_uid is not None:
                conn.execute(
                    outputs.update()
                    .where(outputs.c.sop_instance_uid == predecessor_uid)
                    .values(replaced_by=sop_uid)
                )
