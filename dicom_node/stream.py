"""C-STORE requests taken off the wire by the upper-layer reader, data sets written as they arrive.

Stock pynetdicom reads a PDU in 4 KiB pieces, copies every fragment twice more on its way into an
in-memory buffer, decodes the command into a pydicom data set, hands the message to the
association thread (which looks for work every millisecond) and encodes the answer through pydicom
again; the handler then writes and fsyncs the data set, one step after the other. For a CT slice
that machinery cost more than the disk; for a 10 MB chest X-ray the copies and the late write were
most of the time the sender waited.

Here the upper-layer reader (``StreamingDUL``) does it itself for a plain C-STORE: it reads each
PDU into one reused buffer, recognises a whole C-STORE-RQ command set (``parse_store_request``),
writes the data-set fragments straight into a ``StagedFile`` under the spool's ``.incoming/``
folder (the disk flushes start as it goes, the last one when the data set is complete), calls the
store handler on its own thread with a ``DirectStore`` and sends the C-STORE-RSP PDU itself. The
upper-layer state stays Sta6 throughout, as it would, and the association thread waits while the
C-STOREs flow. Anything else (association set-up and release, other services, a command in
pieces, a PDU that mixes a command with data, an association with its own DIMSE or PDU event
handlers or pynetdicom's INFO log on) takes pynetdicom's path; a C-STORE data set there is still
written into a staged file as it arrives (``request._dataset_file``, the attribute pynetdicom uses
for data sets it keeps in files), and a plain response is still encoded directly. Every PDU is
read here, bounded in time (``BulkReadSocket``: the ACSE timeout until the association is
established, so that nobody can hold a connection before the allow-list has seen it), and handed
to pynetdicom's decoder and state machine as its own reader would.

This relies on pynetdicom's upper-layer internals (``DULServiceProvider._read_pdu_data``, its
queues and state machine, the DIMSE message being assembled, the association's reactor
checkpoint, ``DIMSEServiceProvider.send_msg``), which is why pyproject.toml pins pynetdicom to the
3.0 series; tests/dicom_node/test_stream.py pins down the behaviour.
"""

from __future__ import annotations

import enum
import functools
import logging
import select
import socket
import ssl
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom._handlers import (
    standard_dimse_recv_handler,
    standard_dimse_sent_handler,
    standard_pdu_recv_handler,
    standard_pdu_sent_handler,
)
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicom_node.negotiation import copy_context, decode_associate_rq, remember_association_setup
from dicom_node.spool import Spool, StagedFile

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.dimse_primitives import DimsePrimitiveType

log = logging.getLogger(__name__)
_PYNETDICOM_LOG = logging.getLogger("pynetdicom")

_P_DATA_TF = 0x04
_A_ASSOCIATE_RQ = b"\x01"
_PDU_TYPES = frozenset(range(0x01, 0x08))
_COMMAND = 0x01
_LAST_FRAGMENT = 0x02
# How long the reader waits for the next PDU of a data set before it lets the reactor run.
_NEXT_PDU_WAIT_S = 0.05
# What a PDU may be at most when the listener offers a maximum, and when it offers none.
_MIN_PDU_LIMIT = 1 << 20
_UNLIMITED_PDU_LIMIT = 256 << 20
# The reactor's poll interval while PDUs flow, for how long after the last one, and otherwise.
_BUSY_POLL_S = 0.0001
_BUSY_WINDOW_S = 0.1
_IDLE_POLL_S = 0.001
# The bound on association set-up when the AE has no ACSE timeout (the listener always has one).
_DEFAULT_ACSE_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class _Streamed:
    last: bool  # the data set's last fragment was in it


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _even(value: str, pad: bytes) -> bytes:
    encoded = value.encode("ascii", "replace")
    return encoded + pad if len(encoded) % 2 else encoded


def file_preamble(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    sending_aet: str = "",
    receiving_aet: str = "",
) -> bytes:
    """Preamble, ``DICM`` and file meta that make a received data set a DICOM file.

    The same elements as pynetdicom's ``create_file_meta`` (its implementation UID and version),
    encoded here directly: pydicom's encoder costs about as much as the rest of a small C-STORE.
    The AE titles of the sender and of the listener it called, when given, go into Sending and
    Receiving Application Entity Title (0002,0017) and (0002,0018), so that the file alone says
    who sent it (``dicom_node.recovery`` indexes such a file again from it).
    """
    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\x00")),
        _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\x00")),
        _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\x00")),
        _meta_element(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
        _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
    ]
    for element, aet in ((0x0017, sending_aet), (0x0018, receiving_aet)):
        if aet.strip():
            elements.append(_meta_element(element, b"AE", _even(aet.strip(), b" ")))
    body = b"".join(elements)
    length = _meta_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return b"\x00" * 128 + b"DICM" + length + body


class NegotiationTimeout(TimeoutError):
    """The peer did not finish associating within the ACSE timeout of its connection."""


def _bound_by_the_kernel(sock: socket.socket, timeout: float | None) -> None:
    """Blocking reads and writes that the kernel ends after ``timeout`` seconds (None: never).

    Python's own socket timeout polls before every read: for the many reads of a stream of
    C-STOREs that was about a tenth of the listener's CPU. SO_RCVTIMEO/SO_SNDTIMEO cost nothing
    per read; a read that times out fails with EAGAIN, which ends the association like any
    other transport error.
    """
    sock.settimeout(None)
    if timeout is None:
        return
    seconds = int(timeout)
    value = struct.pack("ll", seconds, int((timeout - seconds) * 1_000_000))
    for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
        sock.setsockopt(socket.SOL_SOCKET, option, value)


class BulkReadSocket(AssociationSocket):
    """pynetdicom's socket, reading a PDU in large ``recv_into`` calls instead of 4 KiB pieces.

    Every read is bounded in time. Until the association is established, all of them together
    must end by ``negotiation_deadline`` (the ACSE timeout after the connection was handed
    over): a peer that sends half a request, or a byte now and then, or nothing at all (not
    even a TLS ClientHello), is closed then, whoever it claims to be. pynetdicom's reader
    blocks in its read and never looks at its timers, so without this such a peer would hold
    its association slot for as long as it liked. Afterwards each read and write waits at most
    the network timeout (``_bound_by_the_kernel``).
    """

    negotiation_deadline: float | None = None
    _negotiated = False

    def _bound_next_read(self) -> None:
        if self._negotiated:
            return
        sock = self.socket
        if sock is None:
            return
        if self.assoc.is_established or self.negotiation_deadline is None:
            self._negotiated = True
            _bound_by_the_kernel(sock, self.assoc.network_timeout)
            return
        left = self.negotiation_deadline - time.monotonic()
        if left <= 0:
            raise NegotiationTimeout("no association within the ACSE timeout")
        sock.settimeout(left)

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes > self.pdu_limit():
            raise OSError(f"peer announced a {nr_bytes}-byte PDU, more than this node accepts")
        buffer = bytearray(nr_bytes)
        read = self.recv_into(memoryview(buffer))
        if read < nr_bytes:  # connection closed: return what came, as the stock reader does
            del buffer[read:]
        return buffer

    def pdu_limit(self) -> int:
        """The largest PDU this side reads: twice the maximum it offers, at least 1 MiB.

        A compliant peer stays within the offered maximum; without a limit, a PDU header
        announcing 4 GB would have the reader allocate 4 GB.
        """
        offered = int(getattr(self.assoc.ae, "maximum_pdu_size", 0) or 0)
        return max(_MIN_PDU_LIMIT, 2 * offered) if offered else _UNLIMITED_PDU_LIMIT

    def wait_readable(self, timeout: float) -> bool:
        """True when data can be read within ``timeout`` seconds."""
        sock = self.socket
        if sock is None:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            ready, _, _ = select.select([sock], [], [], timeout)
        except (OSError, ValueError):
            return False
        return bool(ready)

    def recv_into(self, view: memoryview) -> int:
        """Fill ``view``; return how many bytes came (fewer only if the peer closed)."""
        sock = self.socket
        assert sock is not None
        read = 0
        while read < len(view):
            self._bound_next_read()
            try:
                n = sock.recv_into(view[read:])
            except TimeoutError as exc:
                if self._negotiated:
                    raise
                raise NegotiationTimeout("no association within the ACSE timeout") from exc
            if n == 0:
                break
            read += n
        return read


@dataclass(frozen=True)
class DirectStore:
    """A C-STORE request the reader took off the wire itself, with its data set in ``staged``.

    The C-STORE handler answers it with a status, as it would pynetdicom's ``EVT_C_STORE``.
    """

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    staged: StagedFile


StoreHandler = Callable[["Association", DirectStore], int]


class _Step(enum.Enum):
    MORE = "more"  # nothing for pynetdicom to do: the reader may take the next PDU itself
    DONE = "done"  # an event is queued (or the association ends): back to the reactor


# The command elements of a C-STORE request (PS3.7 9.3.1.1) the reader answers itself; a command
# with any other element (a retired one, say) goes to pynetdicom.
_STORE_RQ_ELEMENTS = frozenset(
    (0x0000, 0x0002, 0x0100, 0x0110, 0x0700, 0x0800, 0x1000, 0x1030, 0x1031)
)
_NO_DATA_SET = 0x0101
_C_STORE_RQ = 0x0001


def parse_store_request(command: bytes | memoryview) -> tuple[int, str, str] | None:
    """(message ID, SOP class UID, SOP instance UID) of a C-STORE-RQ command set with a data set.

    ``command`` is the encoded command set (implicit VR little endian). None for anything else,
    or anything unusual, which pynetdicom then decodes as it always does.
    """
    elements: dict[int, bytes] = {}
    pos, end = 0, len(command)
    while pos < end:
        if end - pos < 8:
            return None
        group, element, length = struct.unpack_from("<HHI", command, pos)
        pos += 8
        if group != 0x0000 or element not in _STORE_RQ_ELEMENTS or pos + length > end:
            return None
        elements[element] = bytes(command[pos : pos + length])
        pos += length
    try:
        (field,) = struct.unpack("<H", elements[0x0100])
        (message_id,) = struct.unpack("<H", elements[0x0110])
        (data_set_type,) = struct.unpack("<H", elements[0x0800])
        struct.unpack("<H", elements[0x0700])  # priority: present and a US
        sop_class = elements[0x0002].rstrip(b"\x00 ").decode("ascii")
        sop_instance = elements[0x1000].rstrip(b"\x00 ").decode("ascii")
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    if field != _C_STORE_RQ or data_set_type == _NO_DATA_SET or not sop_class or not sop_instance:
        return None
    return message_id, sop_class, sop_instance


def _data_fragments(context_id: int, body: memoryview) -> list[tuple[int, int, bool]] | None:
    """(start, end, last) of each data-set fragment in a P-DATA-TF body, all of ``context_id``.

    None unless the body is nothing but such fragments, with at most the final one marked last.
    """
    fragments: list[tuple[int, int, bool]] = []
    last = False
    pos = 0
    while pos < len(body):
        if last or len(body) - pos < 6:
            return None
        (item_length,) = struct.unpack_from(">L", body, pos)
        end = pos + 4 + item_length
        item_context, control = body[pos + 4], body[pos + 5]
        if item_length < 2 or end > len(body) or item_context != context_id or control & _COMMAND:
            return None
        last = bool(control & _LAST_FRAGMENT)
        fragments.append((pos + 6, end, last))
        pos = end
    return fragments


def _pdata_pdus(context_id: int, command: bytes, peer_maximum: int) -> bytes:
    """P-DATA-TF PDUs carrying ``command``, split to the peer's maximum PDU length (0: none)."""
    step = peer_maximum - 6 if peer_maximum > 6 else len(command)
    pdus = []
    for start in range(0, len(command), step):
        piece = command[start : start + step]
        control = _COMMAND | (_LAST_FRAGMENT if start + step >= len(command) else 0)
        item = struct.pack(">LBB", len(piece) + 2, context_id, control) + piece
        pdus.append(struct.pack(">BBL", _P_DATA_TF, 0, len(item)) + item)
    return b"".join(pdus)


@functools.cache
def _is_storage(sop_class_uid: str) -> bool:
    return uid_to_service_class(sop_class_uid) is StorageServiceClass


# pynetdicom's own handlers for these events only log at DEBUG; any other handler bound to one of
# them wants the messages and PDUs as objects, so such an association takes pynetdicom's path.
_STANDARD_HANDLERS = {
    evt.EVT_DIMSE_RECV: {standard_dimse_recv_handler},
    evt.EVT_DIMSE_SENT: {standard_dimse_sent_handler},
    evt.EVT_PDU_RECV: {standard_pdu_recv_handler},
    evt.EVT_PDU_SENT: {standard_pdu_sent_handler},
    evt.EVT_DATA_RECV: set(),
    evt.EVT_DATA_SENT: set(),
    evt.EVT_FSM_TRANSITION: set(),
}


def quiet_standard_handlers(assoc: Association) -> None:
    """Unbind pynetdicom's logging handlers from ``assoc`` when nothing they log would be shown.

    They log at INFO and DEBUG only, but build their lines first: for the A-ASSOCIATE-RQ of a
    ``storescu`` proposing 128 presentation contexts that alone is about a fifth of the CPU the
    association set-up takes. With pynetdicom's logger at INFO or below they stay bound.
    """
    if _PYNETDICOM_LOG.isEnabledFor(logging.INFO):
        return
    for event, standard in _STANDARD_HANDLERS.items():
        for handler in standard:
            assoc.unbind(event, handler)


def only_standard_handlers(assoc: Association) -> bool:
    """True when nothing but pynetdicom's logging handlers listens to the DIMSE/PDU events."""
    if _PYNETDICOM_LOG.isEnabledFor(logging.INFO):
        return False  # pynetdicom's log of every message and PDU was asked for
    for event, standard in _STANDARD_HANDLERS.items():
        bound = cast(list[tuple[Any, Any]], assoc.get_handlers(event))
        if any(handler not in standard for handler, _ in bound):
            return False
    return True


class StreamingDUL(DULServiceProvider):
    """The upper layer of one association, writing C-STORE data-set fragments into the spool.

    With a ``store`` handler it also takes plain C-STORE requests off the wire itself and answers
    them (see ``_start_direct``).
    """

    spool: Spool | None = None
    store: StoreHandler | None = None
    _direct: DirectStore | None = None
    _busy_until = 0.0
    _timed_out = False

    def expect_activity(self) -> None:
        """Poll at the busy rate now: a new association's request is on its way.

        Otherwise the reader would find the A-ASSOCIATE-RQ up to a millisecond late, and the
        A-ASSOCIATE-AC would wait up to another in the queue to the reader.
        """
        self._busy_until = time.monotonic() + _BUSY_WINDOW_S
        self._run_loop_delay = _BUSY_POLL_S

    def _is_transport_event(self) -> bool:
        # pynetdicom's reactor sleeps 1 ms between idle checks. While PDUs flow it checks every
        # 0.1 ms instead, so the answer to a C-STORE and the sender's next request are picked up
        # at once; an association quiet for a moment goes back to 1 ms.
        busy = bool(super()._is_transport_event())
        now = time.monotonic()
        if busy:
            self._busy_until = now + _BUSY_WINDOW_S
        self._run_loop_delay = _BUSY_POLL_S if now < self._busy_until else _IDLE_POLL_S
        return busy

    def _decode_pdu(self, bytestream: bytearray) -> tuple[Any, str]:
        if bytestream[:1] != _A_ASSOCIATE_RQ:
            return super()._decode_pdu(bytestream)
        # As pynetdicom's, with a request seen before not decoded again (dicom_node.negotiation).
        data = bytes(bytestream)
        evt.trigger(self.assoc, evt.EVT_DATA_RECV, {"data": data})
        pdu = decode_associate_rq(data)
        evt.trigger(self.assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
        return pdu, "Evt6"  # A-ASSOCIATE-RQ PDU received

    def _read_pdu_data(self) -> None:
        # While C-STOREs stream in, read their PDUs back to back: returning to pynetdicom's
        # reactor after a PDU that raised no event would cost a 1 ms sleep per PDU.
        checkpoint = self.assoc._reactor_checkpoint
        paused = False
        try:
            while True:
                direct = self._direct
                message = None if direct is not None else self._receiving_store()
                if direct is None and message is None and not self._takes_commands():
                    # A PDU for pynetdicom's state machine, read as pynetdicom would (with the
                    # same events), but bounded in time and logged in one line.
                    read = self._read_pdu()
                    if read is not None:
                        self._queue_pdu(read[0] + bytes(read[1]))
                    return
                read = self._read_pdu()
                if read is None:
                    return
                step = self._dispatch(*read, direct, message)
                if self._direct is not None and not paused:
                    # The association thread has nothing to do while this reader answers the
                    # C-STOREs: it waits instead of polling every millisecond. It goes on as
                    # soon as this loop returns to the reactor.
                    checkpoint.clear()
                    paused = True
                if step is _Step.DONE or not self._more_data_soon():
                    return
                self._idle_timer.restart()  # a long run of PDUs here is activity, not idleness
        finally:
            if paused:
                checkpoint.set()

    def _dispatch(
        self, head: bytes, body: memoryview, direct: DirectStore | None, message: C_STORE_RQ | None
    ) -> _Step:
        """Take one PDU: a piece of a data set, a new C-STORE, or something for pynetdicom."""
        if head[0] != _P_DATA_TF:
            if direct is not None:  # an abort or a release in the middle of a data set
                self._drop_direct()
            self._queue_pdu(head + bytes(body))
            return _Step.DONE
        if direct is not None:
            return self._continue_direct(direct, body)
        if message is None:
            return self._start_direct(head, body)
        streamed = self._stream(message, body)
        if streamed is None:
            self._queue_pdu(head + bytes(body))
            return _Step.DONE
        return _Step.DONE if streamed.last else _Step.MORE

    def _read_pdu(self) -> tuple[bytes, memoryview] | None:
        """The next PDU's header and body (a view of the reused buffer); None if it ended."""
        sock = cast(BulkReadSocket, self.socket)
        try:
            head = bytes(sock.recv(6))
            if not head and not self.assoc.is_established:
                # Closed before a word (a port check, a load balancer's probe): nothing to say.
                self.event_queue.put("Evt17")
                return None
            if len(head) < 6:
                raise EOFError("connection closed")
            pdu_type, _, length = struct.unpack(">BBL", head)
            if pdu_type not in _PDU_TYPES:
                log.error("unknown PDU type 0x%02X received", pdu_type)
                self.event_queue.put("Evt19")  # unrecognised or invalid PDU
                return None
            if length > sock.pdu_limit():
                raise OSError(f"peer announced a {length}-byte PDU, more than this node accepts")
            body = self._body(length)
            if sock.recv_into(body) < length:
                raise EOFError("connection closed")
        except NegotiationTimeout:
            if not self._timed_out:  # once, however often it sends more
                self._timed_out = True
                log.warning(
                    "connection from %s closed: no association within the ACSE timeout (%g s)",
                    self.assoc.requestor.address,
                    self.assoc.acse_timeout,
                )
            self.event_queue.put("Evt17")  # transport connection closed
            return None
        except (OSError, TimeoutError, EOFError) as exc:
            log.error("association ended while reading a PDU: %s", exc)
            self.event_queue.put("Evt17")  # transport connection closed
            return None
        return head, body

    def _more_data_soon(self) -> bool:
        """True when the next PDU is there within a moment and nothing else needs the reactor."""
        if self._kill_thread or not self.to_provider_queue.empty():
            return False
        return cast(BulkReadSocket, self.socket).wait_readable(_NEXT_PDU_WAIT_S)

    def run(self) -> None:  # the DUL thread (its target was bound before the class changed)
        try:
            super().run()
        finally:
            # A data set cut off by an abort or a lost connection: nobody will publish it.
            self._drop_direct()
            dimse = getattr(self.assoc, "dimse", None)
            staged = getattr(getattr(dimse, "message", None), "_data_set_file", None)
            if isinstance(staged, StagedFile):
                staged.discard()

    # --- C-STORE requests answered here ----------------------------------------------------

    def _takes_commands(self) -> bool:
        """True when the next PDU may start a C-STORE this reader answers itself."""
        return (
            self.store is not None
            and self.spool is not None
            and self.state_machine.current_state == "Sta6"
            and self.event_queue.empty()
            and self._recv_pdu.empty()
            and self.assoc.dimse.message is None
        )

    def _start_direct(self, head: bytes, body: memoryview) -> _Step:
        """Take a P-DATA-TF PDU that holds a whole C-STORE-RQ command set; else hand it on.

        The reader then writes the data set into a staged file, calls the store handler on this
        thread and sends the C-STORE-RSP itself: no DIMSE message object, no pydicom command set,
        no hop to the association thread, no state-machine events for the P-DATA. The upper-layer
        state stays Sta6 throughout, as it would. Anything else (another command, a command in
        pieces, data next to the command, an association that wants messages as objects, no
        room for a staged file) goes to pynetdicom unchanged.
        """
        direct = None
        if len(body) >= 6:
            (item_length,) = struct.unpack_from(">L", body, 0)
            context_id, control = body[4], body[5]
            if item_length + 4 == len(body) and control == _COMMAND | _LAST_FRAGMENT:
                direct = self._direct_store(context_id, body[6:])
        if direct is None:
            self._queue_pdu(head + bytes(body))
            return _Step.DONE
        self._direct = direct
        return _Step.MORE

    def _direct_store(self, context_id: int, command: memoryview) -> DirectStore | None:
        request = parse_store_request(command)
        if request is None or not self.assoc.is_acceptor or not self.assoc.is_established:
            return None
        message_id, sop_class_uid, sop_instance_uid = request
        context = self.assoc._accepted_cx.get(context_id)
        if context is None or not _is_storage(sop_class_uid):
            return None  # pynetdicom aborts or refuses these, as it always has
        if sop_class_uid in self.assoc.acceptor.accepted_common_extended:
            return None
        if not only_standard_handlers(self.assoc):
            return None
        assert self.spool is not None
        transfer_syntax = context.transfer_syntax[0]
        preamble = file_preamble(
            sop_class_uid,
            sop_instance_uid,
            str(transfer_syntax),
            self.assoc.requestor.ae_title,
            self.assoc.acceptor.ae_title,
        )
        # With the disk above its watermark the staged file keeps nothing and the handler
        # answers 0xA700: the data set is read off the wire, never held in memory.
        staged = self.spool.stage([preamble])
        staged.dataset_offset = len(preamble)
        return DirectStore(
            context_id, message_id, sop_class_uid, sop_instance_uid, UID(transfer_syntax), staged
        )

    def _continue_direct(self, direct: DirectStore, body: memoryview) -> _Step:
        fragments = _data_fragments(direct.context_id, body)
        if fragments is None:
            # A command or another context's data in the middle of a data set: a protocol error.
            log.error("malformed P-DATA-TF in the middle of a data set; aborting the association")
            self._drop_direct()
            self.event_queue.put("Evt19")  # invalid PDU: A-ABORT
            return _Step.DONE
        for start, end, _ in fragments:
            direct.staged.write(body[start:end])
        if direct.staged.too_large is not None:
            return self._abort_too_large(direct.staged)
        if not fragments or not fragments[-1][2]:
            return _Step.MORE
        direct.staged.complete()
        self._direct = None
        return self._answer(direct)

    def _answer(self, direct: DirectStore) -> _Step:
        """Run the store handler for a complete data set and send its C-STORE-RSP."""
        assert self.store is not None
        try:
            status = self.store(self.assoc, direct)
        except Exception:
            log.exception("C-STORE handler failed; answering 0xC211")
            status = 0xC211
        finally:
            direct.staged.discard()  # whatever was not published
        if self._kill_thread or not self.assoc.is_established:
            return _Step.DONE
        command = store_response_command(
            direct.message_id, direct.sop_class_uid, direct.sop_instance_uid, status
        )
        sock = cast(BulkReadSocket, self.socket)
        sock.send(_pdata_pdus(direct.context_id, command, self.assoc.dimse.maximum_pdu_size))
        return _Step.MORE if self.event_queue.empty() else _Step.DONE

    def _abort_too_large(self, staged: StagedFile) -> _Step:
        """End the association of a data set above the size limit: nothing more is read of it."""
        log.error(
            "C-STORE from %s cut off and the association aborted: %s",
            self.assoc.requestor.ae_title.strip(),
            staged.too_large,
        )
        self._drop_direct()
        staged.discard()
        self.event_queue.put("Evt19")  # A-ABORT to the peer, A-P-ABORT to the association
        return _Step.DONE

    def _drop_direct(self) -> None:
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.staged.discard()

    # --- data sets of C-STORE requests pynetdicom decoded -----------------------------------

    def _receiving_store(self) -> C_STORE_RQ | None:
        """The C-STORE request whose data set is arriving, if its fragments can be streamed."""
        if self.spool is None or self.state_machine.current_state != "Sta6":
            return None
        # Earlier PDUs not yet handled by the state machine must be handled first, in order.
        if not self.event_queue.empty() or not self._recv_pdu.empty():
            return None
        message = self.assoc.dimse.message
        if not isinstance(message, C_STORE_RQ):
            return None
        staged = message._data_set_file
        if staged is None:
            # Fragments that already went to pynetdicom's memory buffer keep going there.
            return message if cast(BytesIO, message.data_set).tell() == 0 else None
        return message if isinstance(staged, StagedFile) else None

    def _body(self, length: int) -> memoryview:
        buffer: bytearray | None = getattr(self, "_buffer", None)
        if buffer is None or len(buffer) < length:
            buffer = bytearray(length)
            self._buffer = buffer
        return memoryview(buffer)[:length]

    def _stream(self, message: C_STORE_RQ, body: memoryview) -> _Streamed | None:
        """Write the PDU's fragments to the message's staged file; None to leave it to pynetdicom.

        Only a PDU made of data-set fragments of the message's presentation context is taken,
        with at most the last of them marked last.
        """
        fragments = _data_fragments(cast(int, message.context_id), body)
        staged = self._staged(message) if fragments else None
        if fragments is None or staged is None:
            return None
        for start, end, _ in fragments:
            staged.write(body[start:end])
        if staged.too_large is not None:
            self._abort_too_large(staged)
            return _Streamed(last=True)
        last = fragments[-1][2]
        if last:
            staged.complete()
            # Let pynetdicom complete the message as if the last fragment were empty.
            item = struct.pack(">LBB", 2, cast(int, message.context_id), _LAST_FRAGMENT)
            self._queue_pdu(struct.pack(">BBL", _P_DATA_TF, 0, len(item)) + item)
        return _Streamed(last)

    def _staged(self, message: C_STORE_RQ) -> StagedFile | None:
        """The message's staged file, made (with preamble and file meta) on its first fragment."""
        if isinstance(message._data_set_file, StagedFile):
            return message._data_set_file
        assert self.spool is not None
        command = message.command_set
        try:
            context = self.assoc._accepted_cx[cast(int, message.context_id)]
            preamble = file_preamble(
                str(command.AffectedSOPClassUID),
                str(command.AffectedSOPInstanceUID),
                str(context.transfer_syntax[0]),
                self.assoc.requestor.ae_title,
                self.assoc.acceptor.ae_title,
            )
        except Exception as exc:  # an unknown context: pynetdicom's own handling of the message
            log.warning("receiving a data set in memory: %s", exc)
            return None
        staged = self.spool.stage([preamble])
        staged.dataset_offset = len(preamble)
        message._data_set_file = cast(Any, staged)  # pynetdicom types it as a NamedTemporaryFile
        message._data_set_path = staged.path
        return staged

    def _queue_pdu(self, data: bytes) -> None:
        """Decode a whole PDU and queue it for the state machine, as pynetdicom's reader does."""
        try:
            pdu, event = self._decode_pdu(bytearray(data))
        except Exception:
            log.exception("unable to decode the received PDU")
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)


def _command_element(element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def store_response_command(message_id: int, sop_class_uid: str, sop_uid: str, status: int) -> bytes:
    """The C-STORE-RSP command set (implicit VR little endian) for a plain status."""
    elements = b"".join(
        (
            _command_element(0x0002, _even(sop_class_uid, b"\x00")),
            _command_element(0x0100, struct.pack("<H", 0x8001)),  # C-STORE-RSP
            _command_element(0x0120, struct.pack("<H", message_id)),
            _command_element(0x0800, struct.pack("<H", 0x0101)),  # no data set
            _command_element(0x0900, struct.pack("<H", status)),
            _command_element(0x1000, _even(sop_uid, b"\x00")),
        )
    )
    return _command_element(0x0000, struct.pack("<I", len(elements))) + elements


class StreamingDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, encoding a plain C-STORE response directly.

    pydicom's encoder costs about 1 ms per response, a sixth of the CPU a CT slice needs; the
    bytes are the same (tests/dicom_node/test_stream.py).
    """

    def send_msg(self, primitive: DimsePrimitiveType, context_id: int) -> None:
        command = self._store_response(primitive)
        if command is None:
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)

    def _store_response(self, primitive: DimsePrimitiveType) -> bytes | None:
        if not isinstance(primitive, C_STORE) or primitive.MessageIDBeingRespondedTo is None:
            return None
        if primitive.OffendingElement is not None or primitive.ErrorComment is not None:
            return None
        bound = cast(list[tuple[Any, Any]], self.assoc.get_handlers(evt.EVT_DIMSE_SENT))
        if any(handler is not standard_dimse_sent_handler for handler, _ in bound):
            return None  # someone wants the message object: pynetdicom's path
        if _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG):
            return None  # its debug log of the message was asked for: pynetdicom's path
        command = store_response_command(
            primitive.MessageIDBeingRespondedTo,
            str(primitive.AffectedSOPClassUID),
            str(primitive.AffectedSOPInstanceUID),
            int(primitive.Status or 0),
        )
        limit = self.maximum_pdu_size
        return command if limit == 0 or len(command) + 6 <= limit else None


def lighter_association_setup() -> None:
    """Process-wide, in the processes that serve associations: cheaper association set-up.

    UIDs are checked once (``lighter_uid_checks``) and a request seen before is not decoded,
    negotiated and answered from scratch again (``dicom_node.negotiation``).
    """
    lighter_uid_checks()
    remember_association_setup()


def lighter_uid_checks() -> None:
    """Process-wide: check each UID of an association request once, not five times.

    For every UID of an A-ASSOCIATE-RQ pynetdicom builds a pydicom ``UID`` (which validates it),
    runs its own validator (which builds and validates another) and asks ``is_valid``: for the
    128 presentation contexts ``storescu`` proposes, about a third of the 35-40 ms the listener
    took to answer it. Called by the processes that serve associations (the node and its
    children), it

    - turns off pydicom's validation of values as they are read: in WARN mode, pydicom's default,
      it never refuses a value, it only logs it. What the listener relies on it checks itself
      (UIDs with ``is_valid_uid`` before they become paths, the data set's structure in
      ``dicom_node.wire``);
    - remembers pynetdicom's verdict on each UID string it has validated (the same function of the
      same string; a peer proposes the same few hundred UIDs every time);
    - remembers pydicom's ``UID.is_valid`` per string too: a regular expression run on every
      call, which pynetdicom makes for each UID it sets. With the two above remembered, it was
      still a third of the CPU of a ``storescu`` association's set-up.
    """
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    if not isinstance(pynetdicom_config.VALIDATORS["UI"], _RememberedUIDs):
        pynetdicom_config.VALIDATORS["UI"] = _RememberedUIDs(pynetdicom_config.VALIDATORS["UI"])
    if UID.__dict__.get("is_valid") is not _REMEMBERED_IS_VALID:
        setattr(UID, "is_valid", _REMEMBERED_IS_VALID)  # noqa: B010 (a property of pydicom's class)


_PYDICOM_IS_VALID = cast(property, UID.__dict__["is_valid"])


@functools.lru_cache(maxsize=4096)
def _uid_is_valid(value: str) -> bool:
    return bool(_PYDICOM_IS_VALID.fget(value))  # type: ignore[misc]


_REMEMBERED_IS_VALID = property(lambda self: _uid_is_valid(str.__str__(self)), doc="UID.is_valid")


class _RememberedUIDs:
    """pynetdicom's UID validator with its verdicts kept per UID string and conformance setting."""

    def __init__(self, validate: Callable[[Any], tuple[bool, str]], size: int = 4096) -> None:
        self.validate = validate
        self.verdicts: dict[tuple[str, bool], tuple[bool, str]] = {}
        self.size = size

    def __call__(self, value: Any) -> tuple[bool, str]:
        if type(value) is not UID:
            return self.validate(value)
        key = (str(value), pynetdicom_config.ENFORCE_UID_CONFORMANCE)
        verdict = self.verdicts.get(key)
        if verdict is None:
            verdict = self.validate(value)
            if len(self.verdicts) < self.size:
                self.verdicts[key] = verdict
        return verdict


class CheapCopyContexts(list[PresentationContext]):
    """A server's supported presentation contexts, for a deep copy per association that is cheap.

    pynetdicom deep-copies the server's contexts for every association it accepts: about 4 ms of
    CPU for the listener's contexts, most of it building and validating every UID again, before
    the sender gets its A-ASSOCIATE-AC. A context holds immutable values (UIDs, ints, flags) and
    lists of them, so a copy of each context with its own copies of those lists is the same deep
    copy.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [copy_context(context) for context in self]


def streaming_request_handler(
    spool: Spool, store: StoreHandler | None = None
) -> type[RequestHandler]:
    """A pynetdicom request handler whose associations stream C-STORE data sets into ``spool``.

    With ``store``, plain C-STORE requests are answered by the reader with what ``store`` returns
    (it must do what the association's ``EVT_C_STORE`` handler does); others take that handler.
    """

    class StreamingRequestHandler(RequestHandler):
        def _create_association(self) -> Association:
            server = self.server
            if not isinstance(server.contexts, CheapCopyContexts):
                server.contexts = CheapCopyContexts(server.contexts)
            assoc = super()._create_association()
            quiet_standard_handlers(assoc)
            if type(assoc.dul.socket) is AssociationSocket:
                assoc.dul.socket.__class__ = BulkReadSocket
                cast(BulkReadSocket, assoc.dul.socket).negotiation_deadline = time.monotonic() + (
                    assoc.acse_timeout or _DEFAULT_ACSE_TIMEOUT_S
                )
                if type(assoc.dul) is DULServiceProvider:
                    assoc.dul.__class__ = StreamingDUL
                    cast(StreamingDUL, assoc.dul).spool = spool
                    cast(StreamingDUL, assoc.dul).store = store
                    cast(StreamingDUL, assoc.dul).expect_activity()
                if type(assoc.dimse) is DIMSEServiceProvider:
                    assoc.dimse.__class__ = StreamingDIMSE
            return assoc

    return StreamingRequestHandler
