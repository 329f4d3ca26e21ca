"""``pacs-ai serve``: the real-use command runs every component and stops cleanly on SIGTERM."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

import pydicom
import pytest

from dicom_node.index import Index, JobStatus
from dicom_node.settings import DestinationSettings
from tests.dicom_node.helpers import small_study
from tests.servers import Orthanc, echoscu, free_port, port_open, storescu
from worker.settings import Settings, write_settings


def _settings(tmp_path: Path, orthanc: Orthanc, demo_model_dir: Path) -> Settings:
    settings = Settings()
    settings.listener.port = free_port()
    settings.storage.data_dir = tmp_path / "data"
    settings.models.cxr_triage.path = demo_model_dir
    settings.outputs.destinations = [
        DestinationSettings(
            name="pacs", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port
        )
    ]
    return settings


def _start_serve(
    settings: Settings, config: Path, log: IO[bytes], cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """``pacs-ai serve`` with everything it prints in ``log``, once its listener answers.

    Started as an operator starts it, by its console script, in ``cwd`` when given.
    """
    write_settings(settings, config)
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("pacs-ai")), "serve", "--config", str(config)],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=cwd,
    )
    deadline = time.time() + 60
    while not port_open("127.0.0.1", settings.listener.port) and time.time() < deadline:
        assert proc.poll() is None, Path(log.name).read_text()
        time.sleep(0.2)
    assert echoscu("127.0.0.1", settings.listener.port, "PACSAI").returncode == 0
    return proc


def _done_job_result(index: Index, study_uid: str, timeout: float = 120) -> dict[str, Any] | None:
    """The result of the study's first job to finish, or None if none does in time."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        done = [j for j in index.study_jobs(study_uid) if j.status == JobStatus.DONE]
        if done and done[0].result is not None:
            return done[0].result
        time.sleep(0.2)
    return None


def _stop_serve(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


@pytest.mark.e2e
def test_serve_turns_a_study_into_an_sr_in_the_pacs_and_stops_cleanly(
    tmp_path: Path, orthanc: Orthanc, demo_model_dir: Path
) -> None:
    settings = _settings(tmp_path, orthanc, demo_model_dir)
    config = tmp_path / "site.yaml"
    log = (tmp_path / "serve.log").open("wb")
    # Started from a folder holding packages named like what its child processes import (a
    # shared folder, say): the listener's children and the workers must not import them.
    poisoned = tmp_path / "shared-folder"
    for name in ("dicom_node", "worker", "pydicom", "dl"):
        (poisoned / name).mkdir(parents=True)
        (poisoned / name / "__init__.py").write_text(
            f"raise ImportError('{name} imported from the working directory')\n"
        )
    proc = _start_serve(settings, config, log, cwd=poisoned)
    try:
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
        result = _done_job_result(index, study_uid)
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
        code = _stop_serve(proc)
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


@pytest.mark.e2e
def test_serve_logs_no_patient_data_when_the_libraries_complain_about_its_values(
    tmp_path: Path, orthanc: Orthanc, demo_model_dir: Path
) -> None:
    # Values a PACS really sends and pydicom or highdicom complain about, quoting them: a name of
    # one component (no caret), a birth date and a sex in the wrong format. The study still gets
    # its SR, and none of them reaches the log.
    name, birth_date, sex, patient_id = "PRIVACYSENTINEL", "1961-07-04", "male", "PID-SENTINEL-7"
    files = small_study(tmp_path / "in", kind="normal", seed=5, patient_id=patient_id, size=256)
    for path in files:
        ds = pydicom.dcmread(path)
        ds.PatientName = name
        ds.PatientBirthDate = birth_date
        ds.PatientSex = sex
        ds.save_as(path)
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    settings = _settings(tmp_path, orthanc, demo_model_dir)
    log_path = tmp_path / "serve.log"
    log = log_path.open("wb")
    proc = _start_serve(settings, tmp_path / "site.yaml", log)
    try:
        sent = storescu(files, host="127.0.0.1", port=settings.listener.port, called_aet="PACSAI")
        assert sent.returncode == 0
        index = Index(settings.index_url)
        result = _done_job_result(index, study_uid)
        index.close()
        assert result is not None, log_path.read_text()[-3000:]
        sr = pydicom.dcmread(io.BytesIO(orthanc.wait_for_sop(result["sr_sop_instance_uid"], 60)))
    finally:
        code = _stop_serve(proc)
        log.close()
    assert code == 0
    text = log_path.read_text()
    # What was wrong is there for the operator, without the values.
    assert "is unlikely to represent the intended person name" in text
    # Once per study, not once per document built.
    assert text.count("source PatientBirthDate is not a valid DA; left out") == 1
    assert text.count("source PatientSex is not a valid CS; left out") == 1
    for value in (name, birth_date, sex, patient_id):
        assert value not in text, f"{value!r} is in the log"
    # The SR still carries the patient's data as received (it goes to the PACS, not to a log).
    assert str(sr.PatientName) == name
    assert sr.PatientID == patient_id
