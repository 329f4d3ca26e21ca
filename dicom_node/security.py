"""Who may talk to the node, and how: the per-peer allow-list and DICOM TLS.

The allow-list is checked when the A-ASSOCIATE-RQ arrives (``EVT_REQUESTED``), before any
negotiation: an unknown peer gets an A-ASSOCIATE-RJ ("calling AE title not recognised"), never an
accepted association that then fails. pynetdicom's own ``require_calling_aet`` can only check the
AE title; a sender is identified here by AE title *and* source address.

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
from typing import Any, TypeVar, cast

from pynetdicom import AE, evt
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

_TLS_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}

_T = TypeVar("_T")

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

    def handle_requested(self, event: Event) -> None:
        """EVT_REQUESTED: reject the association of a peer that is not on the list."""
        assoc = event.assoc
        request = cast(A_ASSOCIATE, assoc.requestor.primitive)
        calling_aet = str(request.calling_ae_title or "")
        address = assoc.requestor.address if assoc.requestor.address_info else ""
        if self.allows(calling_aet, address):
            return
        log.warning(
            "association from calling AE [%s] at %s rejected: peer not allowed",
            calling_aet,
            address,
        )
        # What pynetdicom's ACSE does for a calling AE title it does not know: reject, tell the
        # handlers, and wait until the reject has gone out before the thread ends.
        assoc.acse.send_reject(*_REJECT_UNKNOWN_PEER)
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
    """An AE whose every server enforces the listener's allow-list and TLS settings.

    Whatever starts the listener (``start_server`` or ``make_server``, one process or several)
    gets the peer check bound and the TLS context set; neither can be forgotten by a caller.
    """

    def __init__(self, listener: ListenerSettings) -> None:
        super().__init__(ae_title=listener.ae_title)
        self.peer_policy = PeerPolicy(listener.peers)
        self.ssl_context = server_context(listener.tls)

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
            (evt.EVT_REQUESTED, self.peer_policy.handle_requested),
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
