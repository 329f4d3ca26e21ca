"""The listener as several processes: one acceptor, N association servers.

One pynetdicom process tops out at one core, and its per-association threads slow each other down
under concurrent senders. So the node's process accepts every TCP connection and gives it to
whichever association server runs the fewest associations: its own (threads in the node's process,
as with one process) or one of N-1 child processes, which get the socket by SCM_RIGHTS over a
Unix socket pair. Each child runs pynetdicom with the same event handlers, its own index
connection, spool and quarantine. A child tells the parent when a released association made
studies complete, so the study assembler, which runs once in the parent, wakes at once. Serving
in the parent too saves one interpreter's memory (about 90 MB) against N children.

The acceptor also keeps connections that have not yet asked to associate (pending: the
A-ASSOCIATE-RQ has not arrived, or not passed the allow-list) from taking the allowed peers'
capacity. They are counted apart from associations, in two pools: connections from addresses on
the allow-list, and all others; each pool holds at most ``listener.max_pending_connections`` and
one address at most ``listener.max_pending_per_address``. A connection beyond either is closed at
once. Every pending connection is closed by the ACSE timeout (``dicom_node.stream``), and only
admitted associations count against ``listener.max_associations`` (``dicom_node.security``).

Channel messages: parent to child ``C`` (one byte, with the connection's descriptor) and ``Q``
(stop after the running associations); child to parent, one line each, ``U`` (ready), ``R``
(studies ready), ``A <peer>`` (the connection from that address and port was admitted) and
``D <peer>`` (it closed). A child whose parent vanishes (kill -9) sees end of file on its
channel, aborts its associations and exits.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import Event, EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.logs import configure_logging
from dicom_node.process import python_module_command
from dicom_node.security import PeerPolicy
from dicom_node.settings import ListenerSettings
from dicom_node.spool import Spool
from dicom_node.stream import StoreHandler, lighter_association_setup, streaming_request_handler

log = logging.getLogger(__name__)

CONNECTION = b"C"
QUIT = b"Q"
READY = b"U"
STUDIES_READY = b"R"
ADMITTED = b"A"
DONE = b"D"
# A pending connection the server forgot to report is dropped from the counts this long after
# its ACSE timeout (by then it is closed whatever happened).
_PENDING_GRACE_S = 10.0
# Refused connections are logged per address at most once in this many seconds.
_REFUSAL_LOG_INTERVAL_S = 10.0
_REFUSALS_REMEMBERED = 1024


def peer_key(address: str, port: int) -> str:
    """How the acceptor and the association servers name one connection: its peer's address."""
    return f"{address}|{port}"


def association_peer(assoc: Association) -> str:
    """``peer_key`` of the connection an association runs on."""
    return peer_key(assoc.requestor.address, assoc.requestor.port)


# How long a stopping child lets running associations finish before aborting them.
DRAIN_SECONDS = 5.0


def default_processes() -> int:
    """One association server per core, at least 2 (so one slow sender never blocks the rest)."""
    return max(2, min(8, os.cpu_count() or 1))


# --- association servers -----------------------------------------------------------------------


class HandedServer(ThreadedAssociationServer):
    """A pynetdicom server fed with connections accepted elsewhere; it never listens itself.

    ``on_closed`` hears of every connection's end once, by its ``peer_key``. pynetdicom closes a
    connection one of two ways: the association's socket (``EVT_CONN_CLOSE``), or, for one that
    never associated (timed out, rejected), the server's ``shutdown_request`` without that event.
    """

    on_closed: Callable[[str], None] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Descriptor -> peer of each connection not yet reported closed.
        self._open: dict[int, str] = {}
        self._open_lock = threading.Lock()
        self.bind(evt.EVT_CONN_CLOSE, self._handle_conn_close)

    def server_bind(self) -> None:  # the parent owns the listening socket
        pass

    def server_activate(self) -> None:
        pass

    def _handle_conn_close(self, event: Event) -> None:
        peer = association_peer(event.assoc)
        with self._open_lock:
            fds = [fd for fd, p in self._open.items() if p == peer]
            for fd in fds:
                del self._open[fd]
        if fds and self.on_closed is not None:
            self.on_closed(peer)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            try:
                peer = self._open.pop(request.fileno(), None)
            except (OSError, ValueError):  # closed already
                peer = None
        if peer is not None and self.on_closed is not None:
            self.on_closed(peer)
        super().shutdown_request(request)

    def serve(self, conn: socket.socket) -> None:
        """Run one association on an accepted connection (what ``get_request`` would return)."""
        address = conn.getpeername()
        with self._open_lock:
            self._open[conn.fileno()] = peer_key(*address[:2])
        if self.ssl_context is not None:
            # The handshake happens on the first read, in the association's thread: a client
            # that connects and sends nothing must not stall the loop that hands connections out.
            conn = self.ssl_context.wrap_socket(
                conn, server_side=True, do_handshake_on_connect=False
            )
        self.process_request(conn, address)


def _child(channel: socket.socket, config_json: str, max_associations: int) -> None:
    from dicom_node.node import NodeConfig, build_storage_scp  # the child's own imports
    from dicom_node.scp import build_ae, handlers

    lighter_association_setup()
    config = NodeConfig.from_json(config_json)
    listener = config.listener
    send_lock = threading.Lock()

    def tell(message: bytes) -> None:
        # OSError: the parent is gone; the channel's end of file stops this child.
        with send_lock, contextlib.suppress(OSError):
            channel.sendall(message)

    scp = build_storage_scp(config, on_study_ready=lambda: tell(STUDIES_READY + b"\n"))
    ae = build_ae(listener)
    ae.admission_limit = max_associations
    ae.on_admitted = lambda assoc: tell(_line(ADMITTED, association_peer(assoc)))
    server = make_handed_server(
        ae, (listener.host, listener.port), handlers(scp), scp.spool, scp.store_direct
    )
    server.on_closed = lambda peer: tell(_line(DONE, peer))
    tell(READY + b"\n")
    orderly = False
    while True:
        try:
            message, fds, _flags, _address = socket.recv_fds(channel, 1, 1)
        except OSError:
            message, fds = b"", []
        if not message:
            break
        if message == QUIT:
            orderly = True
            break
        for fd in fds:
            conn = socket.socket(fileno=fd)
            try:
                peer = peer_key(*conn.getpeername()[:2])
            except OSError:  # gone already: the parent counts it until its ACSE timeout
                conn.close()
                continue
            try:
                server.serve(conn)
            except Exception:
                log.exception("could not start an association")
                server.shutdown_request(conn)
                # shutdown_request reports it only if serve got as far as counting it.
                tell(_line(DONE, peer))
    _drain(server, DRAIN_SECONDS if orderly else 0.0)
    scp.index.close()
    scp.spool.close()


def _line(kind: bytes, peer: str) -> bytes:
    return kind + b" " + peer.encode("ascii", "replace") + b"\n"


def make_handed_server(
    ae: Any,
    address: tuple[str, int],
    events: list[EventHandlerType],
    spool: Spool,
    store: StoreHandler | None = None,
) -> HandedServer:
    """A server for ``ae`` that runs the associations of connections given to ``serve``.

    C-STORE data sets are written into ``spool`` as they arrive, and plain C-STOREs answered with
    ``store`` (``dicom_node.stream``). Set ``on_closed`` to hear of each connection's end.
    """
    server = ae.make_server(
        address,
        evt_handlers=events,
        server_class=HandedServer,
        request_handler=streaming_request_handler(spool, store),
    )
    assert isinstance(server, HandedServer)
    server.daemon_threads = True
    return server


def _drain(server: HandedServer, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assoc: Association
    for assoc in server.active_associations:
        assoc.abort()


def child_main(argv: list[str] | None = None) -> int:
    """Entry point of a child: ``python -m dicom_node.server --fd N`` with the config on stdin."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--max-associations", type=int, required=True)
    parser.add_argument("--log-level", type=int, default=logging.INFO)
    args = parser.parse_args(argv)
    configure_logging(
        args.log_level, format="%(asctime)s %(levelname)-7s %(name)s[%(process)d]: %(message)s"
    )
    channel = socket.socket(fileno=args.fd)
    _child(channel, sys.stdin.read(), args.max_associations)
    return 0


# --- parent ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Child:
    process: subprocess.Popen[bytes]
    channel: socket.socket
    ready: bool = False
    received: bytes = b""  # the start of a message still on its way


@dataclass
class _Connection:
    """A connection handed to an association server, until it closes."""

    address: str
    listed: bool  # from an address on the allow-list (its own pending pool)
    child: _Child | None  # None: served in this process
    since: float
    pending: bool = True  # not yet admitted as an association


class ListenerPool:
    """The listening socket, the accept loop and the association-server processes."""

    def __init__(
        self,
        config_json: str,
        address: tuple[str, int],
        processes: int,
        listener: ListenerSettings,
        on_study_ready: Callable[[], None],
    ) -> None:
        self.config_json = config_json
        self.address = address
        self.processes = processes
        self.max_associations = listener.max_associations
        self.max_pending = listener.max_pending_connections
        self.max_pending_per_address = listener.max_pending_per_address
        self.pending_timeout_s = listener.acse_timeout_s + _PENDING_GRACE_S
        self.policy = PeerPolicy(listener.peers)
        self.on_study_ready = on_study_ready
        # The node's own association server, when it serves too (see set_local).
        self.local: HandedServer | None = None
        self._sock: socket.socket | None = None
        self._children: list[_Child] = []
        self._connections: dict[str, _Connection] = {}
        self._refused: dict[str, tuple[float, int]] = {}  # address -> (last logged, since then)
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._selector = selectors.DefaultSelector()

    def set_local(self, server: HandedServer) -> None:
        """Serve associations in this process too; set ``local_admitted`` as its AE's
        ``on_admitted``."""
        self.local = server
        server.on_closed = self._local_closed

    def local_admitted(self, assoc: Association) -> None:
        with self._lock:
            self._admitted(association_peer(assoc))

    def _local_closed(self, peer: str) -> None:
        with self._lock:
            self._closed(peer)

    @property
    def port(self) -> int:
        assert self._sock is not None, "listener not started"
        return int(self._sock.getsockname()[1])

    def pending(self) -> dict[str, int]:
        """Pending connections per address (for tests and the operator)."""
        with self._lock:
            counts: Counter[str] = Counter(
                c.address for c in self._connections.values() if c.pending
            )
        return dict(counts)

    def start(self, timeout: float = 60.0) -> None:
        """Bind, start the children and wait until each is ready to serve."""
        self._sock = socket.create_server(self.address, backlog=128)
        # A timeout lets the accept loop notice stop() without closing the socket under it.
        self._sock.settimeout(0.5)
        for _ in range(self.processes - (1 if self.local is not None else 0)):
            self._children.append(self._spawn())
        deadline = time.monotonic() + timeout
        while not all(c.ready for c in self._children):
            if time.monotonic() > deadline or any(
                c.process.poll() is not None for c in self._children
            ):
                self.stop()
                raise RuntimeError("listener processes did not start (see their log above)")
            self._read_messages(0.1)
        for target, name in ((self._accept_loop, "accept"), (self._message_loop, "children")):
            thread = threading.Thread(target=target, name=f"listener-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def _spawn(self) -> _Child:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        limit = per_process_limit(self.max_associations, self.processes)
        args = python_module_command(
            "dicom_node.server",
            *("--fd", str(theirs.fileno()), "--max-associations", str(limit)),
            *("--log-level", str(logging.getLogger().getEffectiveLevel())),
        )
        process = subprocess.Popen(args, stdin=subprocess.PIPE, pass_fds=[theirs.fileno()])
        theirs.close()
        assert process.stdin is not None
        process.stdin.write(self.config_json.encode())
        process.stdin.close()
        child = _Child(process, ours)
        self._selector.register(ours, selectors.EVENT_READ, child)
        return child

    # -- accepting

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                conn, address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("accept failed")
                time.sleep(0.1)
                continue
            self._hand_over(conn, str(address[0]), int(address[1]))

    def _refusal(self, address: str, listed: bool) -> str | None:
        """Why a new connection from ``address`` is refused, or None (lock held)."""
        from_address = sum(
            1 for c in self._connections.values() if c.pending and c.address == address
        )
        if from_address >= self.max_pending_per_address:
            return (
                f"{from_address} connections from it have not associated yet "
                "(listener.max_pending_per_address)"
            )
        in_pool = sum(1 for c in self._connections.values() if c.pending and c.listed == listed)
        if in_pool >= self.max_pending:
            pool = "allow-listed" if listed and self.policy.peers else "other"
            return (
                f"{in_pool} connections from {pool} addresses have not associated yet "
                "(listener.max_pending_connections)"
            )
        return None

    def _hand_over(self, conn: socket.socket, address: str, port: int) -> None:
        key = peer_key(address, port)
        listed = self.policy.lists(address)
        with conn:
            while not self._stopping.is_set():
                now = time.monotonic()
                with self._lock:
                    self._forget_stale(now)
                    refusal = self._refusal(address, listed)
                    if refusal is not None:
                        self._log_refusal(address, refusal, now)
                        return  # closed by the with block
                    served = Counter(c.child for c in self._connections.values())
                    alive = [c for c in self._children if c.process.poll() is None]
                    child = min(alive, key=lambda c: served[c]) if alive else None
                    if self.local is not None and (child is None or served[None] < served[child]):
                        child = None
                    elif child is None:
                        log.error("no listener process is running; connection dropped")
                        return
                    self._connections[key] = _Connection(address, listed, child, now)
                if child is None:
                    self._serve_locally(conn, key)
                    return
                try:
                    socket.send_fds(child.channel, [CONNECTION], [conn.fileno()])
                    return
                except OSError:
                    with self._lock:
                        self._connections.pop(key, None)
                    time.sleep(0.05)  # that child is dying; the message loop replaces it

    def _log_refusal(self, address: str, refusal: str, now: float) -> None:
        """Log a refused connection, at most once per address and interval (lock held)."""
        last, count = self._refused.get(address, (0.0, 0))
        if now - last < _REFUSAL_LOG_INTERVAL_S:
            self._refused[address] = (last, count + 1)
            return
        also = f" ({count} more refused since the last report)" if count else ""
        log.warning("connection from %s refused: %s%s", address, refusal, also)
        self._refused[address] = (now, 0)
        if len(self._refused) > _REFUSALS_REMEMBERED:  # many addresses: forget the quiet ones
            for quiet in [
                a for a, (t, _) in self._refused.items() if now - t >= _REFUSAL_LOG_INTERVAL_S
            ]:
                del self._refused[quiet]

    def _serve_locally(self, conn: socket.socket, key: str) -> None:
        assert self.local is not None
        try:
            self.local.serve(conn.dup())
        except Exception:
            log.exception("could not start an association")
            with self._lock:
                self._closed(key)

    # -- what the association servers report (lock held)

    def _admitted(self, key: str) -> None:
        connection = self._connections.get(key)
        if connection is not None:
            connection.pending = False

    def _closed(self, key: str) -> None:
        self._connections.pop(key, None)

    def _forget_stale(self, now: float) -> None:
        """Drop pending connections nobody reported closed long after their ACSE timeout."""
        stale = [
            key
            for key, c in self._connections.items()
            if c.pending and now - c.since > self.pending_timeout_s
        ]
        for key in stale:
            log.warning("pending connection %s was never reported closed; forgotten", key)
            del self._connections[key]

    # -- messages from the children

    def _read_messages(self, timeout: float) -> None:
        for key, _mask in self._selector.select(timeout):
            child: _Child = key.data
            try:
                data = child.channel.recv(4096)
            except OSError:
                data = b""
            if not data:
                self._child_gone(child)
                continue
            studies_ready = False
            with self._lock:
                lines = (child.received + data).split(b"\n")
                child.received = lines.pop()  # what follows the last newline: not whole yet
                for line in lines:
                    kind, _, peer = line.partition(b" ")
                    if kind == READY:
                        child.ready = True
                    elif kind == ADMITTED:
                        self._admitted(peer.decode("ascii", "replace"))
                    elif kind == DONE:
                        self._closed(peer.decode("ascii", "replace"))
                    elif kind == STUDIES_READY:
                        studies_ready = True
            if studies_ready:
                self.on_study_ready()

    def _child_gone(self, child: _Child) -> None:
        self._selector.unregister(child.channel)
        child.channel.close()
        with self._lock:
            for key in [k for k, c in self._connections.items() if c.child is child]:
                del self._connections[key]  # its connections went with it
        if self._stopping.is_set() or not child.ready:
            return
        code = child.process.wait()
        log.error("listener process %d exited (%s); starting another", child.process.pid, code)
        replacement = self._spawn()
        with self._lock:
            self._children[self._children.index(child)] = replacement

    def _message_loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._read_messages(0.5)
                with self._lock:
                    self._forget_stale(time.monotonic())
            except Exception:
                log.exception("listener message loop failed; continuing")

    # -- stopping

    def stop(self) -> None:
        """Stop accepting, let the children finish their associations briefly, reap them."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()
        for child in self._children:
            with contextlib.suppress(OSError):
                child.channel.sendall(QUIT)
        deadline = time.monotonic() + DRAIN_SECONDS + 5
        for child in self._children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()
            child.channel.close()
        self._selector.close()


def per_process_limit(max_associations: int, processes: int) -> int:
    """Associations each child may run so that all together stay near ``max_associations``."""
    return max(1, math.ceil(max_associations / processes))


if __name__ == "__main__":
    raise SystemExit(child_main())
