"""Compressed and deliberately broken images for the decoding tests, made with real encoders.

JPEG Lossless comes from gdcm (pydicom has no encoder for it); JPEG-LS, JPEG 2000 and RLE from
pydicom's encoders (pyjpegls, openjpeg, its own RLE); JPEG Baseline from pillow.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.dicom_node.helpers import small_study


def native_image(folder: Path, size: int = 64, seed: int = 1) -> Path:
    """A small valid DX image (16-bit, explicit VR little endian)."""
    [path] = small_study(folder, size=size, seed=seed)
    return path


def jpeg_lossless(source: Path, out: Path) -> Path:
    """``source`` re-encoded as JPEG Lossless SV1 by gdcm."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read(), f"gdcm cannot read {source}"
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
    change.SetInput(reader.GetImage())
    assert change.Change(), "gdcm did not encode JPEG Lossless"
    writer = gdcm.ImageWriter()
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    writer.SetFileName(str(out))
    assert writer.Write()
    assert pydicom.dcmread(out).file_meta.TransferSyntaxUID == JPEGLosslessSV1
    return out


def compressed(source: Path, syntax: str, out: Path) -> Path:
    """``source`` in ``syntax``: JPEG Lossless via gdcm, JPEG Baseline via pillow, others pydicom."""
    if syntax == JPEGLosslessSV1:
        return jpeg_lossless(source, out)
    ds = pydicom.dcmread(source)
    if syntax == JPEGBaseline8Bit:
        from PIL import Image

        pixels = ds.pixel_array.astype(np.float64)
        scaled = (255 * (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0)).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(scaled).save(buffer, format="JPEG", quality=90)
        ds.PixelData = encapsulate([buffer.getvalue()])
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
        for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
            if keyword in ds:
                delattr(ds, keyword)
    else:
        assert syntax in (JPEGLSLossless, JPEG2000Lossless, RLELossless), syntax
        ds.compress(syntax)
    ds.save_as(out, enforce_file_format=True)
    return out


def frame_of(ds: Dataset) -> bytes:
    """The first frame's encoded bytes."""
    return bytes(get_frame(ds.PixelData, 0, number_of_frames=int(ds.get("NumberOfFrames", 1))))


def with_frame(ds: Dataset, frame: bytes) -> Dataset:
    """``ds`` holding ``frame`` as its only frame."""
    ds.PixelData = encapsulate([frame])
    return ds


def gdcm_killer(folder: Path) -> Path:
    """A JPEG Lossless image whose Huffman table marker (FF C4) is damaged.

    Its header is valid; gdcm, the only permissive JPEG Lossless decoder, throws a C++ exception
    on the stream that nothing catches, and the process that decodes it aborts (SIGABRT).
    """
    folder.mkdir(parents=True, exist_ok=True)
    source = jpeg_lossless(native_image(folder / "source"), folder / "lossless.dcm")
    ds = pydicom.dcmread(source)
    frame = bytearray(frame_of(ds))
    marker = frame.find(b"\xff\xc4")
    assert marker > 0, "no Huffman table in the JPEG Lossless stream"
    frame[marker] = 0x23
    out = folder / "gdcm-killer.dcm"
    with_frame(ds, bytes(frame)).save_as(out, enforce_file_format=True)
    return out


def rle_bomb(folder: Path, rows: int, columns: int) -> Path:
    """An RLE Lossless image of ``rows`` x ``columns`` 16-bit zeros: small on disk, huge decoded.

    Each of the frame's two byte segments is runs of 128 equal bytes (PS3.5 G.3.1: the code
    byte -127 repeats the next byte 128 times), so 144 million pixels fit in about 2.3 MB.
    """
    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(native_image(folder / "source"))
    count = rows * columns
    runs, rest = divmod(count, 128)
    segment = b"\x81\x00" * runs + (bytes([257 - rest, 0]) if rest > 1 else b"\x00\x00" * rest)
    if len(segment) % 2:
        segment += b"\x00"
    header = np.zeros(16, dtype="<u4")
    header[0] = 2
    header[1] = 64
    header[2] = 64 + len(segment)
    frame = header.tobytes() + segment + segment
    ds.Rows, ds.Columns = rows, columns
    ds.PixelData = encapsulate([frame])
    ds.file_meta.TransferSyntaxUID = RLELossless
    out = folder / f"rle-{rows}x{columns}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out
