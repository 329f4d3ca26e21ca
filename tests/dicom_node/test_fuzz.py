"""Fuzzed C-STOREs from a real client: corrupt byte streams and data sets with broken tags.

Every example starts from one small valid chest X-ray, gets a fresh SOP Instance UID (so each
success is a new instance, not an idempotent repeat), then breaks it: UIDs removed or replaced by
invalid strings (path traversal among them), wrong VRs, wrong and oversized lengths, truncations,
flipped, overwritten, inserted and appended bytes. The listener must answer success only for a
data set that is complete and valid, quarantine everything it refuses with a reason, write nothing
outside its spool and quarantine, and keep answering C-ECHO.
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import generate_uid
from pynetdicom.dimse_primitives import C_STORE

from dicom_node.node import DicomNode
from dicom_node.recovery import BOOT_MARK
from tests.dicom_node.conftest import make_config
from tests.dicom_node.helpers import c_echo, dataset_bytes, send_raw, small_study
from tests.servers import RedisTestDatabase

SUCCESS, DATASET_MISMATCH, CANNOT_UNDERSTAND = 0x0000, 0xA900, 0xC000
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
# The standard's UID grammar, written out here so the test does not trust the code it tests.
UID_CHARS = set("0123456789.")

# Explicit VR little endian: these VRs have 2 reserved bytes and a 4-byte length.
LONG_VRS = {
    b"OB",
    b"OD",
    b"OF",
    b"OL",
    b"OV",
    b"OW",
    b"SQ",
    b"SV",
    b"UC",
    b"UN",
    b"UR",
    b"UT",
    b"UV",
}
ALL_VRS = sorted(
    LONG_VRS
    | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT"}
    | {b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
)

BAD_UIDS = st.sampled_from(
    [
        "../../etc/passwd",
        "1.2/../../x",
        "../../../x",
        "..",
        ".",
        "/tmp/x",
        "1.2\\..\\..\\x",
        "1.2.3.",
        ".1.2.3",
        "1..2",
        "01.2.3",
        "1.2.abc",
        "1.2.3 4",
        "1." + "2" * 70,
        "1.2.3\x00../x",
        "1.2.3\n",
        "1.2.840.10008.1\n\n",
    ]
) | st.text(alphabet="0123456789./\\-_ab", min_size=1, max_size=80)


@dataclass(frozen=True)
class Element:
    """Where one top-level element's header lies in the encoded data set."""

    offset: int
    vr_offset: int
    length_offset: int
    length_size: int


def top_level_elements(stream: bytes) -> list[Element]:
    """The top-level elements of an explicit VR little endian data set, up to the first one with an
    undefined length (nothing after it can be located without parsing the sequence)."""
    found: list[Element] = []
    pos = 0
    while pos + 8 <= len(stream):
        vr = stream[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<I", stream, pos + 8)
            found.append(Element(pos, pos + 4, pos + 8, 4))
            if length == 0xFFFFFFFF:
                break
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", stream, pos + 6)
            found.append(Element(pos, pos + 4, pos + 6, 2))
            pos += 8 + length
    return found


# --- what is sent ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One fuzzed input: edits to the data set, then byte-level damage to its encoding."""

    uid_edits: tuple[tuple[str, str | None], ...]  # keyword -> new value (None: removed)
    request_names_bad_uid: bool  # the C-STORE request carries the replaced SOP Instance UID too
    drop_pixel_data: bool
    damage: tuple[tuple[str, int, int, bytes], ...]  # (kind, position, number, bytes)


DAMAGE = st.tuples(
    st.sampled_from(
        ["truncate", "flip", "overwrite", "insert", "append", "wrong_vr", "length", "oversized"]
    ),
    st.integers(min_value=0, max_value=1 << 20),
    st.integers(min_value=0, max_value=0xFFFFFFFF),
    st.binary(min_size=1, max_size=16),
)

CASES = st.builds(
    Case,
    uid_edits=st.lists(
        st.tuples(st.sampled_from(REQUIRED_UIDS), st.none() | BAD_UIDS),
        max_size=2,
        unique_by=lambda edit: edit[0],
    ).map(tuple),
    request_names_bad_uid=st.booleans(),
    drop_pixel_data=st.booleans(),
    damage=st.lists(DAMAGE, max_size=3).map(tuple),
)


def apply_damage(stream: bytes, damage: tuple[tuple[str, int, int, bytes], ...]) -> bytes:
    data = bytearray(stream)
    for kind, position, number, blob in damage:
        if not data:
            break
        at = position % len(data)
        elements = top_level_elements(bytes(data))
        element = elements[number % len(elements)] if elements else None
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            data[at] ^= (number % 255) + 1
        elif kind == "overwrite":
            data[at : at + len(blob)] = blob
        elif kind == "insert":
            data[at:at] = blob
        elif kind == "append":
            data += blob
        elif element is not None and kind == "wrong_vr":
            data[element.vr_offset : element.vr_offset + 2] = ALL_VRS[position % len(ALL_VRS)]
        elif element is not None and kind in ("length", "oversized"):
            size = element.length_size
            limit = (1 << (8 * size)) - 1
            value = limit - (number % 64) if kind == "oversized" else number % (limit + 1)
            packed = value.to_bytes(size, "little")
            data[element.length_offset : element.length_offset + size] = packed
    return bytes(data)


def client_can_send(uid: str) -> bool:
    """Whether pynetdicom lets a C-STORE request carry ``uid`` (too long, multi-valued: no)."""
    if "\\" in uid:  # read back from the file meta as several values
        return False
    try:
        C_STORE().AffectedSOPInstanceUID = uid
    except (TypeError, ValueError):
        return False
    return True


def build_file(template: Dataset, case: Case, sop_uid: str, folder: Path) -> tuple[Path, str]:
    """Write the fuzzed file; return it and the SOP Instance UID the request will carry."""
    ds = copy.deepcopy(template)
    ds.SOPInstanceUID = sop_uid
    request_uid = sop_uid
    # Invalid values are the point here: let pydicom write them as given.
    saved = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    try:
        for keyword, value in case.uid_edits:
            if value is None:
                del ds[keyword]
            else:
                setattr(ds, keyword, value)
                if keyword == "SOPInstanceUID" and case.request_names_bad_uid:
                    request_uid = value if client_can_send(value) else request_uid
        if case.drop_pixel_data:
            del ds.PixelData
        # The request names the template's SOP class (the only one the association proposes).
        ds.file_meta.MediaStorageSOPClassUID = template.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = request_uid
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=False)
    finally:
        pydicom_config.settings.writing_validation_mode = saved
    raw = buffer.getvalue()
    body = dataset_bytes(raw)
    meta = raw[: len(raw) - len(body)]
    path = folder / "fuzzed.dcm"
    path.write_bytes(meta + apply_damage(body, case.damage))
    return path, request_uid


# --- the oracle: is this a complete, valid data set? ------------------------------------------


def is_valid_uid(value: str) -> bool:
    if not 0 < len(value) <= 64 or not set(value) <= UID_CHARS:
        return False
    parts = value.split(".")
    return all(p and (p == "0" or not p.startswith("0")) for p in parts)


def complete_and_valid(body: bytes, sop_class: str, request_uid: str) -> bool:
    """True when ``body`` is exactly what a conformant encoder writes for some data set whose
    elements have their dictionary VRs, whose UIDs are valid and match the request, and which holds
    pixel data (every SOP class sent here is an image)."""
    saved = pydicom_config.settings.reading_validation_mode
    saved_un = pydicom_config.replace_un_with_known_vr
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    # Keep UN as sent, so that the re-encoding below can be compared byte for byte.
    pydicom_config.replace_un_with_known_vr = False
    try:
        ds = read_dataset(BytesIO(body), is_implicit_VR=False, is_little_endian=True)
        for elem in ds.iterall():
            _ = elem.value
            if not elem.tag.is_private and elem.tag.element != 0:
                try:
                    expected = dictionary_VR(elem.tag)
                except KeyError:
                    continue  # a tag newer than this dictionary: any VR may be right
                if elem.VR not in [*expected.split(" or "), "UN"]:
                    return False
        again = DicomBytesIO()
        again.is_little_endian, again.is_implicit_VR = True, False
        write_dataset(again, ds)
    except Exception:
        return False
    finally:
        pydicom_config.settings.reading_validation_mode = saved
        pydicom_config.replace_un_with_known_vr = saved_un
    if again.getvalue() != body:
        return False
    values = {k: str(ds.get(k, "") or "") for k in REQUIRED_UIDS}
    return (
        all(is_valid_uid(v) for v in values.values())
        and values["SOPClassUID"] == sop_class
        and values["SOPInstanceUID"] == request_uid
        and "PixelData" in ds
    )


# --- the node under test ----------------------------------------------------------------------


@dataclass
class Sandbox:
    """The node, its data folder nested deep enough that any ``../`` escape lands in ``root``."""

    node: DicomNode
    root: Path
    data_dir: Path
    template: Dataset
    work: Path
    outside: frozenset[Path]


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir()}


@pytest.fixture(scope="module")
def sandbox(
    tmp_path_factory: pytest.TempPathFactory, _redis_database: RedisTestDatabase
) -> Iterator[Sandbox]:
    root = tmp_path_factory.mktemp("fuzz")
    nest = root / "a" / "b" / "c" / "d"
    template_file = small_study(root / "input", size=16)[0]
    template = pydicom.dcmread(template_file)
    _redis_database.flush()
    node = DicomNode(make_config(nest, _redis_database.url))
    node.start()
    work = root / "work"
    work.mkdir()
    data_dir = nest / "data"
    outside = frozenset(p for p in files_under(root) if data_dir not in p.parents)
    try:
        yield Sandbox(node, root, data_dir, template, work, outside)
    finally:
        node.stop()
        _redis_database.flush()


def assert_nothing_written_outside(box: Sandbox) -> None:
    for path in files_under(box.root):
        if box.data_dir in path.parents:
            relative = path.relative_to(box.data_dir)
            # Besides those, only the index, the node's note of the boot it last ran in and the
            # instance lock files, whose names are bucket numbers, never the sender's values.
            assert (
                relative.parts[0] in ("spool", "quarantine")
                or relative.name.startswith("index.sqlite3")
                or relative == Path(BOOT_MARK)
                or (relative.parts[0] == "locks" and relative.name.isdigit())
            ), f"listener wrote outside its spool and quarantine: {relative}"
        elif path.parent != box.work:
            assert path in box.outside, f"file appeared outside the data folder: {path}"
    spool = box.data_dir / "spool"
    for path in files_under(spool):
        study, series, name = path.relative_to(spool).parts
        assert is_valid_uid(study) and is_valid_uid(series) and name.endswith(".dcm")


_counter = iter(range(1 << 30))


@given(case=CASES)
@settings(max_examples=60, deadline=None, derandomize=True, database=None)
def test_fuzzed_input_is_stored_only_when_valid_and_otherwise_quarantined(
    sandbox: Sandbox, case: Case
) -> None:
    box = sandbox
    sop_uid = generate_uid(entropy_srcs=["fuzz", str(next(_counter))])
    path, request_uid = build_file(box.template, case, sop_uid, box.work)
    sent = dataset_bytes(path.read_bytes())
    sop_class = str(box.template.SOPClassUID)
    transfer_syntax = str(box.template.file_meta.TransferSyntaxUID)
    before = {q.id for q in box.node.index.list_quarantine(limit=1_000_000)}

    status = send_raw(path, box.node.port, sop_class, transfer_syntax)

    entries = [q for q in box.node.index.list_quarantine(limit=1_000_000) if q.id not in before]
    if status == SUCCESS:
        assert complete_and_valid(sent, sop_class, request_uid), (
            f"success answered for an invalid data set: {case}"
        )
        assert not entries
        record = box.node.index.instance(request_uid)
        assert record is not None, "success answered but the instance is not in the index"
        stored = Path(record.path)
        assert box.data_dir / "spool" in stored.parents
        assert dataset_bytes(stored.read_bytes()) == sent
    else:
        assert status in (CANNOT_UNDERSTAND, DATASET_MISMATCH), f"status 0x{status:04X}"
        assert len(entries) == 1, "a refused instance must be quarantined exactly once"
        [entry] = entries
        assert entry.reason.strip() and entry.status_code == status
        folder = Path(entry.path)
        assert box.data_dir / "quarantine" in folder.parents
        note = json.loads((folder / "reason.json").read_text())
        assert note["reason"] == entry.reason
        assert dataset_bytes((folder / "instance.dcm").read_bytes()) == sent
        if is_valid_uid(request_uid):
            assert box.node.index.instance(request_uid) is None
    assert_nothing_written_outside(box)


def test_unbroken_template_is_stored_and_listener_answers_echo_after_fuzzing(
    sandbox: Sandbox,
) -> None:
    # Runs after the fuzzing above (file order): the same listener still serves normally.
    case = Case(uid_edits=(), request_names_bad_uid=False, drop_pixel_data=False, damage=())
    sop_uid = generate_uid(entropy_srcs=["fuzz", "unbroken"])
    path, request_uid = build_file(sandbox.template, case, sop_uid, sandbox.work)
    assert complete_and_valid(
        dataset_bytes(path.read_bytes()), sandbox.template.SOPClassUID, sop_uid
    )
    assert c_echo(sandbox.node.port) == SUCCESS
    status = send_raw(
        path,
        sandbox.node.port,
        str(sandbox.template.SOPClassUID),
        str(sandbox.template.file_meta.TransferSyntaxUID),
    )
    assert status == SUCCESS
    assert sandbox.node.index.instance(request_uid) is not None
    assert_nothing_written_outside(sandbox)
