"""DICOM pixel decoding into model-ready frames, on a real compressed file and on phantoms."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    MPEG2MPML,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from tests.servers import require
from worker.demo.phantoms import MAX_VALUE, make_cxr_dataset, make_cxr_pixels
from worker.imaging import UndecodableImage, UnsupportedImage, decode_instance

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"
SIIM = REAL / "siim_cr_jpeg_baseline.dcm"


def phantom(photometric: str = "MONOCHROME2", modality: str = "DX", size: int = 128) -> Dataset:
    return make_cxr_dataset(
        make_cxr_pixels("pneumothorax", 21, size, size),
        patient_id="DEMO0021",
        patient_name="DEMO^DECODE",
        study_instance_uid="1.2.826.0.1.3680043.8.498.1",
        series_instance_uid="1.2.826.0.1.3680043.8.498.1.1",
        sop_instance_uid="1.2.826.0.1.3680043.8.498.1.1.1",
        accession_number="DEMO21",
        modality=modality,
        photometric=photometric,
    )


def test_real_jpeg_baseline_secondary_capture_decodes() -> None:
    require(SIIM.is_file(), f"real test data missing: {SIIM}")
    ds = pydicom.dcmread(SIIM)
    image = decode_instance(ds)
    assert image.pixels.shape == (1024, 1024)
    assert image.pixels.dtype == np.float32
    assert image.pixels.flags.c_contiguous
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    # No window in the header: the percentile window leaves a real image, not a flat one.
    assert 0.2 < float(image.pixels.mean()) < 0.8
    assert float(image.pixels.std()) > 0.1
    assert image.pixel_spacing_mm == (0.168, 0.168)
    assert image.view_position == "PA"
    assert image.sop_instance_uid == ds.SOPInstanceUID
    assert image.sop_class_uid == ds.SOPClassUID


@pytest.mark.parametrize("modality", ["DX", "CR"])
def test_monochrome1_decodes_to_the_same_image_as_monochrome2(modality: str) -> None:
    mono2 = decode_instance(phantom("MONOCHROME2", modality)).pixels
    mono1 = decode_instance(phantom("MONOCHROME1", modality)).pixels
    assert np.allclose(mono1, mono2, atol=1e-6)
    assert mono2.min() == 0.0 and mono2.max() == 1.0


def test_header_window_is_applied() -> None:
    ds = phantom()
    image = decode_instance(ds).pixels
    stored = ds.pixel_array.astype(np.float64)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    expected = np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)
    assert np.allclose(image, expected, atol=1e-6)


def test_without_voi_a_percentile_window_is_used_and_bright_stays_bright() -> None:
    ds = phantom()
    windowed = decode_instance(ds).pixels
    del ds.WindowCenter, ds.WindowWidth, ds.WindowCenterWidthExplanation, ds.VOILUTFunction
    auto = decode_instance(ds).pixels
    assert auto.min() == 0.0 and auto.max() == 1.0
    assert np.corrcoef(auto.ravel(), windowed.ravel())[0, 1] > 0.99


def test_modality_rescale_is_applied_before_the_window() -> None:
    ds = phantom()
    reference = decode_instance(ds).pixels
    # The same image stored as (value + 100) / 2 with a rescale that undoes it.
    stored = ds.pixel_array.astype(np.int32)
    ds.PixelData = ((stored + 100) // 2).astype("<u2").tobytes()
    ds.RescaleSlope, ds.RescaleIntercept = 2, -100
    rescaled = decode_instance(ds).pixels
    assert np.abs(rescaled - reference).max() < 2.0 / float(ds.WindowWidth)


def test_voi_lut_sequence_maps_through_the_lut() -> None:
    ds = phantom(size=64)
    del ds.WindowCenter, ds.WindowWidth
    # A square-root LUT over the 12-bit range, output 10 bits but described as 16 (vendors do).
    domain = np.arange(MAX_VALUE + 1)
    lut = np.round(np.sqrt(domain / MAX_VALUE) * 1023).astype("<u2")
    item = Dataset()
    item.LUTDescriptor = [MAX_VALUE + 1, 0, 16]
    item.LUTData = lut.tobytes()
    item["LUTData"].VR = "OW"
    ds.VOILUTSequence = DicomSequence([item])
    image = decode_instance(ds).pixels
    expected = np.sqrt(ds.pixel_array / MAX_VALUE)
    assert np.abs(image - expected).max() < 2e-3


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless])
def test_lossless_compressed_syntaxes_decode_like_the_original(syntax: pydicom.uid.UID) -> None:
    ds = phantom()
    reference = decode_instance(ds).pixels
    compressed = copy.deepcopy(ds)
    compressed.compress(syntax)
    assert compressed.file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(decode_instance(compressed).pixels, reference)


def test_multi_frame_returns_the_requested_frame() -> None:
    first = phantom(size=64)
    second_pixels = make_cxr_pixels("cardiomegaly", 2, 64, 64)
    ds = copy.deepcopy(first)
    ds.NumberOfFrames = 2
    ds.PixelData = first.PixelData + second_pixels.astype("<u2").tobytes()
    single = copy.deepcopy(first)
    single.PixelData = second_pixels.astype("<u2").tobytes()
    assert np.array_equal(decode_instance(ds, 1).pixels, decode_instance(single).pixels)
    assert np.array_equal(decode_instance(ds, 0).pixels, decode_instance(first).pixels)
    with pytest.raises(ValueError, match="frame 2"):
        decode_instance(ds, 2)


def rgb(channels: np.ndarray) -> Dataset:
    ds = phantom(size=32)
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    for keyword in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept"):
        del ds[keyword]
    ds.PixelData = channels.astype(np.uint8).tobytes()
    return ds


def test_grey_content_in_rgb_is_accepted_and_real_colour_refused() -> None:
    grey = np.linspace(0, 255, 32 * 32).reshape(32, 32).round()
    image = decode_instance(rgb(np.stack([grey] * 3, axis=-1))).pixels
    assert np.allclose(image, grey / 255.0, atol=1e-6)
    coloured = np.stack([grey, grey, 255 - grey], axis=-1)
    with pytest.raises(UnsupportedImage, match="colour"):
        decode_instance(rgb(coloured))


def test_missing_pixels_and_palette_colour_are_unsupported() -> None:
    ds = phantom(size=32)
    palette = copy.deepcopy(ds)
    palette.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(UnsupportedImage, match="PALETTE COLOR"):
        decode_instance(palette)
    del ds.PixelData
    with pytest.raises(UnsupportedImage, match="Pixel Data"):
        decode_instance(ds)


def test_syntax_without_a_decoder_is_undecodable_and_names_it() -> None:
    ds = phantom(size=32)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xd9"])
    ds["PixelData"].VR = "OB"
    with pytest.raises(UndecodableImage, match=str(MPEG2MPML).replace(".", r"\.")):
        decode_instance(ds)


@pytest.mark.parametrize("option", ["+e1", "+el"], ids=["lossless-sv1", "lossless"])
def test_jpeg_lossless_from_dcmtk_decodes_to_the_original_pixels(
    option: str, tmp_path: Path
) -> None:
    # JPEG Lossless is common in CR/DX archives; python-gdcm (BSD) reads it, no GPL plugin needed.
    from tests.servers import run_tool

    ds = phantom(size=64)
    source = tmp_path / "plain.dcm"
    ds.save_as(source, enforce_file_format=True)
    compressed = tmp_path / "lossless.dcm"
    result = run_tool("dcmcjpeg", [option, source, compressed])
    assert result.returncode == 0, result.stderr
    encoded = pydicom.dcmread(compressed)
    assert encoded.file_meta.TransferSyntaxUID in (JPEGLosslessSV1, "1.2.840.10008.1.2.4.57")
    assert np.array_equal(decode_instance(encoded).pixels, decode_instance(ds).pixels)
