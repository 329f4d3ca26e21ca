"""Real servers and command-line tools for the tests: Orthanc as the PACS, dcmtk as the DICOM
clients, dciodvfy as the validator, Redis as the broker, PostgreSQL as the scaled-out index.

Nothing here is a mock. A test that needs a missing part calls :func:`require_tool` or
:func:`require`: outside CI the test is skipped with the reason, in CI (``CI`` set, or
``PACS_AI_REQUIRE_ALL=1``) it fails, so a green CI run means every part really ran.

The fixtures that use these classes live in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest

# Which Debian package brings a tool, for the message that tells a developer what to install.
DEBIAN_PACKAGE = {
    "Orthanc": "orthanc",
    "storescu": "dcmtk",
    "storescp": "dcmtk",
    "echoscu": "dcmtk",
    "findscu": "dcmtk",
    "movescu": "dcmtk",
    "getscu": "dcmtk",
    "dcmdump": "dcmtk",
    "dciodvfy": "dicom3tools",
    "redis-server": "redis-server",
    "psql": "postgresql-client",
    "createdb": "postgresql-client",
}

# dcmtk and Orthanc stall about 45 ms per C-STORE (Nagle + delayed ACK) unless this is set.
TOOL_ENV = {"TCP_NODELAY": "1"}

LOOPBACK = "127.0.0.1"


# --- the require rule ---------------------------------------------------------------------------


def everything_required() -> bool:
    """True in CI (``CI`` set and not false) or with ``PACS_AI_REQUIRE_ALL=1``: no skipping."""
    ci = os.environ.get("CI", "").strip().lower()
    return ci not in ("", "0", "false", "no") or os.environ.get("PACS_AI_REQUIRE_ALL") == "1"


def require(condition: bool, reason: str) -> None:
    """Go on if ``condition`` holds; otherwise fail in CI and skip (printing ``reason``) elsewhere."""
    if condition:
        return
    if everything_required():
        pytest.fail(
            f"required component missing (CI / PACS_AI_REQUIRE_ALL): {reason}", pytrace=False
        )
    pytest.skip(reason)


def require_tool(name: str) -> str:
    """The absolute path of the executable ``name``, under the require rule."""
    # Orthanc lives in /usr/sbin, which is not on a Debian user's PATH.
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    package = DEBIAN_PACKAGE.get(name)
    hint = f" (Debian: apt-get install {package}, or run scripts/test as root)" if package else ""
    require(path is not None, f"{name} not found on PATH{hint}")
    assert path is not None
    return path


# --- ports --------------------------------------------------------------------------------------


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (all sockets held until all chosen)."""
    with contextlib.ExitStack() as stack:
        ports: list[int] = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((LOOPBACK, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    return free_ports(1)[0]


def connect_from(port: int, source: str, opening: bytes = b"") -> socket.socket:
    """A TCP connection to 127.0.0.1:``port`` from the loopback address ``source`` (Linux routes
    all of 127/8 to loopback: another host on this one), having sent ``opening``."""
    sock = socket.create_connection((LOOPBACK, port), timeout=10, source_address=(source, 0))
    sock.settimeout(10)
    if opening:
        sock.sendall(opening)
    return sock


def seconds_until_closed(sock: socket.socket, limit: float) -> float:
    """How long the server took to close ``sock`` (end of file or reset); fails past ``limit``.

    ``sock`` is closed afterwards either way.
    """
    start = time.monotonic()
    sock.settimeout(limit)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {limit} s")
    finally:
        sock.close()
    return time.monotonic() - start


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --- command-line tools -------------------------------------------------------------------------


def tool_env() -> dict[str, str]:
    """The environment for dcmtk and Orthanc: ours plus ``TCP_NODELAY=1``."""
    return {**os.environ, **TOOL_ENV}


def run_tool(
    name: str, args: Iterable[str | os.PathLike[str]], *, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    """Run a command-line tool (under the require rule) with ``TCP_NODELAY=1``; never raises on a
    non-zero exit status: the caller asserts on ``returncode``/``stdout``/``stderr``."""
    executable = require_tool(name)
    return subprocess.run(
        [executable, *(os.fspath(a) for a in args)],
        env=tool_env(),
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )


def storescu(
    files: Iterable[str | os.PathLike[str]],
    *,
    host: str,
    port: int,
    called_aet: str,
    calling_aet: str = "STORESCU",
    extra_args: Sequence[str] = (),
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """dcmtk ``storescu``: send ``files`` (or directories with ``extra_args=("+sd",)``) by C-STORE."""
    args = ["-aec", called_aet, "-aet", calling_aet, *extra_args, host, str(port), *map(str, files)]
    return run_tool("storescu", args, timeout=timeout)


def echoscu(
    host: str, port: int, called_aet: str, *, calling_aet: str = "ECHOSCU", timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    """dcmtk ``echoscu``: one C-ECHO; ``returncode == 0`` means the association and echo worked."""
    return run_tool(
        "echoscu", ["-aec", called_aet, "-aet", calling_aet, host, str(port)], timeout=timeout
    )


@dataclass(frozen=True)
class ValidationResult:
    """What ``dciodvfy`` said about one file."""

    errors: list[str]
    warnings: list[str]
    output: str
    returncode: int

    @property
    def ok(self) -> bool:
        return not self.errors


def dciodvfy(path: str | os.PathLike[str], *, timeout: float = 60.0) -> ValidationResult:
    """Validate one DICOM file against its IOD with dicom3tools ``dciodvfy``."""
    # dciodvfy writes its findings to stderr; keep both streams in the order they came.
    executable = require_tool("dciodvfy")
    completed = subprocess.run(
        [executable, os.fspath(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=timeout,
        check=False,
    )
    lines = completed.stdout.splitlines()
    return ValidationResult(
        errors=[line for line in lines if line.startswith("Error")],
        warnings=[line for line in lines if line.startswith("Warning")],
        output=completed.stdout,
        returncode=completed.returncode,
    )


# --- Orthanc ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Modality:
    """A remote DICOM node Orthanc may C-STORE / C-MOVE to (an entry of ``DicomModalities``)."""

    aet: str
    host: str
    port: int


ModalitySpec = Modality | tuple[str, str, int]


class OrthancError(RuntimeError):
    """Orthanc did not start, or a REST call failed; the message carries the log tail."""


@dataclass
class Orthanc:
    """One real Orthanc process acting as the PACS, with its storage, index, config and log in
    ``workdir``. ``stop()`` then ``start()`` restarts it on the same ports with the same storage."""

    workdir: Path
    aet: str = "ORTHANC"
    modalities: dict[str, Modality] = field(default_factory=dict)
    # Merged last into the generated configuration, for options a test needs to change.
    extra_config: dict[str, Any] = field(default_factory=dict)
    verbose: bool = False
    dicom_port: int = 0
    http_port: int = 0
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _log: IO[bytes] | None = field(default=None, init=False, repr=False)
    _ever_started: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.dicom_port and self.http_port):
            self.dicom_port, self.http_port = free_ports(2)
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        # Unique, so that readiness is never taken from another server that got our port.
        self.name = f"pacs-ai-test-{self.aet}-{secrets.token_hex(4)}"

    # -- paths and configuration

    @property
    def storage_dir(self) -> Path:
        return self.workdir / "storage"

    @property
    def config_path(self) -> Path:
        return self.workdir / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.workdir / "orthanc.log"

    @property
    def http_url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    @property
    def host(self) -> str:
        return LOOPBACK

    def config(self) -> dict[str, Any]:
        """The JSON configuration this Orthanc runs with."""
        config: dict[str, Any] = {
            "Name": self.name,
            "StorageDirectory": str(self.storage_dir),
            "IndexDirectory": str(self.storage_dir),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            # Loopback only, so no authentication is needed.
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "DicomCheckCalledAet": False,
            "DicomCheckModalityHost": False,
            # Any AE may echo and store (a modality or our node pushing); find/move/get are open
            # too so the node under test can query priors and tests can drive movescu.
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowFind": True,
            "DicomAlwaysAllowMove": True,
            "DicomAlwaysAllowGet": True,
            "AcceptedTransferSyntaxes": ["1.2.840.10008.1.*"],
            "DeflatedTransferSyntaxAccepted": True,
            "JpegTransferSyntaxAccepted": True,
            "Jpeg2000TransferSyntaxAccepted": True,
            "JpegLosslessTransferSyntaxAccepted": True,
            "JpipTransferSyntaxAccepted": True,
            "Mpeg2TransferSyntaxAccepted": True,
            "RleTransferSyntaxAccepted": True,
            "Mpeg4TransferSyntaxAccepted": True,
            "H265TransferSyntaxAccepted": True,
            "DicomModalitiesInDatabase": False,
            "DicomModalities": {
                name: [m.aet, m.host, m.port] for name, m in self.modalities.items()
            },
            "DicomScuTimeout": 10,
            "SaveJobs": False,
            "WebDavEnabled": False,
            "ExecuteLuaEnabled": False,
            "RestApiWriteToFileSystemEnabled": False,
        }
        config.update(self.extra_config)
        config["Name"] = self.name  # start() recognises its own server by it
        return config

    def add_modality(self, name: str, modality: ModalitySpec) -> None:
        """Declare a remote node; takes effect at once if running and survives ``stop``/``start``."""
        m = modality if isinstance(modality, Modality) else Modality(*modality)
        self.modalities[name] = m
        if self.running:
            self.rest("PUT", f"/modalities/{name}", {"AET": m.aet, "Host": m.host, "Port": m.port})

    # -- process lifetime

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout: float = 30.0) -> None:
        """Start Orthanc and wait until ``GET /system`` answers and the DICOM port accepts."""
        if self.running:
            return
        executable = require_tool("Orthanc")
        # A first start may lose a port race with another test; a restart keeps its ports so
        # that nodes configured with them still reach it.
        attempts = 1 if self._ever_started else 3
        for attempt in range(attempts):
            if attempt:
                self.dicom_port, self.http_port = free_ports(2)
            if self._spawn(executable, timeout):
                self._ever_started = True
                return
        raise OrthancError(
            f"Orthanc did not become ready (DICOM port {self.dicom_port}, HTTP port "
            f"{self.http_port}); log {self.log_path}:\n{self.log_tail()}"
        )

    def _spawn(self, executable: str, timeout: float) -> bool:
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        if self._log is None:
            self._log = self.log_path.open("ab")
        self._log.write(f"\n===== starting Orthanc at {time.strftime('%H:%M:%S')} =====\n".encode())
        self._log.flush()
        args = [executable, *(["--verbose"] if self.verbose else []), str(self.config_path)]
        self._process = subprocess.Popen(
            args,
            cwd=self.workdir,
            env=tool_env(),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                self._process = None
                return False
            if self._answers() and port_open(LOOPBACK, self.dicom_port):
                return self._process.poll() is None
            time.sleep(0.05)
        self.stop()
        return False

    def _answers(self) -> bool:
        try:
            with self._opener.open(f"{self.http_url}/system", timeout=1.0) as response:
                system = json.loads(response.read())
        except (OSError, ValueError):
            return False
        return isinstance(system, dict) and system.get("Name") == self.name

    def terminate(self) -> subprocess.Popen[bytes] | None:
        """Ask Orthanc to stop (SIGTERM) without waiting; returns the process for the caller to
        reap. Orthanc takes about 3.5 s to stop cleanly, so fixtures reap in the background."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
        if self._log is not None:
            self._log.close()
            self._log = None
        return process

    def stop(self, timeout: float = 15.0) -> None:
        """Stop Orthanc and wait (SIGTERM, then SIGKILL after ``timeout``); its storage stays."""
        process = self.terminate()
        if process is not None:
            reap(process, timeout)

    def __enter__(self) -> Orthanc:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 80) -> str:
        """The end of Orthanc's log, for failure messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- REST

    def rest_bytes(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 30.0
    ) -> bytes:
        """One REST call; raises :class:`OrthancError` on an HTTP error status."""
        request = urllib.request.Request(f"{self.http_url}{path}", data=body, method=method)
        try:
            with self._opener.open(request, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as error:
            detail = error.read().decode(errors="replace")
            raise OrthancError(f"{method} {path} -> HTTP {error.code}: {detail}") from error

    def rest(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        """One REST call with a JSON body (if any) and a JSON answer."""
        data = None if body is None else json.dumps(body).encode()
        raw = self.rest_bytes(method, path, data, timeout)
        return json.loads(raw) if raw.strip() else None

    def instances(self) -> list[str]:
        """Orthanc ids of every stored instance."""
        return list(self.rest("GET", "/instances"))

    def find_sop(self, sop_instance_uid: str) -> str | None:
        """The Orthanc id of the instance with this SOP Instance UID, or None."""
        found = self.rest(
            "POST",
            "/tools/find",
            {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}},
        )
        return str(found[0]) if found else None

    def get_dicom(self, orthanc_id: str) -> bytes:
        """The stored DICOM file (Part 10 bytes) of one instance."""
        return self.rest_bytes("GET", f"/instances/{urllib.parse.quote(orthanc_id)}/file")

    def wait_for_sop(self, sop_instance_uid: str, timeout: float = 10.0) -> bytes:
        """Poll until the instance is stored and return its file; TimeoutError if it never comes."""
        deadline = time.monotonic() + timeout
        while True:
            orthanc_id = self.find_sop(sop_instance_uid)
            if orthanc_id is not None:
                return self.get_dicom(orthanc_id)
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"SOP Instance {sop_instance_uid} not in Orthanc {self.aet} after {timeout} s "
                    f"({len(self.instances())} instances stored); log {self.log_path}"
                )
            time.sleep(0.05)


def reap(process: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """Wait for a terminated process, killing it if it is still there after ``timeout``."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# --- Redis --------------------------------------------------------------------------------------


class RedisTestDatabase:
    """Claims one numbered Redis database for this test session, so that test sessions running at
    the same time (other engineers, several workers) never flush each other's data.

    The claim is a lock key in database 0 holding this session's token, with an expiry so that a
    crashed session frees it; the claimed database itself holds nothing but the tests' own keys.
    A database with keys that our tests did not leave there belongs to someone else and is never
    touched.
    """

    REGISTRY_DB = 0
    LOCK_SECONDS = 6 * 3600

    def __init__(self, host: str = LOOPBACK, port: int = 6379, candidates: Iterable[int] = ()):
        self.host = host
        self.port = port
        self.candidates = list(candidates) or [13, 14, 15, *range(12, 0, -1)]
        self.token = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.db: int | None = None

    def _client(self, db: int) -> Any:
        import redis

        return redis.Redis(
            host=self.host, port=self.port, db=db, socket_connect_timeout=2, socket_timeout=10
        )

    @staticmethod
    def _lock_key(db: int) -> str:
        return f"pacs-ai-worker:tests:redis-db:{db}:lock"

    @staticmethod
    def _owned_key(db: int) -> str:
        # Set while our tests use the database: its keys are ours to flush even after a crash.
        return f"pacs-ai-worker:tests:redis-db:{db}:owned"

    def reachable(self) -> bool:
        try:
            return bool(self._client(self.REGISTRY_DB).ping())
        except Exception:
            return False

    def claim(self) -> int:
        """Claim the first free candidate database and empty it; RuntimeError if none is free."""
        registry = self._client(self.REGISTRY_DB)
        for db in self.candidates:
            lock = self._lock_key(db)
            if not registry.set(lock, self.token, nx=True, ex=self.LOCK_SECONDS):
                continue  # another live session holds it
            if self._client(db).dbsize() and not registry.exists(self._owned_key(db)):
                registry.delete(lock)  # someone else's data: leave it alone
                continue
            registry.set(self._owned_key(db), self.token)
            self.db = db
            self.flush()
            return db
        raise RuntimeError(f"no free Redis database among {self.candidates} at {self.url}")

    def flush(self) -> None:
        """Empty the claimed database and renew the claim."""
        assert self.db is not None
        self._client(self.db).flushdb()
        self._client(self.REGISTRY_DB).expire(self._lock_key(self.db), self.LOCK_SECONDS)

    def release(self) -> None:
        """Empty the claimed database and give it back."""
        if self.db is None:
            return
        self._client(self.db).flushdb()
        registry = self._client(self.REGISTRY_DB)
        registry.delete(self._owned_key(self.db))
        if registry.get(self._lock_key(self.db)) == self.token.encode():
            registry.delete(self._lock_key(self.db))
        self.db = None

    @property
    def url(self) -> str:
        suffix = "" if self.db is None else f"/{self.db}"
        return f"redis://{self.host}:{self.port}{suffix}"


# --- PostgreSQL ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostgresServer:
    """A PostgreSQL server on which tests create and drop throw-away databases."""

    host: str = LOOPBACK
    port: int = 5432
    user: str = "postgres"
    # An existing database to connect to for CREATE / DROP DATABASE.
    admin_dbname: str = "test"

    def _connect(self) -> Any:
        import psycopg

        return psycopg.connect(
            host=self.host,
            port=self.port,
            user=self.user,
            dbname=self.admin_dbname,
            connect_timeout=3,
            autocommit=True,
        )

    def reachable(self) -> str | None:
        """None if we can connect, else why not."""
        try:
            import psycopg  # noqa: F401
        except ImportError:
            return "psycopg is not installed (pip install -e '.[dev]')"
        try:
            self._connect().close()
        except Exception as error:
            return f"PostgreSQL not reachable at {self.host}:{self.port} as {self.user}: {error}"
        return None

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of a database on this server."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    @contextlib.contextmanager
    def temporary_database(self) -> Iterator[str]:
        """Create a fresh empty database, yield its name, drop it afterwards."""
        from psycopg import errors, sql

        name = f"pacs_ai_test_{os.getpid()}_{secrets.token_hex(4)}"
        with self._connect() as conn:
            for attempt in range(10):
                try:
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
                    break
                except errors.ObjectInUse:
                    # template1 briefly in use by another session's CREATE DATABASE
                    if attempt == 9:
                        raise
                    time.sleep(0.2)
        try:
            yield name
        finally:
            with self._connect() as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
                )


# --- alert receivers: HL7 over MLLP, SMTP ---------------------------------------------------------


class MllpReceiver:
    """A real HL7 v2 receiver (python-hl7's asyncio MLLP server) on a loopback port.

    Every message is parsed with python-hl7 and kept; the reply is an ACK with MSA-1 = ``ack_code``
    (AA by default; AE/AR to play a receiver that refuses)."""

    def __init__(self, port: int = 0, ack_code: str = "AA") -> None:
        import asyncio

        self.ack_code = ack_code
        self.messages: list[Any] = []
        self.raw: list[str] = []
        self._port = port or free_port()
        self._loop = asyncio.new_event_loop()
        self._server: Any = None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> MllpReceiver:
        import asyncio

        import hl7
        import hl7.mllp

        async def handle(reader: Any, writer: Any) -> None:
            try:
                while not writer.is_closing():
                    message = await reader.readmessage()
                    self.raw.append(str(message))
                    self.messages.append(message)
                    writer.writemessage(message.create_ack(ack_code=self.ack_code))
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        async def serve() -> Any:
            # UTF-8, as the messages' MSH-18 says when they are not ASCII.
            return await hl7.mllp.start_hl7_server(
                handle, host=LOOPBACK, port=self._port, encoding="utf-8"
            )

        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(serve(), self._loop).result(timeout=10)
        return self

    def stop(self) -> None:
        import asyncio

        async def shut(server: Any) -> None:
            # On the loop's own thread: asyncio's server is not safe to close from another, and
            # a connection ending at the same moment made close() fail now and then.
            server.close()
            await server.wait_closed()

        if self._server is not None:
            asyncio.run_coroutine_threadsafe(shut(self._server), self._loop).result(timeout=10)
            self._server = None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)


class SmtpSink:
    """A real SMTP server (aiosmtpd) on a loopback port that keeps every message it accepts."""

    def __init__(self, port: int = 0) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[Any] = []
        sink = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                import email
                import email.policy

                sink.messages.append(
                    email.message_from_bytes(envelope.content, policy=email.policy.default)
                )
                return "250 Message accepted for delivery"

        self.port = port or free_port()
        self._controller = Controller(Handler(), hostname=LOOPBACK, port=self.port)

    def start(self) -> SmtpSink:
        self._controller.start()
        return self

    def stop(self) -> None:
        self._controller.stop()
