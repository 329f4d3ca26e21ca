"""What the worker sends back: DICOM Structured Reports (and, later, alerts and other objects)."""

from worker.outputs.sr import (
    DEMO_LABEL,
    FindingsSRError,
    ReadFinding,
    build_findings_sr,
    derive_uid,
    read_findings_sr,
)

__all__ = [
    "DEMO_LABEL",
    "FindingsSRError",
    "ReadFinding",
    "build_findings_sr",
    "derive_uid",
    "read_findings_sr",
]
