"""The Storage and Verification SCP: where a C-STORE lands.

It also takes the Storage Commitment reports (N-EVENT-REPORT) that destinations send back on a new
association after the outbox asked them to commit what it stored: that needs no new port or AE
title, since the PACS already knows the listener, and the report lands in the shared index whichever
worker process asked.

The C-STORE handler only writes the encoded bytes, fsyncs, records the instance and answers; no
pixel decoding, inference or network calls happen here. Success (0x0000) goes back only after the
file is in place and its index row is committed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import cast

from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE, N_EVENT_REPORT
from pynetdicom.events import Event

from dicom_node.errors import CorruptDataset, DatasetMismatch, ImageRefused, OutOfResources
from dicom_node.images import Geometry, geometry_problem
from dicom_node.index import Index, InstanceRecord
from dicom_node.quarantine import Quarantine, split_file
from dicom_node.scu import STORAGE_COMMITMENT
from dicom_node.security import ListenerAE
from dicom_node.settings import CompletionSettings, ImageSettings, ListenerSettings
from dicom_node.sop import ACCEPTED_STORAGE, ACCEPTED_TRANSFER_SYNTAXES, IMAGE_STORAGE, VERIFICATION
from dicom_node.spool import Spool, StagedFile, is_valid_uid
from dicom_node.stream import DirectStore, file_preamble
from dicom_node.wire import (
    BITS_ALLOCATED,
    COLUMNS,
    NUMBER_OF_FRAMES,
    REQUESTED_PROCEDURE_PRIORITY,
    ROWS,
    SAMPLES_PER_PIXEL,
    Layout,
    check_complete,
)

SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
MODALITY = 0x00080060
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E

log = logging.getLogger(__name__)

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110
NO_SUCH_EVENT_TYPE = 0x0113


@dataclass(frozen=True)
class InstanceHeader:
    """What the listener reads of every instance it keeps."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str  # as sent, "" when absent
    stat: bool  # RequestedProcedurePriority STAT, at the top level or in a requested procedure


def check_instance(
    stream: bytes | memoryview,
    ts: UID,
    sop_class_uid: str | None,
    sop_instance_uid: str | None,
    images: ImageSettings | None = None,
) -> InstanceHeader:
    """The checks every received data set passes before it is kept; return what it says.

    ``stream`` is the encoded data set in transfer syntax ``ts``; the UIDs are those the C-STORE
    request named. Raises ``CorruptDataset`` (answer 0xC000) or ``DatasetMismatch`` (0xA900).
    The values come from the structural walk itself (``dicom_node.wire``), not from pydicom.
    With ``images``, an image whose declared pixels no pipeline may decode (``images`` limits)
    is refused too (``ImageRefused``, 0xC000). Used by the listener and by
    ``pacs-ai quarantine retry``.
    """
    layout = check_complete(
        stream, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian
    )
    header = InstanceHeader(
        sop_class_uid=layout.text(SOP_CLASS_UID),
        sop_instance_uid=layout.text(SOP_INSTANCE_UID),
        study_instance_uid=layout.text(STUDY_INSTANCE_UID),
        series_instance_uid=layout.text(SERIES_INSTANCE_UID),
        modality=layout.text(MODALITY),
        stat=any(
            _is_stat(value)
            for value in (
                layout.values.get(REQUESTED_PROCEDURE_PRIORITY, b""),
                *layout.request_priorities,
            )
        ),
    )
    for keyword, value in (
        ("SOPClassUID", header.sop_class_uid),
        ("SOPInstanceUID", header.sop_instance_uid),
        ("StudyInstanceUID", header.study_instance_uid),
        ("SeriesInstanceUID", header.series_instance_uid),
    ):
        if not value:
            raise DatasetMismatch(f"required attribute {keyword} is missing or empty")
        if not is_valid_uid(value):
            raise DatasetMismatch(f"{keyword} is not a valid UID")
    if header.sop_class_uid != sop_class_uid:
        raise DatasetMismatch("SOP Class UID in the data set differs from the request")
    if header.sop_instance_uid != sop_instance_uid:
        raise DatasetMismatch("SOP Instance UID in the data set differs from the request")
    if header.sop_class_uid in IMAGE_STORAGE and not layout.has_pixels:
        raise DatasetMismatch("image SOP class without pixel data")
    if images is not None and layout.has_pixels:
        _check_declared_pixels(layout, images)
    return header


def _check_declared_pixels(layout: Layout, images: ImageSettings) -> None:
    """Refuse an image whose Image Pixel module declares what no pipeline may decode."""
    rows, columns = layout.us(ROWS), layout.us(COLUMNS)
    bits = layout.us(BITS_ALLOCATED)
    if rows is None or columns is None or bits is None:
        return  # not an image pixel module the limits can judge (float pixel data, say)
    frames = layout.integer_string(NUMBER_OF_FRAMES)
    geometry = Geometry(
        rows=rows,
        columns=columns,
        frames=1 if frames is None else frames,
        samples_per_pixel=layout.us(SAMPLES_PER_PIXEL) or 1,
        bits_allocated=bits,
    )
    problem = geometry_problem(geometry, images)
    if problem is not None and problem.too_large:
        raise ImageRefused(f"{problem.reason}: no pipeline would decode it")
    if problem is not None:
        raise DatasetMismatch(problem.reason)


def _is_stat(priority: bytes) -> bool:
    return priority.decode("latin-1").strip("\x00 ").upper() == "STAT"


class StorageSCP:
    """C-STORE handling and per-association study tracking."""

    def __init__(
        self,
        listener: ListenerSettings,
        completion: CompletionSettings,
        index: Index,
        spool: Spool,
        quarantine: Quarantine,
        on_study_ready: Callable[[], None] | None = None,
        images: ImageSettings | None = None,
    ) -> None:
        self.listener = listener
        # What an image may declare; one above it is refused at receipt (0xC000).
        self.images = images if images is not None else ImageSettings()
        self.completion = completion
        self.index = index
        self.spool = spool
        self.quarantine = quarantine
        self.on_study_ready = on_study_ready
        self._lock = threading.Lock()
        # association id -> {study uid: modality}; to complete CR/DX studies at release.
        self._touched: dict[int, dict[str, str]] = {}
        # association id -> instances kept; logged once per association, not per instance.
        self._kept: dict[int, int] = {}

    # --- handlers ------------------------------------------------------------------------

    def handle_store(self, event: Event) -> int:
        """EVT_C_STORE: keep the instance durably, then answer."""
        request = cast(C_STORE, event.request)
        return self._receive(
            event.assoc,
            lambda: self._staged(event),
            event.context.transfer_syntax,
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
        )

    def store_direct(self, assoc: Association, request: DirectStore) -> int:
        """A C-STORE the streaming reader took off the wire itself: the same as ``handle_store``."""
        return self._receive(
            assoc,
            lambda: request.staged,
            request.transfer_syntax,
            request.sop_class_uid,
            request.sop_instance_uid,
        )

    def _receive(
        self,
        assoc: Association,
        stage: Callable[[], StagedFile],
        transfer_syntax: UID,
        sop_class_uid: str,
        sop_instance_uid: str,
    ) -> int:
        calling_aet = assoc.requestor.ae_title.strip()
        sop_uid: str | None = None
        try:
            staged = stage()
        except OutOfResources as exc:
            log.error("C-STORE from %s refused (0xA700): %s", calling_aet, exc)
            return OUT_OF_RESOURCES
        try:
            header = self._parse(staged, transfer_syntax, sop_class_uid, sop_instance_uid)
            sop_uid = header.sop_instance_uid
            study_uid, modality = self.store_instance(
                header,
                staged,
                str(transfer_syntax),
                calling_aet,
                called_aet=assoc.acceptor.ae_title.strip(),
            )
            self._touch(assoc, study_uid, modality)
            return SUCCESS
        except (CorruptDataset, ImageRefused) as exc:
            return self._reject(staged, CANNOT_UNDERSTAND, str(exc), calling_aet, sop_uid)
        except DatasetMismatch as exc:
            return self._reject(staged, DATASET_MISMATCH, str(exc), calling_aet, sop_uid)
        except OutOfResources as exc:
            log.error("C-STORE from %s refused (0xA700): %s", calling_aet, exc)
            return OUT_OF_RESOURCES
        finally:
            staged.discard()  # whatever was not published

    def handle_event_report(self, event: Event) -> tuple[int, Dataset | None]:
        """EVT_N_EVENT_REPORT: a Storage Commitment report for rows the outbox keeps waiting.

        Event type 1: every referenced object committed; 2: some failed (Failed SOP Sequence,
        with a reason each). A report the index cannot take is answered 0x0110: the destination
        may send it again, and otherwise the rows time out and are sent again.
        """
        request = cast(N_EVENT_REPORT, event.request)
        calling_aet = event.assoc.requestor.ae_title.strip()
        if request.AffectedSOPClassUID != STORAGE_COMMITMENT or event.event_type not in (1, 2):
            log.warning("N-EVENT-REPORT from %s for something we never asked for", calling_aet)
            return NO_SUCH_EVENT_TYPE, None
        try:
            info = event.event_information
            transaction_uid = str(info.TransactionUID)
            committed = [
                str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])
            ]
            failed = {
                str(item.ReferencedSOPInstanceUID): (
                    f"{calling_aet} failed Storage Commitment with reason "
                    f"0x{int(item.get('FailureReason', 0x0110)):04X}"
                )
                for item in info.get("FailedSOPSequence", [])
            }
            settled = self.index.record_commitment(transaction_uid, committed, failed, time.time())
        except Exception:
            log.exception("Storage Commitment report from %s not recorded", calling_aet)
            return PROCESSING_FAILURE, None
        log.info(
            "Storage Commitment report from %s: %d committed, %d failed, %d outbox row(s) settled",
            calling_aet,
            len(committed),
            len(failed),
            settled,
        )
        return SUCCESS, None

    def handle_released(self, event: Event) -> None:
        """EVT_RELEASED: CR/DX studies sent on this association are complete now."""
        with self._lock:
            touched = self._touched.pop(id(event.assoc), {})
            kept = self._kept.pop(id(event.assoc), 0)
        if kept:
            log.info(
                "association from %s released: %d instance(s) kept in %d study(ies)",
                event.assoc.requestor.ae_title.strip(),
                kept,
                len(touched),
            )
        ready = [
            uid
            for uid, modality in touched.items()
            if modality in self.completion.complete_at_release
        ]
        if ready:
            try:
                self.index.release_studies(ready, time.time())
            except Exception:  # the quiet-period fallback completes them later
                log.exception("could not mark %d released studies complete", len(ready))
            if self.on_study_ready is not None:
                self.on_study_ready()

    def handle_aborted(self, event: Event) -> None:
        """EVT_ABORTED: the sender may retry; its studies complete after the quiet period."""
        with self._lock:
            touched = self._touched.pop(id(event.assoc), {})
            kept = self._kept.pop(id(event.assoc), 0)
        log.warning(
            "association from %s aborted after %d instance(s) kept in %d study(ies)",
            event.assoc.requestor.ae_title.strip(),
            kept,
            len(touched),
        )

    # --- steps ---------------------------------------------------------------------------

    def _staged(self, event: Event) -> StagedFile:
        """The received instance as a staged file in the spool.

        The streaming receiver (``dicom_node.stream``) has usually written it there already as
        it arrived; otherwise pynetdicom holds the data set in memory and it is written now. The
        file is exactly what the sender encoded, behind a standard preamble and file meta.
        """
        request = cast(C_STORE, event.request)
        streamed = getattr(request, "_dataset_file", None)  # pynetdicom's data-set file
        if isinstance(streamed, StagedFile):
            return streamed
        preamble = file_preamble(
            str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID),
            str(event.context.transfer_syntax),
            event.assoc.requestor.ae_title,
            event.assoc.acceptor.ae_title,
        )
        staged = self.spool.stage([preamble, cast(BytesIO, request.DataSet).getvalue()])
        staged.dataset_offset = len(preamble)
        return staged

    def _parse(
        self, staged: StagedFile, transfer_syntax: UID, sop_class_uid: str, sop_instance_uid: str
    ) -> InstanceHeader:
        if staged.error is not None:
            raise OutOfResources(f"cannot store: {staged.error.strerror or staged.error}")
        with staged.mapped() as whole:
            return check_instance(
                whole[staged.dataset_offset :],
                transfer_syntax,
                sop_class_uid,
                sop_instance_uid,
                self.images,
            )

    def store_instance(
        self,
        header: InstanceHeader,
        staged: StagedFile,
        transfer_syntax: str,
        calling_aet: str,
        called_aet: str | None = None,
    ) -> tuple[str, str]:
        """Keep a checked, staged instance in the spool and the index; return (study UID, modality).

        Raises ``OutOfResources`` when it cannot be kept; then no new file is left behind. The
        staged file is published or removed either way. Copies of one instance arriving at the
        same moment are kept one after the other (``Spool.instance_lock``).
        """
        try:
            with self.spool.instance_lock(header.sop_instance_uid):
                return self._keep(header, staged, transfer_syntax, calling_aet, called_aet)
        finally:
            staged.discard()

    def _keep(
        self,
        header: InstanceHeader,
        staged: StagedFile,
        transfer_syntax: str,
        calling_aet: str,
        called_aet: str | None,
    ) -> tuple[str, str]:
        sop_uid = header.sop_instance_uid
        study_uid = header.study_instance_uid
        series_uid = header.series_instance_uid
        modality = (header.modality or "OT").upper()
        target = self.spool.path_for(study_uid, series_uid, sop_uid)
        # Idempotent: a sender retrying after a lost response must not create a duplicate. A
        # known instance whose file has gone is stored again rather than acknowledged unkept.
        # The index is asked first only when the file is there already; otherwise the insert
        # below says whether the instance was known (under another study or series, say).
        there = target.exists()
        known = self._known(sop_uid) if there else None
        if known is not None and self._keeps(known):
            return study_uid, modality
        now = time.time()
        record = self._record(
            header, target, staged.size, transfer_syntax, calling_aet, called_aet, received_at=now
        )
        urgent, complete_after = header.stat, self._complete_after(modality, now)
        if there:
            # Replace, or a file in place that the index does not know (its row lost to a power
            # cut, or an index restored from an older backup): the old file stays whole until
            # the index row describes the new one, so a refused row leaves it as it was.
            with self.spool.replacing(study_uid, series_uid, sop_uid, staged):
                if known is not None or not self.index.record_instance(
                    record, urgent=urgent, complete_after=complete_after
                ):
                    self.index.replace_instance(
                        record, urgent=urgent, complete_after=complete_after
                    )
            if known is not None:
                self._replaced(known, record)
            return study_uid, modality
        self.spool.store(study_uid, series_uid, sop_uid, staged)
        try:
            fresh = self.index.record_instance(record, urgent=urgent, complete_after=complete_after)
            if not fresh:
                # Known already: kept under another path (the copy there stays the one), or
                # its file had gone (the row must now describe the new file).
                known = self._known(sop_uid)
                if known is not None and known.path != record.path and self._keeps(known):
                    target.unlink(missing_ok=True)
                    return study_uid, modality
                self.index.replace_instance(record, urgent=urgent, complete_after=complete_after)
        except OutOfResources:
            # The sender gets 0xA700 and retries: no unindexed file may stay behind.
            target.unlink(missing_ok=True)
            raise
        if known is not None:
            self._replaced(known, record)
        else:
            log.debug("stored instance of study %s (%s, %s)", study_uid, modality, calling_aet)
        return study_uid, modality

    def index_kept_file(self, path: Path) -> bool:
        """Index an instance whose file is in its place in the spool already; False if known.

        For ``dicom_node.recovery``: the file is what the listener wrote (preamble, file meta
        with the AE titles, the data set as sent), so it passes the same checks again and says
        who sent it. Raises ``CorruptDataset`` or ``DatasetMismatch`` for a file that is not a
        whole instance where its UIDs put it, ``OutOfResources`` when the index cannot take it.
        """
        raw = path.read_bytes()
        try:
            meta, stream = split_file(raw)
            ts = UID(str(meta.TransferSyntaxUID))
            sop_class, sop_instance = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        except Exception as exc:  # pydicom raises many types on a broken file meta
            raise CorruptDataset(f"unreadable file meta: {type(exc).__name__}: {exc}") from exc
        header = check_instance(stream, ts, str(sop_class), str(sop_instance))
        target = self.spool.path_for(
            header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid
        )
        if target != path:
            raise DatasetMismatch(f"its UIDs place it at {target}")
        modality = (header.modality or "OT").upper()
        record = self._record(
            header,
            path,
            len(raw),
            str(ts),
            str(meta.get("SendingApplicationEntityTitle", "") or "").strip(),
            str(meta.get("ReceivingApplicationEntityTitle", "") or "").strip() or None,
            received_at=path.stat().st_mtime,
        )
        complete_after = self._complete_after(modality, time.time())
        return self.index.record_instance(record, urgent=header.stat, complete_after=complete_after)

    @staticmethod
    def _record(
        header: InstanceHeader,
        path: Path,
        size: int,
        transfer_syntax: str,
        calling_aet: str,
        called_aet: str | None,
        *,
        received_at: float,
    ) -> InstanceRecord:
        return InstanceRecord(
            sop_instance_uid=header.sop_instance_uid,
            study_instance_uid=header.study_instance_uid,
            series_instance_uid=header.series_instance_uid,
            sop_class_uid=header.sop_class_uid,
            transfer_syntax_uid=transfer_syntax,
            modality=(header.modality or "OT").upper(),
            path=str(path),
            size_bytes=size,
            calling_aet=calling_aet,
            received_at=received_at,
            called_aet=called_aet,
        )

    def _complete_after(self, modality: str, now: float) -> float:
        """When a study that just got an instance of ``modality`` completes if nothing else comes."""
        fallback = self.completion.quiet_period_s
        if modality in self.completion.complete_at_release:
            # Completes at release; this only matters if the association never releases.
            fallback = max(fallback, self.listener.network_timeout_s)
        return now + fallback

    def _known(self, sop_uid: str) -> InstanceRecord | None:
        try:
            return self.index.instance(sop_uid)
        except Exception as exc:
            raise OutOfResources(f"index unavailable: {type(exc).__name__}") from exc

    def _keeps(self, known: InstanceRecord) -> bool:
        """True when a known instance stays as it is (``on_duplicate: keep`` and its file is there)."""
        return self.spool.on_duplicate == "keep" and Path(known.path).is_file()

    def _replaced(self, known: InstanceRecord, record: InstanceRecord) -> None:
        if known.path != record.path:
            Path(known.path).unlink(missing_ok=True)
        log.info(
            "replaced instance of study %s (%s, %s)",
            record.study_instance_uid,
            record.modality,
            record.calling_aet,
        )

    def _touch(self, assoc: Association, study_uid: str, modality: str) -> None:
        key = id(assoc)
        with self._lock:
            self._touched.setdefault(key, {})[study_uid] = modality
            self._kept[key] = self._kept.get(key, 0) + 1

    def _reject(
        self, staged: StagedFile, status: int, reason: str, calling_aet: str, sop_uid: str | None
    ) -> int:
        try:
            entry = self.quarantine.keep(
                [staged.read_bytes()],
                reason=reason,
                status_code=status,
                calling_aet=calling_aet,
                sop_uid=sop_uid,
            )
        except Exception:
            # Could not even keep it aside: ask the sender to retry later rather than lose it.
            log.exception("quarantine failed; answering 0xA700")
            return OUT_OF_RESOURCES
        log.warning(
            "C-STORE from %s quarantined as %s (0x%04X): %s", calling_aet, entry, status, reason
        )
        return status


def build_ae(listener: ListenerSettings) -> ListenerAE:
    """An application entity configured from the listener settings.

    Every server it starts checks the peer allow-list and the association limit
    (``ListenerAE.admission_limit``) and uses the listener's TLS settings.
    """
    ae = ListenerAE(listener)
    ae.maximum_pdu_size = listener.max_pdu_bytes
    ae.network_timeout = listener.network_timeout_s
    ae.acse_timeout = listener.acse_timeout_s
    ae.dimse_timeout = listener.dimse_timeout_s
    ae.require_called_aet = listener.require_called_aet
    for sop_class in ACCEPTED_STORAGE:
        ae.add_supported_context(sop_class, ACCEPTED_TRANSFER_SYNTAXES)
    ae.add_supported_context(VERIFICATION)
    # Destinations send Storage Commitment reports here as the SCP of that SOP class.
    ae.add_supported_context(STORAGE_COMMITMENT, scu_role=False, scp_role=True)
    return ae


def handlers(scp: StorageSCP) -> list[evt.EventHandlerType]:
    """The pynetdicom event bindings for a running listener."""
    return [
        (evt.EVT_C_STORE, scp.handle_store),
        (evt.EVT_N_EVENT_REPORT, scp.handle_event_report),
        (evt.EVT_RELEASED, scp.handle_released),
        (evt.EVT_ABORTED, scp.handle_aborted),
    ]
