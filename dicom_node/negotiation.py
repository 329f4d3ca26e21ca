"""Association set-up without decoding, negotiating and encoding the same request again.

A sender proposes the same presentation contexts every time it connects: ``storescu`` sends a
9.6 KB A-ASSOCIATE-RQ with 128 of them, identical but for the two AE titles, and a modality or a
PACS forwarding one image per association sends it again for every image. pynetdicom decodes it
into items (4.7 ms of CPU on a 2-core guest), turns those into a request primitive (2.4 ms),
negotiates each context (2.2 ms) and makes and encodes the A-ASSOCIATE-AC (3.2 ms): 12 ms before
the sender may send its first byte of data. dcmtk ``storescp`` answers 2.5-3.6 ms after the
connection is made, this listener 20 ms (median) before and 7 ms with what follows.

Each of these steps is a function of what it is given, so the listener remembers its results:

- **the request** by its bytes after the fixed header (``_FIXED``): items and primitive are
  decoded once; a request seen before has only its header decoded (protocol version and AE
  titles, by pynetdicom) and gets fresh copies of the rest;
- **the negotiation** by the remembered request, the server's supported contexts and the roles
  asked for: the same result contexts again, fresh copies;
- **the A-ASSOCIATE-AC** by what its items are made of (application context, each context's
  result and transfer syntax, the listener's user information): the same encoded items, behind
  a header encoded for this association.

Only requests whose user information holds the maximum length, the implementation class UID and
the implementation version name are remembered. Anything else (user identity with its
credentials, extended negotiation, role selection, asynchronous operations) goes through
pynetdicom each time, as does every check on the association itself (AE titles, allow-list,
limits). At most ``_SIZE`` requests and answers are kept per process.
"""

from __future__ import annotations

import copy
import struct
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Any, Generic, TypeVar

from pynetdicom import acse, fsm
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ, PDU_TYPES
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.presentation import negotiate_as_acceptor as _pynetdicom_negotiate

# A-ASSOCIATE-RQ/-AC: PDU type, reserved, length (6); protocol version, reserved (4); called and
# calling AE title (32); reserved (32). The variable items follow.
_FIXED = 74
_APPLICATION_CONTEXT, _PRESENTATION_CONTEXT_RQ, _USER_INFORMATION = 0x10, 0x20, 0x50
# Maximum length, implementation class UID, implementation version name.
_PLAIN_USER_ITEMS = frozenset({0x51, 0x52, 0x55})
_SIZE = 32
_LARGEST = 64 << 10  # a request larger than this is not kept

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class _Remembered(Generic[K, V]):
    """A small least-recently-used map shared by the association threads of a process."""

    def __init__(self, size: int = _SIZE) -> None:
        self._items: OrderedDict[K, V] = OrderedDict()
        self._size = size
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


def copy_context(context: PresentationContext) -> PresentationContext:
    """A deep copy of a presentation context without validating its UIDs again.

    A context holds immutable values (UIDs, ints, flags) and lists of them.
    """
    fresh = PresentationContext.__new__(PresentationContext)
    fresh.__dict__.update(
        {k: list(v) if isinstance(v, list) else v for k, v in vars(context).items()}
    )
    return fresh


def _items_are_plain(items: bytes) -> bool:
    """True for an application context, presentation contexts and plain user information."""
    offset, end = 0, len(items)
    while offset < end:
        if end - offset < 4:
            return False
        item_type, _, length = struct.unpack_from(">BBH", items, offset)
        body, offset = offset + 4, offset + 4 + length
        if offset > end:
            return False
        if item_type == _USER_INFORMATION:
            sub = body
            while sub < offset:
                if offset - sub < 4:
                    return False
                sub_type, _, sub_length = struct.unpack_from(">BBH", items, sub)
                if sub_type not in _PLAIN_USER_ITEMS:
                    return False
                sub += 4 + sub_length
            if sub != offset:
                return False
        elif item_type not in (_APPLICATION_CONTEXT, _PRESENTATION_CONTEXT_RQ):
            return False
    return True


class ProposedContexts(list[PresentationContext]):
    """The presentation contexts of a remembered request, with the request's key."""

    def __init__(self, key: bytes, contexts: list[PresentationContext]) -> None:
        super().__init__(contexts)
        self.key = key


class _Request:
    def __init__(self, items: list[Any], primitive: A_ASSOCIATE) -> None:
        self.items = items  # pynetdicom's decoded items, shared and never changed
        self.primitive = primitive  # the request primitive, copied for each association


class RememberedRQ(A_ASSOCIATE_RQ):
    """An A-ASSOCIATE-RQ whose items were decoded for an earlier, identical request."""

    key: bytes
    request: _Request

    @property
    def pdu_type(self) -> int:
        return PDU_TYPES[A_ASSOCIATE_RQ]

    def to_primitive(self) -> A_ASSOCIATE:
        template = self.request.primitive
        primitive = A_ASSOCIATE()
        primitive.calling_ae_title = self.calling_ae_title
        primitive.called_ae_title = self.called_ae_title
        primitive.application_context_name = template.application_context_name
        # The setter would copy the list into a plain one; the key must stay with it.
        primitive._presentation_context_definition_list = ProposedContexts(
            self.key, [copy_context(c) for c in template.presentation_context_definition_list]
        )
        primitive.user_information = [copy.copy(item) for item in template.user_information]
        return primitive


_requests: _Remembered[bytes, _Request] = _Remembered()


def decode_associate_rq(data: bytes) -> A_ASSOCIATE_RQ:
    """An A-ASSOCIATE-RQ PDU from its bytes, decoded as pynetdicom would.

    Raises what pynetdicom's decoding raises for a malformed PDU.
    """
    key = data[_FIXED:]
    if not (0 < len(key) <= _LARGEST and _items_are_plain(key)):
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(data)
        return pdu
    remembered = RememberedRQ()
    request = _requests.get(key)
    if request is None:
        remembered.decode(data)
        request = _Request(remembered.variable_items, A_ASSOCIATE_RQ.to_primitive(remembered))
        _requests.put(key, request)
    else:
        head = bytearray(data[:_FIXED])
        head[2:6] = struct.pack(">L", _FIXED - 6)
        remembered.decode(bytes(head))  # protocol version and AE titles, as pynetdicom reads them
        remembered.variable_items = request.items
    remembered.key, remembered.request = key, request
    return remembered


# --- negotiation ----------------------------------------------------------------------------

_Negotiated = tuple[list[PresentationContext], list[Any]]
_negotiations: _Remembered[Hashable, _Negotiated] = _Remembered()


def _supported(contexts: list[PresentationContext]) -> Hashable:
    return tuple(
        (c.abstract_syntax, tuple(c.transfer_syntax), c.scu_role, c.scp_role) for c in contexts
    )


def negotiate_as_acceptor(
    rq_contexts: list[PresentationContext],
    ac_contexts: list[PresentationContext],
    roles: dict[Any, tuple[bool | None, bool | None]] | None = None,
) -> _Negotiated:
    """pynetdicom's ``negotiate_as_acceptor``, remembered for the contexts of remembered requests.

    The proposed contexts are those the request's bytes (their key) decode to: nothing in the
    listener changes them between the request and the negotiation.
    """
    if not isinstance(rq_contexts, ProposedContexts):
        return _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
    key = (rq_contexts.key, _supported(ac_contexts), tuple(sorted((roles or {}).items())))
    negotiated = _negotiations.get(key)
    if negotiated is None:
        negotiated = _pynetdicom_negotiate(rq_contexts, ac_contexts, roles)
        _negotiations.put(key, negotiated)
    results, role_items = negotiated
    return [copy_context(c) for c in results], [copy.copy(item) for item in role_items]


# --- the answer -----------------------------------------------------------------------------

_PLAIN_ANSWER_ITEMS = (
    MaximumLengthNotification,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
)
_answers: _Remembered[Hashable, tuple[list[Any], bytes]] = _Remembered()


def _answer_key(primitive: A_ASSOCIATE) -> Hashable | None:
    """What the items of an A-ASSOCIATE-AC are made of; None when it is not to be remembered."""
    user_information = primitive.user_information
    if not all(type(item) in _PLAIN_ANSWER_ITEMS for item in user_information):
        return None
    return (
        str(primitive.application_context_name),
        tuple(
            (c.context_id, c.result, c.transfer_syntax[0] if c.transfer_syntax else None)
            for c in primitive.presentation_context_definition_results_list
        ),
        tuple((type(i).__name__, tuple(sorted(vars(i).items()))) for i in user_information),
    )


class RememberedAC(A_ASSOCIATE_AC):
    """An A-ASSOCIATE-AC whose items are those of an identical earlier answer, encoded once."""

    _encoded_items: bytes | None = None
    _remember_as: Hashable | None = None

    @property
    def pdu_type(self) -> int:
        return PDU_TYPES[A_ASSOCIATE_AC]

    def from_primitive(self, primitive: A_ASSOCIATE) -> None:
        key = _answer_key(primitive)
        answer = _answers.get(key) if key is not None else None
        if answer is None:
            super().from_primitive(primitive)
            self._remember_as = key
            return
        self.reserved_aet = primitive.called_ae_title
        self.reserved_aec = primitive.calling_ae_title
        self.variable_items, self._encoded_items = answer  # shared and never changed

    def encode(self) -> bytes:
        if self._encoded_items is None:
            encoded = super().encode()
            if self._remember_as is not None:
                _answers.put(self._remember_as, (self.variable_items, encoded[_FIXED:]))
            return encoded
        items, self.variable_items = self.variable_items, []
        try:
            fixed = bytearray(super().encode())  # protocol version and AE titles, as pynetdicom
        finally:
            self.variable_items = items
        fixed[2:6] = struct.pack(">L", _FIXED - 6 + len(self._encoded_items))
        return bytes(fixed) + self._encoded_items


def remember_association_setup() -> None:
    """Process-wide: pynetdicom negotiates and answers through this module's remembered steps.

    The request is decoded by ``decode_associate_rq``, called by the listener's upper layer
    (``dicom_node.stream.StreamingDUL``).
    """
    acse.negotiate_as_acceptor = negotiate_as_acceptor
    setattr(fsm, "A_ASSOCIATE_AC", RememberedAC)  # noqa: B010 (a name pynetdicom's AE_7 looks up)
