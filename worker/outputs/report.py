"""The narrative report: an Enhanced SR (text, after TID 2000) flagged as an AI draft.

Findings, impression and comparison sections are assembled from the standardised sentences in
``templates/report/cxr.yaml``. The document is PRELIMINARY, PARTIAL and UNVERIFIED, says so in its
first sentence, and lists the findings SR it was written from in its evidence, so a viewer can
follow the link. A draft written after a late image names the draft it amends as its predecessor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import yaml
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.coding import Code

from worker.findings import DEMO_LABEL, FindingResult, ModelCard
from worker.outputs.sr import conformant_header, derive_uid
from worker.templates import templates_dir

SERIES_DESCRIPTION = "AI draft report (preliminary)"
# The output kind in the index, and part of every UID derived for this document.
KIND = "report-sr"
# LOINC 18748-4 "Diagnostic imaging report": the document title of TID 2000.
TITLE = Code("18748-4", "LN", "Diagnostic imaging report")
FINDINGS = Code("121070", "DCM", "Findings")
IMPRESSION = Code("121072", "DCM", "Impressions")
COMPARISON = Code("18834-2", "LN", "Radiology Comparison study")
FINDING = Code("121071", "DCM", "Finding")
IMPRESSION_ITEM = Code("121073", "DCM", "Impression")


class ReportTemplateError(ValueError):
    """``templates/report/cxr.yaml`` is missing a sentence the report needs."""


@dataclass(frozen=True)
class Narrative:
    """The report's text, section by section (what the SR holds and what a VLM would replace)."""

    notices: tuple[str, ...]
    findings: tuple[str, ...]
    impression: str
    comparison: str


@lru_cache(maxsize=8)
def _sentences(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ReportTemplateError(f"{path}: expected a mapping")
    return data


def write_narrative(
    results: Sequence[FindingResult], card: ModelCard, template: Path | None = None
) -> Narrative:
    """Turn the findings into standardised sentences."""
    t = _sentences(template or templates_dir() / "report" / "cxr.yaml")
    try:
        lines = []
        present = []
        for result in results:
            name = result.finding.replace("_", " ")
            entry = t["findings"].get(result.finding, t["default"])
            sentence = entry["present" if result.present else "absent"]
            lines.append(sentence.format(probability=result.probability, name=name))
            if result.present:
                present.append(name)
        if any(r.urgent for r in results):
            impression = t["impression"]["urgent"].format(findings=", ".join(present).capitalize())
        elif present:
            impression = t["impression"]["abnormal"].format(
                findings=", ".join(present).capitalize()
            )
        else:
            impression = t["impression"]["normal"]
        notices = [t["draft_notice"]] + ([t["demo_notice"]] if card.demo else [])
        return Narrative(tuple(notices), tuple(lines), impression, t["comparison"]["none"])
    except KeyError as exc:
        raise ReportTemplateError(f"report template lacks {exc}") from exc


def _text(name: Code, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(
        name=name, value=value, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )


def _section(name: Code, items: list[hd.sr.TextContentItem]) -> hd.sr.ContainerContentItem:
    section = hd.sr.ContainerContentItem(
        name=name, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    section.ContentSequence = DicomSequence(items)
    return section


def build_report_sr(
    sources: Sequence[pydicom.Dataset],
    results: Sequence[FindingResult],
    card: ModelCard,
    findings_sr: pydicom.Dataset,
    *,
    manufacturer: str,
    institution_name: str | None = None,
    series_number: int = 9002,
    previous_version: pydicom.Dataset | None = None,
) -> hd.sr.EnhancedSR:
    """The narrative draft SR for a study, linked to its findings SR through the evidence.

    ``previous_version`` is the draft this one amends; it goes in the Predecessor Documents
    Sequence (ignored when it is this very draft, as on a re-run of the same inputs).
    """
    narrative = write_narrative(results, card)
    identity = _identity(findings_sr)
    sop_instance_uid = derive_uid(*identity, "sop-instance")
    predecessors = None
    if previous_version is not None and str(previous_version.SOPInstanceUID) != sop_instance_uid:
        if previous_version.StudyInstanceUID != findings_sr.StudyInstanceUID:
            raise ValueError("the previous draft belongs to another study")
        predecessors = [previous_version]
    root = hd.sr.ContainerContentItem(name=TITLE, template_id="2000")
    root.ContentSequence = DicomSequence(
        [
            _section(
                FINDINGS,
                [_text(FINDING, line) for line in (*narrative.notices, *narrative.findings)],
            ),
            _section(IMPRESSION, [_text(IMPRESSION_ITEM, narrative.impression)]),
            _section(COMPARISON, [_text(FINDING, narrative.comparison)]),
        ]
    )
    description = f"{DEMO_LABEL} - {SERIES_DESCRIPTION}" if card.demo else SERIES_DESCRIPTION
    sr = hd.sr.EnhancedSR(
        evidence=[*(conformant_header(ds) for ds in sources), findings_sr],
        content=root,
        series_instance_uid=derive_uid(*identity, "series"),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        manufacturer=manufacturer,
        is_complete=False,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        series_description=description,
        previous_versions=predecessors,
    )
    return sr


def report_sr_uid(findings_sr: pydicom.Dataset) -> str:
    """The SOP Instance UID :func:`build_report_sr` gives the draft of this findings SR."""
    return derive_uid(*_identity(findings_sr), "sop-instance")


def _identity(findings_sr: pydicom.Dataset) -> tuple[str, str]:
    return (str(findings_sr.SOPInstanceUID), KIND)
