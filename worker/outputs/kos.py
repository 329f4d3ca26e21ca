"""Key Object Selection: the images with a present finding, flagged for viewers that ignore SR.

Many viewers and PACS worklists never render an SR but do show key images. One KOS (TID 2010,
title "Of Interest" from CID 7010) per study and model lists the images whose score made a
finding present, urgent ones first, with a Key Object Description that says which findings, that
the result is an unverified AI draft, and DEMO where it applies. It is made only when a destination
asks for it (``DestinationSettings.kos``) and only when there is something to point at.

Its UID follows from the findings SR's, so it is replaced and amended together with it. The Key
Object Document module has no Predecessor Documents Sequence: an amended KOS is a new object, and
the index records which one it replaces.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes as dicom_codes

from worker.findings import DEMO_LABEL, FindingResult, ModelCard
from worker.outputs.sr import (
    algorithm_equipment,
    algorithm_observer,
    conformant_header,
    derive_uid,
)

KIND = "kos"
SERIES_DESCRIPTION = "AI key images"
# CID 7010 "Key Object Selection Document Title": 113000 "Of Interest".
TITLE = dicom_codes.DCM.OfInterest


class KeyObjectError(ValueError):
    """There is nothing for a Key Object Selection to point at."""


def key_images(
    sources: Sequence[pydicom.Dataset], results: Sequence[FindingResult]
) -> list[pydicom.Dataset]:
    """The source images behind a present finding: urgent findings' images first, then by study order."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    present = sorted((r for r in results if r.present), key=lambda r: not r.urgent)
    chosen: dict[str, pydicom.Dataset] = {}
    for result in present:
        for uid in result.source_sop_instance_uids:
            if uid in by_uid:
                chosen.setdefault(uid, by_uid[uid])
    return list(chosen.values())


def describe(results: Sequence[FindingResult], card: ModelCard) -> str:
    """The Key Object Description a viewer shows beside the key images."""
    present = sorted((r for r in results if r.present), key=lambda r: not r.urgent)
    names = ", ".join(
        f"{r.finding.replace('_', ' ')}{' (URGENT)' if r.urgent else ''} {r.probability:.0%}"
        for r in present
    )
    text = (
        f"AI triage ({card.name} {card.version}): {names}. "
        "Preliminary, unverified AI result; see the AI findings SR and draft report."
    )
    return f"{DEMO_LABEL}: {text}" if card.demo else text


def build_key_object_selection(
    sources: Sequence[pydicom.Dataset],
    results: Sequence[FindingResult],
    card: ModelCard,
    findings_sr: pydicom.Dataset,
    *,
    manufacturer: str,
    institution_name: str | None = None,
    series_number: int = 9003,
) -> hd.ko.KeyObjectSelectionDocument:
    """The KOS of a study's key images (see the module docstring).

    Raises :class:`KeyObjectError` when no finding is present (a KOS must select something).
    """
    images = key_images(sources, results)
    if not images:
        raise KeyObjectError("no finding is present: there are no key images")
    identity = (str(findings_sr.SOPInstanceUID), KIND)
    content = hd.ko.KeyObjectSelection(
        document_title=TITLE,
        referenced_objects=images,
        observer_device_context=algorithm_observer(card),
        description=describe(results, card),
    )
    description = f"{DEMO_LABEL} - {SERIES_DESCRIPTION}" if card.demo else SERIES_DESCRIPTION
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=[conformant_header(ds) for ds in images],
        content=content,
        series_instance_uid=derive_uid(*identity, "series"),
        series_number=series_number,
        sop_instance_uid=derive_uid(*identity, "sop-instance"),
        instance_number=1,
        manufacturer=manufacturer,
        institution_name=institution_name,
        series_description=description,
        contributing_equipment=[algorithm_equipment(card)],
    )
    return kos
