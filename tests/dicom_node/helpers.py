"""Helpers for listener tests: small valid studies and a raw C-STORE client."""

from __future__ import annotations

import time
from pathlib import Path

from pynetdicom import AE, _config
from pynetdicom.sop_class import Verification

from dicom_node.index import Index, JobRow, JobStatus
from worker.demo.phantoms import write_synthetic_study


def small_study(
    folder: Path,
    kind: str = "normal",
    seed: int = 1,
    *,
    patient_id: str = "T-0001",
    modality: str = "DX",
    views: tuple[str, ...] = ("PA",),
    size: int = 64,
) -> list[Path]:
    """A real, valid chest X-ray study, small (64x64 by default) so tests stay fast."""
    return write_synthetic_study(
        folder,
        kind,
        seed,
        patient_id=patient_id,
        modality=modality,
        views=views,
        rows=size,
        cols=size,
    )


# send_raw's answer when there was none (the listener aborted the association).
NO_ANSWER = -1


def send_raw(
    path: Path, port: int, sop_class: str, transfer_syntax: str, called_aet: str = "PACSAI"
) -> int:
    """C-STORE a file's bytes exactly as they are on disk (no decoding, no re-encoding).

    dcmtk's storescu refuses to send a file it cannot parse, so corrupt input goes through
    pynetdicom's chunked sender, which streams the encoded bytes after the file meta header.
    Returns the C-STORE status, or ``NO_ANSWER`` when the association ended without one.
    """
    ae = AE(ae_title="RAWSCU")
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    assert assoc.is_established, "association refused"
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()
    return int(status.Status) if "Status" in status else NO_ANSWER


def c_echo(port: int, called_aet: str = "PACSAI") -> int:
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_aet)
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def dataset_bytes(raw: bytes) -> bytes:
    """The encoded data set of a DICOM file, without preamble and file meta information."""
    from io import BytesIO

    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = BytesIO(raw)
    read_preamble(fp, False)
    _read_file_meta_info(fp)
    return raw[fp.tell() :]


def wait_for_queued_job(index: Index, study_uid: str, timeout: float) -> list[JobRow]:
    """The study's jobs once its first is queued, or as they are when ``timeout`` has passed."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        jobs = index.study_jobs(study_uid)
        if jobs and jobs[0].status == JobStatus.QUEUED:
            return jobs
        time.sleep(0.1)
    return index.study_jobs(study_uid)
