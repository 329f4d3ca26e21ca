#!/usr/bin/env python
"""Time to alert: from the end of a pneumothorax chest X-ray's C-STORE association to the alert at
a webhook sink, on an idle system and with a routine backlog queued ahead (the urgent lane).

The stack runs as ``pacs-ai serve`` runs it: the listener and assembler in this process, one worker
reserved for the ``stat`` queue and one for ``stat`` + ``routine``, the demo model on CPU, Redis as
the broker (or the embedded Valkey). Each STAT study (Requested Procedure Priority STAT in the
Request Attributes Sequence, as an RIS order carries it) is sent alone with dcmtk ``storescu``
(``TCP_NODELAY=1``); the clock starts when ``storescu`` has released the association and exited and
stops when ``WebhookSink`` receives the alert. Studies are sent one after another, each after the
previous alert arrived.

Scenarios: (a) idle; (b) the same with N routine studies (normal phantoms, 256 px) queued ahead
on the routine queue, still being worked through when the last STAT alert arrives (checked).
Besides p50/p95/max it prints where the time goes, from the index's timestamps: association end to
job created (assembly), to enqueued, to started by a worker (broker), to alert row created
(decode + inference + SR), to alert received (dispatch + HTTP). Not collected by pytest:

    .venv/bin/python tests/benchmarks/time_to_alert.py --quick   # 10 studies, 50 routine, 512 px
    .venv/bin/python tests/benchmarks/time_to_alert.py           # 50 studies, 500 routine, 2048 px
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pydicom  # noqa: E402

from dicom_node.index import Index, JobStatus  # noqa: E402
from tests.servers import RedisTestDatabase, free_port, storescu  # noqa: E402
from worker.demo.phantoms import write_synthetic_study  # noqa: E402
from worker.demo.sink import WebhookSink  # noqa: E402
from worker.service import Stack  # noqa: E402
from worker.settings import Settings, write_settings  # noqa: E402

TARGET_P95_S = {"idle": 1.0, "backlog": 2.0}
STAGES = ("assembly", "enqueue", "broker", "inference", "dispatch")


@dataclass(frozen=True)
class Sample:
    total: float
    stages: dict[str, float]


def _cache() -> Path:
    return Path(os.environ.get("TMPDIR", tempfile.gettempdir())) / "pacs-ai-bench-cache"


def xrv_model(cache: Path, architecture: str) -> Path:
    """A full-size torchxrayvision network with random weights, in its real folder format.

    Random weights say nothing clinically; the pneumothorax operating point is set low so every
    STAT study alerts and the benchmark measures the path, not the model's opinion.
    """
    import torch

    from worker.models.torchxrayvision import DEFAULT_PATHOLOGIES, build_network

    folder = cache / f"xrv-{architecture}"
    if (folder / "pacs-ai.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    net = build_network(architecture, len(DEFAULT_PATHOLOGIES))  # type: ignore[arg-type]
    torch.save(net.state_dict(), folder / "weights.pt")
    config = {
        "format": "torchxrayvision",
        "name": f"random-{architecture}",
        "version": "0.0.0",
        "manufacturer": "pacs-ai-worker benchmark",
        "demo": True,
        "label": "DEMO / NOT FOR CLINICAL USE",
        "architecture": architecture,
        "weights": "weights.pt",
        "findings": {
            "Pneumothorax": "pneumothorax",
            "Effusion": "pleural_effusion",
            "Cardiomegaly": "cardiomegaly",
        },
        "default_thresholds": {"pneumothorax": 0.01, "pleural_effusion": 0.5, "cardiomegaly": 0.5},
    }
    (folder / "pacs-ai.json").write_text(json.dumps(config, indent=2))
    return folder


def send(paths: list[Path], port: int) -> str | None:
    """C-STORE on one association with dcmtk storescu, or pynetdicom where dcmtk is not installed
    (the GPU machine); return an error message or None."""
    import shutil

    if shutil.which("storescu"):
        result = storescu(paths, host="127.0.0.1", port=port, called_aet="PACSAI")
        return None if result.returncode == 0 else result.stderr
    from dicom_node.scu import RemoteNode, send_files

    try:
        send_files(RemoteNode("PACSAI", "127.0.0.1", port, "STORESCU"), paths)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def demo_model(cache: Path) -> Path:
    """The demo model, trained once (deterministic) and kept in the benchmark cache."""
    from worker.demo.train import train_demo_model

    folder = cache / "demo-cxr"
    if (folder / "config.json").is_file():
        return folder
    print("training the demo model once (about a minute) ...", flush=True)
    return train_demo_model(folder, seed=0)


def stat_studies(folder: Path, count: int, size: int, tag: str) -> list[Path]:
    """STAT pneumothorax studies, one DX image each, cached by size."""
    paths = []
    for i in range(count):
        target = folder / f"stat-{size}" / f"{tag}-{i:03d}.dcm"
        if not target.is_file():
            [path] = write_synthetic_study(
                folder / "tmp",
                "pneumothorax",
                seed=1000 + i,
                patient_id=f"BENCH-{tag}-{i}",
                rows=size,
                cols=size,
            )
            ds = pydicom.dcmread(path)
            item = pydicom.Dataset()
            item.RequestedProcedurePriority = "STAT"
            item.RequestedProcedureID = f"RP{i}"
            item.ScheduledProcedureStepID = f"SPS{i}"
            ds.RequestAttributesSequence = [item]
            target.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(target, enforce_file_format=True)
            path.unlink()
        paths.append(target)
    return paths


def routine_studies(folder: Path, count: int) -> list[Path]:
    paths = []
    for i in range(count):
        target = folder / "routine-256" / f"routine-{i:04d}.dcm"
        if not target.is_file():
            [path] = write_synthetic_study(
                folder / "tmp",
                "normal",
                seed=5000 + i,
                patient_id=f"ROUTINE-{i}",
                rows=256,
                cols=256,
            )
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
        paths.append(target)
    return paths


@contextlib.contextmanager
def broker(kind: str) -> Iterator[str]:
    if kind == "embedded":
        yield "embedded"
        return
    database = RedisTestDatabase()
    if not database.reachable():
        raise SystemExit("Redis not reachable at 127.0.0.1:6379 (or use --broker embedded)")
    database.claim()
    try:
        yield database.url
    finally:
        database.release()


def _stages(index: Index, study_uid: str, sent_end: float, arrived: float) -> dict[str, float]:
    [job] = index.study_jobs(study_uid)
    [alert] = [a for a in index.study_alerts(study_uid) if a["channel"] == "webhook"]
    marks = [
        sent_end,
        job.created_at,
        job.enqueued_at or job.created_at,
        job.started_at or job.created_at,
        alert["created_at"],
        arrived,
    ]
    return {name: marks[i + 1] - marks[i] for i, name in enumerate(STAGES)}


def measure(
    stack: Stack, sink: WebhookSink, index: Index, files: list[Path], label: str
) -> list[Sample]:
    assert stack.node is not None
    samples = []
    for n, path in enumerate(files, start=1):
        study_uid = str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)
        error = send([path], stack.node.port)
        sent_end = time.time()
        if error is not None:
            raise SystemExit(f"C-STORE failed: {error}")
        deadline = sent_end + 60
        arrived = None
        while arrived is None and time.time() < deadline:
            arrived = next(
                (at for at, b in sink.received() if b["study_instance_uid"] == study_uid), None
            )
            if arrived is None:
                time.sleep(0.002)
        if arrived is None:
            raise SystemExit(f"{label}: no alert for study {n} within 60 s")
        samples.append(Sample(arrived - sent_end, _stages(index, study_uid, sent_end, arrived)))
        print(f"\r{label}: {n}/{len(files)}  last {samples[-1].total:.3f} s", end="", flush=True)
    print()
    return samples


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def report(results: dict[str, list[Sample]], backlog_left: int, backlog: int) -> dict[str, object]:
    print(f"\n{'scenario':<10} {'n':>4} {'p50 s':>7} {'p95 s':>7} {'max s':>7}  target p95")
    out: dict[str, object] = {}
    for name, samples in results.items():
        totals = [s.total for s in samples]
        p50, p95, worst = statistics.median(totals), quantile(totals, 0.95), max(totals)
        target = TARGET_P95_S[name]
        verdict = "met" if p95 <= target else "NOT MET"
        print(
            f"{name:<10} {len(totals):>4} {p50:>7.3f} {p95:>7.3f} {worst:>7.3f}  "
            f"<= {target:.1f} s {verdict}"
        )
        out[name] = {"n": len(totals), "p50": p50, "p95": p95, "max": worst, "target_p95": target}
    print("\nmedian time per stage (s):")
    print(f"{'scenario':<10} " + " ".join(f"{s:>9}" for s in STAGES))
    for name, samples in results.items():
        medians = {s: statistics.median(x.stages[s] for x in samples) for s in STAGES}
        print(f"{name:<10} " + " ".join(f"{medians[s]:>9.3f}" for s in STAGES))
        out[f"{name}_stages"] = medians
    if "backlog" in results:
        print(
            f"\nroutine studies still unfinished when the last STAT alert arrived: "
            f"{backlog_left} of {backlog}"
        )
        out["backlog_left"] = backlog_left
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="10 studies, 50 routine, 512 px")
    parser.add_argument("--studies", type=int, help="STAT studies per scenario (default 50)")
    parser.add_argument("--backlog", type=int, help="routine studies queued ahead (default 500)")
    parser.add_argument("--size", type=int, help="STAT image size in px (default 2048)")
    parser.add_argument("--broker", choices=("redis", "embedded"), default="redis")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument(
        "--xrv",
        choices=("densenet121-res224", "resnet50-res512"),
        help="a full-size torchxrayvision network with random weights instead of the demo model",
    )
    parser.add_argument(
        "--device", default="auto", help="model device: auto, cpu, cuda (default auto)"
    )
    args = parser.parse_args()
    studies = args.studies or (10 if args.quick else 50)
    backlog = args.backlog if args.backlog is not None else (50 if args.quick else 500)
    size = args.size or (512 if args.quick else 2048)

    cache = _cache()
    model_dir = xrv_model(cache, args.xrv) if args.xrv else demo_model(cache)
    print(f"model: {model_dir.name} on device {args.device}", flush=True)
    print("generating studies (cached) ...", flush=True)
    idle_files = stat_studies(cache / "tta", studies, size, "idle")
    backlog_files = stat_studies(cache / "tta", studies, size, "backlog")
    routine = routine_studies(cache / "tta", backlog)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; {studies} STAT studies of {size}x{size} per "
        f"scenario, {backlog} routine studies queued ahead in (b)",
        flush=True,
    )

    sink = WebhookSink()
    sink.start()
    with tempfile.TemporaryDirectory(prefix="pacs-ai-tta-") as tmp, broker(args.broker) as url:
        settings = Settings()
        settings.listener.port = free_port()
        settings.storage.data_dir = Path(tmp) / "data"
        settings.queue.broker_url = url
        settings.models.cxr_triage.path = model_dir
        settings.models.cxr_triage.device = args.device
        if args.xrv:
            settings.models.cxr_triage.adapter = "torchxrayvision"
        settings.alerts.webhook.url = sink.url
        config = Path(tmp) / "site.yaml"
        write_settings(settings, config)
        lanes = [
            [settings.queue.urgent_queue],
            [settings.queue.urgent_queue, settings.queue.routine_queue],
        ]
        with Stack(settings, config, lanes, log_dir=Path(tmp) / "logs") as stack:
            if stack.wait_for_workers() != len(lanes):
                raise SystemExit(f"workers did not start; logs in {tmp}/logs")
            assert stack.node is not None
            index = Index(settings.index_url)
            # One study first so that both workers have run the model once (lazy imports, caches).
            warm = stat_studies(cache / "tta", 1, size, "warm")
            measure(stack, sink, index, warm, "warm-up")
            results = {"idle": measure(stack, sink, index, idle_files, "idle")}

            routine_uids = [
                str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in routine
            ]
            backlog_left = 0
            if backlog:
                error = send(routine, stack.node.port)
                if error is not None:
                    raise SystemExit(f"C-STORE failed: {error}")
                deadline = time.time() + 120
                while time.time() < deadline:
                    queued = sum(
                        1
                        for uid in routine_uids
                        for j in index.study_jobs(uid)
                        if j.enqueued_at is not None
                    )
                    if queued == backlog:
                        break
                    time.sleep(0.2)
                results["backlog"] = measure(stack, sink, index, backlog_files, "backlog")
                backlog_left = sum(
                    1
                    for uid in routine_uids
                    for j in index.study_jobs(uid)
                    if j.status != JobStatus.DONE
                )
            index.close()
    sink.stop()
    figures = report(results, backlog_left, backlog)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
