"""What an image declares about its pixels, checked against the site's limits before decoding.

The listener checks it at receipt from the values its structural walk kept; the worker checks it
again from the header before any decoder sees the pixel data. Both use
``geometry_problem``.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.settings import ImageSettings

# Bits Allocated a decoder is asked to produce (PS3.5 8.1.1 and the usual 8/16-bit images).
VALID_BITS_ALLOCATED = frozenset({1, 8, 16, 32, 64})


@dataclass(frozen=True)
class Geometry:
    """The pixel description of an image as its header states it."""

    rows: int
    columns: int
    frames: int
    samples_per_pixel: int
    bits_allocated: int

    @property
    def frame_pixels(self) -> int:
        return self.rows * self.columns

    @property
    def decoded_bytes(self) -> int:
        """Bytes of the whole instance decoded (bit-packed images: rounded up per frame)."""
        bits = self.frame_pixels * self.samples_per_pixel * self.bits_allocated
        return self.frames * ((bits + 7) // 8)


def invalid_geometry(geometry: Geometry) -> str | None:
    """Why no image can have this geometry, or None when it can."""
    g = geometry
    if g.rows < 1 or g.columns < 1:
        return f"declares {g.rows} x {g.columns} pixels"
    if g.frames < 1:
        return f"declares {g.frames} frames"
    if g.samples_per_pixel not in (1, 3):
        return f"declares {g.samples_per_pixel} samples per pixel (1 or 3 are images)"
    if g.bits_allocated not in VALID_BITS_ALLOCATED:
        return f"declares {g.bits_allocated} bits allocated"
    return None


def declared_size_problem(geometry: Geometry, limits: ImageSettings) -> str | None:
    """Why an image of this (valid) geometry must not be decoded here, or None when it may be."""
    g = geometry
    if g.frame_pixels > limits.max_frame_pixels:
        return (
            f"declares {g.rows} x {g.columns} pixels per frame ({g.frame_pixels:,}), above "
            f"images.max_frame_pixels ({limits.max_frame_pixels:,})"
        )
    if g.decoded_bytes > limits.max_decoded_bytes:
        return (
            f"declares {g.decoded_bytes:,} bytes of pixels decoded ({g.frames} frame(s) of "
            f"{g.rows} x {g.columns} x {g.samples_per_pixel} x {g.bits_allocated} bits), above "
            f"images.max_decoded_bytes ({limits.max_decoded_bytes:,})"
        )
    return None


@dataclass(frozen=True)
class GeometryProblem:
    """Why an image is not to be decoded: no image has its geometry, or it is above the limits."""

    reason: str
    too_large: bool


def geometry_problem(geometry: Geometry, limits: ImageSettings) -> GeometryProblem | None:
    """``invalid_geometry``, then ``declared_size_problem``, as one verdict (None: decode it)."""
    invalid = invalid_geometry(geometry)
    if invalid is not None:
        return GeometryProblem(f"the image {invalid}", too_large=False)
    above = declared_size_problem(geometry, limits)
    if above is not None:
        return GeometryProblem(f"the image {above}", too_large=True)
    return None
