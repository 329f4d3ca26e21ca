"""Input the node could not accept, kept aside with a reason an operator can read."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

from dicom_node.errors import OutOfResources
from dicom_node.index import Index
from dicom_node.spool import durable_write


class Quarantine:
    """``<quarantine>/<entry id>/instance.dcm`` plus ``reason.json``, and a row in the index."""

    def __init__(self, root: Path, index: Index) -> None:
        self.root = root
        self.index = index
        root.mkdir(parents=True, exist_ok=True)

    def keep(
        self,
        chunks: list[bytes],
        *,
        reason: str,
        status_code: int,
        calling_aet: str,
        sop_uid: str | None,
    ) -> str:
        """Keep the received bytes with the reason; return the entry id.

        Raises ``OutOfResources`` (and leaves nothing behind) when the entry cannot be kept.
        """
        entry_id = str(uuid.uuid4())
        folder = self.root / entry_id
        now = time.time()
        note = {
            "id": entry_id,
            "received_at": now,
            "calling_aet": calling_aet,
            "status": f"0x{status_code:04X}",
            "reason": reason,
            "sop_instance_uid": sop_uid,
        }
        try:
            durable_write(folder / "instance.dcm", chunks)
            durable_write(folder / "reason.json", [json.dumps(note, indent=2).encode()])
            self.index.record_quarantine(
                entry_id=entry_id,
                calling_aet=calling_aet,
                status_code=status_code,
                reason=reason,
                path=str(folder),
                sop_uid=sop_uid,
                now=now,
            )
        except Exception as exc:
            # An entry the index does not list is one no operator would find: leave none.
            shutil.rmtree(folder, ignore_errors=True)
            if isinstance(exc, OutOfResources):
                raise
            raise OutOfResources(f"cannot quarantine: {type(exc).__name__}") from exc
        return entry_id
