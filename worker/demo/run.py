"""``pacs-ai demo``: the whole product on loopback, from C-STORE in to SR and alert out.

Starts an embedded broker, the DICOM node, a worker process, a small receiving PACS and a webhook
sink; sends synthetic chest X-ray studies and the real SIIM file; prints one row per study.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from dicom_node.errors import DestinationRejected, DestinationUnavailable
from dicom_node.index import DeliveryStatus, Index, JobStatus, StudyStatus
from dicom_node.logs import configure_logging
from dicom_node.scu import RemoteNode, send_files
from dicom_node.settings import DestinationSettings
from worker.demo.pacs import DemoPacs
from worker.demo.phantoms import write_synthetic_study
from worker.demo.sink import WebhookSink
from worker.demo.train import train_demo_model
from worker.findings import DEMO_LABEL
from worker.service import Stack
from worker.settings import Settings, write_settings

log = logging.getLogger(__name__)

REAL_FILE = "siim_cr_jpeg_baseline.dcm"
DEST_NAME = "demo-pacs"
TIMEOUT_S = 300.0


@dataclass
class DemoStudy:
    label: str
    files: list[Path]
    study_uid: str = ""
    sent_at: float | None = None
    send_error: str | None = None
    rows: dict[str, object] = field(default_factory=dict)


def default_real_dir() -> Path:
    """``shared/data/real`` beside the checkout (the project's real test images)."""
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _make_studies(
    inputs: Path, include_real: bool, real_dir: Path, console: Console
) -> list[DemoStudy]:
    size = 1024
    plan = [
        ("pneumothorax (synthetic, PA)", "pneumothorax", 101, "DEMO-0001", "DX", ("PA",)),
        ("normal (synthetic, PA + lateral)", "normal", 102, "DEMO-0002", "DX", ("PA", "LL")),
        ("pleural effusion (synthetic, CR)", "effusion", 103, "DEMO-0003", "CR", ("PA",)),
        ("cardiomegaly (synthetic, PA)", "cardiomegaly", 104, "DEMO-0004", "DX", ("PA",)),
    ]
    studies = []
    for label, kind, seed, patient, modality, views in plan:
        files = write_synthetic_study(
            inputs / kind,
            kind,
            seed,
            patient_id=patient,
            modality=modality,
            views=views,
            rows=size,
            cols=size,
        )
        studies.append(DemoStudy(label, files))
    real = real_dir / REAL_FILE
    if include_real:
        if real.is_file():
            studies.append(DemoStudy("real SIIM chest X-ray (SC/CR, JPEG)", [real]))
        else:
            console.print(f"[yellow]real file {real} not found: sending synthetic studies only[/]")
    for study in studies:
        study.study_uid = str(dcmread(study.files[0], stop_before_pixels=True).StudyInstanceUID)
    return studies


def _settings(workdir: Path, model_dir: Path, pacs_port: int, webhook_url: str) -> Settings:
    settings = Settings()
    settings.storage.data_dir = workdir / "data"
    settings.listener.port = _free_port()
    settings.completion.quiet_period_s = 2.0
    settings.completion.poll_interval_s = 0.2
    settings.models.cxr_triage.path = model_dir
    settings.outputs.destinations = [
        DestinationSettings(name=DEST_NAME, ae_title="DEMOPACS", host="127.0.0.1", port=pacs_port)
    ]
    settings.alerts.webhook.url = webhook_url
    return settings


def _study_state(index: Index, study: DemoStudy) -> tuple[str, bool]:
    """(what to show, finished?) for one study."""
    row = index.study(study.study_uid)
    if study.send_error:
        return f"send failed: {study.send_error}", True
    if row is None:
        return "sending", False
    if row.status in (StudyStatus.IGNORED, StudyStatus.FAILED):
        return f"{row.status.value}: {row.reason}", True
    if row.status != StudyStatus.DONE:
        return row.status.value, False
    for output in index.study_outputs(study.study_uid):
        delivered = [
            d
            for d in index.deliveries_of(output["sop_instance_uid"])
            if d["status"] == DeliveryStatus.DELIVERED
        ]
        if delivered:
            return "SR delivered", True
    return "SR built, delivering", False


def _summary_table(
    index: Index, studies: list[DemoStudy], sink: WebhookSink, pacs_address: str
) -> tuple[Table, bool]:
    table = Table(title=f"Results — {DEMO_LABEL}", show_lines=True)
    table.add_column("study", max_width=24)
    table.add_column("findings: probability vs threshold", no_wrap=True)
    table.add_column("urgent", no_wrap=True)
    table.add_column("SR instance UID → delivered to", no_wrap=True)
    table.add_column("receipt → SR", justify="right", no_wrap=True)
    alerted = {body.get("study_instance_uid") for _, body in sink.received()}
    all_ok = True
    for study in studies:
        row = index.study(study.study_uid)
        jobs = [
            j for j in index.study_jobs(study.study_uid) if j.status == JobStatus.DONE and j.result
        ]
        if row is None or not jobs:
            all_ok = False
            reason = study.send_error or (row.reason if row else "never received")
            table.add_row(study.label, f"[red]no result: {reason}[/]", "", "", "")
            continue
        result = jobs[-1].result
        assert result is not None
        lines = []
        for f in result["findings"]:
            if f["present"]:
                lines.append(
                    f"[bold]{f['finding']} {f['probability']:.2f} ≥ {f['threshold']:.2f} PRESENT[/]"
                )
            else:
                lines.append(f"{f['finding']} {f['probability']:.2f} < {f['threshold']:.2f}")
        if any(f["urgent"] for f in result["findings"]):
            sent = study.study_uid in alerted
            urgent = "[bold red]URGENT[/]\n" + ("alert sent" if sent else "[red]no alert![/]")
        else:
            urgent = "no"
        sr_uid = result["sr_sop_instance_uid"]
        delivered = [
            d for d in index.deliveries_of(sr_uid) if d["status"] == DeliveryStatus.DELIVERED
        ]
        if delivered:
            where = ", ".join(f"{d['destination']} ({pacs_address})" for d in delivered)
            seconds = min(d["delivered_at"] for d in delivered) - row.last_received_at
            latency = f"{seconds:.2f} s"
        else:
            all_ok = False
            where, latency = "[red]not delivered[/]", "-"
        draft = "\n+ narrative draft SR" if result.get("report_sop_instance_uid") else ""
        table.add_row(study.label, "\n".join(lines), urgent, f"{sr_uid}\n→ {where}{draft}", latency)
    return table, all_ok


def run_demo(workdir: Path, *, include_real: bool = True, real_dir: Path | None = None) -> int:
    """Run the demo; exit code 0 only if every study produced a delivered SR."""
    # Wide enough for the summary table when the output goes to a file or a CI log.
    console = Console() if sys.stdout.isatty() else Console(width=160)
    workdir = workdir.resolve()
    console.rule(f"[bold]pacs-ai-worker demo[/] — {DEMO_LABEL}")
    # Each run starts from empty data; the trained demo model is kept between runs.
    shutil.rmtree(workdir / "data", ignore_errors=True)
    shutil.rmtree(workdir / "pacs", ignore_errors=True)
    shutil.rmtree(workdir / "logs", ignore_errors=True)
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    configure_logging(logging.INFO, filename=workdir / "logs" / "node.log", force=True)

    model_dir = workdir / "models" / "demo-cxr"
    if (model_dir / "config.json").is_file():
        console.print(f"demo model: {model_dir} (already trained)")
    else:
        console.print(
            "training the demo triage model on synthetic phantoms (once, about a minute)…"
        )
        with console.status("training") as status:
            train_demo_model(
                model_dir, seed=0, progress=lambda msg: status.update(f"training: {msg}")
            )
        console.print(f"demo model written to {model_dir}")

    console.print("generating synthetic studies…")
    studies = _make_studies(
        workdir / "inputs", include_real, real_dir or default_real_dir(), console
    )

    pacs = DemoPacs(workdir / "pacs")
    pacs_port = pacs.start()
    # The sink verifies every alert's HMAC signature, as a real receiver should.
    secret = secrets.token_hex(16)
    sink = WebhookSink(secret=secret)
    sink.start()
    settings = _settings(workdir, model_dir, pacs_port, sink.url)
    settings.alerts.webhook.secret = secret
    config_path = workdir / "site.yaml"
    write_settings(settings, config_path)
    listener = RemoteNode(
        settings.listener.ae_title, "127.0.0.1", settings.listener.port, "MODALITY"
    )
    console.print(
        f"listener {listener} · embedded broker · 1 worker · receiving PACS DEMOPACS@127.0.0.1:{pacs_port} "
        f"· webhook {sink.url}\nsettings: {config_path} · logs: {workdir / 'logs'}"
    )
    exit_code = 1
    try:
        lanes = [[settings.queue.urgent_queue, settings.queue.routine_queue]]
        with Stack(settings, config_path, lanes, workdir / "logs") as stack:
            with console.status("starting the worker and loading the model…"):
                ready = stack.wait_for_workers()
            if ready < len(lanes):
                console.print(f"[red]the worker did not start: see {workdir / 'logs'}[/]")
                return 1
            index = Index(settings.index_url)
            for study in studies:
                try:
                    send_files(listener, study.files)
                    study.sent_at = time.time()
                except (DestinationUnavailable, DestinationRejected) as exc:
                    study.send_error = str(exc)
                console.print(f"sent {len(study.files)} instance(s): {study.label}")
            with Progress(
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[state]}"),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                tasks = {
                    s.label: progress.add_task(s.label, total=1, state="queued") for s in studies
                }
                deadline = time.time() + TIMEOUT_S
                while time.time() < deadline:
                    finished = 0
                    for study in studies:
                        state, done = _study_state(index, study)
                        progress.update(tasks[study.label], state=state, completed=1 if done else 0)
                        finished += done
                    if finished == len(studies):
                        break
                    time.sleep(0.2)
            time.sleep(0.5)  # let a webhook that is in flight land before the summary
            table, all_ok = _summary_table(index, studies, sink, f"DEMOPACS@127.0.0.1:{pacs_port}")
            console.print(table)
            alerts = sink.received()
            signed = sum(1 for r in sink.requests if r.signature_ok)
            console.print(
                f"alerts received by the webhook: {len(alerts)} ({signed} with a verified signature)"
            )
            for _at, body in alerts:
                console.print(
                    f"  [red]{body.get('finding')}[/] p={body.get('probability')} study {body.get('study_instance_uid')} accession {body.get('accession_number')} [{body.get('label', '')}]"
                )
            console.print(
                f"SRs received by the PACS: {len(pacs.received)} (findings and narrative draft per "
                f"study, in {pacs.folder})"
            )
            index.close()
            exit_code = 0 if all_ok else 1
    finally:
        sink.stop()
        pacs.stop()
    console.rule(
        "[green]every study produced a delivered SR[/]"
        if exit_code == 0
        else "[red]some studies have no delivered SR[/]"
    )
    return exit_code
