"""The storage SOP classes and transfer syntaxes the listener accepts."""

from __future__ import annotations

from pydicom import uid

# What a radiology department sends to an AI node: projection radiography, SC (real PACS traffic is
# often an SC that says CR), cross-sectional imaging and structured reports.
IMAGE_STORAGE: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.1": "CR Image Storage",
    "1.2.840.10008.5.1.4.1.1.1.1": "Digital X-Ray Image Storage - For Presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "Digital X-Ray Image Storage - For Processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.2": "Multi-frame Grayscale Byte SC Image Storage",
    "1.2.840.10008.5.1.4.1.1.7.3": "Multi-frame Grayscale Word SC Image Storage",
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
}

SR_STORAGE: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR Storage",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR Storage",
}

ACCEPTED_STORAGE: dict[str, str] = {**IMAGE_STORAGE, **SR_STORAGE}

ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000,
    uid.RLELossless,
]

VERIFICATION = "1.2.840.10008.1.1"


def sop_class_name(sop_class_uid: str) -> str:
    """A readable name for a SOP class UID (the UID itself when unknown)."""
    return ACCEPTED_STORAGE.get(sop_class_uid) or uid.UID(sop_class_uid).name or sop_class_uid
