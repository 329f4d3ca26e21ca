#!/usr/bin/env python
"""Ingest benchmark: the project's listener against dcmtk ``storescp`` and Orthanc, in one run.

Generates realistic uncompressed data once (cached, never committed): chest X-rays of 2500x2048,
16 bit (about 10 MB each, two views per study) and one CT series of 512x512 slices. Sends it with
dcmtk ``storescu`` over loopback on 1 and on 4 concurrent associations to

- the listener (``pacs-ai node``: fsync + rename + directory fsync + index row before success),
- dcmtk ``storescp`` writing to the same disk (no fsync),
- Orthanc (the test helper's configuration, storage fsync on as by default),

interleaving the receivers within each repetition, and prints MB/s and instances/s (median and
min-max), peak memory (RSS summed over each receiver's processes) and the ratios against the
targets of issue 4. Not collected by pytest (``norecursedirs``); run it on demand:

    .venv/bin/python tests/benchmarks/ingest.py --quick     # smoke run, a minute
    .venv/bin/python tests/benchmarks/ingest.py             # the full run, several minutes

Needs dcmtk, Orthanc and Redis (the listener hands completed studies to a real broker).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.servers import (  # noqa: E402
    LOOPBACK,
    Orthanc,
    RedisTestDatabase,
    free_port,
    port_open,
    reap,
    tool_env,
)

MB = 1_000_000
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
LISTENER_AET = "PACSAI"

# Targets from issue 4, as (scenario, reference receiver, metric, ratio, direction).
TARGETS = [
    ("cxr", 1, "storescp", "mb_s", 0.8),
    ("cxr", 4, "orthanc", "mb_s", 1.5),
    ("ct", 1, "orthanc", "inst_s", 1.3),
    ("ct", 4, "orthanc", "inst_s", 1.5),
]
LATENCY_TARGET = 1.5  # listener / storescp, lower is better
MEMORY_TARGET_MB = 300.0


def tool(name: str) -> str:
    """The absolute path of a command-line tool, or exit with what to install."""
    path = shutil.which(name) or shutil.which(name, path="/usr/local/sbin:/usr/sbin:/sbin")
    if path is None:
        raise SystemExit(f"{name} not found (Debian: apt-get install dcmtk orthanc)")
    return path


# --- data ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    name: str
    studies: int
    per_study: int
    rows: int
    cols: int


@dataclass
class DataSet:
    spec: DataSpec
    files: list[Path]
    # Files by study; a study is never split across associations unless there is only one.
    studies: list[list[Path]]

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)

    def split(self, associations: int) -> list[list[Path]]:
        """The files for each of ``associations`` concurrent senders."""
        if len(self.studies) >= associations:
            parts: list[list[Path]] = [[] for _ in range(associations)]
            for i, study in enumerate(self.studies):
                parts[i % associations].extend(study)
            return parts
        # One series (CT): contiguous runs of slices, as a PACS pushing in parallel would.
        size = -(-len(self.files) // associations)
        return [self.files[i : i + size] for i in range(0, len(self.files), size)]


def _uid(*parts: object) -> str:
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=["pacs-ai-bench", *map(str, parts)]))


def _save(path: Path, sop_class: str, sop_uid: str, fill: Callable[[Any], None]) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.ReferringPhysicianName = ""
    ds.AccessionNumber = ""
    ds.Manufacturer = "pacs-ai benchmark"
    fill(ds)
    ds.save_as(path, enforce_file_format=True)


def _generate(spec: DataSpec, folder: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : spec.rows, 0 : spec.cols]
    if spec.name == "cxr":
        # A smooth body-like gradient plus noise, 12 bits stored in 16.
        base = (1500 + 1200 * np.sin(np.pi * x / spec.cols) * np.sin(np.pi * y / spec.rows)).astype(
            np.uint16
        )
        for s in range(spec.studies):
            study_uid = _uid(spec, "study", s)
            for v, view in enumerate(("PA", "LL")[: spec.per_study]):
                noise = rng.integers(0, 256, size=base.shape, dtype=np.uint16)
                pixels = (base + noise).astype(np.uint16)
                sop_uid = _uid(spec, "sop", s, v)

                def fill(
                    d: Any,
                    s: int = s,
                    v: int = v,
                    view: str = view,
                    study_uid: str = study_uid,
                    pixels: Any = pixels,
                ) -> None:
                    d.PatientName = f"BENCH^CXR{s:04d}"
                    d.PatientID = f"BENCH-CXR-{s:04d}"
                    d.PatientBirthDate = ""
                    d.PatientSex = "O"
                    d.StudyInstanceUID = study_uid
                    d.SeriesInstanceUID = _uid(spec, "series", s, v)
                    d.StudyID = f"{s}"
                    d.SeriesNumber = v + 1
                    d.InstanceNumber = 1
                    d.Modality = "DX"
                    d.BodyPartExamined = "CHEST"
                    d.ViewPosition = view
                    d.PresentationIntentType = "FOR PRESENTATION"
                    d.ImageType = ["ORIGINAL", "PRIMARY"]
                    d.SamplesPerPixel = 1
                    d.PhotometricInterpretation = "MONOCHROME2"
                    d.Rows, d.Columns = spec.rows, spec.cols
                    d.BitsAllocated, d.BitsStored, d.HighBit = 16, 12, 11
                    d.PixelRepresentation = 0
                    d.PixelSpacing = [0.139, 0.139]
                    d.PixelData = pixels.tobytes()

                _save(folder / f"cxr-{s:04d}-{view}.dcm", DX_STORAGE, sop_uid, fill)
        return
    # CT: one series of slices, a disc of soft tissue in air.
    disc = ((x - spec.cols / 2) ** 2 + (y - spec.rows / 2) ** 2) < (0.4 * spec.cols) ** 2
    study_uid, series_uid = _uid(spec, "study"), _uid(spec, "series")
    for i in range(spec.per_study):
        pixels = np.where(disc, 1064, 24).astype(np.int16)
        pixels += rng.integers(-20, 20, size=pixels.shape, dtype=np.int16)
        sop_uid = _uid(spec, "sop", i)

        def fill_ct(d: Any, i: int = i, pixels: Any = pixels) -> None:
            d.PatientName = "BENCH^CT"
            d.PatientID = "BENCH-CT-0001"
            d.PatientBirthDate = ""
            d.PatientSex = "O"
            d.StudyInstanceUID = study_uid
            d.SeriesInstanceUID = series_uid
            d.FrameOfReferenceUID = _uid(spec, "for")
            d.StudyID = "1"
            d.SeriesNumber = 1
            d.InstanceNumber = i + 1
            d.Modality = "CT"
            d.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            d.ImagePositionPatient = [-180.0, -180.0, -i * 1.0]
            d.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
            d.SliceThickness = 1.0
            d.KVP = 120
            d.SamplesPerPixel = 1
            d.PhotometricInterpretation = "MONOCHROME2"
            d.Rows, d.Columns = spec.rows, spec.cols
            d.BitsAllocated, d.BitsStored, d.HighBit = 16, 16, 15
            d.PixelRepresentation = 1
            d.PixelSpacing = [0.7, 0.7]
            d.RescaleIntercept = -1024
            d.RescaleSlope = 1
            d.PixelData = pixels.tobytes()

        _save(folder / f"ct-{i:04d}.dcm", CT_STORAGE, sop_uid, fill_ct)


def load_data(spec: DataSpec, cache: Path) -> DataSet:
    """The data set for ``spec``, generated into ``cache`` on first use."""
    folder = cache / f"{spec.name}-{spec.studies}x{spec.per_study}-{spec.rows}x{spec.cols}"
    done = folder / ".complete"
    if not done.is_file():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        print(f"generating {spec.name} data in {folder} ...", flush=True)
        _generate(spec, folder)
        done.write_text("ok\n")
    files = sorted(folder.glob("*.dcm"))
    if spec.name == "cxr":
        studies: dict[str, list[Path]] = {}
        for f in files:
            studies.setdefault(f.name.split("-")[1], []).append(f)
        return DataSet(spec, files, list(studies.values()))
    return DataSet(spec, files, [files])


# --- receivers ----------------------------------------------------------------------------------


def _children_of(pids: set[int]) -> set[int]:
    """``pids`` and all their descendants (one scan of /proc)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found = set(pids)
    grew = True
    while grew:
        grew = False
        for pid, ppid in parent.items():
            if ppid in found and pid not in found:
                found.add(pid)
                grew = True
    return found


def _rss_bytes(pid: int) -> int:
    try:
        fields = Path(f"/proc/{pid}/statm").read_text().split()
    except OSError:
        return 0
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE")


class MemorySampler:
    """Peak of the summed RSS of a process and its descendants, sampled every 20 ms."""

    def __init__(self, root_pid: int) -> None:
        self.root_pid = root_pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        pids = _children_of({self.root_pid})
        last_scan = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - last_scan > 0.5:
                pids = _children_of({self.root_pid})
                last_scan = time.monotonic()
            self.peak = max(self.peak, sum(_rss_bytes(p) for p in pids))
            self._stop.wait(0.02)

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


class Receiver(Protocol):
    name: str
    aet: str
    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def pid(self) -> int: ...
    def stored(self) -> int: ...


class StoreSCP:
    """dcmtk ``storescp`` writing every instance into its own folder (no fsync)."""

    name = "storescp"
    aet = "STORESCP"

    def __init__(self, workdir: Path, fork: bool) -> None:
        self.out = workdir / "storescp"
        self.fork = fork
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        self.port = free_port()
        args = [tool("storescp"), "-aet", self.aet, "-od", str(self.out)]
        args += ["--fork"] if self.fork else []
        self._proc = subprocess.Popen(
            [*args, str(self.port)],
            env=tool_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        _wait_echo(self.aet, self.port)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            reap(self._proc)
            self._proc = None
        shutil.rmtree(self.out, ignore_errors=True)

    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stored(self) -> int:
        return sum(1 for p in self.out.iterdir() if p.is_file())


class OrthancReceiver:
    """Orthanc with fresh storage for every repetition (a re-sent instance would be skipped)."""

    name = "orthanc"
    aet = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = 0
        self._server: Orthanc | None = None
        self._count = 0

    def start(self) -> None:
        self._count += 1
        self._server = Orthanc(workdir=self.workdir / f"orthanc-{self._count}", aet=self.aet)
        self._server.start()
        self.port = self._server.dicom_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            shutil.rmtree(self._server.workdir, ignore_errors=True)
            self._server = None

    def pid(self) -> int:
        assert self._server is not None and self._server._process is not None
        return self._server._process.pid

    def stored(self) -> int:
        assert self._server is not None
        return int(self._server.rest("GET", "/statistics")["CountInstances"])


class Listener:
    """The project's node (``python -m worker.cli node``) with a fresh data folder each time."""

    name = "listener"
    aet = LISTENER_AET

    def __init__(self, workdir: Path, broker_url: str, processes: int | None) -> None:
        self.workdir = workdir
        self.broker_url = broker_url
        self.processes = processes
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._count = 0

    @property
    def data_dir(self) -> Path:
        return self.workdir / f"listener-{self._count}"

    def start(self) -> None:
        from worker.settings import Settings, write_settings

        self._count += 1
        self.port = free_port()
        settings = Settings()
        settings.listener.port = self.port
        settings.listener.ae_title = self.aet
        if self.processes is not None:
            settings.listener.processes = self.processes
        settings.storage.data_dir = self.data_dir
        settings.queue.broker_url = self.broker_url
        config = self.data_dir / "site.yaml"
        write_settings(settings, config)
        self._log = (self.data_dir / "node.log").open("ab")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "node", "--config", str(config)],
            cwd=REPO_ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        _wait_echo(self.aet, self.port, self._proc)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGTERM)
            reap(self._proc, 30)
            self._proc = None
            self._log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)

    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def stored(self) -> int:
        db = sqlite3.connect(f"file:{self.data_dir / 'index.sqlite3'}?mode=ro", uri=True)
        try:
            return int(db.execute("SELECT count(*) FROM instances").fetchone()[0])
        finally:
            db.close()


def _wait_echo(aet: str, port: int, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"{aet} exited with {proc.returncode} before it answered")
        if port_open(LOOPBACK, port):
            echo = subprocess.run(
                [tool("echoscu"), "-aec", aet, LOOPBACK, str(port)],
                env=tool_env(),
                capture_output=True,
                check=False,
            )
            if echo.returncode == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"{aet} on port {port} did not answer C-ECHO")


# --- runs ---------------------------------------------------------------------------------------


def send(receiver: Receiver, parts: Sequence[Sequence[Path]]) -> float:
    """Send each part on its own association, all at once; seconds until the last sender exits."""
    storescu = tool("storescu")
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [storescu, "-aec", receiver.aet, "-aet", "BENCHSCU", LOOPBACK, str(receiver.port)]
            + [str(p) for p in part],
            env=tool_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for part in parts
    ]
    errors = [p.communicate()[1] for p in procs]
    elapsed = time.perf_counter() - start
    for p, err in zip(procs, errors, strict=True):
        if p.returncode != 0 or b"E:" in err:
            raise SystemExit(f"storescu to {receiver.name} failed:\n{err.decode(errors='replace')}")
    return elapsed


@dataclass
class Run:
    data: str
    associations: int
    receiver: str
    seconds: list[float] = field(default_factory=list)
    peak_rss: list[int] = field(default_factory=list)
    instances: int = 0
    total_bytes: int = 0

    def mb_s(self) -> list[float]:
        return [self.total_bytes / MB / s for s in self.seconds]

    def inst_s(self) -> list[float]:
        return [self.instances / s for s in self.seconds]


def measure(
    receivers: Sequence[Receiver], data: DataSet, associations: int, reps: int
) -> list[Run]:
    runs = {
        r.name: Run(
            data.spec.name,
            associations,
            r.name,
            instances=len(data.files),
            total_bytes=data.total_bytes,
        )
        for r in receivers
    }
    parts = data.split(associations)
    for rep in range(reps):
        for receiver in receivers:
            receiver.start()
            try:
                os.sync()  # earlier runs' dirty pages must not be flushed on this run's clock
                with MemorySampler(receiver.pid()) as memory:
                    seconds = send(receiver, parts)
                stored = receiver.stored()
                if stored != len(data.files):
                    raise SystemExit(
                        f"{receiver.name} stored {stored} of {len(data.files)} instances"
                    )
            finally:
                receiver.stop()
            run = runs[receiver.name]
            run.seconds.append(seconds)
            run.peak_rss.append(memory.peak)
            print(
                f"  {data.spec.name} x{associations} rep {rep + 1} {receiver.name:9s} "
                f"{data.total_bytes / MB / seconds:7.1f} MB/s {len(data.files) / seconds:7.1f} inst/s "
                f"peak {memory.peak / MB:6.1f} MB",
                flush=True,
            )
    return list(runs.values())


def measure_latency(
    receivers: Sequence[Receiver], files: Sequence[Path], reps: int
) -> dict[str, list[float]]:
    """``storescu`` start to exit for one instance, a different one each time."""
    latencies: dict[str, list[float]] = {r.name: [] for r in receivers}
    for receiver in receivers:
        receiver.start()
        try:
            send(receiver, [[files[-1]]])  # warm-up: first association, imports, index file
            for f in files[:reps]:
                os.sync()
                latencies[receiver.name].append(send(receiver, [[f]]))
        finally:
            receiver.stop()
    return latencies


# --- report -------------------------------------------------------------------------------------


def _fmt(values: Sequence[float], digits: int = 1) -> str:
    return f"{statistics.median(values):.{digits}f} ({min(values):.{digits}f}-{max(values):.{digits}f})"


def machine() -> dict[str, str]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def report(
    runs: list[Run], latency: dict[str, list[float]], workdir: Path
) -> tuple[str, dict[str, object]]:
    lines = []
    df = subprocess.run(["df", "-h", str(workdir)], capture_output=True, text=True, check=False)
    info = machine()
    lines.append(
        f"machine: {info['cpus']} CPUs, {info['cpu']}, kernel {info['kernel']}, "
        f"Python {info['python']}"
    )
    lines.append(f"disk ({workdir}):\n{df.stdout.rstrip()}")
    lines.append("")
    lines.append(
        f"{'data':5s} {'assoc':>5s} {'receiver':9s} {'MB/s median (min-max)':>24s} "
        f"{'inst/s median (min-max)':>26s} {'peak RSS MB':>11s}"
    )
    for run in runs:
        lines.append(
            f"{run.data:5s} {run.associations:5d} {run.receiver:9s} {_fmt(run.mb_s()):>24s} "
            f"{_fmt(run.inst_s()):>26s} {max(run.peak_rss) / MB:11.1f}"
        )
    lines.append("")
    lines.append("targets (ratio of medians, listener / reference):")
    by_key = {(r.data, r.associations, r.receiver): r for r in runs}
    results: dict[str, object] = {}
    for data, assoc, ref, metric, target in TARGETS:
        mine, theirs = by_key.get((data, assoc, "listener")), by_key.get((data, assoc, ref))
        if mine is None or theirs is None:
            continue
        ratio = statistics.median(getattr(mine, metric)()) / statistics.median(
            getattr(theirs, metric)()
        )
        verdict = "met" if ratio >= target else "NOT met"
        unit = "MB/s" if metric == "mb_s" else "inst/s"
        lines.append(
            f"  {data} {assoc} assoc {unit:6s} vs {ref:8s}: {ratio:5.2f}x "
            f"(target >= {target}x) {verdict}"
        )
        results[f"{data}_{assoc}_vs_{ref}"] = ratio
    if latency.get("listener") and latency.get("storescp"):
        ratio = statistics.median(latency["listener"]) / statistics.median(latency["storescp"])
        verdict = "met" if ratio <= LATENCY_TARGET else "NOT met"
        lines.append(
            f"  one CXR storescu start-to-exit: listener {_fmt([1000 * s for s in latency['listener']])} ms, "
            f"storescp {_fmt([1000 * s for s in latency['storescp']])} ms"
            + (
                f", orthanc {_fmt([1000 * s for s in latency['orthanc']])} ms"
                if latency.get("orthanc")
                else ""
            )
            + f": {ratio:.2f}x (target <= {LATENCY_TARGET}x) {verdict}"
        )
        results["latency_vs_storescp"] = ratio
    cxr_peaks = [max(r.peak_rss) for r in runs if r.data == "cxr" and r.receiver == "listener"]
    if cxr_peaks:
        peak = max(cxr_peaks) / MB
        verdict = "met" if peak <= MEMORY_TARGET_MB else "NOT met"
        lines.append(
            f"  listener peak RSS during CXR runs: {peak:.0f} MB "
            f"(target <= {MEMORY_TARGET_MB:.0f} MB) {verdict}"
        )
        results["listener_cxr_peak_rss_mb"] = peak
    return "\n".join(lines), {
        "machine": info,
        "ratios": results,
        "runs": [asdict(r) for r in runs],
        "latency_s": latency,
    }


@contextlib.contextmanager
def redis_broker() -> Iterator[str]:
    """A Redis database claimed like the tests claim theirs, emptied afterwards."""
    database = RedisTestDatabase(
        os.environ.get("PACS_AI_TEST_REDIS_HOST", LOOPBACK),
        int(os.environ.get("PACS_AI_TEST_REDIS_PORT", "6379")),
    )
    if not database.reachable():
        raise SystemExit(f"Redis not reachable at {database.host}:{database.port}")
    database.claim()
    try:
        yield database.url
    finally:
        database.release()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer, smaller files (smoke run)")
    parser.add_argument("--reps", type=int, help="repetitions per case (default 3, quick 2)")
    parser.add_argument("--only", choices=["cxr", "ct"], help="one data set only")
    parser.add_argument(
        "--assoc",
        type=int,
        nargs="+",
        default=[1, 4],
        help="concurrent associations (default: 1 4)",
    )
    parser.add_argument(
        "--receivers",
        nargs="+",
        default=["storescp", "orthanc", "listener"],
        choices=["storescp", "orthanc", "listener"],
    )
    parser.add_argument(
        "--listener-processes",
        type=int,
        help="listener.processes for the node (default: its own default)",
    )
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path(tempfile.gettempdir()) / "pacs-ai-bench-cache",
        help="where generated data is kept between runs",
    )
    parser.add_argument("--workdir", type=Path, help="where receivers write (default: a temp dir)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    reps = args.reps or (2 if args.quick else 3)
    if args.quick:
        specs = [DataSpec("cxr", 8, 2, 1024, 1024), DataSpec("ct", 1, 60, 512, 512)]
    else:
        specs = [DataSpec("cxr", 100, 2, 2500, 2048), DataSpec("ct", 1, 300, 512, 512)]
    if args.only:
        specs = [s for s in specs if s.name == args.only]
    data = [load_data(s, args.cache) for s in specs]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="pacs-ai-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M %Z')}; receivers write to {workdir}")
    for d in data:
        print(
            f"data {d.spec.name}: {len(d.files)} instances, {d.total_bytes / MB:.0f} MB "
            f"({d.spec.rows}x{d.spec.cols}, {len(d.studies)} studies)"
        )

    runs: list[Run] = []
    latency: dict[str, list[float]] = {}
    with redis_broker() as broker_url:

        def receivers(associations: int) -> list[Receiver]:
            made: dict[str, Receiver] = {
                # storescp serves one association at a time unless it forks per association.
                "storescp": StoreSCP(workdir, fork=associations > 1),
                "orthanc": OrthancReceiver(workdir),
                "listener": Listener(workdir, broker_url, args.listener_processes),
            }
            return [made[name] for name in args.receivers]

        for d in data:
            for associations in args.assoc:
                runs += measure(receivers(associations), d, associations, reps)
        cxr = [d for d in data if d.spec.name == "cxr"]
        if cxr:
            count = 3 if args.quick else 10
            latency = measure_latency(receivers(1), cxr[0].files, count)

    text, results = report(runs, latency, workdir)
    print()
    print(text)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    shutil.rmtree(workdir, ignore_errors=True) if args.workdir is None else None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
