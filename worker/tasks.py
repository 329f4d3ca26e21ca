"""What a job does: where a job is decided and a model is called. Celery wiring is in celery_app.

Every step is idempotent: output UIDs are deterministic, deliveries and alerts are rows in the index
that are skipped once delivered, so a redelivered or retried job never duplicates anything. Sending
is the outboxes' business (worker.outbox for SRs, worker.alerting for alerts): a job only creates
their rows and gives them a push.
"""

from __future__ import annotations

import logging
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.index import JobRow
from dicom_node.spool import durable_write
from worker.alerting import raise_alerts
from worker.context import WorkerContext
from worker.findings import FindingResult, ModelCard
from worker.outbox import enqueue_outputs
from worker.pipelines import cxr

log = logging.getLogger(__name__)

SR_KIND = "findings-sr"
REPORT_KIND = "report-sr"


def process_study(ctx: WorkerContext, job_id: str) -> None:
    """Run the job's pipeline, record the outputs, queue their delivery and raise alerts."""
    job = ctx.index.start_job(job_id, time.time(), worker=ctx.worker_id)
    if job is None:
        log.info("job %s already done, dead or unknown; nothing to do", job_id)
        return
    if job.pipeline != "cxr":
        ctx.index.finish_job(
            job_id, time.time(), result=None, error=f"unknown pipeline {job.pipeline}"
        )
        return
    try:
        summary = _run_cxr(ctx, job)
    except Exception as exc:
        log.exception("job %s failed", job_id)
        ctx.index.finish_job(job_id, time.time(), result=None, error=f"{type(exc).__name__}: {exc}")
        raise
    # Outbox rows before the job is marked done: a crash in between re-runs the job, and the
    # rows, keyed by the outputs' deterministic UIDs, are created once.
    outputs = [o for o in ctx.index.study_outputs(job.study_instance_uid) if o["job_id"] == job_id]
    enqueue_outputs(
        ctx.index, ctx.settings.outputs, [(o["sop_instance_uid"], o["kind"]) for o in outputs]
    )
    ctx.index.finish_job(job_id, time.time(), result=summary)
    # Fast path: send now rather than at the dispatcher's next poll; whatever fails stays queued.
    ctx.outbox.run_once()


def _run_cxr(ctx: WorkerContext, job: JobRow) -> dict[str, Any]:
    settings = ctx.settings
    classifier = ctx.cxr_classifier()
    records = ctx.index.study_instances(job.study_instance_uid)
    where = ", ".join(d.name for d in settings.outputs.destinations) or "pacs-ai outputs"

    def alert_now(findings: list[FindingResult], sr: Dataset, card: ModelCard) -> None:
        # Alerts first: a person waiting for a pneumothorax alert must not wait for the other
        # documents to be built and written, nor for the PACS.
        if raise_alerts(ctx.index, settings.alerts, findings, card, sr, where):
            ctx.dispatcher.run_once()

    result = cxr.run(
        records,
        classifier,
        settings.models.cxr_triage.thresholds,
        settings.models.cxr_triage.urgent_findings,
        manufacturer=settings.outputs.manufacturer,
        institution_name=settings.outputs.institution_name,
        previous=_previous_versions(ctx, job.study_instance_uid, classifier.card.name),
        key_images=any(d.kos for d in settings.outputs.destinations),
        on_findings=alert_now,
        summary_image=any(d.summary_image for d in settings.outputs.destinations),
        decoder=ctx.decoder,
        limits=settings.images,
    )
    sr = result.sr
    sr_uid = str(sr.SOPInstanceUID)
    for kind, dataset in result.outputs():
        path = _write_output(settings.storage.outputs_dir / job.study_instance_uid, dataset)
        ctx.index.record_output(
            str(dataset.SOPInstanceUID),
            job.study_instance_uid,
            job.job_id,
            kind,
            str(path),
            time.time(),
        )
        ctx.index.link_output(
            str(dataset.SOPInstanceUID),
            input_digest=result.input_digest,
            model=result.card.name,
            predecessor_uid=result.replaces.get(kind),
        )
    card = result.card
    return {
        "sr_sop_instance_uid": sr_uid,
        "report_sop_instance_uid": str(result.report.SOPInstanceUID),
        "kos_sop_instance_uid": None if result.kos is None else str(result.kos.SOPInstanceUID),
        "summary_sop_instance_uid": (
            None if result.summary is None else str(result.summary.SOPInstanceUID)
        ),
        # Output kind -> the SOP Instance UID this run's output amends (after a late image).
        "amends": dict(result.replaces),
        "accession_number": str(sr.get("AccessionNumber", "") or ""),
        "model": {"name": card.name, "version": card.version, "demo": card.demo},
        "findings": [
            {
                "finding": f.finding,
                "probability": round(f.probability, 4),
                "threshold": f.threshold,
                "present": f.present,
                "urgent": f.urgent,
            }
            for f in result.findings
        ],
    }


def _previous_versions(ctx: WorkerContext, study_uid: str, model: str) -> cxr.PreviousVersion:
    """Look up, in the index and the outputs folder, the stored output a new one amends."""

    def previous(kind: str, sop_uid: str) -> Dataset | None:
        row = ctx.index.output_predecessor(study_uid, kind, model, sop_uid)
        if row is None:
            return None
        try:
            return dcmread(Path(row["path"]), stop_before_pixels=True)
        except (OSError, InvalidDicomError) as exc:
            # The amendment still goes out, unlinked: losing the new result would be worse.
            log.warning("previous %s %s unreadable, not linked: %s", kind, row["path"], exc)
            return None

    return previous


def _write_output(folder: Path, dataset: Dataset) -> Path:
    """Write an output object durably (temporary name, fsync, rename) and return its path."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    durable_write(path, [buffer.getvalue()])
    return path
