"""The structural walk over encoded data sets: sequences are walked inside, whatever their encoding."""

from __future__ import annotations

import struct

import pytest

from dicom_node.errors import CorruptDataset
from dicom_node.wire import check_complete

# Modality, then a Referenced Image Sequence (SQ) holding one Referenced SOP Instance UID (UI).
SEQUENCE = 0x00081140
INSTANCE_UID = 0x00081155
MODALITY = 0x00080060
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF


def implicit(tag: int, value: bytes, length: int | None = None) -> bytes:
    """An implicit VR little endian element (or item) with ``value``; ``length`` may lie."""
    return (
        struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(value) if length is None else length)
        + value
    )


def explicit_long(tag: int, vr: bytes, value: bytes, length: int | None = None) -> bytes:
    size = len(value) if length is None else length
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, size) + value


def explicit_short(tag: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


UID = b"1.2.3.4\x00"


def test_implicit_vr_sequence_of_defined_length_is_walked_inside() -> None:
    modality = implicit(MODALITY, b"CT")
    good_item = implicit(ITEM, implicit(INSTANCE_UID, UID))
    check_complete(modality + implicit(SEQUENCE, good_item), implicit_vr=True, little_endian=True)

    # The item's element declares more bytes than the item holds: the sequence is broken, even
    # though every length at the top level fits.
    broken_item = implicit(ITEM, implicit(INSTANCE_UID, UID, length=100))
    with pytest.raises(CorruptDataset, match="declares 100 bytes"):
        check_complete(
            modality + implicit(SEQUENCE, broken_item), implicit_vr=True, little_endian=True
        )


def test_defined_length_item_in_an_undefined_length_sequence_is_walked_inside() -> None:
    def data_set(inner: bytes) -> bytes:
        item = implicit(ITEM, inner)  # item headers carry no VR in any transfer syntax
        sequence = explicit_long(SEQUENCE, b"SQ", item + implicit(SEQ_END, b""), length=UNDEFINED)
        return explicit_short(MODALITY, b"CS", b"CT") + sequence

    element = explicit_short(INSTANCE_UID, b"UI", UID)
    check_complete(data_set(element), implicit_vr=False, little_endian=True)
    with pytest.raises(CorruptDataset, match="declares 8 bytes"):  # its value cut short
        check_complete(data_set(element[:-2]), implicit_vr=False, little_endian=True)


def test_sequence_sent_as_un_is_walked_as_the_implicit_vr_sequence_it_holds() -> None:
    modality = explicit_short(MODALITY, b"CS", b"CT")
    good = implicit(ITEM, implicit(INSTANCE_UID, UID))
    check_complete(
        modality + explicit_long(SEQUENCE, b"UN", good), implicit_vr=False, little_endian=True
    )

    broken = implicit(ITEM, implicit(INSTANCE_UID, UID, length=100))
    with pytest.raises(CorruptDataset, match="declares 100 bytes"):
        check_complete(
            modality + explicit_long(SEQUENCE, b"UN", broken), implicit_vr=False, little_endian=True
        )


def test_fragments_of_encapsulated_pixel_data_are_not_read_as_data_sets() -> None:
    modality = explicit_short(MODALITY, b"CS", b"CT")
    jpeg = b"\xff\xd8\xff\xe0 not a data set \xff\xd9"
    pixels = implicit(ITEM, b"") + implicit(ITEM, jpeg) + implicit(SEQ_END, b"")
    whole = modality + explicit_long(0x7FE00010, b"OB", pixels, length=UNDEFINED)
    assert check_complete(whole, implicit_vr=False, little_endian=True).has_pixels
