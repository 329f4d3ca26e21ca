"""Chest X-ray triage: decode the study's radiographs, classify, decide per finding, build the SR.

Steps (each a function that can be tested alone):
``load_images`` → ``select_frontal`` → ``decode_images`` → ``classify`` → ``decide_findings`` →
``build_findings_sr`` → ``build_report_sr`` (the narrative draft) → ``build_key_object_selection``
(only when a destination asks for key images).

Outputs replace or amend: a re-run of the same images and model makes the same UIDs (the PACS
replaces), while a late image makes new ones, and ``previous`` names the documents they amend.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_node.index import InstanceRecord
from dicom_node.settings import ImageSettings
from dicom_node.sop import IMAGE_STORAGE
from worker.findings import DecodedImage, FindingResult, ModelCard
from worker.imaging.decode import FrameDecoder, decode_instance
from worker.models.base import Classifier
from worker.outputs import kos as key_objects
from worker.outputs import report as report_sr
from worker.outputs import sr as findings_sr
from worker.outputs import summary as summary_sc

log = logging.getLogger(__name__)


class NoUsableImages(Exception):
    """The study holds no radiograph the pipeline can read."""


# Given an output kind and the SOP Instance UID of the document about to be made, the stored
# document of that kind it amends (same study and model, other images), or None.
PreviousVersion = Callable[[str, str], Dataset | None]


@dataclass(frozen=True)
class CxrResult:
    findings: list[FindingResult]
    sr: Dataset
    report: Dataset
    card: ModelCard
    # Key images for viewers that do not render SR; None unless asked for and a finding is present.
    kos: Dataset | None = None
    # Secondary Capture with the findings burned in; None unless a destination asks for it.
    summary: Dataset | None = None
    # Digest of the set of source images the outputs were made from.
    input_digest: str = ""
    # Output kind -> SOP Instance UID of the document the new one amends.
    replaces: dict[str, str] = field(default_factory=dict)

    def outputs(self) -> list[tuple[str, Dataset]]:
        """Every object to store and deliver, by output kind."""
        made = [(findings_sr.KIND, self.sr), (report_sr.KIND, self.report)]
        if self.kos is not None:
            made.append((key_objects.KIND, self.kos))
        if self.summary is not None:
            made.append((summary_sc.KIND, self.summary))
        return made


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


def decode_images(
    images: Sequence[Dataset],
    decoder: FrameDecoder | None = None,
    limits: ImageSettings | None = None,
) -> list[DecodedImage]:
    """Decode every image to model-ready pixels (compressed frames through ``decoder``)."""
    return [decode_instance(ds, decoder=decoder, limits=limits) for ds in images]


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


# Called with the study's findings, its findings SR and the model card (alerts hang on this).
FindingsReady = Callable[[list[FindingResult], Dataset, ModelCard], None]


def _alert_header(image: Dataset, sr_uid: str) -> Dataset:
    """What an alert needs of the findings SR (study, patient, accession, SR UID), from an image."""
    header = Dataset()
    for keyword in ("StudyInstanceUID", "AccessionNumber", "PatientID", "PatientName", "StudyDate"):
        setattr(header, keyword, str(image.get(keyword, "") or ""))
    header.SOPInstanceUID = sr_uid
    return header


def run(
    records: Sequence[InstanceRecord],
    classifier: Classifier,
    thresholds: dict[str, float],
    urgent_findings: Sequence[str],
    *,
    manufacturer: str,
    institution_name: str | None,
    previous: PreviousVersion | None = None,
    key_images: bool = False,
    on_findings: FindingsReady | None = None,
    summary_image: bool = False,
    decoder: FrameDecoder | None = None,
    limits: ImageSettings | None = None,
) -> CxrResult:
    """The whole chest X-ray triage pipeline for one study.

    ``previous`` finds the documents a new one amends (see :data:`PreviousVersion`);
    ``key_images`` adds a Key Object Selection of the images behind present findings;
    ``on_findings`` is called as soon as the findings and the findings SR's identity are known,
    before the remaining documents are built, so an urgent alert does not wait for them;
    ``decoder`` decodes compressed frames (in this process when None), after their declared size
    was checked against ``limits``.
    """
    images = load_images(records)
    frontal = select_frontal(images)
    decoded = decode_images(frontal, decoder, limits)
    scores = classify(classifier, decoded)
    merged = {**classifier.default_thresholds, **thresholds}
    card = classifier.card
    findings = decide_findings(decoded, scores, card, merged, urgent_findings)
    replaces: dict[str, str] = {}

    def amends(kind: str, sop_instance_uid: str) -> Dataset | None:
        found = previous(kind, sop_instance_uid) if previous is not None else None
        if found is None or str(found.SOPInstanceUID) == sop_instance_uid:
            return None
        replaces[kind] = str(found.SOPInstanceUID)
        return found

    sr_uid = findings_sr.findings_sr_uid(images, card)
    try:
        # Once per study: what the documents copy of the images, made conformant, so that what
        # is left out is logged once; the builders then find nothing more to leave out.
        headers = [findings_sr.conformant_header(ds) for ds in images]
        sr = findings_sr.build_findings_sr(
            headers,
            findings,
            card,
            manufacturer=manufacturer,
            institution_name=institution_name,
            previous_version=amends(findings_sr.KIND, sr_uid),
        )
    except Exception:
        # An urgent finding is alerted even when its document cannot be built: whoever waits
        # for the alert needs the finding, not the SR. The job still fails, and says why.
        if on_findings is not None and any(f.urgent for f in findings):
            log.error("findings SR not built; alerting the urgent findings from the images")
            on_findings(findings, _alert_header(images[0], sr_uid), card)
        raise
    if on_findings is not None:
        on_findings(findings, sr, card)
    report = report_sr.build_report_sr(
        headers,
        findings,
        card,
        sr,
        manufacturer=manufacturer,
        institution_name=institution_name,
        previous_version=amends(report_sr.KIND, report_sr.report_sr_uid(sr)),
    )
    kos = None
    if key_images and key_objects.key_images(headers, findings):
        kos = key_objects.build_key_object_selection(
            headers,
            findings,
            card,
            sr,
            manufacturer=manufacturer,
            institution_name=institution_name,
        )
        # A KOS cannot name a predecessor; the lookup only records which one it replaces.
        amends(key_objects.KIND, str(kos.SOPInstanceUID))
    summary = None
    if summary_image:
        # The frontal image with the study's most urgent evidence: the one behind the top finding.
        best = max(range(len(decoded)), key=lambda i: max(scores[i].values()))
        header = next(h for h in headers if h.SOPInstanceUID == frontal[best].SOPInstanceUID)
        summary = summary_sc.build_summary_sc(
            header, decoded[best], findings, card, sr, manufacturer=manufacturer
        )
    return CxrResult(
        summary=summary,
        findings=findings,
        sr=sr,
        report=report,
        card=card,
        kos=kos,
        input_digest=findings_sr.input_digest(images),
        replaces=replaces,
    )
