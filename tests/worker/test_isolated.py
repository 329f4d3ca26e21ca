"""Decoding untrusted pixel data: a decoder that crashes or eats memory costs one image.

The crashing input is real: a JPEG Lossless stream whose Huffman table marker is damaged makes
gdcm (the only permissive JPEG Lossless decoder) abort the process that decodes it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from dicom_node.settings import ImageSettings
from tests.images import compressed, gdcm_killer, native_image, rle_bomb
from worker.imaging.decode import ImageTooLarge, UndecodableImage, decode_instance
from worker.imaging.isolated import IsolatedDecoder

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"


@pytest.fixture
def decoder() -> Iterator[IsolatedDecoder]:
    isolated = IsolatedDecoder(timeout_s=60, memory_mb=1024)
    yield isolated
    isolated.close()


def _run_alone(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a Python process of its own (so that it may die)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


_DECODE_HERE = """
import sys, pydicom
from worker.imaging.decode import decode_instance
decode_instance(pydicom.dcmread(sys.argv[1]))
"""


def test_the_damaged_jpeg_lossless_image_aborts_a_process_that_decodes_it_itself(
    tmp_path: Path,
) -> None:
    # What the worker did before: decode in its own process. The input is lethal.
    run = _run_alone(_DECODE_HERE, str(gdcm_killer(tmp_path)))
    assert run.returncode == -signal.SIGABRT, run.stderr


def test_isolated_decoding_turns_the_crash_into_an_undecodable_image_and_goes_on(
    tmp_path: Path, decoder: IsolatedDecoder
) -> None:
    killer = pydicom.dcmread(gdcm_killer(tmp_path / "bad"))
    for _ in range(2):  # the replacement decoder process survives it just the same
        with pytest.raises(UndecodableImage, match=r"died decoding this image.*SIGABRT"):
            decode_instance(killer, decoder=decoder)
    # The next images decode, each as it would in this process.
    source = native_image(tmp_path / "good")
    for syntax in (
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEG2000Lossless,
        RLELossless,
        JPEGBaseline8Bit,
    ):
        ds = pydicom.dcmread(compressed(source, syntax, tmp_path / f"{syntax}.dcm"))
        isolated = decode_instance(ds, decoder=decoder)
        assert np.array_equal(isolated.pixels, decode_instance(ds).pixels), syntax


def test_the_real_jpeg_baseline_file_decodes_the_same_isolated(decoder: IsolatedDecoder) -> None:
    path = REAL / "siim_cr_jpeg_baseline.dcm"
    if not path.is_file():
        pytest.fail(f"real test file missing: {path}")
    ds = pydicom.dcmread(path)
    assert np.array_equal(decode_instance(ds, decoder=decoder).pixels, decode_instance(ds).pixels)


def test_a_frame_that_needs_more_memory_than_the_decoder_may_take_fails_its_image_only(
    tmp_path: Path,
) -> None:
    # 6000 x 6000 is within the frame limit; 72 MB decoded is more than this decoder may take.
    bomb = pydicom.dcmread(rle_bomb(tmp_path / "bomb", 6000, 6000))
    small = IsolatedDecoder(timeout_s=60, memory_mb=64)
    try:
        with pytest.raises(UndecodableImage):
            decode_instance(bomb, decoder=small)
        ds = pydicom.dcmread(
            compressed(native_image(tmp_path / "ok"), RLELossless, tmp_path / "r.dcm")
        )
        assert decode_instance(ds, decoder=small).pixels.shape == (64, 64)
    finally:
        small.close()


@pytest.mark.parametrize("rows, columns", [(12000, 12000), (65535, 65535)])
def test_a_decompression_bomb_is_refused_before_decoding_with_the_reason(
    tmp_path: Path, decoder: IsolatedDecoder, rows: int, columns: int
) -> None:
    bomb = pydicom.dcmread(rle_bomb(tmp_path, rows, columns))
    with pytest.raises(ImageTooLarge, match=r"images\.max_frame_pixels"):
        decode_instance(bomb, decoder=decoder)
    with pytest.raises(ImageTooLarge, match=f"{rows} x {columns} pixels"):
        decode_instance(bomb)


def test_decoding_a_bomb_keeps_the_process_s_memory_within_a_bound(tmp_path: Path) -> None:
    # 12000 x 12000 RLE took a worker from 432 MB to 3.9 GB; now it is refused before decoding.
    bomb = rle_bomb(tmp_path, 12000, 12000)
    script = """
    import resource, sys, pydicom
    from worker.imaging.decode import ImageTooLarge, decode_instance
    ds = pydicom.dcmread(sys.argv[1])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        decode_instance(ds)
    except ImageTooLarge:
        pass
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
    """
    run = _run_alone(script, str(bomb))
    assert run.returncode == 0, run.stderr
    grown_mb = int(run.stdout.split()[-1]) / 1024
    print(f"\nrefusing a 12000 x 12000 RLE bomb grew the process by {grown_mb:.1f} MB")
    assert grown_mb < 50, f"the process grew by {grown_mb:.0f} MB on a refused image"


def test_limits_are_the_site_s_settings(tmp_path: Path) -> None:
    ds = pydicom.dcmread(native_image(tmp_path, size=64))
    with pytest.raises(ImageTooLarge, match=r"images\.max_frame_pixels"):
        decode_instance(ds, limits=ImageSettings(max_frame_pixels=4095))
    with pytest.raises(ImageTooLarge, match=r"images\.max_decoded_bytes"):
        decode_instance(ds, limits=ImageSettings(max_decoded_bytes=8191))
    assert decode_instance(ds, limits=ImageSettings(max_frame_pixels=4096)).pixels.shape == (64, 64)


# --- in a job --------------------------------------------------------------------------------


@pytest.mark.parametrize("image", ["killer", "bomb"])
def test_a_job_whose_image_crashes_its_decoder_or_is_a_bomb_fails_with_the_reason(
    tmp_path: Path, demo_model_dir: Path, image: str
) -> None:
    from dicom_node.index import JobStatus
    from tests.worker.test_amend import Site
    from worker.tasks import process_study

    path = (
        gdcm_killer(tmp_path / "in")
        if image == "killer"
        else rle_bomb(tmp_path / "in", 12000, 12000)
    )
    site = Site(tmp_path, demo_model_dir)
    try:
        site.receive([path])
        study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        job_id = site.complete(study_uid)
        with pytest.raises(UndecodableImage if image == "killer" else ImageTooLarge):
            process_study(site.ctx, job_id)  # in this process: it would have died before
        job = site.index.job(job_id)
        assert job is not None and job.status == JobStatus.FAILED
        expected = "SIGABRT" if image == "killer" else "images.max_frame_pixels"
        assert expected in (job.error or ""), job.error
        study = site.index.study(study_uid)
        assert study is not None and expected in (study.reason or "")
    finally:
        site.close()
