"""``pacs-ai serve``: the real-use command runs every component and stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.index import Index, JobStatus
from dicom_node.settings import DestinationSettings
from tests.dicom_node.helpers import small_study
from tests.servers import Orthanc, echoscu, free_port, port_open, storescu
from worker.settings import Settings, write_settings


@pytest.mark.e2e
def test_serve_turns_a_study_into_an_sr_in_the_pacs_and_stops_cleanly(
    tmp_path: Path, orthanc: Orthanc, demo_model_dir: Path
) -> None:
    settings = Settings()
    settings.listener.port = free_port()
    settings.storage.data_dir = tmp_path / "data"
    settings.models.cxr_triage.path = demo_model_dir
    settings.outputs.destinations = [
        DestinationSettings(
            name="pacs", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port
        )
    ]
    config = tmp_path / "site.yaml"
    write_settings(settings, config)
    log = (tmp_path / "serve.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 60
        while not port_open("127.0.0.1", settings.listener.port) and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            time.sleep(0.2)
        assert echoscu("127.0.0.1", settings.listener.port, "PACSAI").returncode == 0
        files = small_study(
            tmp_path / "in", kind="pneumothorax", seed=3, patient_id="SERVE-1", size=256
        )
        assert (
            storescu(
                files, host="127.0.0.1", port=settings.listener.port, called_aet="PACSAI"
            ).returncode
            == 0
        )
        study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
        index = Index(settings.index_url)
        deadline = time.time() + 120
        result = None
        while time.time() < deadline and result is None:
            done = [j for j in index.study_jobs(study_uid) if j.status == JobStatus.DONE]
            result = done[0].result if done else None
            time.sleep(0.2)
        assert result is not None, (tmp_path / "serve.log").read_text()[-3000:]
        orthanc.wait_for_sop(result["sr_sop_instance_uid"], timeout=60)

        # A worker that dies (kill -9) is started again, and the next study is still read.
        workers = _worker_pids(config)
        assert workers, "serve started no worker processes"
        for pid in workers:
            os.kill(pid, signal.SIGKILL)
        deadline = time.time() + 60
        while time.time() < deadline:
            restarted = _worker_pids(config)
            if len(restarted) == len(workers) and not restarted & workers:
                break
            time.sleep(0.2)
        assert len(restarted) == len(workers) and not restarted & workers, "workers not restarted"
        assert "restarting" in (tmp_path / "serve.log").read_text()
        second = small_study(
            tmp_path / "in2", kind="normal", seed=4, patient_id="SERVE-2", size=256
        )
        assert (
            storescu(
                second, host="127.0.0.1", port=settings.listener.port, called_aet="PACSAI"
            ).returncode
            == 0
        )
        second_uid = str(pydicom.dcmread(second[0]).StudyInstanceUID)
        deadline = time.time() + 120
        while time.time() < deadline:
            if any(j.status == JobStatus.DONE for j in index.study_jobs(second_uid)):
                break
            time.sleep(0.2)
        assert any(j.status == JobStatus.DONE for j in index.study_jobs(second_uid)), (
            tmp_path / "serve.log"
        ).read_text()[-3000:]
        index.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
        log.close()
    assert code == 0
    assert not port_open("127.0.0.1", settings.listener.port), (
        "the listener must be closed after SIGTERM"
    )
    leftovers = subprocess.run(["pgrep", "-f", str(config)], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", "worker processes must stop with serve"


def _worker_pids(config: Path) -> set[int]:
    """The worker processes ``serve`` started for ``config``."""
    found = subprocess.run(
        ["pgrep", "-f", f"worker.cli worker .*--config {config}"], capture_output=True, text=True
    )
    return {int(pid) for pid in found.stdout.split()}
