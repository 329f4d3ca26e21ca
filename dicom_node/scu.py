"""Outgoing DICOM: C-ECHO and C-STORE to a remote node, one association per batch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.errors import DestinationRejected, DestinationUnavailable
from dicom_node.security import client_context
from dicom_node.settings import DestinationSettings, DestinationTLSSettings
from dicom_node.sop import VERIFICATION

STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
EXPLICIT_VR_LE, IMPLICIT_VR_LE = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2"
# Storage Commitment Push Model: the SOP class and its well-known instance (PS3.4 J.3.5).
STORAGE_COMMITMENT = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"


@dataclass(frozen=True)
class RemoteNode:
    """Where to connect: the called AE title, host and port, and who we say we are."""

    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "PACSAI"
    timeout_s: float = 30.0
    # None or disabled: plain TCP.
    tls: DestinationTLSSettings | None = None

    @classmethod
    def from_destination(cls, dest: DestinationSettings) -> RemoteNode:
        """The node a configured destination names, TLS settings included."""
        return cls(
            dest.ae_title, dest.host, dest.port, dest.calling_ae_title, dest.timeout_s, dest.tls
        )

    @classmethod
    def parse(cls, address: str, calling_ae_title: str = "PACSAI") -> RemoteNode:
        """Parse ``AE@HOST:PORT``."""
        try:
            ae_title, rest = address.split("@", 1)
            host, port = rest.rsplit(":", 1)
            return cls(ae_title, host, int(port), calling_ae_title)
        except ValueError as exc:
            raise ValueError(f"expected AE@HOST:PORT, got {address!r}") from exc

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _associate(remote: RemoteNode, contexts: Sequence[tuple[str, str]]) -> Association:
    assoc = _request(remote, contexts)
    if not assoc.is_established:
        raise DestinationUnavailable(f"association with {remote} {_failure(assoc)}")
    return assoc


def _failure(assoc: Association) -> str:
    return "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"


def _request(remote: RemoteNode, contexts: Sequence[tuple[str, str]]) -> Association:
    ae = AE(ae_title=remote.calling_ae_title)
    ae.acse_timeout = remote.timeout_s
    ae.dimse_timeout = remote.timeout_s
    ae.network_timeout = remote.timeout_s
    # Also bounds the TLS handshake, which happens while connecting.
    ae.connection_timeout = remote.timeout_s
    for sop_class, syntax in dict.fromkeys(contexts):
        ae.add_requested_context(sop_class, syntax)
    context = client_context(remote.tls) if remote.tls is not None else None
    return ae.associate(
        remote.host,
        remote.port,
        ae_title=remote.ae_title,
        tls_args=(context, remote.host) if context is not None else None,
    )


def echo(remote: RemoteNode) -> int:
    """C-ECHO the remote node; return the status (0x0000 is success)."""
    assoc = _associate(remote, [(VERIFICATION, "1.2.840.10008.1.2")])
    try:
        status = assoc.send_c_echo()
        if "Status" not in status:
            raise DestinationUnavailable(f"no C-ECHO response from {remote}")
        return int(status.Status)
    finally:
        assoc.release()


def send_datasets(remote: RemoteNode, datasets: Sequence[Dataset]) -> list[int]:
    """C-STORE the data sets on one association; raise on the first failure status."""
    if not datasets:
        return []
    contexts = [(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets]
    assoc = _associate(remote, contexts)
    statuses: list[int] = []
    try:
        for ds in datasets:
            response = assoc.send_c_store(ds)
            if "Status" not in response:
                raise DestinationUnavailable(f"no C-STORE response from {remote}")
            status = int(response.Status)
            statuses.append(status)
            # 0xB000-0xBFFF are warnings: stored, with a remark.
            if status != 0x0000 and not 0xB000 <= status <= 0xBFFF:
                raise DestinationRejected(
                    f"{remote} refused {ds.SOPInstanceUID} with status 0x{status:04X}", status
                )
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


@dataclass(frozen=True)
class StoreOutcome:
    """The destination's answer to one C-STORE of a batch.

    ``status`` is None when the object was never sent: the destination accepted no presentation
    context for its SOP class and transfer syntax (``refused``), or the association broke first.
    """

    status: int | None
    message: str
    refused: bool = False
    # With confirmation asked for: did a C-FIND find the stored object (or did the destination
    # take the Storage Commitment request)? None: not checked.
    confirmed: bool | None = None
    # The Storage Commitment transaction whose report will settle this object; None: none asked.
    commitment: str | None = None

    @property
    def stored(self) -> bool:
        # 0xB000-0xBFFF are warnings: stored, with a remark.
        return self.status is not None and (
            self.status == 0x0000 or 0xB000 <= self.status <= 0xBFFF
        )


# Called with the transaction UID and the indexes (into the batch) of the objects about to be
# named in a Storage Commitment request, before it is sent: the report may overtake the response.
CommitmentHook = Callable[[str, Sequence[int]], None]


def store_datasets(
    remote: RemoteNode,
    datasets: Sequence[Dataset],
    *,
    confirm_by_find: bool = False,
    commit: CommitmentHook | None = None,
) -> list[StoreOutcome]:
    """C-STORE the data sets on one association and report each answer, failures included.

    Raises :class:`DestinationUnavailable` only when no association could be made; an association
    that breaks mid-batch leaves the rest with ``status`` None (not refused: worth retrying).
    ``confirm_by_find``: then C-FIND each stored object on the same association.
    ``commit``: then ask for Storage Commitment of the stored objects with one N-ACTION; their
    outcomes carry the transaction UID (the report comes later, on another association). A
    destination that accepts no Storage Commitment context is checked by C-FIND instead if it
    accepts that, else its C-STORE status stands.
    """
    if not datasets:
        return []
    contexts = [(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets]
    if commit is not None:
        contexts += [(STORAGE_COMMITMENT, ts) for ts in (EXPLICIT_VR_LE, IMPLICIT_VR_LE)]
    if confirm_by_find or commit is not None:
        contexts += [(STUDY_ROOT_FIND, ts) for ts in (EXPLICIT_VR_LE, IMPLICIT_VR_LE)]
    assoc = _request(remote, contexts)
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:
            # The node answered but takes none of these objects (pynetdicom then aborts).
            return [_no_context(remote, ds, "") for ds in datasets]
        raise DestinationUnavailable(f"association with {remote} {_failure(assoc)}")
    outcomes: list[StoreOutcome] = []
    try:
        for ds in datasets:
            if not assoc.is_established:
                outcomes.append(StoreOutcome(None, f"association with {remote} lost"))
                continue
            try:
                response = assoc.send_c_store(ds)
            except ValueError as exc:
                # pynetdicom's way of saying no accepted presentation context fits this object.
                outcomes.append(_no_context(remote, ds, f": {exc}"))
                continue
            if "Status" not in response:
                outcomes.append(StoreOutcome(None, f"no C-STORE response from {remote}"))
                continue
            status = int(response.Status)
            outcomes.append(StoreOutcome(status, f"{remote} answered status 0x{status:04X}"))
        if commit is not None and _accepts(assoc, STORAGE_COMMITMENT):
            outcomes = _request_commitment(assoc, remote, datasets, outcomes, commit)
        elif confirm_by_find or (commit is not None and _accepts(assoc, STUDY_ROOT_FIND)):
            outcomes = [
                _confirm(assoc, remote, ds, o) if o.stored else o
                for ds, o in zip(datasets, outcomes, strict=True)
            ]
    finally:
        if assoc.is_established:
            assoc.release()
    return outcomes


def _accepts(assoc: Association, sop_class: str) -> bool:
    return any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts)


def _request_commitment(
    assoc: Association,
    remote: RemoteNode,
    datasets: Sequence[Dataset],
    outcomes: list[StoreOutcome],
    commit: CommitmentHook,
) -> list[StoreOutcome]:
    """One N-ACTION (Request Storage Commitment) naming every stored object of the batch."""
    stored = [i for i, o in enumerate(outcomes) if o.stored]
    if not stored or not assoc.is_established:
        return outcomes
    transaction_uid = str(generate_uid())
    request = Dataset()
    request.TransactionUID = transaction_uid
    references = []
    for i in stored:
        item = Dataset()
        item.ReferencedSOPClassUID = datasets[i].SOPClassUID
        item.ReferencedSOPInstanceUID = datasets[i].SOPInstanceUID
        references.append(item)
    request.ReferencedSOPSequence = references
    commit(transaction_uid, stored)
    status_ds, _reply = assoc.send_n_action(
        request, 1, STORAGE_COMMITMENT, STORAGE_COMMITMENT_INSTANCE
    )
    status = int(status_ds.Status) if status_ds is not None and "Status" in status_ds else None
    result = list(outcomes)
    for i in stored:
        if status == 0x0000:
            result[i] = replace(outcomes[i], commitment=transaction_uid)
        else:
            answer = "no answer" if status is None else f"status 0x{status:04X}"
            result[i] = replace(
                outcomes[i],
                confirmed=False,
                message=f"{remote} stored the object but answered its Storage Commitment "
                f"request with {answer}",
            )
    return result


def _confirm(
    assoc: Association, remote: RemoteNode, ds: Dataset, outcome: StoreOutcome
) -> StoreOutcome:
    uid = str(ds.SOPInstanceUID)
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = ds.StudyInstanceUID
    query.SeriesInstanceUID = ds.SeriesInstanceUID
    query.SOPInstanceUID = uid
    found = False
    try:
        for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
            pending = status is not None and int(status.get("Status", 0)) in (0xFF00, 0xFF01)
            if pending and identifier is not None and identifier.get("SOPInstanceUID") == uid:
                found = True
    except ValueError:
        return replace(outcome, confirmed=False, message=f"{remote} does not answer C-FIND")
    if found:
        return replace(outcome, confirmed=True)
    return replace(
        outcome,
        confirmed=False,
        message=f"{remote} answered 0x{outcome.status or 0:04X} but a C-FIND does not find {uid}",
    )


def _no_context(remote: RemoteNode, ds: Dataset, detail: str) -> StoreOutcome:
    return StoreOutcome(
        None,
        f"{remote} accepts no presentation context for SOP class {ds.SOPClassUID} "
        f"in transfer syntax {ds.file_meta.TransferSyntaxUID}{detail}",
        refused=True,
    )


def send_files(remote: RemoteNode, paths: Sequence[Path]) -> list[int]:
    """C-STORE DICOM files on one association."""
    return send_datasets(remote, [dcmread(p) for p in paths])
