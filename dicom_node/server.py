"""The listener as several processes: one acceptor, N association servers.

One pynetdicom process tops out at one core, and its per-association threads slow each other down
under concurrent senders. So the node's process accepts every TCP connection and gives it to
whichever association server runs the fewest associations: its own (threads in the node's process,
as with one process) or one of N-1 child processes, which get the socket by SCM_RIGHTS over a
Unix socket pair. Each child runs pynetdicom with the same event handlers, its own index
connection, spool and quarantine. A child tells the parent when a released association made
studies complete, so the study assembler, which runs once in the parent, wakes at once. Serving
in the parent too saves one interpreter's memory (about 90 MB) against N children.

Channel messages, one byte each: parent to child ``C`` (with the connection's descriptor) and
``Q`` (stop after the running associations); child to parent ``U`` (ready), ``R`` (studies
ready) and ``D`` (a connection closed). A child whose parent vanishes (kill -9) sees end of file
on its channel, aborts its associations and exits.
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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.events import EventHandlerType
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.logs import configure_logging
from dicom_node.process import python_module_command
from dicom_node.spool import Spool
from dicom_node.stream import StoreHandler, lighter_association_setup, streaming_request_handler

log = logging.getLogger(__name__)

CONNECTION = b"C"
QUIT = b"Q"
READY = b"U"
STUDIES_READY = b"R"
DONE = b"D"

# How long a stopping child lets running associations finish before aborting them.
DRAIN_SECONDS = 5.0


def default_processes() -> int:
    """One association server per core, at least 2 (so one slow sender never blocks the rest)."""
    return max(2, min(8, os.cpu_count() or 1))


# --- association servers -----------------------------------------------------------------------


class HandedServer(ThreadedAssociationServer):
    """A pynetdicom server fed with connections accepted elsewhere; it never listens itself."""

    def server_bind(self) -> None:  # the parent owns the listening socket
        pass

    def server_activate(self) -> None:
        pass

    def serve(self, conn: socket.socket) -> None:
        """Run one association on an accepted connection (what ``get_request`` would return)."""
        address = conn.getpeername()
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

    scp = build_storage_scp(config, on_study_ready=lambda: tell(STUDIES_READY))
    ae = build_ae(listener)
    ae.maximum_associations = max_associations
    events = [*handlers(scp), (evt.EVT_CONN_CLOSE, lambda _event: tell(DONE))]
    server = make_handed_server(
        ae, (listener.host, listener.port), events, scp.spool, scp.store_direct
    )
    tell(READY)
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
                server.serve(conn)
            except Exception:
                log.exception("could not start an association")
                conn.close()
                tell(DONE)
    _drain(server, DRAIN_SECONDS if orderly else 0.0)
    scp.index.close()


def make_handed_server(
    ae: Any,
    address: tuple[str, int],
    events: list[EventHandlerType],
    spool: Spool,
    store: StoreHandler | None = None,
) -> HandedServer:
    """A server for ``ae`` that runs the associations of connections given to ``serve``.

    C-STORE data sets are written into ``spool`` as they arrive, and plain C-STOREs answered with
    ``store`` (``dicom_node.stream``).
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


@dataclass
class _Child:
    process: subprocess.Popen[bytes]
    channel: socket.socket
    active: int = 0
    ready: bool = False


class ListenerPool:
    """The listening socket, the accept loop and the association-server processes."""

    def __init__(
        self,
        config_json: str,
        address: tuple[str, int],
        processes: int,
        max_associations: int,
        on_study_ready: Callable[[], None],
    ) -> None:
        self.config_json = config_json
        self.address = address
        self.processes = processes
        self.max_associations = max_associations
        self.on_study_ready = on_study_ready
        # The node's own association server, when it serves too (see set_local).
        self.local: HandedServer | None = None
        self._local_active = 0
        self._sock: socket.socket | None = None
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._selector = selectors.DefaultSelector()

    def set_local(self, server: HandedServer) -> None:
        """Serve associations in this process too; bind ``local_closed`` to its EVT_CONN_CLOSE."""
        self.local = server

    def local_closed(self, _event: object = None) -> None:
        with self._lock:
            self._local_active = max(0, self._local_active - 1)

    @property
    def port(self) -> int:
        assert self._sock is not None, "listener not started"
        return int(self._sock.getsockname()[1])

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
                conn, _address = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                if self._stopping.is_set():
                    return
                log.exception("accept failed")
                time.sleep(0.1)
                continue
            self._hand_over(conn)

    def _hand_over(self, conn: socket.socket) -> None:
        with conn:
            while not self._stopping.is_set():
                with self._lock:
                    alive = [c for c in self._children if c.process.poll() is None]
                    child = min(alive, key=lambda c: c.active) if alive else None
                    if self.local is not None and (
                        child is None or self._local_active < child.active
                    ):
                        self._local_active += 1
                        child = None
                    elif child is None:
                        log.error("no listener process is running; connection dropped")
                        return
                    else:
                        child.active += 1
                if child is None:
                    self._serve_locally(conn)
                    return
                try:
                    socket.send_fds(child.channel, [CONNECTION], [conn.fileno()])
                    return
                except OSError:
                    with self._lock:
                        child.active -= 1
                    time.sleep(0.05)  # that child is dying; the message loop replaces it

    def _serve_locally(self, conn: socket.socket) -> None:
        assert self.local is not None
        try:
            self.local.serve(conn.dup())
        except Exception:
            log.exception("could not start an association")
            self.local_closed()

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
                for byte in data:
                    message = bytes([byte])
                    if message == READY:
                        child.ready = True
                    elif message == DONE:
                        child.active = max(0, child.active - 1)
                    elif message == STUDIES_READY:
                        studies_ready = True
            if studies_ready:
                self.on_study_ready()

    def _child_gone(self, child: _Child) -> None:
        self._selector.unregister(child.channel)
        child.channel.close()
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
