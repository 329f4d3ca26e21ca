"""A Secondary Capture summary image, only for sites that ask for one (``summary_image: true``).

The frontal radiograph the findings came from, reduced to at most 1024 pixels, with the AI
findings burned in above it: for viewers and worklists that show neither SR nor key images. It is
flagged as burned-in annotation and, like every output, says preliminary and unverified (and DEMO
when the model is a demo).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw, ImageFont

from worker.findings import DEMO_LABEL, DecodedImage, FindingResult, ModelCard
from worker.outputs.sr import conformant_header, derive_uid

KIND = "summary-sc"
MAX_SIDE = 1024
SERIES_DESCRIPTION = "AI summary image (preliminary)"


def summary_lines(results: Sequence[FindingResult], card: ModelCard) -> list[str]:
    """The text burned into the image, first line first."""
    lines = [f"AI TRIAGE - PRELIMINARY, NOT VERIFIED - {card.name} {card.version}"]
    if card.demo:
        lines.append(DEMO_LABEL)
    for r in results:
        state = "PRESENT" if r.present else "absent"
        urgent = "  URGENT" if r.urgent else ""
        lines.append(f"{r.finding.replace('_', ' ')}: {r.probability:.2f} {state}{urgent}")
    return lines


def _render(pixels: npt.NDArray[np.float32], lines: list[str]) -> npt.NDArray[np.uint8]:
    image = Image.fromarray(np.clip(pixels * 255.0, 0, 255).astype(np.uint8), mode="L")
    scale = MAX_SIDE / max(image.size)
    if scale < 1:
        image = image.resize(
            (round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR
        )
    font = ImageFont.load_default(size=20)
    line_height = 24
    band = line_height * len(lines) + 8
    canvas = Image.new("L", (image.width, image.height + band), 0)
    canvas.paste(image, (0, band))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, 4 + i * line_height), line, fill=255, font=font)
    return np.asarray(canvas, dtype=np.uint8)


def build_summary_sc(
    source: pydicom.Dataset,
    decoded: DecodedImage,
    results: Sequence[FindingResult],
    card: ModelCard,
    findings_sr: pydicom.Dataset,
    *,
    manufacturer: str,
    series_number: int = 9004,
) -> hd.sc.SCImage:
    """The summary image of ``source`` (whose decoded frame is ``decoded``)."""
    identity = (str(findings_sr.SOPInstanceUID), KIND)
    pixels = _render(decoded.pixels, summary_lines(results, card))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=conformant_header(source),
        pixel_array=pixels,
        photometric_interpretation="MONOCHROME2",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=derive_uid(*identity, "series"),
        series_number=series_number,
        sop_instance_uid=derive_uid(*identity, "sop-instance"),
        instance_number=1,
        manufacturer=manufacturer,
        patient_orientation=("L", "F"),
        transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
    )
    sc.BurnedInAnnotation = "YES"
    # Type 2C: present and empty; the chest as a whole has no laterality.
    sc.Laterality = ""
    sc.SeriesDescription = (
        f"{DEMO_LABEL} - {SERIES_DESCRIPTION}" if card.demo else SERIES_DESCRIPTION
    )
    sc.ImageComments = " | ".join(summary_lines(results, card))[:10240]
    return sc
