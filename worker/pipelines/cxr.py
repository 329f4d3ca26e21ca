"""Chest X-ray triage: decode the study's radiographs, classify, decide per finding, build the SR.

Steps (each a function that can be tested alone):
``load_images`` → ``select_frontal`` → ``decode_images`` → ``classify`` → ``decide_findings`` →
``build_findings_sr`` → ``build_report_sr`` (the narrative draft).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_node.index import InstanceRecord
from dicom_node.sop import IMAGE_STORAGE
from worker.findings import DecodedImage, FindingResult, ModelCard
from worker.imaging.decode import decode_instance
from worker.models.base import Classifier
from worker.outputs.report import build_report_sr
from worker.outputs.sr import build_findings_sr

log = logging.getLogger(__name__)


class NoUsableImages(Exception):
    """The study holds no radiograph the pipeline can read."""


@dataclass(frozen=True)
class CxrResult:
    findings: list[FindingResult]
    sr: Dataset
    report: Dataset
    card: ModelCard


def load_images(records: Sequence[InstanceRecord]) -> list[Dataset]:
    """Read the study's image instances from the spool (structured reports and others are skipped)."""
    images: list[Dataset] = [
        pydicom.dcmread(Path(r.path)) for r in records if r.sop_class_uid in IMAGE_STORAGE
    ]
    if not images:
        raise NoUsableImages("the study holds no image instances")
    return images


FRONTAL_VIEWS = frozenset({"PA", "AP"})
LATERAL_VIEWS = frozenset({"LL", "RL", "LATERAL", "LAT"})


def select_frontal(images: Sequence[Dataset]) -> list[Dataset]:
    """The frontal radiographs: triage classifiers are trained on PA/AP views.

    A view the header does not name is kept (real traffic often omits it); laterals are left out of
    classification but stay in the SR's evidence.
    """
    frontal = [
        ds
        for ds in images
        if str(ds.get("ViewPosition", "") or "").strip().upper() not in LATERAL_VIEWS
    ]
    if not frontal:
        raise NoUsableImages("the study holds only lateral views")
    return frontal


def decode_images(images: Sequence[Dataset]) -> list[DecodedImage]:
    """Decode every image to model-ready pixels."""
    return [decode_instance(ds) for ds in images]


def classify(classifier: Classifier, decoded: Sequence[DecodedImage]) -> list[dict[str, float]]:
    """Per-image probabilities, in the model's finding order."""
    return classifier.predict(decoded)


def decide_findings(
    decoded: Sequence[DecodedImage],
    scores: Sequence[dict[str, float]],
    card: ModelCard,
    thresholds: dict[str, float],
    urgent_findings: Sequence[str],
) -> list[FindingResult]:
    """The study's probability per finding is its highest image score; compare with the threshold."""
    results: list[FindingResult] = []
    for finding in card.findings:
        best = max(range(len(scores)), key=lambda i: scores[i][finding])
        results.append(
            FindingResult(
                finding=finding,
                probability=float(scores[best][finding]),
                threshold=thresholds[finding],
                urgent_finding=finding in urgent_findings,
                source_sop_instance_uids=(decoded[best].sop_instance_uid,),
            )
        )
    return results


def run(
    records: Sequence[InstanceRecord],
    classifier: Classifier,
    thresholds: dict[str, float],
    urgent_findings: Sequence[str],
    *,
    manufacturer: str,
    institution_name: str | None,
) -> CxrResult:
    """The whole chest X-ray triage pipeline for one study."""
    images = load_images(records)
    decoded = decode_images(select_frontal(images))
    scores = classify(classifier, decoded)
    merged = {**classifier.default_thresholds, **thresholds}
    findings = decide_findings(decoded, scores, classifier.card, merged, urgent_findings)
    sr = build_findings_sr(
        images,
        findings,
        classifier.card,
        manufacturer=manufacturer,
        institution_name=institution_name,
    )
    report = build_report_sr(
        images,
        findings,
        classifier.card,
        sr,
        manufacturer=manufacturer,
        institution_name=institution_name,
    )
    return CxrResult(findings=findings, sr=sr, report=report, card=classifier.card)
