"""Exceptions with domain meaning, caught where something can act on them (the SCP answers a status)."""

from __future__ import annotations


class DicomNodeError(Exception):
    """Base class for errors raised by the DICOM node."""


class CorruptDataset(DicomNodeError):
    """The received bytes are not a complete, parseable DICOM data set (answer 0xC000, quarantine)."""


class DatasetMismatch(DicomNodeError):
    """The data set contradicts the request or its SOP class (answer 0xA900, quarantine)."""


class ImageRefused(DicomNodeError):
    """An image declares pixels beyond what the site decodes (answer 0xC000, quarantine)."""


class OutOfResources(DicomNodeError):
    """The instance cannot be kept durably right now: disk full, spool or index unavailable (0xA700)."""


class DestinationUnavailable(DicomNodeError):
    """A remote DICOM node could not be reached or refused the association."""


class DestinationRejected(DicomNodeError):
    """A remote DICOM node answered a C-STORE with a failure status."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
