"""Synthetic chest X-ray phantoms and the DX/CR instances that carry them, checked by dciodvfy."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.servers import dciodvfy
from worker.demo.phantoms import (
    CR_IMAGE_STORAGE,
    DX_IMAGE_STORAGE_FOR_PRESENTATION,
    KINDS,
    MAX_VALUE,
    make_cxr_dataset,
    make_cxr_pixels,
    write_synthetic_study,
)

SIZE = 256


def test_phantom_is_deterministic_12_bit_and_seed_dependent() -> None:
    first = make_cxr_pixels("pneumothorax", 3, SIZE, SIZE)
    again = make_cxr_pixels("pneumothorax", 3, SIZE, SIZE)
    other = make_cxr_pixels("pneumothorax", 4, SIZE, SIZE)
    assert first.dtype == np.uint16 and first.shape == (SIZE, SIZE)
    assert int(first.max()) <= MAX_VALUE
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_has_dark_lungs_inside_a_brighter_body(kind: str) -> None:
    pixels = make_cxr_pixels(kind, 11, SIZE, 200).astype(np.float64)
    assert pixels.shape == (SIZE, 200)
    corner = pixels[:10, :10].mean()  # air outside the neck
    mid_lung_row = pixels[int(SIZE * 0.35)]
    spine = mid_lung_row[90:110].mean()
    lungs = np.concatenate([mid_lung_row[40:70], mid_lung_row[130:160]]).mean()
    assert corner < lungs < spine


def test_a_finding_changes_only_its_own_region_of_the_same_patient() -> None:
    normal = make_cxr_pixels("normal", 5, SIZE, SIZE).astype(np.int32)
    ptx = make_cxr_pixels("pneumothorax", 5, SIZE, SIZE).astype(np.int32)
    changed = np.abs(ptx - normal) > 40
    left, right = changed[:, : SIZE // 2].sum(), changed[:, SIZE // 2 :].sum()
    # One lung collapses; the other half of the chest is untouched.
    assert max(left, right) > 500
    assert min(left, right) < 0.02 * max(left, right)
    # The collapsed lung's air space is darker than the lung it replaced.
    side = slice(0, SIZE // 2) if left > right else slice(SIZE // 2, SIZE)
    assert (ptx - normal)[:, side][changed[:, side]].mean() < 0


def test_effusion_whitens_a_lung_base_and_cardiomegaly_widens_the_heart() -> None:
    normal = make_cxr_pixels("normal", 8, SIZE, SIZE).astype(np.int32)
    effusion = make_cxr_pixels("effusion", 8, SIZE, SIZE).astype(np.int32)
    cardio = make_cxr_pixels("cardiomegaly", 8, SIZE, SIZE).astype(np.int32)
    brighter = (effusion - normal) > 200
    rows = np.nonzero(brighter.any(axis=1))[0]
    assert rows.size and rows.min() > SIZE * 0.4  # fluid sits at the base, not the apex
    heart = (cardio - normal) > 200
    columns = np.nonzero(heart.any(axis=0))[0]
    # The enlarged heart spreads into both lungs, past the midline on both sides.
    assert columns.min() < SIZE * 0.45 < SIZE * 0.55 < columns.max()


@pytest.mark.parametrize(
    ("modality", "photometric"),
    [("DX", "MONOCHROME2"), ("DX", "MONOCHROME1"), ("CR", "MONOCHROME2"), ("CR", "MONOCHROME1")],
)
def test_instances_pass_dciodvfy(tmp_path: Path, modality: str, photometric: str) -> None:
    paths = write_synthetic_study(
        tmp_path,
        "effusion",
        2,
        patient_id="DEMO0002",
        modality=modality,
        views=("PA", "LL"),
        rows=SIZE,
        cols=SIZE,
        photometric=photometric,
    )
    for path in paths:
        result = dciodvfy(path)
        assert result.errors == [], result.output


def test_study_has_one_instance_per_view_with_deterministic_uids(tmp_path: Path) -> None:
    first = write_synthetic_study(
        tmp_path / "a",
        "cardiomegaly",
        9,
        patient_id="DEMO0009",
        views=("PA", "LL"),
        rows=64,
        cols=64,
    )
    again = write_synthetic_study(
        tmp_path / "b",
        "cardiomegaly",
        9,
        patient_id="DEMO0009",
        views=("PA", "LL"),
        rows=64,
        cols=64,
    )
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in again]
    pa, lateral = (pydicom.dcmread(p) for p in first)
    assert pa.StudyInstanceUID == lateral.StudyInstanceUID
    assert pa.SOPInstanceUID != lateral.SOPInstanceUID
    assert (pa.ViewPosition, lateral.ViewPosition) == ("PA", "LL")
    assert str(pa.PatientName) == "DEMO^CARDIOMEGALY"
    assert pa.SOPClassUID == DX_IMAGE_STORAGE_FOR_PRESENTATION
    other_patient = write_synthetic_study(
        tmp_path / "c", "cardiomegaly", 9, patient_id="DEMO0010", rows=64, cols=64
    )
    assert pydicom.dcmread(other_patient[0]).StudyInstanceUID != pa.StudyInstanceUID


def test_monochrome1_dataset_stores_inverted_values() -> None:
    pixels = make_cxr_pixels("normal", 1, 64, 64)

    def dataset(modality: str, photometric: str) -> pydicom.Dataset:
        return make_cxr_dataset(
            pixels,
            patient_id="P",
            patient_name="DEMO^X",
            study_instance_uid="1.2.3.4",
            series_instance_uid="1.2.3.4.1",
            sop_instance_uid="1.2.3.4.1.1",
            accession_number="A1",
            modality=modality,
            photometric=photometric,
        )

    mono2, mono1 = dataset("DX", "MONOCHROME2"), dataset("CR", "MONOCHROME1")
    assert mono1.SOPClassUID == CR_IMAGE_STORAGE
    assert np.array_equal(mono1.pixel_array.astype(np.int32), MAX_VALUE - mono2.pixel_array)
    assert mono1.PresentationLUTShape == "INVERSE"


def test_unknown_kind_and_view_are_refused() -> None:
    with pytest.raises(ValueError, match="kind"):
        make_cxr_pixels("pneumonia", 1, 64, 64)
    with pytest.raises(ValueError, match="view"):
        make_cxr_pixels("normal", 1, 64, 64, view="OBLIQUE")
