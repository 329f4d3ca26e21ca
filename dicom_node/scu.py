"""Outgoing DICOM: C-ECHO and C-STORE to a remote node, one association per batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node.errors import DestinationRejected, DestinationUnavailable
from dicom_node.security import client_context
from dicom_node.settings import DestinationSettings, DestinationTLSSettings
from dicom_node.sop import VERIFICATION


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
    ae = AE(ae_title=remote.calling_ae_title)
    ae.acse_timeout = remote.timeout_s
    ae.dimse_timeout = remote.timeout_s
    ae.network_timeout = remote.timeout_s
    # Also bounds the TLS handshake, which happens while connecting.
    ae.connection_timeout = remote.timeout_s
    for sop_class, syntax in dict.fromkeys(contexts):
        ae.add_requested_context(sop_class, syntax)
    context = client_context(remote.tls) if remote.tls is not None else None
    assoc = ae.associate(
        remote.host,
        remote.port,
        ae_title=remote.ae_title,
        tls_args=(context, remote.host) if context is not None else None,
    )
    if not assoc.is_established:
        state = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "failed"
        raise DestinationUnavailable(f"association with {remote} {state}")
    return assoc


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


def send_files(remote: RemoteNode, paths: Sequence[Path]) -> list[int]:
    """C-STORE DICOM files on one association."""
    return send_datasets(remote, [dcmread(p) for p in paths])
