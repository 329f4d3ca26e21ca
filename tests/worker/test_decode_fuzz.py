"""Fuzzing the decode path: corrupt streams in every compressed syntax and absurd geometries.

Every example starts from a small valid image in one of JPEG Baseline, JPEG Lossless, JPEG-LS,
JPEG 2000 and RLE, made by real encoders, then breaks its encoded frame (truncated, bytes
flipped, overwritten, inserted, markers forged) and/or its Image Pixel module (rows, columns,
frames, samples, bits, photometric interpretation). Decoded the way the worker decodes
(``IsolatedDecoder``), each must end as a decoded image or as ``UnsupportedImage`` /
``UndecodableImage`` with a reason; nothing may kill this process (which stands in for the
worker) or leak another exception type. ``PACS_AI_FUZZ_EXAMPLES`` sets the number of examples
(300 by default; the nightly-style run in docs/reliability.md used several thousand).
"""

from __future__ import annotations

import copy
import os
import resource
import time
from collections import Counter
from collections.abc import Iterator

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.images import compressed, frame_of, native_image, with_frame
from worker.imaging.decode import UndecodableImage, UnsupportedImage, decode_instance
from worker.imaging.isolated import IsolatedDecoder

EXAMPLES = int(os.environ.get("PACS_AI_FUZZ_EXAMPLES", "300"))
SYNTAXES = (JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless, JPEG2000Lossless, RLELossless)
JPEG_MARKERS = [0xC0, 0xC3, 0xC4, 0xD0, 0xD7, 0xD8, 0xD9, 0xDA, 0xDB, 0xDD, 0xF7, 0xFE, 0x4F, 0x90]
GEOMETRY = {
    "Rows": st.sampled_from([0, 1, 2, 63, 64, 65, 128, 4096, 65535]),
    "Columns": st.sampled_from([0, 1, 2, 63, 64, 65, 128, 4096, 65535]),
    "NumberOfFrames": st.sampled_from([0, 1, 2, 3, 100]),
    "SamplesPerPixel": st.sampled_from([0, 1, 2, 3, 4]),
    "BitsAllocated": st.sampled_from([0, 1, 7, 8, 12, 16, 32, 64]),
    "BitsStored": st.sampled_from([0, 1, 8, 12, 16, 17, 32]),
    "HighBit": st.sampled_from([0, 7, 11, 15, 31]),
    "PixelRepresentation": st.sampled_from([0, 1]),
    "PlanarConfiguration": st.sampled_from([0, 1]),
    "PhotometricInterpretation": st.sampled_from(
        ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR"]
    ),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Dataset]:
    folder = tmp_path_factory.mktemp("fuzz-sources")
    native = native_image(folder / "native", size=64)
    return {
        syntax: pydicom.dcmread(compressed(native, syntax, folder / f"{syntax}.dcm"))
        for syntax in SYNTAXES
    }


@pytest.fixture(scope="module")
def decoder() -> Iterator[IsolatedDecoder]:
    isolated = IsolatedDecoder(timeout_s=60, memory_mb=1024)
    yield isolated
    isolated.close()


@pytest.fixture(scope="module")
def outcomes() -> Iterator[Counter[str]]:
    counts: Counter[str] = Counter()
    started = time.monotonic()
    yield counts
    seconds = time.monotonic() - started
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024
    print(
        f"\ndecode fuzz: {sum(counts.values())} examples in {seconds:.1f} s; peak RSS "
        f"{own} MB here, {children} MB in the largest ended child process"
    )
    for outcome, count in sorted(counts.items()):
        print(f"  {count:6}  {outcome}")


@st.composite
def broken_frame(draw: st.DrawFn, frame: bytes) -> bytes:
    data = bytearray(frame)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["truncate", "flip", "overwrite", "insert", "marker", "cut"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "truncate":
            del data[at:]
        elif kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "overwrite":
            chunk = draw(st.binary(min_size=1, max_size=64))
            data[at : at + len(chunk)] = chunk
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=256))
        elif kind == "marker":
            data[at : at + 2] = bytes([0xFF, draw(st.sampled_from(JPEG_MARKERS))])
        else:
            del data[at : at + draw(st.integers(1, 512))]
    return bytes(data).ljust(2, b"\x00")  # a fragment holds at least 2 bytes


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_no_corrupt_stream_or_geometry_kills_the_worker_or_escapes_as_another_error(
    sources: dict[str, Dataset],
    decoder: IsolatedDecoder,
    outcomes: Counter[str],
    data: st.DataObject,
) -> None:
    syntax = data.draw(st.sampled_from(SYNTAXES), label="syntax")
    ds = copy.deepcopy(sources[syntax])
    frame = data.draw(broken_frame(frame_of(ds)), label="frame")
    with_frame(ds, frame)
    for keyword in data.draw(st.sets(st.sampled_from(sorted(GEOMETRY)), max_size=3), label="keys"):
        setattr(ds, keyword, data.draw(GEOMETRY[keyword], label=keyword))
    try:
        image = decode_instance(ds, decoder=decoder)
    except (UnsupportedImage, UndecodableImage) as exc:
        assert str(exc), "refused without a reason"
        outcome = "decoder died" if "died" in str(exc) else type(exc).__name__
        outcomes[f"{syntax.name}: {outcome}"] += 1
        return
    outcomes[f"{syntax.name}: decoded"] += 1
    assert image.pixels.dtype == np.float32 and image.pixels.ndim == 2
    assert np.isfinite(image.pixels).all()
    assert float(image.pixels.min()) >= 0.0 and float(image.pixels.max()) <= 1.0


def test_the_untouched_sources_decode(
    sources: dict[str, Dataset], decoder: IsolatedDecoder
) -> None:
    for syntax, ds in sources.items():
        assert decode_instance(ds, decoder=decoder).pixels.shape == (64, 64), syntax

    assert {str(ds.file_meta.TransferSyntaxUID) for ds in sources.values()} == set(SYNTAXES)
