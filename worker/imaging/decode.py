"""DICOM pixel data to the image a model sees: one grey frame, float32 in [0, 1].

The steps are those of the DICOM grayscale pipeline (PS3.4 N.2): stored values, Modality LUT
(rescale or LUT), VOI LUT (LUT or window), Presentation LUT (MONOCHROME1 is inverted). Only
permissively licensed decoders are used; a syntax they cannot read is an UndecodableImage.

Pixel data comes from senders and is not to be trusted. Before anything decodes it, what the
header declares is checked against the site's limits (``images``: an RLE frame of a few MB may
declare 65535 x 65535 pixels). Native decoders are tried in an order that puts the sturdiest
first (pillow before gdcm for JPEG; gdcm aborts the whole process on some corrupt streams), and
the worker runs them through a ``FrameDecoder`` in a child process of its own
(``worker.imaging.isolated``), so that a decoder that crashes, hangs or eats memory costs one
image, not the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, get_frame
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut, get_decoder, pixel_array
from pydicom.uid import (
    HTJ2K,
    JPEG2000,
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from dicom_node.images import Geometry, geometry_problem
from dicom_node.settings import ImageSettings
from worker.findings import DecodedImage

GREY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")

# pydicom's "pylibjpeg" plugin reads these syntaxes through pylibjpeg-libjpeg, which is GPL;
# the worker must not depend on it even where someone has installed it.
_GPL_ROUTES: dict[str, frozenset[str]] = {
    "pylibjpeg": frozenset(
        {
            JPEGBaseline8Bit,
            JPEGExtended12Bit,
            JPEGLossless,
            JPEGLosslessSV1,
            JPEGLSLossless,
            JPEGLSNearLossless,
        }
    )
}

# The decoders to try for each syntax, sturdiest first; those not installed are skipped. gdcm
# comes last where anything else can read the syntax: it aborts the process (a C++ exception) on
# some corrupt streams and mismatched headers, where pillow and openjpeg raise.
_PREFERRED_PLUGINS: dict[str, tuple[str, ...]] = {
    JPEGBaseline8Bit: ("pillow", "gdcm"),
    JPEGExtended12Bit: ("pillow", "gdcm"),
    JPEGLossless: ("gdcm",),
    JPEGLosslessSV1: ("gdcm",),
    JPEGLSLossless: ("pyjpegls", "gdcm"),
    JPEGLSNearLossless: ("pyjpegls", "gdcm"),
    JPEG2000Lossless: ("pylibjpeg", "pillow", "gdcm"),
    JPEG2000: ("pylibjpeg", "pillow", "gdcm"),
    HTJ2KLossless: ("pylibjpeg",),
    HTJ2KLosslessRPCL: ("pylibjpeg",),
    HTJ2K: ("pylibjpeg",),
    RLELossless: ("pylibjpeg", "pydicom"),
}
# The Image Pixel module's attributes a decoder reads (PS3.3 C.7.6.3).
PIXEL_MODULE = (
    "Rows",
    "Columns",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "PlanarConfiguration",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
)

# Without a VOI in the header, the window spans these percentiles of the modality values: wide
# enough for the whole body, robust to collimator edges and burnt-in labels.
AUTO_WINDOW_PERCENTILES = (0.5, 99.5)
# Channels of a colour image that differ by no more than this are grey content (JPEG colour
# conversion rounds a little).
GREY_TOLERANCE = 2


class UnsupportedImage(Exception):
    """The instance holds no image a grayscale model can read (no pixels, colour, odd photometric)."""


class UndecodableImage(Exception):
    """The pixel data cannot be decoded: its syntax, or the installed permissive decoders failed."""


class ImageTooLarge(UnsupportedImage):
    """The header declares more pixels than the site's ``images`` limits allow."""


@dataclass(frozen=True)
class FrameRequest:
    """One compressed frame to decode, with what a decoder needs of the header."""

    transfer_syntax: str
    header: dict[str, Any]  # PIXEL_MODULE values
    frame: bytes  # the frame's encoded bytes, as in the Pixel Data's fragments
    plugins: tuple[str, ...]  # pydicom decoding plugins to try, in order


class FrameDecoder(Protocol):
    """Turns a compressed frame into its stored values; raises ``UndecodableImage``."""

    def decode(self, request: FrameRequest) -> npt.NDArray[Any]: ...


def decode_frame(request: FrameRequest) -> npt.NDArray[Any]:
    """Decode one frame here, in this process: the plugins in order until one succeeds."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(request.transfer_syntax)
    for keyword, value in request.header.items():
        setattr(ds, keyword, value)
    ds.NumberOfFrames = 1
    ds.PixelData = encapsulate([request.frame])
    errors: list[str] = []
    for plugin in request.plugins:
        try:
            return pixel_array(ds, decoding_plugin=plugin)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:
            # Each plugin fails in its own way, the Rust ones (pylibjpeg-rle) with a panic that
            # is no Exception at all: try the next one.
            errors.append(f"{plugin}: {type(exc).__name__}: {exc}")
    raise UndecodableImage(
        f"pixel data in {_syntax_name(UID(request.transfer_syntax))} could not be decoded "
        f"({'; '.join(errors)})"
    )


class InProcessDecoder:
    """Decodes in the calling process: for trusted images (the demo's own, training, tests)."""

    def decode(self, request: FrameRequest) -> npt.NDArray[Any]:
        return decode_frame(request)


F32 = npt.NDArray[np.float32]


def _syntax_name(uid: UID) -> str:
    return f"{uid.name} ({uid})" if uid.is_transfer_syntax else str(uid)


def _permissive_plugins(uid: UID) -> list[str]:
    """Decoding plugins usable for `uid`; [""] means pydicom's own native decoding."""
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as exc:
        raise UndecodableImage(
            f"no decoder exists for transfer syntax {_syntax_name(uid)}"
        ) from exc
    if not uid.is_compressed:
        return [""]
    available = [
        name for name in decoder.available_plugins if uid not in _GPL_ROUTES.get(name, frozenset())
    ]
    preferred = _PREFERRED_PLUGINS.get(uid, ())
    plugins = [p for p in preferred if p in available] + [
        p for p in available if p not in preferred
    ]
    if not plugins:
        missing = "; ".join(decoder.missing_dependencies) or "none installed"
        raise UndecodableImage(
            f"transfer syntax {_syntax_name(uid)} cannot be decoded with the installed "
            f"permissive decoders (GPL plugins are not used; missing: {missing})"
        )
    return plugins


def _frame_view(ds: Dataset, frame: int) -> Dataset:
    """The header as one frame sees it: enhanced objects keep rescale and window per frame."""
    if "PerFrameFunctionalGroupsSequence" not in ds and "SharedFunctionalGroupsSequence" not in ds:
        return ds
    view = Dataset()
    for keyword in (
        "PhotometricInterpretation",
        "BitsStored",
        "BitsAllocated",
        "PixelRepresentation",
        "RescaleSlope",
        "RescaleIntercept",
        "RescaleType",
        "WindowCenter",
        "WindowWidth",
        "VOILUTFunction",
        "VOILUTSequence",
        "ModalityLUTSequence",
    ):
        if keyword in ds:
            setattr(view, keyword, ds[keyword].value)
    groups: list[Dataset] = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])  # per-frame values override shared ones
    for group in groups:
        for macro in ("PixelValueTransformationSequence", "FrameVOILUTSequence"):
            items = group.get(macro)
            if items:
                for element in items[0]:
                    view[element.tag] = element
    return view


def _window(values: npt.NDArray[np.float64], center: float, width: float, function: str) -> F32:
    """The VOI window of PS3.3 C.11.2.1.2/3, scaled straight to [0, 1]."""
    if function == "SIGMOID":
        out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        out = (values - center) / width + 0.5
    else:
        # LINEAR: the standard's half-value offset and width - 1; a width of 1 is a threshold.
        if width <= 1:
            out = (values >= center - 0.5).astype(np.float64)
        else:
            out = (values - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _first(value: object) -> float:
    """First value of a multi-valued DS (several windows: the first is the default)."""
    if isinstance(value, MultiValue):
        return float(value[0])
    return float(value)  # type: ignore[arg-type]


def _voi(values: npt.NDArray[np.float64], header: Dataset) -> F32:
    """VOI LUT, else window, else a robust percentile window; output in [0, 1]."""
    if header.get("VOILUTSequence"):
        item = header.VOILUTSequence[0]
        entries, first_mapped, _ = item.LUTDescriptor
        entries = entries or 65536  # 0 means 2**16 entries (PS3.3 C.11.2.1.1)
        # The LUT's real output range, found by passing its own input domain through it:
        # descriptors often claim more bits than the data uses.
        domain = np.arange(first_mapped, first_mapped + entries, dtype=np.int64)
        lut = apply_voi_lut(domain, header, prefer_lut=True).astype(np.float64)
        # A LUT is indexed by whole values (PS3.3 C.11.2.1.1).
        indices = np.rint(values).astype(np.int64)
        out = apply_voi_lut(indices, header, prefer_lut=True).astype(np.float64)
        low, high = float(lut.min()), float(lut.max())
        if high > low:
            return np.clip((out - low) / (high - low), 0.0, 1.0).astype(np.float32)
    if "WindowCenter" in header and "WindowWidth" in header:
        width = _first(header.WindowWidth)
        if width > 0:
            function = str(header.get("VOILUTFunction", "LINEAR")).upper()
            return _window(values, _first(header.WindowCenter), width, function)
    low, high = np.percentile(values, AUTO_WINDOW_PERCENTILES)
    if high <= low:
        return np.zeros(values.shape, dtype=np.float32)
    return np.clip((values - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            row, col = float(value[0]), float(value[1])
            if row > 0 and col > 0:
                return row, col
    return None


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        if default is None:
            raise UnsupportedImage(f"{keyword} is missing")
        return default
    try:
        return int(_first(value))
    except (TypeError, ValueError):
        raise UnsupportedImage(f"{keyword} is not a number") from None


def geometry(ds: Dataset) -> Geometry:
    """The pixels ``ds`` declares; ``UnsupportedImage`` when the header does not say."""
    return Geometry(
        rows=_int(ds, "Rows"),
        columns=_int(ds, "Columns"),
        frames=_int(ds, "NumberOfFrames", 1),
        samples_per_pixel=_int(ds, "SamplesPerPixel", 1),
        bits_allocated=_int(ds, "BitsAllocated"),
    )


def check_declared_size(ds: Dataset, limits: ImageSettings) -> Geometry:
    """Raise ``UnsupportedImage`` for a geometry no image has, ``ImageTooLarge`` for one above
    ``limits``; return the geometry otherwise."""
    declared = geometry(ds)
    problem = geometry_problem(declared, limits)
    if problem is not None:
        raise (ImageTooLarge if problem.too_large else UnsupportedImage)(
            f"not decoded: {problem.reason}"
        )
    return declared


def decode_instance(
    ds: Dataset,
    frame: int = 0,
    *,
    decoder: FrameDecoder | None = None,
    limits: ImageSettings | None = None,
) -> DecodedImage:
    """One frame of `ds` as a model input: float32 in [0, 1], 0 = black as displayed.

    Compressed frames go to ``decoder`` (in this process when None); what the header declares
    is checked against ``limits`` (the defaults when None) before that.
    """
    if "PixelData" not in ds:
        raise UnsupportedImage("the instance has no Pixel Data (7FE0,0010)")
    photometric = str(ds.get("PhotometricInterpretation", "")).upper()
    if photometric not in GREY + COLOUR:
        raise UnsupportedImage(
            f"photometric interpretation {photometric or '(none)'!r} is not supported"
        )
    frames = check_declared_size(ds, limits if limits is not None else ImageSettings()).frames
    if not 0 <= frame < frames:
        raise ValueError(f"frame {frame} requested from an instance with {frames} frame(s)")
    file_meta = getattr(ds, "file_meta", None)
    syntax = UID(file_meta.get("TransferSyntaxUID", "") if file_meta is not None else "")
    if not syntax:
        raise UndecodableImage("the instance has no Transfer Syntax UID in its file meta")
    plugins = _permissive_plugins(syntax)
    stored: npt.NDArray[Any]
    if syntax.is_compressed:
        stored = (decoder or InProcessDecoder()).decode(
            FrameRequest(
                str(syntax), _pixel_header(ds), _encoded_frame(ds, frame, frames), tuple(plugins)
            )
        )
    else:
        try:
            stored = pixel_array(ds, index=frame if frames > 1 else None)
        except Exception as exc:
            raise UndecodableImage(f"native pixel data could not be read: {exc}") from exc

    if photometric in COLOUR:
        grey = _grey_from_colour(stored, photometric, int(ds.get("BitsStored", 8)))
    else:
        if stored.ndim != 2:
            raise UnsupportedImage(f"expected one grey sample per pixel, got shape {stored.shape}")
        header = _frame_view(ds, frame)
        values = apply_modality_lut(stored, header).astype(np.float64)
        grey = _voi(values, header)
        if photometric == "MONOCHROME1":
            grey = 1.0 - grey
    return DecodedImage(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        pixels=np.ascontiguousarray(grey, dtype=np.float32),
        pixel_spacing_mm=_pixel_spacing(ds),
        view_position=str(ds.ViewPosition) if ds.get("ViewPosition") else None,
    )


def _pixel_header(ds: Dataset) -> dict[str, Any]:
    return {k: ds.data_element(k).value for k in PIXEL_MODULE if k in ds}  # type: ignore[union-attr]


def _encoded_frame(ds: Dataset, frame: int, frames: int) -> bytes:
    """One frame's encoded bytes out of the Pixel Data's fragments (no decoder involved)."""
    try:
        return bytes(get_frame(ds.PixelData, frame, number_of_frames=frames))
    except Exception as exc:  # a broken offset table or fragment: pydicom raises several types
        raise UndecodableImage(f"the encapsulated pixel data is malformed: {exc}") from exc


def _grey_from_colour(stored: npt.NDArray[np.generic], photometric: str, bits: int) -> F32:
    """Colour pixels whose channels agree (screenshots, scanned films) as grey; else refuse."""
    if stored.ndim != 3 or stored.shape[-1] != 3:
        raise UnsupportedImage(f"{photometric} pixel data with unexpected shape {stored.shape}")
    channels = stored.astype(np.int32)
    spread = int((channels.max(axis=-1) - channels.min(axis=-1)).max())
    if spread > GREY_TOLERANCE:
        raise UnsupportedImage(
            f"{photometric} image has real colour content (channels differ by up to {spread})"
        )
    # Colour images are already for display: scale by the stored range, no windowing.
    top = float((1 << bits) - 1)
    return np.clip(channels.mean(axis=-1) / top, 0.0, 1.0).astype(np.float32)
