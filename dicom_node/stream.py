"""C-STORE data sets written into the spool as their PDUs arrive.

Stock pynetdicom reads a PDU in 4 KiB pieces, copies every fragment twice more on its way into an
in-memory buffer, and hands the handler the whole data set at the end; the handler then writes
and fsyncs it, one step after the other. For a 10 MB chest X-ray that is most of the time the
sender waits for its answer. Here, while a C-STORE request's data set is arriving, the upper-layer
reader takes each P-DATA-TF PDU itself: it reads the PDU into one reused buffer and writes the
fragments straight into a ``StagedFile`` under the spool's ``.incoming/`` folder, which starts the
disk writing as it goes. When the last fragment is in, pynetdicom gets an empty last fragment and
finishes the message as usual; the C-STORE handler then finds the data set in the file
(``request._dataset_file``, the attribute pynetdicom uses for data sets it keeps in files), checks
it in place and publishes it. Its answer, a plain C-STORE-RSP, is encoded directly rather than
through pydicom. Anything else (association set-up, commands, other services, a PDU that mixes a
command with data) takes pynetdicom's own path unchanged.

This relies on pynetdicom's upper-layer internals (``DULServiceProvider._read_pdu_data``, the
DIMSE message being assembled, the data-set file attributes, ``DIMSEServiceProvider.send_msg``),
which is why pyproject.toml pins
pynetdicom to the 3.0 series; tests/dicom_node/test_stream.py pins down the behaviour.
"""

from __future__ import annotations

import logging
import select
import ssl
import struct
import time
from dataclasses import dataclass
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

from dicom_node.spool import Spool, StagedFile

if TYPE_CHECKING:
    from pynetdicom.association import Association
    from pynetdicom.dimse_primitives import DimsePrimitiveType

log = logging.getLogger(__name__)
_PYNETDICOM_LOG = logging.getLogger("pynetdicom")

_P_DATA_TF = 0x04
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


def file_preamble(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and file meta that make a received data set a DICOM file.

    The same elements as pynetdicom's ``create_file_meta`` (its implementation UID and version),
    encoded here directly: pydicom's encoder costs about as much as the rest of a small C-STORE.
    """
    elements = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\x00\x01"),
            _meta_element(0x0002, b"UI", _even(sop_class_uid, b"\x00")),
            _meta_element(0x0003, b"UI", _even(sop_instance_uid, b"\x00")),
            _meta_element(0x0010, b"UI", _even(transfer_syntax, b"\x00")),
            _meta_element(0x0012, b"UI", _even(PYNETDICOM_IMPLEMENTATION_UID, b"\x00")),
            _meta_element(0x0013, b"SH", _even(PYNETDICOM_IMPLEMENTATION_VERSION, b" ")),
        )
    )
    length = _meta_element(0x0000, b"UL", struct.pack("<I", len(elements)))
    return b"\x00" * 128 + b"DICM" + length + elements


class BulkReadSocket(AssociationSocket):
    """pynetdicom's socket, reading a PDU in large ``recv_into`` calls instead of 4 KiB pieces."""

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
            n = sock.recv_into(view[read:])
            if n == 0:
                break
            read += n
        return read


class StreamingDUL(DULServiceProvider):
    """The upper layer of one association, writing C-STORE data-set fragments into the spool."""

    spool: Spool | None = None
    _busy_until = 0.0

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

    def _read_pdu_data(self) -> None:
        # While a data set streams in, read its PDUs back to back: returning to pynetdicom's
        # reactor after a PDU that raised no event would cost a 1 ms sleep per PDU.
        while True:
            message = self._receiving_store()
            if message is None:
                super()._read_pdu_data()
                return
            if not self._read_streamed(message) or not self._more_data_soon():
                return

    def _read_streamed(self, message: C_STORE_RQ) -> bool:
        """Read one PDU for ``message``; True when it was streamed and more fragments follow."""
        sock = cast(BulkReadSocket, self.socket)
        try:
            head = bytes(sock.recv(6))
            if len(head) < 6:
                raise EOFError("connection closed")
            pdu_type, _, length = struct.unpack(">BBL", head)
            if pdu_type not in _PDU_TYPES:
                log.error("unknown PDU type 0x%02X received", pdu_type)
                self.event_queue.put("Evt19")  # unrecognised or invalid PDU
                return False
            if length > sock.pdu_limit():
                raise OSError(f"peer announced a {length}-byte PDU, more than this node accepts")
            body = self._body(length)
            if sock.recv_into(body) < length:
                raise EOFError("connection closed")
        except (OSError, TimeoutError, EOFError) as exc:
            log.error("association ended while reading a PDU: %s", exc)
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if pdu_type == _P_DATA_TF:
            streamed = self._stream(message, body)
            if streamed is not None:
                return not streamed.last
        self._queue_pdu(head + bytes(body))
        return False

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
            dimse = getattr(self.assoc, "dimse", None)
            staged = getattr(getattr(dimse, "message", None), "_data_set_file", None)
            if isinstance(staged, StagedFile):
                staged.discard()

    # --- steps ---------------------------------------------------------------------------

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
        fragments: list[tuple[int, int]] = []
        last = False
        pos = 0
        while pos < len(body):
            if last or len(body) - pos < 6:
                return None
            (item_length,) = struct.unpack_from(">L", body, pos)
            end = pos + 4 + item_length
            context_id, control = body[pos + 4], body[pos + 5]
            if item_length < 2 or end > len(body) or context_id != message.context_id:
                return None
            if control & _COMMAND:
                return None
            last = bool(control & _LAST_FRAGMENT)
            fragments.append((pos + 6, end))
            pos = end
        staged = self._staged(message) if fragments else None
        if staged is None:
            return None
        for start, end in fragments:
            staged.write(body[start:end])
        if last:
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
            )
            staged = self.spool.stage([preamble])
        except Exception as exc:
            # No file (disk full, say): the data set stays in memory and the handler answers.
            log.warning("receiving a data set in memory: %s", exc)
            return None
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
        handlers = [handler for handler, _ in bound]
        if handlers != [standard_dimse_sent_handler] or _PYNETDICOM_LOG.isEnabledFor(logging.DEBUG):
            return None  # someone wants the message object (or its debug log): pynetdicom's path
        command = store_response_command(
            primitive.MessageIDBeingRespondedTo,
            str(primitive.AffectedSOPClassUID),
            str(primitive.AffectedSOPInstanceUID),
            int(primitive.Status or 0),
        )
        limit = self.maximum_pdu_size
        return command if limit == 0 or len(command) + 6 <= limit else None


def streaming_request_handler(spool: Spool) -> type[RequestHandler]:
    """A pynetdicom request handler whose associations stream C-STORE data sets into ``spool``."""

    class StreamingRequestHandler(RequestHandler):
        def _create_association(self) -> Association:
            assoc = super()._create_association()
            if type(assoc.dul.socket) is AssociationSocket:
                assoc.dul.socket.__class__ = BulkReadSocket
                if type(assoc.dul) is DULServiceProvider:
                    assoc.dul.__class__ = StreamingDUL
                    cast(StreamingDUL, assoc.dul).spool = spool
                if type(assoc.dimse) is DIMSEServiceProvider:
                    assoc.dimse.__class__ = StreamingDIMSE
            return assoc

    return StreamingRequestHandler
