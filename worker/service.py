"""Running the components: the node, a worker, or everything on one machine (serve)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType

from dicom_node.assembly import report_lost_jobs
from dicom_node.index import Index
from dicom_node.node import DicomNode, NodeConfig
from dicom_node.process import exit_reason, python_module_command
from worker.ackserver import AckServer
from worker.broker import EMBEDDED, EmbeddedBroker
from worker.heartbeat import worker_id
from worker.settings import ENV_PREFIX, Settings

log = logging.getLogger(__name__)

# CPU priority (nice) of workers that take routine work, under the urgent lane's worker.
ROUTINE_NICE = 10
# How often serve looks for workers that exited (and hands their running jobs back).
SUPERVISE_INTERVAL_S = 0.5


def node_config(settings: Settings, broker_url: str) -> NodeConfig:
    return NodeConfig(
        listener=settings.listener,
        storage=settings.storage,
        completion=settings.completion,
        queue=settings.queue,
        index_url=settings.index_url,
        broker_url=broker_url,
        routing=settings.routing,
        images=settings.images,
    )


def require_broker_url(settings: Settings) -> str:
    """The broker URL for a component run on its own (the embedded broker needs ``serve``)."""
    url = settings.queue.broker_url
    if url == EMBEDDED:
        raise SystemExit(
            "queue.broker_url is 'embedded', which only 'pacs-ai serve' and 'pacs-ai demo' start; "
            "set it to a Redis URL (for example redis://127.0.0.1:6379/0) to run components apart"
        )
    return url


class _Stop:
    """Turns SIGINT/SIGTERM into an event the main thread waits on."""

    def __init__(self) -> None:
        self.event = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: self.event.set())


def run_node(settings: Settings) -> int:
    """The listener and study assembler, until SIGINT/SIGTERM."""
    node = DicomNode(node_config(settings, require_broker_url(settings)))
    stop = _Stop()
    node.start()
    stop.event.wait()
    log.info("stopping the DICOM node")
    node.stop()
    return 0


def run_worker(
    settings: Settings, queues: Sequence[str], concurrency: int, broker_url: str | None = None
) -> int:
    """A Celery worker consuming the given queues (blocks)."""
    from worker.celery_app import create_app  # imports torch: only where a worker runs

    url = broker_url or require_broker_url(settings)
    # What this process really serves (the command line may say otherwise than the file).
    settings.worker.queues = list(queues)
    settings.worker.concurrency = concurrency
    app = create_app(settings, url)
    argv = [
        "worker",
        f"--queues={','.join(queues)}",
        f"--hostname=pacs-ai-{'-'.join(queues)}@{socket.gethostname()}-{os.getpid()}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
    ]
    # One model per process: solo for one job at a time, threads to share it between jobs.
    argv += (
        ["--pool=solo"] if concurrency == 1 else ["--pool=threads", f"--concurrency={concurrency}"]
    )
    app.worker_main(argv)
    return 0


class Stack(AbstractContextManager["Stack"]):
    """Broker (embedded when configured), node in this process and worker subprocesses."""

    def __init__(
        self,
        settings: Settings,
        config_path: Path | None,
        worker_queues: Sequence[Sequence[str]],
        log_dir: Path | None = None,
    ) -> None:
        self.settings = settings
        # None: workers log to this process's terminal; else one file per worker.
        self.log_dir = log_dir
        self.config_path = config_path
        self.worker_queues = worker_queues
        self.broker: EmbeddedBroker | None = None
        self.node: DicomNode | None = None
        self.workers: list[tuple[Sequence[str], subprocess.Popen[bytes]]] = []
        self.broker_url = ""
        self.ack_server: AckServer | None = None

    def _spawn_worker(self, queues: Sequence[str]) -> subprocess.Popen[bytes]:
        cmd = python_module_command("worker.cli", "worker", "--queues", ",".join(queues))
        if self.config_path is not None:
            cmd += ["--config", str(self.config_path)]
        env = dict(os.environ)
        env[f"{ENV_PREFIX}QUEUE__BROKER_URL"] = self.broker_url
        env[f"{ENV_PREFIX}STORAGE__DATA_DIR"] = str(self.settings.storage.data_dir)
        if self.log_dir is None:
            proc = subprocess.Popen(cmd, env=env)
        else:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_dir / f"worker-{'-'.join(queues)}.log", "ab") as log_file:
                proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        if self.settings.queue.routine_queue in queues:
            # Workers on one machine share its cores: the urgent lane's worker must win them while
            # a routine backlog runs. Set before the worker starts its threads, which inherit it.
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, proc.pid, ROUTINE_NICE)
        return proc

    def start(self) -> Stack:
        url = self.settings.queue.broker_url
        if url == EMBEDDED:
            self.broker = EmbeddedBroker(self.settings.storage.data_dir / "broker")
            url = self.broker.start()
        self.broker_url = url
        self.node = DicomNode(node_config(self.settings, url))
        self.node.start()
        if self.settings.alerts.ack.secret:
            # The links in the alerts point here; it needs only the index.
            self.ack_server = AckServer(
                Index(self.settings.index_url), self.settings.alerts.ack
            ).start()
        for queues in self.worker_queues:
            self.workers.append((queues, self._spawn_worker(queues)))
        return self

    def wait_for_workers(self, timeout_s: float = 120.0) -> int:
        """Wait until every worker answers a ping (models loaded); return how many answered."""
        from celery import Celery

        app = Celery("pacs_ai_probe", broker=self.broker_url, set_as_current=False)
        deadline = time.time() + timeout_s
        answered = 0
        try:
            while time.time() < deadline:
                answered = len(app.control.ping(timeout=0.5) or [])
                if answered >= len(self.workers):
                    break
                if any(proc.poll() is not None for _, proc in self.workers):
                    break
        finally:
            app.close()
        return answered

    def supervise_once(self) -> None:
        """Restart a worker that died; the job it was running goes back to its queue at once.

        The broker would hand the job's unacknowledged message out again only after its
        visibility timeout (hours); the index knows the job ran on that process, so it is handed
        over again now (or failed for good after ``queue.max_worker_losses`` deaths).
        """
        for i, (queues, proc) in enumerate(self.workers):
            if proc.poll() is None:
                continue
            why = exit_reason(proc.returncode)
            log.error("worker for %s (pid %d) %s; restarting", ",".join(queues), proc.pid, why)
            if self.node is not None:
                try:
                    lost = self.node.index.worker_gone(
                        worker_id(proc.pid), why, time.time(), self.settings.queue.max_worker_losses
                    )
                except Exception:  # the heartbeat timeout hands them over later
                    log.exception("could not hand back the jobs of worker %d", proc.pid)
                else:
                    report_lost_jobs(lost)
                    self.node.assembler.wake()
            self.workers[i] = (queues, self._spawn_worker(queues))

    def stop(self) -> None:
        for _, proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + 20
        for _, proc in self.workers:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.workers = []
        if self.ack_server is not None:
            self.ack_server.stop()
            self.ack_server.index.close()
            self.ack_server = None
        if self.node is not None:
            self.node.stop()
            self.node = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def run_serve(settings: Settings, config_path: Path | None) -> int:
    """Everything on one machine until SIGINT/SIGTERM: one urgent-lane worker, one for all queues."""
    queue = settings.queue
    lanes = [[queue.urgent_queue], [queue.urgent_queue, queue.routine_queue]]
    stop = _Stop()
    with Stack(settings, config_path, lanes) as stack:
        assert stack.node is not None
        log.info(
            "serving: listener %s@%s:%d, broker %s, %d worker(s)",
            settings.listener.ae_title,
            settings.listener.host,
            stack.node.port,
            "embedded" if stack.broker else stack.broker_url,
            len(lanes),
        )
        while not stop.event.wait(SUPERVISE_INTERVAL_S):
            stack.supervise_once()
    return 0
