"""A small receiving PACS for the demo: stores what it gets in a folder and remembers when."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.sop import ACCEPTED_STORAGE, ACCEPTED_TRANSFER_SYNTAXES, VERIFICATION
from dicom_node.spool import durable_write, is_valid_uid


@dataclass
class Received:
    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    received_at: float


@dataclass
class DemoPacs:
    """Storage SCP on loopback; ``received`` maps SOP Instance UID to what arrived."""

    folder: Path
    ae_title: str = "DEMOPACS"
    received: dict[str, Received] = field(default_factory=dict)
    _server: ThreadedAssociationServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _on_store(self, event: Event) -> int:
        ds = event.dataset
        sop_uid = str(ds.SOPInstanceUID)
        if not is_valid_uid(sop_uid):
            return 0xA900
        path = self.folder / f"{sop_uid}.dcm"
        durable_write(path, [event.encoded_dataset()])
        with self._lock:
            self.received[sop_uid] = Received(sop_uid, str(ds.SOPClassUID), path, time.time())
        return 0x0000

    def start(self, port: int = 0) -> int:
        self.folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title=self.ae_title)
        for sop_class in ACCEPTED_STORAGE:
            ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
        ae.add_supported_context(VERIFICATION)
        server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._on_store)]
        )
        assert server is not None  # block=False always returns the server
        self._server = server
        return int(server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
