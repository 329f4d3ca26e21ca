"""Cheap structural checks of an encoded data set, done in the C-STORE handler without decoding.

pydicom reads a truncated value without complaint, so completeness is checked here by walking the
element headers: every declared length must fit, every undefined-length sequence and item must
close, and the items of every sequence are walked too (in implicit VR, and in UN, a sequence is
known by its tag). Nothing is decoded, and only the few values the listener reads of every
instance are copied as the walk passes them (``Layout.values``): for a CT slice, parsing its header
with pydicom cost four times what the walk does.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from functools import cache

from pydicom.datadict import dictionary_VR

from dicom_node.errors import CorruptDataset

# VRs whose explicit-VR header has 2 reserved bytes and a 4-byte length.
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_SHORT_VRS = frozenset(
    {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN"}
    | {b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)
_UNDEFINED = 0xFFFFFFFF
_ITEM = 0xFFFEE000
_ITEM_END = 0xFFFEE00D
_SEQ_END = 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
# Pixel Data, Float Pixel Data, Double Float Pixel Data.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
_PIXEL_GROUP = 0x7FE0
# Requested Procedure Priority, and the sequence in which a request from the worklist carries it.
REQUESTED_PROCEDURE_PRIORITY = 0x00401003
REQUEST_ATTRIBUTES_SEQUENCE = 0x00400275
# What an image declares of its pixels (checked against the site's limits at receipt).
SAMPLES_PER_PIXEL = 0x00280002
NUMBER_OF_FRAMES = 0x00280008
ROWS = 0x00280010
COLUMNS = 0x00280011
BITS_ALLOCATED = 0x00280100
# The top-level elements whose values the walk keeps.
KEPT_TAGS = frozenset(
    {
        0x00080016,  # SOP Class UID
        0x00080018,  # SOP Instance UID
        0x00080060,  # Modality
        0x0020000D,  # Study Instance UID
        0x0020000E,  # Series Instance UID
        REQUESTED_PROCEDURE_PRIORITY,
        SAMPLES_PER_PIXEL,
        NUMBER_OF_FRAMES,
        ROWS,
        COLUMNS,
        BITS_ALLOCATED,
    }
)


def _tag(data: memoryview, pos: int, little: bool) -> int:
    group, element = struct.unpack_from("<HH" if little else ">HH", data, pos)
    return int(group) << 16 | int(element)


def _u32(data: memoryview, pos: int, little: bool) -> int:
    return int(struct.unpack_from("<I" if little else ">I", data, pos)[0])


@cache
def _allowed_vrs(tag: int) -> frozenset[bytes] | None:
    """The VRs the data dictionary allows for a public tag (UN always); None when unknown."""
    if (tag >> 16) % 2 or tag & 0xFFFF == 0:
        return None  # private tags and group lengths: any VR the standard defines
    try:
        entry = dictionary_VR(tag)
    except KeyError:
        return None
    return frozenset(vr.strip().encode() for vr in entry.split(" or ")) | {b"UN"}


def _is_sequence(tag: int) -> bool:
    """True for a public tag whose only VR in the data dictionary is SQ."""
    allowed = _allowed_vrs(tag)
    return allowed is not None and allowed - {b"UN"} == {b"SQ"}


def _walk_items(
    data: memoryview,
    pos: int,
    implicit: bool,
    little: bool,
    depth: int,
    fragments: bool,
    priorities: list[bytes] | None = None,
) -> int:
    """Walk an undefined-length sequence from ``pos``; return the position after its delimiter.

    ``fragments``: encapsulated pixel data, whose items hold compressed bytes, not data sets.
    """
    while True:
        if pos + 8 > len(data):
            raise CorruptDataset(f"sequence not closed at byte {pos}")
        tag = _tag(data, pos, little)
        if tag == _SEQ_END:
            return pos + 8
        pos = _walk_item(data, pos, len(data), implicit, little, depth, priorities, fragments)


def _walk_defined_sequence(
    data: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    little: bool,
    depth: int,
    priorities: list[bytes] | None = None,
) -> None:
    """Walk the items of a sequence of defined length, which must fill it exactly."""
    while pos < end:
        if pos + 8 > end:
            raise CorruptDataset(f"item header truncated at byte {pos}")
        pos = _walk_item(data, pos, end, implicit, little, depth, priorities)


def _walk_item(
    data: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    little: bool,
    depth: int,
    priorities: list[bytes] | None,
    fragment: bool = False,
) -> int:
    """Walk the item whose header is at ``pos`` in a sequence ending by ``end``; return its end.

    ``fragment``: an item of encapsulated pixel data, whose bytes are not a data set.
    """
    tag = _tag(data, pos, little)
    length = _u32(data, pos + 4, little)
    if tag != _ITEM:
        raise CorruptDataset(f"expected an item tag at byte {pos}, found {tag:08X}")
    start = pos + 8
    if length == _UNDEFINED:
        return _walk_elements(
            data, start, end, implicit, little, depth + 1, in_item=True, priorities=priorities
        )
    if start + length > end:
        where = "the data" if end == len(data) else "its sequence"
        raise CorruptDataset(f"item at byte {pos} runs past the end of {where}")
    if not fragment:
        _walk_elements(
            data,
            start,
            start + length,
            implicit,
            little,
            depth + 1,
            in_item=False,
            priorities=priorities,
        )
    return start + length


def _walk_elements(
    data: memoryview,
    pos: int,
    end: int,
    implicit: bool,
    little: bool,
    depth: int,
    in_item: bool,
    top: _TopLevel | None = None,
    priorities: list[bytes] | None = None,
) -> int:
    """Walk the elements from ``pos`` to ``end``; return where the walk stopped.

    ``top``: this is the data set itself, whose kept values and pixel data are noted there.
    ``priorities``: this is an item of a Request Attributes Sequence; its Requested Procedure
    Priority goes there.
    """
    if depth > 32:
        raise CorruptDataset("sequences nested deeper than 32 levels")
    previous = -1
    while pos < end:
        if pos + 8 > end:
            raise CorruptDataset(f"element header truncated at byte {pos}")
        tag = _tag(data, pos, little)
        if in_item and tag == _ITEM_END:
            return pos + 8
        if tag <= previous:
            raise CorruptDataset(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of order")
        previous = tag
        if top is not None:
            if tag in _PIXEL_TAGS:
                top.pixel_tags.add(tag)
            if top.header_end is None and tag >> 16 >= _PIXEL_GROUP:
                top.header_end = pos
        if implicit:
            vr = b""
            length = _u32(data, pos + 4, little)
            pos += 8
        else:
            vr = bytes(data[pos + 4 : pos + 6])
            if vr not in _LONG_VRS and vr not in _SHORT_VRS:
                raise CorruptDataset(f"invalid VR at byte {pos + 4}")
            allowed = _allowed_vrs(tag)
            if allowed is not None and vr not in allowed:
                name = f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
                raise CorruptDataset(f"{name} has VR {vr.decode()}, the standard says otherwise")
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    raise CorruptDataset(f"element header truncated at byte {pos}")
                length = _u32(data, pos + 8, little)
                pos += 12
            else:
                length = int(struct.unpack_from("<H" if little else ">H", data, pos + 6)[0])
                pos += 8
        inner = top.priorities if top is not None and tag == REQUEST_ATTRIBUTES_SEQUENCE else None
        if length == _UNDEFINED:
            # Undefined length: a sequence, encapsulated pixel data, or UN holding implicit VR.
            inner_implicit = implicit or vr == b"UN"
            fragments = tag in _PIXEL_TAGS or vr in (b"OB", b"OW")
            pos = _walk_items(data, pos, inner_implicit, little, depth, fragments, inner)
            continue
        if pos + length > end:
            name = "pixel data" if tag == _PIXEL_DATA else f"({tag >> 16:04X},{tag & 0xFFFF:04X})"
            raise CorruptDataset(
                f"{name} declares {length} bytes but only {end - pos} remain: data set truncated"
            )
        if vr == b"SQ":
            _walk_defined_sequence(data, pos, pos + length, implicit, little, depth, inner)
        elif (implicit or vr == b"UN") and _is_sequence(tag):
            # No VR on the wire (implicit VR, or UN holding implicit VR): the dictionary says it is
            # a sequence, and pydicom will read it as one.
            _walk_defined_sequence(data, pos, pos + length, True, little, depth, inner)
        elif top is not None and tag in KEPT_TAGS:
            top.values[tag] = bytes(data[pos : pos + length])
        elif priorities is not None and tag == REQUESTED_PROCEDURE_PRIORITY:
            priorities.append(bytes(data[pos : pos + length]))
        pos += length
    if in_item:
        raise CorruptDataset("item not closed before the end of the data")
    return pos


@dataclass
class _TopLevel:
    pixel_tags: set[int] = field(default_factory=set)
    header_end: int | None = None
    values: dict[int, bytes] = field(default_factory=dict)
    priorities: list[bytes] = field(default_factory=list)


@dataclass(frozen=True)
class Layout:
    """What the walk learned of a structurally whole data set."""

    has_pixels: bool  # pixel data at the top level
    header_end: int  # where the pixel data group (7FE0) starts, or the end: the header is before
    # The encoded values of the ``KEPT_TAGS`` present at the top level.
    values: dict[int, bytes] = field(default_factory=dict)
    # Requested Procedure Priority in each item of the Request Attributes Sequence.
    request_priorities: tuple[bytes, ...] = ()

    little_endian: bool = True

    def text(self, tag: int) -> str:
        """A kept string value as text, without its padding ("" when absent or empty)."""
        return self.values.get(tag, b"").decode("latin-1").strip("\x00 ")

    def us(self, tag: int) -> int | None:
        """A kept US value (its first), or None when absent or not two bytes long."""
        value = self.values.get(tag, b"")
        if len(value) < 2:
            return None
        return int(struct.unpack_from("<H" if self.little_endian else ">H", value)[0])

    def integer_string(self, tag: int) -> int | None:
        """A kept IS value (its first), or None when absent or not a number."""
        text = self.text(tag).split("\\")[0].strip()
        try:
            return int(text) if text else None
        except ValueError:
            return None


def check_complete(
    dataset_bytes: bytes | memoryview, *, implicit_vr: bool, little_endian: bool
) -> Layout:
    """Raise ``CorruptDataset`` unless the encoded data set (no file meta) is structurally whole."""
    data = memoryview(dataset_bytes)
    if len(data) == 0:
        raise CorruptDataset("empty data set")
    top = _TopLevel()
    try:
        _walk_elements(data, 0, len(data), implicit_vr, little_endian, 0, in_item=False, top=top)
    except struct.error as exc:
        raise CorruptDataset(f"data set truncated: {exc}") from exc
    end = len(data) if top.header_end is None else top.header_end
    return Layout(
        has_pixels=bool(top.pixel_tags),
        header_end=end,
        values=top.values,
        request_priorities=tuple(top.priorities),
        little_endian=little_endian,
    )
