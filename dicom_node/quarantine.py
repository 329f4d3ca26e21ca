"""Input the node could not accept, kept aside with a reason an operator can read."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import UID

from dicom_node.errors import CorruptDataset, DatasetMismatch, ImageRefused, OutOfResources
from dicom_node.index import Index, QuarantineRow
from dicom_node.sop import ACCEPTED_STORAGE, ACCEPTED_TRANSFER_SYNTAXES, sop_class_name
from dicom_node.spool import durable_write

if TYPE_CHECKING:  # scp imports this module
    from dicom_node.scp import StorageSCP


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


@dataclass(frozen=True)
class RetryOutcome:
    """What a retry of a quarantined instance came to."""

    stored: bool
    status_code: int
    reason: str


def split_file(raw: bytes) -> tuple[Dataset, bytes]:
    """The file meta information and the encoded data set of a kept DICOM file."""
    fp = BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return meta, raw[fp.tell() :]


def describe(folder: Path) -> dict[str, str]:
    """An admin's summary of a kept instance: what it is, never who it is about."""
    summary: dict[str, str] = {}
    try:
        raw = (folder / "instance.dcm").read_bytes()
        summary["size"] = f"{len(raw)} bytes"
        meta, _ = split_file(raw)
        ts = str(meta.get("TransferSyntaxUID", ""))
        summary["transfer syntax"] = f"{ts} ({UID(ts).name})" if ts else "missing"
        sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
        summary["SOP class"] = (
            f"{sop_class} ({sop_class_name(sop_class)})" if sop_class else "missing"
        )
        header = dcmread(BytesIO(raw), stop_before_pixels=True, force=True)
        for keyword in ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality"):
            try:
                summary[keyword] = str(header.get(keyword, "") or "-")
            except Exception as exc:  # the data set is broken: that is why it is here
                summary[keyword] = f"unreadable ({type(exc).__name__})"
    except Exception as exc:
        summary["header"] = f"unreadable: {type(exc).__name__}: {exc}"
    return summary


def retry(scp: StorageSCP, entry: QuarantineRow) -> RetryOutcome:
    """Put a kept instance through the listener's checks again; store it or keep it aside.

    For an operator who fixed the cause (the file in place, a setting, disk space).
    """
    folder = Path(entry.path)
    raw = (folder / "instance.dcm").read_bytes()
    try:
        meta, stream = split_file(raw)
        ts = UID(str(meta.TransferSyntaxUID))
        sop_class = str(meta.MediaStorageSOPClassUID)
        if sop_class not in ACCEPTED_STORAGE:
            raise DatasetMismatch(f"SOP class {sop_class} is not one the listener accepts")
        if ts not in ACCEPTED_TRANSFER_SYNTAXES:
            raise DatasetMismatch(f"transfer syntax {ts} is not one the listener accepts")
        from dicom_node.scp import check_instance  # scp imports this module: import late

        header = check_instance(
            stream, ts, sop_class, str(meta.MediaStorageSOPInstanceUID), scp.images
        )
        scp.store_instance(header, scp.spool.stage([raw]), str(ts), entry.calling_aet)
    except (CorruptDataset, ImageRefused) as exc:
        return _keep(scp.index, entry, 0xC000, str(exc))
    except DatasetMismatch as exc:
        return _keep(scp.index, entry, 0xA900, str(exc))
    except (OutOfResources, OSError) as exc:
        return RetryOutcome(False, 0xA700, f"cannot store now, try again later: {exc}")
    except Exception as exc:  # unreadable file meta and the like
        return _keep(
            scp.index, entry, 0xC000, f"cannot read the kept file: {type(exc).__name__}: {exc}"
        )
    scp.index.delete_quarantine(entry.id)
    shutil.rmtree(folder, ignore_errors=True)
    return RetryOutcome(True, 0x0000, "stored")


def _keep(index: Index, entry: QuarantineRow, status: int, reason: str) -> RetryOutcome:
    index.update_quarantine(entry.id, status_code=status, reason=reason)
    note_path = Path(entry.path) / "reason.json"
    note = json.loads(note_path.read_text()) if note_path.is_file() else {}
    note.update({"status": f"0x{status:04X}", "reason": reason, "retried_at": time.time()})
    durable_write(note_path, [json.dumps(note, indent=2).encode()])
    return RetryOutcome(False, status, reason)
