"""Shared fixtures that start real servers: Orthanc (the PACS), Redis, PostgreSQL.

Helpers that need no fixture (``storescu``, ``echoscu``, ``dciodvfy``, ``require_tool``,
``free_port``) are imported from ``tests.servers``. A missing component fails the test in CI and
skips it elsewhere (see ``tests.servers.require``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Generator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

# Test modules import their helpers as ``tests.servers`` whatever pytest's import mode.
REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.servers import (  # noqa: E402
    ModalitySpec,
    Orthanc,
    PostgresServer,
    RedisTestDatabase,
    reap,
    require,
)

OrthancFactory = Callable[..., Orthanc]

_STARTED_ORTHANCS = pytest.StashKey[list[Orthanc]]()


@pytest.fixture(scope="session")
def _orthanc_reaper() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Orthanc processes told to stop at a test's teardown; waited for at the end of the session,
    so that no test pays Orthanc's 3.5 s clean shutdown."""
    stopping: list[subprocess.Popen[bytes]] = []
    yield stopping
    for process in stopping:
        reap(process)


@pytest.fixture
def orthanc_factory(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    _orthanc_reaper: list[subprocess.Popen[bytes]],
) -> Iterator[OrthancFactory]:
    """Start real Orthanc servers: ``orthanc_factory(aet="PACS", modalities={"NODE": ("NODE",
    "127.0.0.1", port)}, extra_config={...}, start=True)``. Each has its own storage under
    ``tmp_path``; all are stopped at teardown and their logs are shown if the test fails."""
    started: list[Orthanc] = []
    request.node.stash[_STARTED_ORTHANCS] = started

    def make(
        aet: str = "ORTHANC",
        *,
        modalities: Mapping[str, ModalitySpec] | None = None,
        extra_config: Mapping[str, Any] | None = None,
        verbose: bool = False,
        start: bool = True,
    ) -> Orthanc:
        server = Orthanc(
            workdir=tmp_path / f"orthanc-{len(started)}-{aet}",
            aet=aet,
            extra_config=dict(extra_config or {}),
            verbose=verbose,
        )
        for name, modality in (modalities or {}).items():
            server.add_modality(name, modality)
        started.append(server)
        if start:
            server.start()
        return server

    try:
        yield make
    finally:
        _orthanc_reaper[:] = [p for p in _orthanc_reaper if p.poll() is None]
        for server in started:
            process = server.terminate()
            if process is not None:
                _orthanc_reaper.append(process)


@pytest.fixture
def orthanc(orthanc_factory: OrthancFactory) -> Orthanc:
    """A running Orthanc (AE title ORTHANC) with empty storage; ``orthanc.add_modality`` lets it
    C-STORE / C-MOVE to a node under test."""
    return orthanc_factory()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the Orthanc logs to the report of a failed test."""
    report = yield
    if report.failed:
        for server in item.stash.get(_STARTED_ORTHANCS, []):
            if tail := server.log_tail(200):
                report.sections.append((f"Orthanc {server.aet} log ({server.log_path})", tail))
    return report


# --- Redis --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _redis_database() -> Iterator[RedisTestDatabase]:
    host = os.environ.get("PACS_AI_TEST_REDIS_HOST", "127.0.0.1")
    port = int(os.environ.get("PACS_AI_TEST_REDIS_PORT", "6379"))
    database = RedisTestDatabase(host, port)
    require(database.reachable(), f"Redis not reachable at {host}:{port}")
    database.claim()
    try:
        yield database
    finally:
        database.release()


@pytest.fixture
def redis_url(_redis_database: RedisTestDatabase) -> Iterator[str]:
    """``redis://127.0.0.1:6379/N``: a database of the local Redis claimed for this test session,
    empty at the start of the test and flushed after it."""
    _redis_database.flush()
    try:
        yield _redis_database.url
    finally:
        _redis_database.flush()


# --- PostgreSQL ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def _postgres_server() -> PostgresServer:
    server = PostgresServer(
        host=os.environ.get("PACS_AI_TEST_POSTGRES_HOST", "127.0.0.1"),
        port=int(os.environ.get("PACS_AI_TEST_POSTGRES_PORT", "5432")),
        user=os.environ.get("PACS_AI_TEST_POSTGRES_USER", "postgres"),
        admin_dbname=os.environ.get("PACS_AI_TEST_POSTGRES_DB", "test"),
    )
    problem = server.reachable()
    require(problem is None, problem or "")
    return server


@pytest.fixture
def postgres_url(_postgres_server: PostgresServer) -> Iterator[str]:
    """SQLAlchemy URL ``postgresql+psycopg://postgres@127.0.0.1:5432/<fresh database>``; the
    database is created empty for this test and dropped after it."""
    with _postgres_server.temporary_database() as name:
        yield _postgres_server.url(name)


# --- models -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def demo_model_dir(pytestconfig: pytest.Config) -> Path:
    """The demo triage model, trained through the real training code.

    Training is deterministic, so the result is kept in pytest's cache under a hash of the code
    that produces it (phantoms, network, training): a change to any of them trains anew.
    """
    import hashlib

    from worker.demo.train import train_demo_model

    sources = [
        "worker/demo/phantoms.py",
        "worker/demo/train.py",
        "worker/models/pacs_ai_cnn.py",
        "worker/imaging/decode.py",
    ]
    digest = hashlib.sha256()
    for source in sources:
        digest.update((REPO_ROOT / source).read_bytes())
    folder = pytestconfig.cache.mkdir(f"demo-model-{digest.hexdigest()[:16]}") / "demo-cxr"
    if (folder / "config.json").is_file():
        return folder
    return train_demo_model(folder, seed=0)


# --- alert receivers ----------------------------------------------------------------------------


@pytest.fixture
def mllp_receiver() -> Iterator[Any]:
    """A real HL7 v2 MLLP receiver on a free loopback port (python-hl7), acknowledging with AA."""
    from tests.servers import MllpReceiver

    receiver = MllpReceiver().start()
    yield receiver
    receiver.stop()


@pytest.fixture
def smtp_sink() -> Iterator[Any]:
    """A real SMTP server (aiosmtpd) on a free loopback port keeping every message."""
    from tests.servers import SmtpSink

    sink = SmtpSink().start()
    yield sink
    sink.stop()


@pytest.fixture
def webhook_sink() -> Iterator[Any]:
    """A real HTTP webhook receiver on loopback that verifies HMAC signatures with 'test-secret'."""
    from worker.demo.sink import WebhookSink

    sink = WebhookSink(secret="test-secret")
    sink.start()
    yield sink
    sink.stop()
