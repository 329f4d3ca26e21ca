"""The DICOM node as one running service: listener, study assembler and job producer."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.assembly import StudyAssembler
from dicom_node.index import Index
from dicom_node.quarantine import Quarantine
from dicom_node.queue import JobQueue
from dicom_node.scp import StorageSCP, build_ae, handlers
from dicom_node.settings import (
    CompletionSettings,
    ListenerSettings,
    QueueSettings,
    StorageSettings,
)
from dicom_node.spool import Spool

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


class DicomNode:
    """Starts and stops the listener and the assembler around one index."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.index = Index(config.index_url)
        self.spool = Spool(
            config.storage.spool_dir,
            config.storage.max_disk_used_fraction,
            config.storage.on_duplicate,
        )
        self.quarantine = Quarantine(config.storage.quarantine_dir, self.index)
        self.queue = JobQueue(config.queue, config.broker_url)
        self.assembler = StudyAssembler(self.index, self.queue, config.completion, config.queue)
        self.scp = StorageSCP(
            config.listener,
            config.completion,
            self.index,
            self.spool,
            self.quarantine,
            on_study_ready=self.assembler.wake,
        )
        self._server: ThreadedAssociationServer | None = None
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        """The bound port (useful when the settings asked for port 0)."""
        assert self._server is not None, "node not started"
        return int(self._server.server_address[1])

    def start(self) -> None:
        swept = self.spool.sweep_partials()
        if swept:
            log.warning("removed %d partial files left by an interrupted write", swept)
        listener = self.config.listener
        ae = build_ae(listener)
        self._server = ae.start_server(
            (listener.host, listener.port), block=False, evt_handlers=handlers(self.scp)
        )
        self.assembler.start()
        log.info("listening as %s on %s:%d", listener.ae_title, listener.host, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.assembler.stop()
        self.queue.close()
        self.index.close()
        self._stopped.set()

    def wait(self) -> None:
        self._stopped.wait()
