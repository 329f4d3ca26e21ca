"""The chest X-ray findings SR: a TID 1500 Measurement Report in a Comprehensive SR (IHE AI Results).

Content tree, one document per study and model::

    Imaging Measurement Report (TID 1500)
      Language, observation context (device observer = the algorithm, with a device UID)
      Procedure Reported = the chest X-ray exam (LOINC, by number of views), never the algorithm
      Image Library = the source images
      Imaging Measurements
        Measurement Group (TID 1501), one per finding
          Tracking Identifier (finding name) + Tracking Unique Identifier
          Finding = the coded finding (SNOMED CT)
          Algorithm Name / Version / Parameters (the operating point)
          Certainty of Finding (NUM, %) with its algorithm and source images
          <finding> = Present | Absent
          Source images of the group

Codes come from ``templates/codes.yaml`` (:mod:`worker.templates`). UIDs are derived from the
inputs and the model, so a re-run replaces the SR in the PACS rather than adding a second one; a
new or late image changes the UID, and the new SR names the one it amends as its predecessor.
An AI result is never complete, final or verified: PARTIAL, PRELIMINARY, UNVERIFIED.
"""

from __future__ import annotations

import hashlib
import logging
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import pydicom
from highdicom.sr.utils import find_content_items
from pydicom import config
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes as dicom_codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, ComprehensiveSRStorage
from pydicom.valuerep import DA, DT, TM, validate_value

from worker.findings import DEMO_LABEL, FindingResult, ModelCard
from worker.templates import CodeMap, code_map

logger = logging.getLogger(__name__)

SERIES_DESCRIPTION = "AI chest X-ray findings"
# The output kind in the index, and part of every UID derived for this document.
KIND = "findings-sr"

# Fixed namespace of every UID this project derives. Changing it changes every output UID, so a
# re-run after the change would duplicate results in the PACS: never change it.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:pacs-ai-worker:derived-uid")

_ALGORITHM_PARAMETERS = Code("111002", "DCM", "Algorithm Parameters")
_THRESHOLD_PARAMETER = "threshold="
_DECIMALS = 4

# The SR classes this module reads back: ours is Comprehensive; 3D is accepted in case a router
# re-encodes it (the content tree is the same).
_SR_CLASSES: dict[str, type[hd.sr.ComprehensiveSR] | type[hd.sr.Comprehensive3DSR]] = {
    ComprehensiveSRStorage: hd.sr.ComprehensiveSR,
    Comprehensive3DSRStorage: hd.sr.Comprehensive3DSR,
}


class FindingsSRError(ValueError):
    """The inputs cannot make a valid findings SR, or a dataset is not one."""


@dataclass(frozen=True)
class ReadFinding:
    """One finding as read back from a findings SR."""

    finding: str  # key of templates/codes.yaml
    probability: float  # 0..1
    present: bool
    source_sop_instance_uids: tuple[str, ...]
    tracking_identifier: str
    tracking_uid: str
    # The operating point recorded in the algorithm parameters, when there is one.
    threshold: float | None


def derive_uid(*parts: str) -> str:
    """A UID that depends only on ``parts``: the same inputs give the same UID on every run.

    A name-based (SHA-1) UUID under the ``2.25`` arc (ISO/IEC 9834-8). Not
    ``pydicom.uid.generate_uid``: with ``prefix=None`` it ignores the entropy sources and returns
    a random UID, and with ``prefix="2.25."`` it appends a 150-digit hash truncated to 64
    characters, which is not a UUID and so not a valid ``2.25`` UID.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    # Length-prefix each part so that ("ab", "c") and ("a", "bc") give different UIDs.
    name = "".join(f"{len(part)}:{part};" for part in parts)
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def build_findings_sr(
    sources: Sequence[pydicom.Dataset],
    results: Sequence[FindingResult],
    card: ModelCard,
    *,
    manufacturer: str,
    institution_name: str | None = None,
    series_number: int = 9001,
    instance_number: int = 1,
    previous_version: pydicom.Dataset | None = None,
) -> hd.sr.ComprehensiveSR:
    """Build the findings SR of one study from the model's results (see the module docstring).

    ``sources`` are the study's images the model read (headers suffice; pixels are not used).
    ``previous_version`` is the findings SR this one amends (made before a late image arrived):
    it is listed in the Predecessor Documents Sequence so the PACS links the two.
    Raises :class:`FindingsSRError` for inputs that would make a wrong report, and
    :class:`worker.templates.UnknownFinding` for a finding ``codes.yaml`` does not define.
    """
    codes = code_map()
    images = _unique_images(sources)
    if not results:
        raise FindingsSRError("no findings to report")
    keys = [r.finding for r in results]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise FindingsSRError(f"finding reported twice: {', '.join(duplicates)}")

    identity = _identity(images, card)
    sop_instance_uid = derive_uid(*identity, "sop-instance")
    series_instance_uid = derive_uid(*identity, "series")
    predecessors = _predecessors(previous_version, sop_instance_uid, images)
    algorithm_name = f"{card.name} ({DEMO_LABEL})" if card.demo else card.name
    observer = algorithm_observer(card)
    groups = [
        _measurement_group(result, card, codes, images, algorithm_name, sop_instance_uid)
        for result in results
    ]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.procedure_for_views(len(images)),
        imaging_measurements=groups,
    )
    _insert_image_library(report, list(images.values()))

    equipment = algorithm_equipment(card)

    series_description = f"{DEMO_LABEL} - {SERIES_DESCRIPTION}" if card.demo else SERIES_DESCRIPTION
    sr = hd.sr.ComprehensiveSR(
        evidence=[conformant_header(ds) for ds in images.values()],
        content=report,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid,
        instance_number=instance_number,
        manufacturer=manufacturer,
        # An AI result is a draft for a radiologist: never complete, final or verified.
        is_complete=False,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        contributing_equipment=[equipment],
        series_description=series_description,
        previous_versions=predecessors,
    )
    return sr


def algorithm_device_uid(card: ModelCard) -> str:
    """The algorithm's device UID: it changes exactly when the model (name, version, weights) does."""
    return derive_uid(card.name, card.version, card.weights_sha256, "algorithm-device")


def algorithm_observer(card: ModelCard) -> hd.sr.ObserverContext:
    """The device observer context that names the algorithm as the author of a document."""
    return hd.sr.ObserverContext(
        observer_type=dicom_codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=algorithm_device_uid(card),
            name=f"{card.name} ({DEMO_LABEL})" if card.demo else card.name,
            manufacturer_name=card.manufacturer,
            model_name=card.name,
        ),
    )


def algorithm_equipment(card: ModelCard) -> hd.ContributingEquipment:
    """The Contributing Equipment item of the algorithm ("Processing Algorithm")."""
    equipment = hd.ContributingEquipment(
        manufacturer=card.manufacturer,
        purpose_of_reference=code_map().processing_purpose,
        manufacturer_model_name=card.name,
        software_versions=card.version,
        contribution_description=(f"{DEMO_LABEL}: " if card.demo else "")
        + f"AI algorithm {card.name} {card.version} (weights sha256 {card.weights_sha256})",
    )
    # Device UID (0018,1002) is allowed in Contributing Equipment items but highdicom has no
    # argument for it; it is what lets a PACS tell two builds of the same model apart.
    equipment.DeviceUID = algorithm_device_uid(card)
    return equipment


def findings_sr_uid(sources: Sequence[pydicom.Dataset], card: ModelCard) -> str:
    """The SOP Instance UID :func:`build_findings_sr` gives the SR of these images and model."""
    return derive_uid(*_identity(_unique_images(sources), card), "sop-instance")


def input_digest(sources: Sequence[pydicom.Dataset]) -> str:
    """A digest of the set of source images (order and duplicates do not matter)."""
    names = "\n".join(sorted({str(ds.SOPInstanceUID) for ds in sources}))
    return hashlib.sha256(names.encode("ascii")).hexdigest()


def _identity(images: dict[str, pydicom.Dataset], card: ModelCard) -> tuple[str, ...]:
    # Sorted so that the order images arrived in does not change the UID.
    return (*sorted(images), card.name, card.version, card.weights_sha256, KIND)


def _predecessors(
    previous: pydicom.Dataset | None, sop_instance_uid: str, images: dict[str, pydicom.Dataset]
) -> list[pydicom.Dataset] | None:
    """The Predecessor Documents of an amended document, checked to be another document of
    the same study (a wrong link would hide a result behind an unrelated one)."""
    if previous is None:
        return None
    if str(previous.SOPInstanceUID) == sop_instance_uid:
        # A re-run of the same inputs replaces the document; it does not amend itself.
        return None
    study = str(next(iter(images.values())).StudyInstanceUID)
    if str(previous.StudyInstanceUID) != study:
        raise FindingsSRError("the previous version belongs to another study")
    return [previous]


# Type 2 attributes of the Patient and General Study modules: present, but may be empty.
_TYPE_2_COPIED = frozenset(
    {
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "ReferringPhysicianName",
        "StudyID",
        "AccessionNumber",
    }
)


# Copied General Study attributes outside the patient group (0010,xxxx), which holds the rest of
# the Patient and Patient Study modules.
_STUDY_KEYWORDS = frozenset(
    {
        "StudyInstanceUID",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
        "StudyDescription",
        "PhysiciansOfRecord",
        "NameOfPhysiciansReadingStudy",
        "AdmittingDiagnosesDescription",
    }
)


# Values highdicom converts, and refuses when it cannot: dates and times are parsed, and Patient's
# Sex must be one of the enumerated values.
_TEMPORAL = {"DA": DA, "TM": TM, "DT": DT}
_PATIENT_SEX = frozenset({"", "M", "F", "O"})
# ISO 646 with code extensions: the character set of an empty value 1 (PS3.3 C.12.1.1.2).
_DEFAULT_EXTENSION = "ISO 2022 IR 6"
# The header ends where overlays and pixel data begin.
_HEADER_END = 0x60000000


def conformant_header(source: pydicom.Dataset) -> pydicom.Dataset:
    """The header of ``source``, with the patient and study values an output copies made conformant.

    highdicom copies the Patient and Study modules of the first source into what it builds,
    converts some values (dates, times, Patient's Sex) and fails on those it cannot convert;
    real PACS traffic carries malformed ones (the SIIM file's Patient's Age is "62", not "062Y";
    birth dates like "1961-07-04"), which would cost the study its SR and its alert, or make the
    SR fail validation. Repairing would mean guessing a clinical fact, so a malformed Type 2 value
    is emptied and a Type 3 one left out; the images in the spool keep the original. The source
    itself is not changed: the copy shares its other elements.
    """
    header = pydicom.Dataset()
    for element in source:
        if element.tag >= _HEADER_END:
            break
        if element.keyword == "SpecificCharacterSet":
            character_set = _character_set(element)
            if character_set is not None:
                header.add(character_set)
            continue
        copied = element.tag.group == 0x0010 or element.keyword in _STUDY_KEYWORDS
        if not copied or element.VR == "SQ" or _conformant(element):
            header.add(element)
            continue
        if element.keyword == "StudyInstanceUID":
            raise FindingsSRError("the source images have an invalid Study Instance UID")
        # The keyword only: values are patient data and stay out of logs.
        logger.warning(
            "study %s: source %s is not a valid %s; left out",
            source.get("StudyInstanceUID", ""),
            element.keyword,
            element.VR,
        )
        if element.keyword in _TYPE_2_COPIED:
            header.add_new(element.tag, element.VR, None)
    for keyword in _TYPE_2_COPIED:
        if keyword not in header:  # absent in the images (they too must have it): empty here
            setattr(header, keyword, None)
    return header


def _character_set(element: pydicom.DataElement) -> pydicom.DataElement | None:
    """Specific Character Set in a form highdicom takes; None for the default repertoire.

    highdicom refuses an empty value 1, which the standard allows and means ISO 2022 IR 6
    (PS3.3 C.12.1.1.2: the usual Japanese ``\\ISO 2022 IR 87``), and a code extension term
    alone; both are spelt out here with the same meaning.
    """
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    terms = [str(value or "").strip() for value in values]
    if len(terms) > 1 and not terms[0]:
        terms[0] = _DEFAULT_EXTENSION
    elif len(terms) == 1 and terms[0].startswith("ISO 2022"):
        if terms[0] == _DEFAULT_EXTENSION:
            return None
        terms.insert(0, _DEFAULT_EXTENSION)
    if terms == list(values):
        return element
    return pydicom.DataElement(element.tag, "CS", terms if len(terms) > 1 else terms[0])


def _conformant(element: pydicom.DataElement) -> bool:
    values = element.value if isinstance(element.value, MultiValue) else [element.value]
    try:
        for value in values:
            validate_value(element.VR, value, config.RAISE)
            if element.VR in _TEMPORAL and value not in (None, ""):
                _TEMPORAL[element.VR](value)
            # pydicom counts the groups of a name but not the components of each (at most 5).
            if element.VR == "PN" and any(g.count("^") > 4 for g in str(value or "").split("=")):
                return False
    except ValueError:
        return False
    return element.keyword != "PatientSex" or (element.value or "") in _PATIENT_SEX


def _unique_images(sources: Sequence[pydicom.Dataset]) -> dict[str, pydicom.Dataset]:
    """The sources by SOP Instance UID, checked to be one study."""
    if not sources:
        raise FindingsSRError("a findings SR needs at least one source image")
    images: dict[str, pydicom.Dataset] = {}
    for ds in sources:
        images.setdefault(str(ds.SOPInstanceUID), ds)
    studies = {str(ds.StudyInstanceUID) for ds in images.values()}
    if len(studies) != 1:
        # The SR lives in one study; images of a prior study are other evidence, not sources.
        raise FindingsSRError(f"source images belong to {len(studies)} studies, expected one")
    return images


# ViewPosition (CS) -> Image View (CID 4010), the views a chest X-ray study holds.
_VIEWS: dict[str, Code] = {
    "PA": dicom_codes.cid4010.PosteroAnterior,
    "AP": dicom_codes.cid4010.AnteroPosterior,
    "LL": dicom_codes.cid4010.LeftLateral,
    "RL": dicom_codes.cid4010.RightLateral,
    "LATERAL": dicom_codes.cid4010.LateralProjection,
}
_SOURCE = Code("260753009", "SCT", "Source")
_PIXELS = Code("{pixels}", "UCUM", "Pixels")
_ACQ = hd.sr.RelationshipTypeValues.HAS_ACQ_CONTEXT
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


def _insert_image_library(report: hd.sr.MeasurementReport, images: list[pydicom.Dataset]) -> None:
    """Add the Image Library (TID 1600) before Imaging Measurements, where TID 1500 puts it.

    Built here rather than by highdicom (``MeasurementReport(referenced_images=...)``): highdicom
    requires Patient Orientation and Imager Pixel Spacing on every CR/DX image and codes a
    Secondary Capture image as modality "Other". Real chest X-rays lack both (the SIIM file has
    an empty Patient Orientation and only Pixel Spacing) and often arrive as SC with Modality CR;
    the descriptors below are the TID 1602/1603 ones, each written only when the header has it.
    """
    entries = []
    for ds in images:
        entry = hd.sr.ImageContentItem(
            name=_SOURCE,
            referenced_sop_class_uid=ds.SOPClassUID,
            referenced_sop_instance_uid=ds.SOPInstanceUID,
            relationship_type=_CONTAINS,
        )
        entry.ContentSequence = hd.sr.ContentSequence(_image_descriptors(ds))
        entries.append(entry)
    group = hd.sr.ContainerContentItem(
        name=dicom_codes.DCM.ImageLibraryGroup, relationship_type=_CONTAINS
    )
    group.ContentSequence = hd.sr.ContentSequence(entries)
    library = hd.sr.ContainerContentItem(
        name=dicom_codes.DCM.ImageLibrary, relationship_type=_CONTAINS
    )
    library.ContentSequence = hd.sr.ContentSequence([group])

    content = report[0].ContentSequence
    position = next(
        index
        for index, item in enumerate(content)
        if item.name == dicom_codes.DCM.ImagingMeasurements
    )
    content.insert(position, library)


def _image_descriptors(ds: pydicom.Dataset) -> list[hd.sr.ContentItem]:
    """TID 1602 (+ TID 1603 for projection radiography) descriptors of one image."""
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=dicom_codes.DCM.Modality,
            value=_modality_code(str(ds.get("Modality", "") or "")),
            relationship_type=_ACQ,
        )
    ]
    if "FrameOfReferenceUID" in ds:
        items.append(
            hd.sr.UIDRefContentItem(
                name=dicom_codes.DCM.FrameOfReferenceUID,
                value=ds.FrameOfReferenceUID,
                relationship_type=_ACQ,
            )
        )
    for name, value in (
        (dicom_codes.DCM.PixelDataRows, ds.Rows),
        (dicom_codes.DCM.PixelDataColumns, ds.Columns),
    ):
        items.append(
            hd.sr.NumContentItem(name=name, value=int(value), unit=_PIXELS, relationship_type=_ACQ)
        )
    view = _VIEWS.get(str(ds.get("ViewPosition", "") or "").upper())
    if view is not None:
        items.append(
            hd.sr.CodeContentItem(
                name=dicom_codes.DCM.ImageView, value=view, relationship_type=_ACQ
            )
        )
    orientation = [str(v) for v in (ds.get("PatientOrientation") or []) if str(v)]
    if len(orientation) == 2:
        for name, text in (
            (dicom_codes.DCM.PatientOrientationRow, orientation[0]),
            (dicom_codes.DCM.PatientOrientationColumn, orientation[1]),
        ):
            items.append(hd.sr.TextContentItem(name=name, value=text, relationship_type=_ACQ))
    # Imager Pixel Spacing is the detector's; Pixel Spacing is what SC/CR files usually carry.
    spacing = ds.get("ImagerPixelSpacing") or ds.get("PixelSpacing")
    if spacing is not None and len(spacing) == 2:
        for name, mm in (
            (dicom_codes.DCM.HorizontalPixelSpacing, spacing[1]),
            (dicom_codes.DCM.VerticalPixelSpacing, spacing[0]),
        ):
            items.append(
                hd.sr.NumContentItem(
                    name=name,
                    value=float(mm),
                    unit=dicom_codes.UCUM.Millimeter,
                    relationship_type=_ACQ,
                )
            )
    return items


def _modality_code(modality: str) -> Code:
    """Modality (CS) as its CID 29 code; "Other" when the header says nothing DICOM knows."""
    for keyword in dicom_codes.cid29.dir():
        code = getattr(dicom_codes.cid29, keyword)
        if code.value == modality:
            return code
    return Code("OT", "DCM", "Other")


def _measurement_group(
    result: FindingResult,
    card: ModelCard,
    codes: CodeMap,
    images: dict[str, pydicom.Dataset],
    algorithm_name: str,
    sop_instance_uid: str,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    entry = codes.finding_entry(result.finding)
    for label, value in (("probability", result.probability), ("threshold", result.threshold)):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise FindingsSRError(f"{result.finding}: {label} {value!r} is not within [0, 1]")

    unknown = [uid for uid in result.source_sop_instance_uids if uid not in images]
    if unknown:
        raise FindingsSRError(
            f"{result.finding}: source images {unknown} are not among the SR's source images"
        )
    group_images = [images[uid] for uid in dict.fromkeys(result.source_sop_instance_uids)] or list(
        images.values()
    )

    algorithm = hd.sr.AlgorithmIdentification(
        name=algorithm_name,
        version=card.version,
        # repr() round-trips the float exactly, so a reader recovers the operating point.
        parameters=[f"{_THRESHOLD_PARAMETER}{result.threshold!r}"],
        family=dicom_codes.cid7162.ArtificialIntelligence,
        manufacturer=card.manufacturer,
    )
    probability = hd.sr.Measurement(
        name=codes.probability_name,
        # Rounded: 0.91 * 100 is 91.00000000000001 in binary floating point, which viewers
        # would show in full; 4 decimals of a percentage keep the probability to 1e-6.
        value=round(result.probability * codes.probability_scale, _DECIMALS),
        unit=codes.probability_unit,
        algorithm_id=algorithm,
        referenced_images=[
            hd.sr.SourceImageForMeasurement.from_source_image(ds) for ds in group_images
        ],
    )
    presence = hd.sr.QualitativeEvaluation(name=entry.code, value=codes.presence(result.present))
    # Viewers list groups by this text: a demo label here is seen next to every finding.
    label = f"{entry.display_name} [{DEMO_LABEL}]" if card.demo else entry.display_name
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(sop_instance_uid, result.finding, "tracking"),
            identifier=label,
        ),
        finding_type=entry.code,
        algorithm_id=algorithm,
        measurements=[probability],
        qualitative_evaluations=[presence],
        source_images=[
            hd.sr.SourceImageForMeasurementGroup.from_source_image(ds) for ds in group_images
        ],
    )


def read_findings_sr(ds: pydicom.Dataset) -> list[ReadFinding]:
    """Read the findings back from a findings SR (as written by :func:`build_findings_sr`)."""
    codes = code_map()
    sr_class = _SR_CLASSES.get(str(ds.get("SOPClassUID", "")))
    if sr_class is None:
        raise FindingsSRError(f"not a Comprehensive SR: SOP Class {ds.get('SOPClassUID')}")
    report = sr_class.from_dataset(ds, copy=True).content
    if not isinstance(report, hd.sr.MeasurementReport):
        raise FindingsSRError("the SR content is not a TID 1500 Measurement Report")

    findings: list[ReadFinding] = []
    for group in report.get_image_measurement_groups():
        finding_type = group.finding_type
        if finding_type is None:
            raise FindingsSRError("a measurement group has no Finding")
        key = codes.finding_key(_as_code(finding_type))
        findings.append(
            ReadFinding(
                finding=key,
                probability=_probability(group, codes, key),
                present=_presence(group, codes, key),
                source_sop_instance_uids=tuple(
                    str(image.referenced_sop_instance_uid) for image in group.source_images
                ),
                tracking_identifier=group.tracking_identifier or "",
                tracking_uid=str(group.tracking_uid or ""),
                threshold=_threshold(group),
            )
        )
    return findings


def _as_code(concept: hd.sr.CodedConcept) -> Code:
    return Code(concept.value, concept.scheme_designator, concept.meaning)


def _probability(
    group: hd.sr.MeasurementsAndQualitativeEvaluations, codes: CodeMap, key: str
) -> float:
    measurements = group.get_measurements(name=codes.probability_name)
    if len(measurements) != 1:
        raise FindingsSRError(
            f"{key}: expected one probability measurement, found {len(measurements)}"
        )
    measurement = measurements[0]
    unit = measurement.unit
    expected = codes.probability_unit
    if (unit.value, unit.scheme_designator) != (expected.value, expected.scheme_designator):
        raise FindingsSRError(
            f"{key}: probability unit {unit.value!r}, expected {expected.value!r}"
        )
    return float(measurement.value) / codes.probability_scale


def _presence(group: hd.sr.MeasurementsAndQualitativeEvaluations, codes: CodeMap, key: str) -> bool:
    evaluations = group.get_qualitative_evaluations(name=codes.finding(key))
    if len(evaluations) != 1:
        raise FindingsSRError(f"{key}: expected one presence evaluation, found {len(evaluations)}")
    # highdicom types QualitativeEvaluation.value as a number; it is the CODE item's concept.
    value: object = evaluations[0].value
    if not isinstance(value, hd.sr.CodedConcept):
        raise FindingsSRError(f"{key}: presence evaluation has no coded value")
    for code, present in ((codes.present, True), (codes.absent, False)):
        if (value.value, value.scheme_designator) == (code.value, code.scheme_designator):
            return present
    raise FindingsSRError(f"{key}: presence {value.value!r} is neither present nor absent")


def _threshold(group: hd.sr.MeasurementsAndQualitativeEvaluations) -> float | None:
    for item in find_content_items(group[0], name=_ALGORITHM_PARAMETERS):
        text = str(item.TextValue)
        if text.startswith(_THRESHOLD_PARAMETER):
            try:
                return float(text[len(_THRESHOLD_PARAMETER) :])
            except ValueError:
                return None
    return None
