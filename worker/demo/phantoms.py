"""Synthetic chest X-ray phantoms and the DICOM instances that carry them.

The phantoms are drawn from a few analytic shapes (body, lungs, heart, ribs, diaphragm) in
normalised image coordinates, so one seed gives the same "patient" at any matrix size. The anatomy
depends on the seed only and the finding on (seed, kind): ``normal`` and ``pneumothorax`` with the
same seed differ only where the lung has collapsed, which makes prior/current pairs easy to build.

Everything here is made up; the patient names say DEMO and nothing is a real person.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian, generate_uid

KINDS: tuple[str, ...] = ("normal", "pneumothorax", "effusion", "cardiomegaly")
"""Phantom kinds, in a fixed order (their index seeds the finding's random draws)."""

DX_IMAGE_STORAGE_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"

BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1
# Width of the simulated detector: 43 cm, the usual chest cassette.
DETECTOR_WIDTH_MM = 430.0

# Normal cardiothoracic ratio (heart width / thorax width) and the cardiomegaly range; the gap
# between them keeps the demo labels unambiguous.
NORMAL_CTR = (0.38, 0.47)
CARDIOMEGALY_CTR = (0.57, 0.68)

# Float arrays; the phantoms compute in float32 but numpy promotes freely.
F32 = npt.NDArray[np.floating[Any]]


def _sig(x: F32) -> F32:
    """Logistic step, used for every soft edge (X-ray edges are never pixel-sharp)."""
    y = np.multiply(x, 0.5, dtype=np.float32)
    np.tanh(y, out=y)
    y *= 0.5
    y += 0.5
    return y


def _interp_matrix(n_out: int, n_in: int, *, wrap: bool = False) -> F32:
    """Smooth (smoothstep) interpolation from `n_in` samples to `n_out` as a matrix product."""
    span = n_in if wrap else n_in - 1
    pos = (np.arange(n_out, dtype=np.float64) + 0.5) / n_out * span
    i0 = np.floor(pos).astype(np.intp)
    f = pos - i0
    f = f * f * (3.0 - 2.0 * f)
    i1 = (i0 + 1) % n_in if wrap else np.minimum(i0 + 1, n_in - 1)
    i0 = i0 % n_in if wrap else np.minimum(i0, n_in - 1)
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    matrix[rows, i0] = 1.0 - f
    matrix[rows, i1] += f  # i1 == i0 at a clamped end: the weights still sum to one
    return matrix


def _upsample(grid: F32, rows: int, cols: int, *, wrap_cols: bool = False) -> F32:
    """Smooth noise: a coarse random grid interpolated up to rows x cols (separable, fast)."""
    left = _interp_matrix(rows, grid.shape[0])
    right = _interp_matrix(cols, grid.shape[1], wrap=wrap_cols).T
    # Multiply in the cheaper order; the result is the same.
    if rows * grid.shape[1] > grid.shape[0] * cols:
        return (left @ (grid @ right)).astype(np.float32)
    return ((left @ grid) @ right).astype(np.float32)


@dataclass(frozen=True)
class _Lung:
    """One lung field; `s` is the distance from the midline, positive towards the chest wall."""

    direction: float  # -1: patient's right lung (image left in a PA view), +1: patient's left
    medial: float  # mediastinal border
    lateral: float  # inner chest wall at the base
    apex: float  # v of the apex
    costophrenic: float  # v of the costophrenic angle (lowest point of the lung)
    dome: float  # height of the hemidiaphragm dome above the costophrenic angle
    hilum_v: float

    def diaphragm(self, s: F32) -> F32:
        """v of the hemidiaphragm: highest mid-lung, lowest at the costophrenic angle."""
        centre = 0.5 * (self.medial + self.lateral)
        half = self.lateral - centre
        dome = np.clip(1.0 - ((s - centre) / half) ** 2, 0.0, 1.0)
        return (self.costophrenic - self.dome * dome).astype(np.float32)

    def margin(self, s: F32, v: F32) -> F32:
        """Approximate signed distance to the lung border (positive inside), without the heart."""
        t = np.clip((v - self.apex) / (self.costophrenic - self.apex), 0.0, 1.0)
        lateral_edge = self.medial + (self.lateral - self.medial) * np.sqrt(t) * (1.0 - 0.06 * t)
        return np.minimum(
            np.minimum(lateral_edge - s, s - self.medial),
            np.minimum(v - self.apex, self.diaphragm(s) - v),
        ).astype(np.float32)


# Lung markings live on a polar grid around each hilum: radius up to _POLAR_R_MAX.
_POLAR_R_MAX = 0.6


def _polar_shape(rows: int, cols: int) -> tuple[int, int]:
    """Polar texture resolution: just fine enough for the output matrix."""
    return int(np.clip(rows // 5, 48, 192)), int(np.clip(cols * 3 // 2, 384, 1536))


@dataclass(frozen=True)
class _Anatomy:
    cx: float
    half_thorax: float
    lungs: tuple[_Lung, _Lung]
    heart_ctr: float
    heart_half_height: float
    aortic_knob: float
    mediastinum: float
    gastric_bubble: bool
    rib_offset: float
    rib_gap: float
    vessel_seeds: tuple[F32, F32, F32, F32]
    mottle: F32
    offset: float
    gain: float
    noise: float


def _draw_anatomy(seed: int) -> _Anatomy:
    """The 'patient': everything that does not depend on the finding."""
    rng = np.random.default_rng([seed, 0x0C4])
    cx = 0.5 + rng.normal(0.0, 0.015)
    half_thorax = rng.uniform(0.35, 0.41)
    mediastinum = rng.uniform(0.045, 0.065)
    apex = rng.uniform(0.11, 0.17)
    costophrenic = rng.uniform(0.71, 0.79)
    lungs = []
    for direction in (-1.0, 1.0):
        # The right hemidiaphragm usually sits a little higher than the left (the liver).
        cp = costophrenic - (0.015 if direction < 0 else 0.0) + rng.normal(0.0, 0.008)
        lungs.append(
            _Lung(
                direction=direction,
                medial=mediastinum + rng.uniform(-0.005, 0.01),
                lateral=half_thorax + rng.normal(0.0, 0.008),
                apex=apex + rng.normal(0.0, 0.008),
                costophrenic=cp,
                dome=rng.uniform(0.035, 0.065),
                hilum_v=rng.uniform(0.38, 0.45),
            )
        )
    seeds = [
        rng.normal(0.0, 1.0, size=shape).astype(np.float32)
        for shape in ((8, 70), (20, 320), (8, 70), (20, 320))
    ]
    return _Anatomy(
        cx=cx,
        half_thorax=half_thorax,
        lungs=(lungs[0], lungs[1]),
        heart_ctr=rng.uniform(*NORMAL_CTR),
        heart_half_height=rng.uniform(0.1, 0.12),
        aortic_knob=rng.uniform(0.025, 0.04),
        mediastinum=mediastinum,
        gastric_bubble=bool(rng.random() < 0.7),
        rib_offset=rng.uniform(-0.01, 0.01),
        rib_gap=rng.uniform(0.058, 0.068),
        vessel_seeds=(seeds[0], seeds[1], seeds[2], seeds[3]),
        mottle=rng.normal(0.0, 1.0, size=(40, 40)).astype(np.float32),
        offset=rng.uniform(80.0, 260.0),
        gain=rng.uniform(2900.0, 3500.0),
        noise=rng.uniform(8.0, 22.0),
    )


def _marking_texture(coarse: F32, fine: F32, shape: tuple[int, int]) -> F32:
    """Lung markings in (radius, angle) space around a hilum.

    Zero crossings of noise that varies slowly along the radius are long wiggly radial lines
    that branch and merge, which is how vessels look on a radiograph; they thin and fade out
    towards the periphery.
    """
    radius = (np.arange(shape[0], dtype=np.float32) + 0.5) / shape[0] * _POLAR_R_MAX
    width = (0.07 + 0.3 * np.exp(-radius / 0.12))[:, None]
    start = np.clip(radius / 0.05, 0.0, 1.0)
    weight = (start**2 * np.exp(-radius / 0.35) * (1.0 + 1.2 * np.exp(-radius / 0.1)))[:, None]
    # The hilum itself: a bright knot of vessels and nodes, not a point where lines converge.
    hilum = (0.9 * np.exp(-((radius / 0.04) ** 2)))[:, None]
    big = _upsample(coarse, *shape, wrap_cols=True)
    small = _upsample(fine, *shape, wrap_cols=True)
    ridges = np.exp(-((big / width) ** 2)) + 0.4 * np.exp(-((small / (0.6 * width)) ** 2))
    return (ridges * weight + hilum).astype(np.float32)


def _markings(lung: _Lung, texture: F32, s: F32, v: F32) -> F32:
    """Look the marking texture up at image points given in lung coordinates."""
    ds = s - (lung.medial + 0.035)
    dv = v - lung.hilum_v
    r = np.sqrt(ds * ds + dv * dv)
    theta = np.arctan2(dv, ds) * np.float32(1.0 / (2.0 * np.pi))
    n_r, n_theta = texture.shape
    ri = np.minimum(r * (n_r / _POLAR_R_MAX), n_r - 1).astype(np.intp)
    ti = (np.mod(theta, 1.0) * n_theta).astype(np.intp) % n_theta
    return texture[ri, ti]


def _span(low: float, high: float, n: int) -> slice:
    """Pixel indices whose centres fall in [low, high] of the normalised axis."""
    return slice(max(int(np.floor(low * n)), 0), min(int(np.ceil(high * n)), n))


def _frontal(an: _Anatomy, kind: str, seed: int, rows: int, cols: int) -> F32:
    """Attenuation map of a PA/AP chest radiograph, roughly in [0, 1] (bright = dense)."""
    rng = np.random.default_rng([seed, 0xF1D, KINDS.index(kind)])
    # The finding's draws, always in the same order whatever the kind.
    ptx_side = int(rng.integers(0, 2))
    ptx_k = (rng.uniform(0.55, 0.8), rng.uniform(0.68, 0.88))
    eff_sides = {int(rng.integers(0, 2))}
    if rng.random() < 0.25:
        eff_sides = {0, 1}
    eff_depth = (rng.uniform(0.09, 0.2), rng.uniform(0.09, 0.2))
    eff_meniscus = (rng.uniform(0.03, 0.08), rng.uniform(0.03, 0.08))
    big_ctr = rng.uniform(*CARDIOMEGALY_CTR)

    vv = (np.arange(rows, dtype=np.float32) + 0.5) / rows
    uu = (np.arange(cols, dtype=np.float32) + 0.5) / cols
    # A column and a row: products broadcast to the full matrix only where they need to.
    v = vv[:, None]
    x = (uu - an.cx)[None, :]
    edge = 0.005

    # Soft tissue: the chord through an elliptic trunk, narrowing at the neck.
    shoulders = np.clip((vv - 0.02) / 0.2, 0.0, 1.0)
    body_half = 0.1 + (an.half_thorax + 0.085 - 0.1) * (3 * shoulders**2 - 2 * shoulders**3)
    chord = np.clip(1.0 - (x / body_half[:, None]) ** 2, 0.0, 1.0)
    body = chord**0.35
    atten = 0.55 * body

    # Heart: an ellipse, a third of it right of the midline, resting on the diaphragm.
    ctr = big_ctr if kind == "cardiomegaly" else an.heart_ctr
    heart_hh = an.heart_half_height * (1.0 + 0.8 * max(ctr - 0.45, 0.0))
    heart_a = ctr * an.half_thorax
    heart_cx = 0.3 * heart_a
    floor_v = 0.5 * (an.lungs[0].costophrenic + an.lungs[1].costophrenic) - 0.045
    heart_v = floor_v - 0.65 * heart_hh
    heart_r = np.sqrt(((x - heart_cx) / heart_a) ** 2 + ((v - heart_v) / heart_hh) ** 2)
    heart_out = (heart_r - 1.0) * min(heart_a, heart_hh)
    heart = _sig(-heart_out / edge)

    polar = _polar_shape(rows, cols)
    lungs = np.zeros((rows, cols), dtype=np.float32)
    markings = np.zeros((rows, cols), dtype=np.float32)
    below = np.zeros((rows, cols), dtype=np.float32)
    for index, lung in enumerate(an.lungs):
        texture = _marking_texture(
            an.vessel_seeds[2 * index], an.vessel_seeds[2 * index + 1], polar
        )
        lo, hi = (
            (an.cx - lung.lateral - 0.04, an.cx)
            if index == 0
            else (an.cx, an.cx + lung.lateral + 0.04)
        )
        cs = _span(lo, hi, cols)
        # The abdomen below this hemidiaphragm, down to the bottom of the image.
        s_col = x[:, cs] * lung.direction
        below[:, cs] = np.maximum(
            below[:, cs], _sig((v - lung.diaphragm(s_col)) / edge) * (s_col > 0.0)
        )
        rs = _span(lung.apex - 0.02, lung.costophrenic + 0.02, rows)
        s, vb = s_col, v[rs]
        margin = np.minimum(lung.margin(s, vb), heart_out[rs, cs])
        mask = _sig(margin / edge)
        # Lungs are thicker centrally, so the periphery is less lucent.
        depth = np.sqrt(np.clip(margin / 0.06, 0.0, 1.0))
        field = -0.34 * mask * (0.65 + 0.35 * depth)
        vessels = _markings(lung, texture, s, vb)

        if kind == "pneumothorax" and index == ptx_side:
            # The lung shrinks towards its medial base; air fills the apex and the chest wall
            # side, and the markings stop at the visceral pleural line.
            kh, kv = ptx_k
            fs, fv = lung.medial + 0.02, lung.costophrenic
            s_c = fs + (s - fs) / kh
            v_c = fv + (vb - fv) / kv
            margin_c = np.minimum(lung.margin(s_c, v_c) * min(kh, kv), heart_out[rs, cs])
            collapsed = _sig(margin_c / 0.0025)
            vessels = _markings(lung, texture, s_c, v_c) * collapsed
            field += -0.08 * mask * (1.0 - collapsed) + 0.03 * mask * collapsed
            line = np.exp(-((margin_c / 0.0022) ** 2)) * _sig((margin - 0.006) / 0.002)
            field += 0.16 * line

        if kind == "effusion" and index in eff_sides:
            # Fluid layers at the base with a meniscus climbing the lateral chest wall.
            t = np.clip((s - lung.medial) / (lung.lateral - lung.medial), 0.0, 1.0)
            level = lung.costophrenic - lung.dome - eff_depth[index] - eff_meniscus[index] * t**2
            fluid = _sig((vb - level) / 0.012)
            field += 0.36 * fluid * mask
            vessels = vessels * (1.0 - fluid)

        lungs[rs, cs] += field
        markings[rs, cs] += vessels * mask

    mottle = _upsample(an.mottle, rows, cols)
    atten += lungs * (1.0 + 0.06 * mottle) + 0.13 * markings

    # Mediastinum, aortic knob, spine and the air column of the trachea.
    mediastinum = _sig((an.mediastinum + 0.01 - np.abs(x)) / edge) * _sig((v - 0.05) / 0.01)
    knob_r = np.sqrt((x - an.mediastinum) ** 2 + (v - 0.3) ** 2)
    knob = _sig((an.aortic_knob - knob_r) / edge)
    atten += np.maximum(0.1 * np.maximum(mediastinum, knob), 0.12 * heart)
    spine = _sig((0.032 - np.abs(x)) / 0.004)
    vertebra = 0.5 + 0.5 * np.cos(2 * np.pi * (v - an.rib_offset) / 0.045)
    atten += spine * (0.09 + 0.04 * vertebra)
    trachea = _sig((0.011 - np.abs(x - 0.003)) / 0.003) * _sig((0.33 - v) / 0.01)
    atten -= 0.09 * trachea

    # Ribs: posterior arcs dropping towards the chest wall, fainter anterior ones rising
    # laterally, and the clavicles.
    s_abs = np.abs(x) / an.half_thorax
    in_thorax = _sig((1.06 - s_abs) / 0.01) * (np.abs(x) > 0.03)
    top = an.lungs[0].apex - 0.03 - an.rib_offset
    phase = (v - top - 0.01 * s_abs - 0.15 * s_abs**2) / an.rib_gap
    distance = np.abs(phase - np.round(phase)) * an.rib_gap
    # Below the domes the ribs vanish into the dense upper abdomen.
    floor = _sig((an.lungs[0].costophrenic + 0.02 - v) / 0.02)
    in_range = in_thorax * (phase > -0.5) * (phase < 9.5) * floor
    atten += in_range * (
        0.06 * _sig((0.011 - distance) / 0.0025)
        + 0.03 * np.exp(-(((distance - 0.011) / 0.002) ** 2))
    )
    phase_a = (v - top - 0.1 + 0.12 * s_abs**2) / (an.rib_gap * 1.1)
    distance_a = np.abs(phase_a - np.round(phase_a)) * an.rib_gap * 1.1
    atten += (
        0.025
        * _sig((0.009 - distance_a) / 0.003)
        * in_thorax
        * floor
        * (phase_a > 0.5)
        * (phase_a < 5.5)
    )
    clavicle_v = an.lungs[0].apex + 0.03 - 0.25 * (np.abs(x) - 0.05)
    clavicle = _sig((0.013 - np.abs(v - clavicle_v)) / 0.003) * (np.abs(x) > 0.04)
    atten += 0.1 * clavicle * _sig((0.3 - np.abs(x)) / 0.01)

    # Liver and spleen below the diaphragm; the stomach's gas bubble under the left dome.
    atten += 0.12 * below * body
    if an.gastric_bubble:
        bubble_v = an.lungs[1].costophrenic + 0.015
        bubble_r = np.sqrt(((x - 0.17) / 1.4) ** 2 + (v - bubble_v) ** 2)
        atten -= 0.12 * _sig((0.035 - bubble_r) / 0.004) * below
    # Film-like response: dense regions saturate, so bone shows best over the lungs.
    atten = np.maximum(atten, 0.0)
    return ((1.0 - np.exp(-2.0 * atten)) / (1.0 - np.exp(-2.0))).astype(np.float32)


def _lateral(an: _Anatomy, kind: str, seed: int, rows: int, cols: int) -> F32:
    """Attenuation map of a left lateral view: anterior to the image left, spine to the right."""
    rng = np.random.default_rng([seed, 0x1A7, KINDS.index(kind)])
    apex_cap = rng.uniform(0.06, 0.12)
    fluid_level = rng.uniform(0.08, 0.16)
    big_ctr = rng.uniform(*CARDIOMEGALY_CTR)
    vv = (np.arange(rows, dtype=np.float32) + 0.5) / rows
    uu = (np.arange(cols, dtype=np.float32) + 0.5) / cols
    v = vv[:, None]
    u = uu[None, :]
    edge = 0.005
    chord = np.clip(1.0 - ((u - 0.5) / 0.37) ** 2, 0.0, 1.0)
    body = chord**0.35 * _sig((v - 0.03) / 0.01)
    atten = 0.55 * body
    apex = an.lungs[0].apex
    base = 0.5 * (an.lungs[0].costophrenic + an.lungs[1].costophrenic)
    # One projected lung field: rounded apex, diaphragm lowest in the posterior sulcus.
    t = np.clip((v - apex) / (base - apex), 0.0, 1.0)
    front = 0.5 - 0.27 * np.sqrt(t)
    back = 0.5 + 0.27 * np.sqrt(t)
    dome = np.clip(1.0 - ((u - 0.45) / 0.3) ** 2, 0.0, 1.0)
    diaphragm = base - 0.06 * dome + 0.03 * (u - 0.5)
    margin = np.minimum(np.minimum(u - front, back - u), np.minimum(v - apex, diaphragm - v))
    ctr = big_ctr if kind == "cardiomegaly" else an.heart_ctr
    heart_a = 0.1 + 0.4 * (ctr - 0.4)
    heart_r = np.sqrt(((u - 0.28 - heart_a * 0.6) / heart_a) ** 2 + ((v - base + 0.1) / 0.13) ** 2)
    heart = _sig((1.0 - heart_r) * 0.1 / edge)
    lung = _sig(margin / edge) * (1.0 - 0.7 * heart)
    texture = _marking_texture(an.vessel_seeds[0], an.vessel_seeds[1], _polar_shape(rows, cols))
    vessels = _markings(an.lungs[0], texture, (u - 0.45).astype(np.float32), v)
    if kind == "pneumothorax":
        # Seen from the side the collapse is subtle: an apical cap without markings.
        cap = _sig((apex + apex_cap - v) / 0.01)
        vessels = vessels * (1.0 - cap)
        lung = lung * (1.0 + 0.2 * cap)
    atten += -0.34 * lung + 0.12 * vessels * lung + 0.12 * heart * body
    if kind == "effusion":
        level = base - fluid_level - 0.1 * np.clip(u - 0.5, 0.0, 1.0)
        fluid = _sig((v - level) / 0.012) * _sig((u - 0.5) / 0.03)
        atten += 0.34 * fluid * lung
    spine = _sig((0.045 - np.abs(u - 0.77)) / 0.004) * _sig((v - 0.05) / 0.01)
    vertebra = 0.5 + 0.5 * np.cos(2 * np.pi * v / 0.05)
    atten += spine * (0.12 + 0.08 * vertebra)
    sternum = _sig((0.012 - np.abs(u - (0.17 + 0.04 * v))) / 0.003) * (v > 0.15) * (v < 0.6)
    atten += 0.1 * sternum
    atten = np.maximum(atten, 0.0)
    return ((1.0 - np.exp(-2.0 * atten)) / (1.0 - np.exp(-2.0))).astype(np.float32)


def make_cxr_pixels(
    kind: str, seed: int, rows: int = 1024, cols: int = 1024, *, view: str = "PA"
) -> npt.NDArray[np.uint16]:
    """A synthetic chest radiograph: 12-bit values, bright = dense (MONOCHROME2).

    `kind` is one of KINDS; `view` is "PA" or "AP" (frontal) or "LL" (left lateral). The result
    depends on (kind, seed, rows, cols, view) only.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; expected one of {', '.join(KINDS)}")
    if rows < 16 or cols < 16:
        raise ValueError(f"phantom matrix {rows}x{cols} is too small")
    anatomy = _draw_anatomy(seed)
    if view in ("PA", "AP"):
        atten = _frontal(anatomy, kind, seed, rows, cols)
    elif view == "LL":
        atten = _lateral(anatomy, kind, seed, rows, cols)
    else:
        raise ValueError(f"unsupported view {view!r}; expected PA, AP or LL")
    # Noise depends on the seed, not the kind: a normal and an abnormal phantom of one seed
    # differ only where the finding is.
    noise_rng = np.random.default_rng([seed, 0x401, rows, cols])
    # Quantum noise grows with the detected signal, i.e. where the image is dark; a per-pixel
    # sigma also keeps it visible at any matrix size.
    sigma = anatomy.noise * (1.3 - 0.6 * np.clip(atten, 0.0, 1.0))
    values = anatomy.offset + anatomy.gain * atten
    values += noise_rng.standard_normal(atten.shape, dtype=np.float32) * sigma
    return np.clip(np.rint(values), 0, MAX_VALUE).astype(np.uint16)


def _window(pixels: npt.NDArray[np.uint16]) -> tuple[int, int]:
    """Window centre and width covering the body: 1st to 99.8th percentile."""
    low, high = np.percentile(pixels, [1.0, 99.8])
    width = max(round(float(high - low)), 2)
    return round(float(low + high) / 2), width


def make_cxr_dataset(
    pixels: npt.NDArray[np.uint16],
    *,
    patient_id: str,
    patient_name: str,
    study_instance_uid: str,
    series_instance_uid: str,
    sop_instance_uid: str,
    accession_number: str,
    modality: str = "DX",
    view_position: str = "PA",
    study_date: date | None = None,
    photometric: str = "MONOCHROME2",
    instance_number: int = 1,
    series_number: int = 1,
    description: str = "DEMO chest radiograph (synthetic)",
    manufacturer: str = "pacs-ai-worker demo phantom",
) -> Dataset:
    """A DX (For Presentation) or CR Image Storage instance holding `pixels` (MONOCHROME2 sense).

    With ``photometric="MONOCHROME1"`` the stored values and the window are inverted, so the
    displayed image is the same. `study_date` None means today.
    """
    if pixels.ndim != 2 or pixels.dtype != np.uint16:
        raise ValueError("pixels must be a 2-D uint16 array")
    if int(pixels.max(initial=0)) > MAX_VALUE:
        raise ValueError(f"pixels exceed {BITS_STORED} bits")
    if modality not in ("DX", "CR"):
        raise ValueError(f"modality must be DX or CR, not {modality!r}")
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise ValueError(f"photometric must be MONOCHROME1 or MONOCHROME2, not {photometric!r}")
    if view_position not in ("PA", "AP", "LL", "RL"):
        raise ValueError(f"unsupported view position {view_position!r}")
    rows, cols = pixels.shape
    sop_class = DX_IMAGE_STORAGE_FOR_PRESENTATION if modality == "DX" else CR_IMAGE_STORAGE
    when = datetime.combine(study_date or date.today(), datetime.min.time()) + timedelta(
        hours=9, minutes=30
    )
    da, tm = when.strftime("%Y%m%d"), when.strftime("%H%M%S")
    center, width = _window(pixels)
    stored = pixels
    if photometric == "MONOCHROME1":
        stored = (MAX_VALUE - pixels.astype(np.int32)).astype(np.uint16)
        # The window is defined on stored values; mirror it so the displayed image is unchanged
        # (PS3.3 C.11.2.1.2: the linear window's centre carries a half-value offset).
        center = MAX_VALUE - center + 1

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PACS_AI_DEMO"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance_uid
    # Patient
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    # General Study
    ds.StudyInstanceUID = study_instance_uid
    ds.StudyDate = da
    ds.StudyTime = tm
    ds.ReferringPhysicianName = ""
    ds.StudyID = accession_number[:16]
    ds.AccessionNumber = accession_number
    ds.StudyDescription = "DEMO chest X-ray"
    # General Series (+ DX Series / CR Series)
    ds.Modality = modality
    ds.SeriesInstanceUID = series_instance_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = description
    ds.SeriesDate = da
    ds.SeriesTime = tm
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view_position
    if modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    # General Equipment
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = "synthetic chest phantom"
    ds.SoftwareVersions = "1"
    ds.InstitutionName = "DEMO"
    # General Image / General Acquisition
    ds.InstanceNumber = instance_number
    ds.ContentDate = da
    ds.ContentTime = tm
    ds.AcquisitionDate = da
    ds.AcquisitionTime = tm
    lateral = view_position in ("LL", "RL")
    ds.PatientOrientation = ["P", "F"] if lateral else ["L", "F"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageLaterality = "U"  # the thorax is an unpaired body part
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    spacing = round(DETECTOR_WIDTH_MM / cols, 4)
    ds.ImagerPixelSpacing = [spacing, spacing]
    # Modality LUT and VOI LUT
    ds.RescaleIntercept = 0
    ds.RescaleSlope = 1
    ds.RescaleType = "US"
    ds.WindowCenter = center
    ds.WindowWidth = width
    ds.WindowCenterWidthExplanation = "DEMO body window"
    ds.VOILUTFunction = "LINEAR"
    if modality == "DX":
        # DX Image: a log-exposure image; MONOCHROME1 stores it the other way round.
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME2" else 1
        # DX Detector
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelSpacing = [spacing, spacing]
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        ds.PixelSpacingCalibrationDescription = "DEMO: detector plane"
        # DX Anatomy Imaged
        anatomy_item = Dataset()
        anatomy_item.CodeValue = "43799004"
        anatomy_item.CodingSchemeDesignator = "SCT"
        anatomy_item.CodeMeaning = "Chest"
        ds.AnatomicRegionSequence = DicomSequence([anatomy_item])
        # DX Positioning: the view as a code too
        view_item = Dataset()
        view_codes = {
            "PA": ("399348003", "postero-anterior"),
            "AP": ("399182006", "antero-posterior"),
            "LL": ("399173006", "left lateral"),
            "RL": ("399198007", "right lateral"),
        }
        view_item.CodeValue, view_item.CodeMeaning = view_codes[view_position]
        view_item.CodingSchemeDesignator = "SCT"
        view_item.ViewModifierCodeSequence = DicomSequence()
        ds.ViewCodeSequence = DicomSequence([view_item])
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = DicomSequence()
    else:
        ds.PixelSpacing = [spacing, spacing]
        ds.PixelSpacingCalibrationType = "GEOMETRY"
        ds.PixelSpacingCalibrationDescription = "DEMO: detector plane"
    # Presentation LUT: MONOCHROME1 is displayed inverted (PS3.3 C.8.11.6.1.2 / C.8.11.3.1.2).
    ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
    ds.PixelData = np.ascontiguousarray(stored).astype("<u2").tobytes()
    return ds


def _seed_date(seed: int) -> date:
    """A fixed study date per seed, so written studies are byte-for-byte reproducible."""
    return date(2024, 1, 1) + timedelta(days=seed % 366)


def write_synthetic_study(
    folder: Path,
    kind: str,
    seed: int,
    *,
    patient_id: str,
    modality: str = "DX",
    views: Sequence[str] = ("PA",),
    rows: int = 1024,
    cols: int = 1024,
    study_date: date | None = None,
    photometric: str = "MONOCHROME2",
) -> list[Path]:
    """Write one synthetic study (one instance per view) under `folder`; returns the file paths.

    UIDs derive from (kind, seed, patient_id), so the same call writes the same study again.
    `study_date` None gives a date fixed by the seed.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown phantom kind {kind!r}; expected one of {', '.join(KINDS)}")
    if not views or len(set(views)) != len(views):
        raise ValueError("views must name each view once")
    key = ["pacs-ai-demo", kind, str(seed), patient_id]
    study_uid = generate_uid(entropy_srcs=[*key, "study"])
    digest = hashlib.sha256("/".join(key).encode()).hexdigest()
    accession = "DEMO" + str(int(digest[:12], 16))[:12]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, view in enumerate(views, start=1):
        pixels = make_cxr_pixels(kind, seed, rows, cols, view=view)
        ds = make_cxr_dataset(
            pixels,
            patient_id=patient_id,
            patient_name=f"DEMO^{kind.upper()}",
            study_instance_uid=study_uid,
            series_instance_uid=generate_uid(entropy_srcs=[*key, "series", view]),
            sop_instance_uid=generate_uid(entropy_srcs=[*key, "instance", view]),
            accession_number=accession,
            modality=modality,
            view_position=view,
            study_date=study_date or _seed_date(seed),
            photometric=photometric,
            instance_number=1,
            series_number=number,
            description=f"DEMO chest {view} (synthetic)",
        )
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
