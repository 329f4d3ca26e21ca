"""Who may talk to the node, and how: the per-peer allow-list and DICOM TLS.

The allow-list is checked when the A-ASSOCIATE-RQ arrives (``EVT_REQUESTED``), before any
negotiation: an unknown peer gets an A-ASSOCIATE-RJ ("calling AE title not recognised"), never an
accepted association that then fails. pynetdicom's own ``require_calling_aet`` can only check the
AE title; a sender is identified here by AE title *and* source address. The same check admits at
most ``listener.max_associations`` associations of allowed peers; connections that have not yet
asked to associate are limited apart (``dicom_node.server``) and in time (``dicom_node.stream``).

TLS contexts are built from PEM files named in the settings (TLS 1.2 or newer); a listener with a
CA file requires and verifies client certificates (mutual TLS). The listener's TLS handshake runs
in the association's own thread, not in pynetdicom's accept loop (see ``_HandshakeInAssociationThread``).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
from collections.abc import Callable
from typing import Any, TypeVar, cast

from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.settings import (
    DestinationTLSSettings,
    ListenerSettings,
    PeerSettings,
    TLSSettings,
)

log = logging.getLogger(__name__)

# A-ASSOCIATE-RJ: rejected-permanent, by the DUL service user, calling AE title not recognised.
_REJECT_UNKNOWN_PEER = (0x01, 0x01, 0x03)
# A-ASSOCIATE-RJ: rejected-transient, by the service provider (presentation), local limit exceeded.
_REJECT_BUSY = (0x02, 0x03, 0x02)
# pynetdicom refuses an association when more association threads than this run: it counts
# connections that have not yet associated too, so the real limit is the admission check's.
_THREAD_LIMIT = 1 << 16

_TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

_T = TypeVar("_T")
# Set on an association that passed the admission check.
_ADMITTED = "_pacs_ai_admitted"

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def _ip(address: str) -> IPAddress | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    # A listener bound to "::" sees IPv4 senders as ::ffff:a.b.c.d.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class PeerPolicy:
    """The allow-list of senders: calling AE title and source address pairs."""

    def __init__(self, peers: list[PeerSettings]) -> None:
        self.peers = list(peers)

    def allows(self, calling_aet: str, address: str) -> bool:
        """True when the peer may associate; an empty list allows everyone."""
        if not self.peers:
            return True
        ip = _ip(address)
        if ip is None:
            return False
        calling_aet = calling_aet.strip()
        return any(
            peer.ae_title == calling_aet
            and ip.version == peer.address.version
            and ip in peer.address
            for peer in self.peers
        )

    def lists(self, address: str) -> bool:
        """True when some allowed peer may connect from ``address`` (or when all may)."""
        if not self.peers:
            return True
        ip = _ip(address)
        return ip is not None and any(
            ip.version == peer.address.version and ip in peer.address for peer in self.peers
        )


def _reject(assoc: Association, reason: tuple[int, int, int]) -> None:
    # What pynetdicom's ACSE does for a calling AE title it does not know: reject, tell the
    # handlers, and wait until the reject has gone out before the thread ends.
    assoc.acse.send_reject(*reason)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()


# --- TLS ------------------------------------------------------------------------------------------


class _HandshakeInAssociationThread(ssl.SSLContext):
    """A server context whose sockets shake hands on first read, in the association's thread.

    pynetdicom wraps accepted sockets in its accept loop; with the default handshake-on-connect a
    client that connects and sends nothing stalls every other sender until it goes away.
    """

    def wrap_socket(self, sock: socket.socket, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        if kwargs.get("server_side"):
            kwargs["do_handshake_on_connect"] = False
        return super().wrap_socket(sock, *args, **kwargs)


def _load_identity(context: ssl.SSLContext, tls: TLSSettings) -> None:
    context.minimum_version = _TLS_VERSIONS[tls.min_version]
    if tls.cert_file is not None and tls.key_file is not None:
        context.load_cert_chain(certfile=tls.cert_file, keyfile=tls.key_file)


def server_context(tls: TLSSettings) -> ssl.SSLContext | None:
    """The listener's TLS context, or None when TLS is off; mutual TLS when a CA file is given."""
    if not tls.enabled:
        return None
    context = _HandshakeInAssociationThread(ssl.PROTOCOL_TLS_SERVER)
    _load_identity(context, tls)
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=tls.ca_file)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: DestinationTLSSettings) -> ssl.SSLContext | None:
    """The TLS context for an outgoing association, or None when TLS is off.

    The server certificate is always verified: against ``ca_file`` when given, else against the
    system trust store.
    """
    if not tls.enabled:
        return None
    context = ssl.create_default_context(
        ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca_file) if tls.ca_file else None
    )
    context.check_hostname = tls.check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    _load_identity(context, tls)
    return context


# --- the listener's application entity ------------------------------------------------------------


class ListenerAE(AE):
    """An AE whose every server enforces the listener's allow-list, limits and TLS settings.

    Whatever starts the listener (``start_server`` or ``make_server``, one process or several)
    gets the admission check bound and the TLS context set; neither can be forgotten by a caller.

    Admission (``EVT_REQUESTED``, when the A-ASSOCIATE-RQ has arrived): a peer not on the
    allow-list is rejected; an allowed one is rejected as busy (transient, local limit
    exceeded) when ``admission_limit`` associations of allowed peers already run here, and is
    otherwise admitted and reported to ``on_admitted``. Connections that have not yet sent
    their request do not count against the limit: they are bounded apart (``dicom_node.server``
    and the ACSE timeout on every read before the association, ``dicom_node.stream``), so that
    they cannot take the allowed peers' capacity.
    """

    def __init__(self, listener: ListenerSettings) -> None:
        super().__init__(ae_title=listener.ae_title)
        self.peer_policy = PeerPolicy(listener.peers)
        self.ssl_context = server_context(listener.tls)
        # Associations of allowed peers this process serves at once.
        self.admission_limit = listener.max_associations
        # Called with each admitted association (the listener's processes tell the acceptor).
        self.on_admitted: Callable[[Association], None] | None = None
        self._admission = threading.Lock()
        self.maximum_associations = _THREAD_LIMIT

    def handle_requested(self, event: Event) -> None:
        """EVT_REQUESTED: reject a peer not on the list, or any peer when the limit is reached."""
        assoc = event.assoc
        request = cast(A_ASSOCIATE, assoc.requestor.primitive)
        calling_aet = str(request.calling_ae_title or "")
        address = assoc.requestor.address if assoc.requestor.address_info else ""
        if not self.peer_policy.allows(calling_aet, address):
            log.warning(
                "association from calling AE [%s] at %s rejected: peer not allowed",
                calling_aet,
                address,
            )
            _reject(assoc, _REJECT_UNKNOWN_PEER)
            return
        with self._admission:
            running = sum(
                1
                for other in self.active_associations
                if other is not assoc and getattr(other, _ADMITTED, False)
            )
            busy = running >= self.admission_limit
            if not busy:
                setattr(assoc, _ADMITTED, True)
        if busy:
            log.warning(
                "association from calling AE [%s] at %s rejected: %d associations running "
                "(listener.max_associations)",
                calling_aet,
                address,
                running,
            )
            _reject(assoc, _REJECT_BUSY)
            return
        if self.on_admitted is not None:
            self.on_admitted(assoc)

    def make_server(
        self,
        address: tuple[str, int] | tuple[str, int, int, int],
        ae_title: str | None = None,
        contexts: list[PresentationContext] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[EventHandlerType] | None = None,
        server_class: type[_T] | None = None,
        **kwargs: Any,
    ) -> _T | ThreadedAssociationServer:
        handlers: list[EventHandlerType] = [
            *(evt_handlers or []),
            (evt.EVT_REQUESTED, self.handle_requested),
        ]
        return super().make_server(
            address,
            ae_title=ae_title,
            contexts=contexts,
            ssl_context=ssl_context if ssl_context is not None else self.ssl_context,
            evt_handlers=handlers,
            server_class=server_class,
            **kwargs,
        )

    def serve_in_background(self, server: ThreadedAssociationServer) -> None:
        """Run a server from ``make_server`` on a daemon thread, as ``start_server`` would.

        (``start_server`` takes no request handler; ``server.shutdown()`` stops it.)
        """
        threading.Thread(target=server.serve_forever, name="listener", daemon=True).start()
        self._servers.append(server)
