"""A worker that dies mid-job: its job goes back to its queue within seconds, not hours.

``pacs-ai serve`` with real parts (dcmtk storescu, the listener, the embedded broker, two workers,
Orthanc as the PACS). The broker alone would hand a dead worker's unacknowledged job out again
only after its visibility timeout (2 h by default); the index knows which process ran it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest

from dicom_node.index import Index, JobRow, JobStatus
from tests.dicom_node.helpers import small_study
from tests.e2e.test_serve import _settings, _start_serve, _stop_serve, _worker_pids
from tests.e2e.test_urgent_lane import _stat
from tests.images import gdcm_killer
from tests.servers import Orthanc, storescu

REAL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "real"


def _wait_for(what: str, found: Callable[[], object], timeout: float, log: Path) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = found()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(
        f"timed out after {timeout} s waiting for {what}\n{log.read_text()[-4000:]}"
    )


def _decoder_processes() -> dict[int, int]:
    """Decoder child pid -> its worker's pid, for every isolated decoder process running."""
    found = subprocess.run(
        ["pgrep", "-f", "worker.imaging.isolated"], capture_output=True, text=True
    ).stdout.split()
    parents = {}
    for pid in map(int, found):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def _send(files: list[Path], port: int, *proposal: str) -> None:
    """storescu ``files``; ``proposal``: -xy for JPEG Baseline files, -xs for JPEG Lossless."""
    result = storescu(files, host="127.0.0.1", port=port, called_aet="PACSAI", extra_args=proposal)
    assert result.returncode == 0, result.stderr


def _latest_job(index: Index, study_uid: str) -> JobRow | None:
    jobs = index.study_jobs(study_uid)
    return jobs[-1] if jobs else None


def _job_in(index: Index, study_uid: str, status: JobStatus, timeout: float, log: Path) -> JobRow:
    """The study's latest job once it is in ``status``."""
    job = _wait_for(
        f"the job of {study_uid} to be {status.value}",
        lambda: (j := _latest_job(index, study_uid)) and j.status == status and j,
        timeout,
        log,
    )
    assert isinstance(job, JobRow)
    return job


@pytest.mark.e2e
def test_a_worker_killed_mid_job_has_its_study_re_run_and_its_sr_delivered_once(
    tmp_path: Path, orthanc: Orthanc, demo_model_dir: Path
) -> None:
    source = REAL / "siim_cr_jpeg_baseline.dcm"
    if not source.is_file():
        pytest.fail(f"real test file missing: {source}")
    settings = _settings(tmp_path, orthanc, demo_model_dir)
    settings.completion.poll_interval_s = 0.1
    config = tmp_path / "site.yaml"
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    proc = _start_serve(settings, config, log)
    stopped: list[int] = []
    try:
        index = Index(settings.index_url)
        workers = _worker_pids(config)
        _wait_for(
            "both workers ready (model loaded, decoder started)",
            lambda: log_path.read_text().count(" ready.") >= 2,
            120,
            log_path,
        )
        decoders = _wait_for(
            "a decoder process per worker",
            lambda: (d := _decoder_processes()) and set(d.values()) >= workers and d,
            60,
            log_path,
        )
        assert isinstance(decoders, dict)
        # Hold every decoder: whichever worker takes the job is then busy with it, mid-job,
        # when it is killed (the real compressed SIIM image is decoded in the worker's decoder).
        for pid in decoders:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        study = tmp_path / "in" / "stat.dcm"
        study.parent.mkdir()
        study.write_bytes(source.read_bytes())
        _stat(study)
        study_uid = str(pydicom.dcmread(study, stop_before_pixels=True).StudyInstanceUID)
        _send([study], settings.listener.port, "-xy")
        running = _job_in(index, study_uid, JobStatus.RUNNING, 60, log_path)
        assert running.worker is not None
        victim = int(running.worker.rsplit(":", 1)[1])
        assert victim in workers
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        for pid, parent in decoders.items():
            # The victim's decoder goes with it; the other worker's decodes again.
            os.kill(pid, signal.SIGKILL if parent == victim else signal.SIGCONT)
        stopped.clear()

        done = _job_in(index, study_uid, JobStatus.DONE, 60, log_path)
        assert done.result is not None
        orthanc.wait_for_sop(done.result["sr_sop_instance_uid"], timeout=30)
        seconds = time.monotonic() - killed_at
        print(f"\nSTAT study re-run and SR delivered {seconds:.1f} s after kill -9 of its worker")
        assert done.job_id == running.job_id and done.attempts == 2 and done.losses == 1
        assert len(index.study_jobs(study_uid)) == 1, "one job, run twice"
        [sr] = [o for o in index.study_outputs(study_uid) if o["kind"] == "findings-sr"]
        _wait_for(
            "the outbox to record the delivery",
            lambda: all(
                d["status"] == "delivered" for d in index.deliveries_of(sr["sop_instance_uid"])
            ),
            30,
            log_path,
        )
        deliveries = index.deliveries_of(sr["sop_instance_uid"])
        assert [(d["status"], d["attempts"]) for d in deliveries] == [("delivered", 1)], (
            "delivered exactly once"
        )
        assert "worker" in (Path(log_path).read_text()) and "restarting" in log_path.read_text()
        index.close()
    finally:
        for pid in stopped:
            os.kill(pid, signal.SIGCONT)
        code = _stop_serve(proc)
        log.close()
    assert code == 0


@pytest.mark.e2e
def test_an_image_that_kills_its_worker_three_times_is_dead_lettered_and_stat_is_still_served(
    tmp_path: Path, orthanc: Orthanc, demo_model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from worker.cli import main

    settings = _settings(tmp_path, orthanc, demo_model_dir)
    settings.completion.poll_interval_s = 0.1
    # Decoding in the worker's own process, as before isolation: the image kills the worker.
    settings.worker.isolate_decoding = False
    config = tmp_path / "site.yaml"
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    proc = _start_serve(settings, config, log)
    try:
        index = Index(settings.index_url)
        killer = gdcm_killer(tmp_path / "killer")
        _stat(killer)
        killer_uid = str(pydicom.dcmread(killer, stop_before_pixels=True).StudyInstanceUID)
        _send([killer], settings.listener.port, "-xs")
        dead = _job_in(index, killer_uid, JobStatus.DEAD, 120, log_path)

        assert dead.losses == 3 and dead.attempts == 3
        assert "its worker died 3 times while running it" in (dead.error or "")
        assert "killed by SIGABRT" in (dead.error or "")
        # The urgent lane still serves: the next STAT study gets its SR.
        files = small_study(tmp_path / "next", kind="pneumothorax", seed=9, size=256)
        for path in files:
            _stat(path)
        next_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        _send(files, settings.listener.port)
        done = _job_in(index, next_uid, JobStatus.DONE, 120, log_path)
        assert done.result is not None
        orthanc.wait_for_sop(done.result["sr_sop_instance_uid"], timeout=30)
        # Nothing runs the dead job again.
        time.sleep(2)
        after = _latest_job(index, killer_uid)
        assert after is not None and after.status == JobStatus.DEAD and after.attempts == 3
        index.close()
        # The operator sees it, and why.
        capsys.readouterr()
        assert main(["studies", "--config", str(config)]) == 0
        out = capsys.readouterr().out
        assert "job cxr dead, 3 attempts: its worker died 3 times" in out
    finally:
        code = _stop_serve(proc)
        log.close()
    assert code == 0
