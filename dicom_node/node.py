"""The DICOM node as one running service: listener, study assembler and job producer."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from dicom_node.assembly import StudyAssembler
from dicom_node.index import Index
from dicom_node.quarantine import Quarantine
from dicom_node.recovery import recover_after_boot
from dicom_node.scp import StorageSCP, build_ae, handlers
from dicom_node.server import (
    ListenerPool,
    default_processes,
    make_handed_server,
    per_process_limit,
)
from dicom_node.settings import (
    CompletionSettings,
    ImageSettings,
    ListenerSettings,
    QueueSettings,
    RoutingSettings,
    StorageSettings,
)
from dicom_node.spool import Spool
from dicom_node.stream import lighter_association_setup

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeConfig:
    """The sections of the settings file the node runs on."""

    listener: ListenerSettings
    storage: StorageSettings
    completion: CompletionSettings
    queue: QueueSettings
    index_url: str
    broker_url: str
    routing: RoutingSettings = field(default_factory=RoutingSettings)
    images: ImageSettings = field(default_factory=ImageSettings)

    def to_json(self) -> str:
        """The configuration as JSON, for the listener's child processes."""
        return json.dumps(
            {
                "listener": self.listener.model_dump(mode="json"),
                "storage": self.storage.model_dump(mode="json"),
                "completion": self.completion.model_dump(mode="json"),
                "queue": self.queue.model_dump(mode="json"),
                "index_url": self.index_url,
                "broker_url": self.broker_url,
                "routing": self.routing.model_dump(mode="json"),
                "images": self.images.model_dump(mode="json"),
            }
        )

    @classmethod
    def from_json(cls, text: str) -> NodeConfig:
        data = json.loads(text)
        return cls(
            listener=ListenerSettings.model_validate(data["listener"]),
            storage=StorageSettings.model_validate(data["storage"]),
            completion=CompletionSettings.model_validate(data["completion"]),
            queue=QueueSettings.model_validate(data["queue"]),
            index_url=data["index_url"],
            broker_url=data["broker_url"],
            routing=RoutingSettings.model_validate(data["routing"]),
            images=ImageSettings.model_validate(data["images"]),
        )


def build_storage_scp(
    config: NodeConfig, on_study_ready: Callable[[], None] | None = None
) -> StorageSCP:
    """The C-STORE handlers with their own index connection, spool and quarantine."""
    index = Index(config.index_url)
    return StorageSCP(
        config.listener,
        config.completion,
        index,
        Spool(
            config.storage.spool_dir,
            config.storage.max_disk_used_fraction,
            config.storage.on_duplicate,
            locks=config.storage.locks_dir,
            max_instance_bytes=config.listener.max_instance_bytes,
        ),
        Quarantine(config.storage.quarantine_dir, index),
        on_study_ready=on_study_ready,
        images=config.images,
    )


class DicomNode:
    """Starts and stops the listener and the assembler around one index."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        # Imported here: the listener's child processes import this module but never enqueue.
        from dicom_node.queue import JobQueue

        self.queue = JobQueue(config.queue, config.broker_url)
        # In the one-process listener these also serve the associations; with several processes
        # each child builds its own (build_storage_scp) and these serve the node's own reads.
        self.scp = build_storage_scp(config)
        self.index = self.scp.index
        self.spool = self.scp.spool
        self.quarantine = self.scp.quarantine
        self.assembler = StudyAssembler(
            self.index, self.queue, config.completion, config.queue, config.routing
        )
        self.scp.on_study_ready = self.assembler.wake
        self._pool: ListenerPool | None = None
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        """The bound port (useful when the settings asked for port 0)."""
        assert self._pool is not None, "node not started"
        return self._pool.port

    @property
    def pool(self) -> ListenerPool:
        """The acceptor and its association servers (once started)."""
        assert self._pool is not None, "node not started"
        return self._pool

    @property
    def processes(self) -> int:
        """Association-server processes (1: threads in this process)."""
        return self.config.listener.processes or default_processes()

    def start(self) -> None:
        lighter_association_setup()
        swept = self.spool.sweep_partials()
        if swept:
            log.warning("removed %d partial files left by an interrupted write", swept)
        # Index rows a power loss took (SQLite commits them without waiting for the disk).
        recover_after_boot(self.scp, self.config.storage.data_dir)
        listener = self.config.listener
        # One acceptor for any number of processes: it keeps connections that have not
        # associated from taking the allowed peers' capacity (dicom_node.server).
        self._pool = ListenerPool(
            self.config.to_json(),
            (listener.host, listener.port),
            self.processes,
            listener,
            on_study_ready=self.assembler.wake,
        )
        # This process serves associations too, beside processes - 1 children.
        ae = build_ae(listener)
        ae.admission_limit = per_process_limit(listener.max_associations, self.processes)
        ae.on_admitted = self._pool.local_admitted
        self._pool.set_local(
            make_handed_server(
                ae,
                (listener.host, listener.port),
                handlers(self.scp),
                self.spool,
                self.scp.store_direct,
            )
        )
        self._pool.start()
        self.assembler.start()
        log.info(
            "listening as %s on %s:%d (%d process%s)",
            listener.ae_title,
            listener.host,
            self.port,
            self.processes,
            "" if self.processes == 1 else "es",
        )

    def stop(self) -> None:
        if self._pool is not None:
            self._pool.stop()
            self._pool = None
        self.assembler.stop()
        self.queue.close()
        self.index.close()
        self.spool.close()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()
