"""What a job does: where a job is decided and a model is called. Celery wiring is in celery_app.

Every step is idempotent: output UIDs are deterministic, deliveries and alerts are rows in the index
that are skipped once delivered, so a redelivered or retried job never duplicates anything.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.errors import DestinationRejected, DestinationUnavailable
from dicom_node.index import DeliveryStatus, JobRow
from dicom_node.scu import RemoteNode, send_datasets
from dicom_node.spool import durable_write
from worker.alerting import raise_alerts
from worker.context import WorkerContext
from worker.pipelines import cxr

log = logging.getLogger(__name__)

SR_KIND = "findings-sr"
REPORT_KIND = "report-sr"


@dataclass(frozen=True)
class PendingWork:
    """Deliveries or alerts that did not go through yet; the caller schedules a retry."""

    errors: list[str]

    @property
    def done(self) -> bool:
        return not self.errors


def process_study(ctx: WorkerContext, job_id: str) -> PendingWork:
    """Run the job's pipeline, record the outputs, deliver them and raise alerts."""
    job = ctx.index.start_job(job_id, time.time())
    if job is None:
        log.info("job %s already done or unknown; nothing to do", job_id)
        return PendingWork([])
    if job.pipeline != "cxr":
        ctx.index.finish_job(
            job_id, time.time(), result=None, error=f"unknown pipeline {job.pipeline}"
        )
        return PendingWork([])
    try:
        summary = _run_cxr(ctx, job)
    except Exception as exc:
        log.exception("job %s failed", job_id)
        ctx.index.finish_job(job_id, time.time(), result=None, error=f"{type(exc).__name__}: {exc}")
        raise
    ctx.index.finish_job(job_id, time.time(), result=summary)
    return deliver_pending(ctx, job_id)


def _run_cxr(ctx: WorkerContext, job: JobRow) -> dict[str, Any]:
    settings = ctx.settings
    classifier = ctx.cxr_classifier()
    records = ctx.index.study_instances(job.study_instance_uid)
    result = cxr.run(
        records,
        classifier,
        settings.models.cxr_triage.thresholds,
        settings.models.cxr_triage.urgent_findings,
        manufacturer=settings.outputs.manufacturer,
        institution_name=settings.outputs.institution_name,
    )
    sr = result.sr
    sr_uid = str(sr.SOPInstanceUID)
    for kind, dataset in ((SR_KIND, sr), (REPORT_KIND, result.report)):
        path = _write_output(settings.storage.outputs_dir / job.study_instance_uid, dataset)
        ctx.index.record_output(
            str(dataset.SOPInstanceUID),
            job.study_instance_uid,
            job.job_id,
            kind,
            str(path),
            time.time(),
        )
    card = result.card
    where = ", ".join(d.name for d in settings.outputs.destinations) or "pacs-ai outputs"
    if raise_alerts(ctx.index, settings.alerts, result.findings, card, sr, where):
        # Alerts first: a person waiting for a pneumothorax alert must not wait for the PACS.
        ctx.dispatcher.run_once()
    return {
        "sr_sop_instance_uid": sr_uid,
        "report_sop_instance_uid": str(result.report.SOPInstanceUID),
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


def _write_output(folder: Path, dataset: Dataset) -> Path:
    """Write an output object durably (temporary name, fsync, rename) and return its path."""
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    path = folder / f"{dataset.SOPInstanceUID}.dcm"
    durable_write(path, [buffer.getvalue()])
    return path


def deliver_pending(ctx: WorkerContext, job_id: str) -> PendingWork:
    """Send the job's outputs to every destination (alerts have their own outbox)."""
    job = ctx.index.job(job_id)
    if job is None or job.result is None:
        return PendingWork([])
    return PendingWork(_send_outputs(ctx, job))


def _send_outputs(ctx: WorkerContext, job: JobRow) -> list[str]:
    errors: list[str] = []
    outputs = [
        o for o in ctx.index.study_outputs(job.study_instance_uid) if o["job_id"] == job.job_id
    ]
    for dest in ctx.settings.outputs.destinations:
        remote = RemoteNode.from_destination(dest)
        todo = []
        for output in outputs:
            done = {
                d["destination"]
                for d in ctx.index.deliveries_of(output["sop_instance_uid"])
                if d["status"] == DeliveryStatus.DELIVERED
            }
            if dest.name not in done:
                todo.append(output)
        if not todo:
            continue
        try:
            send_datasets(remote, [dcmread(Path(o["path"])) for o in todo])
        except (DestinationUnavailable, DestinationRejected, OSError) as exc:
            message = f"{dest.name}: {exc}"
            errors.append(message)
            for output in todo:
                ctx.index.record_delivery(
                    output["sop_instance_uid"], dest.name, time.time(), error=message
                )
            log.warning("delivery to %s failed, will retry: %s", dest.name, exc)
            continue
        now = time.time()
        for output in todo:
            ctx.index.record_delivery(output["sop_instance_uid"], dest.name, now, error=None)
        log.info(
            "delivered %d object(s) of study %s to %s", len(todo), job.study_instance_uid, remote
        )
    return errors
