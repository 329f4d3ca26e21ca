"""Which queue a complete study goes to: urgent work never waits behind routine work."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicom_node.index import JobStatus, StudyRow, StudyStatus
from dicom_node.node import DicomNode
from dicom_node.routing import route_study
from dicom_node.settings import QueueSettings
from tests.dicom_node.helpers import small_study
from tests.servers import storescu


def study(modality: str = "CR", urgent: bool = False, calling_aet: str = "WARD") -> StudyRow:
    return StudyRow(
        study_instance_uid="1.2.3",
        status=StudyStatus.RECEIVING,
        modality=modality,
        urgent=urgent,
        calling_aet=calling_aet,
        instance_count=1,
        first_received_at=0.0,
        last_received_at=0.0,
        complete_after=0.0,
        completed_at=None,
        runs=0,
        reason=None,
    )


@pytest.mark.parametrize("modality", ["CR", "DX"])
def test_chest_radiographs_go_to_the_cxr_pipeline_on_the_routine_queue(modality: str) -> None:
    route = route_study(study(modality), QueueSettings())
    assert (route.pipeline, route.queue) == ("cxr", "routine")


def test_stat_priority_goes_to_the_urgent_queue() -> None:
    assert route_study(study(urgent=True), QueueSettings()).queue == "stat"


def test_er_calling_ae_goes_to_the_urgent_queue() -> None:
    queues = QueueSettings(urgent_calling_aets=["ER_CR1"])
    assert route_study(study(calling_aet="ER_CR1"), queues).queue == "stat"


def test_study_without_a_pipeline_is_ignored_with_the_reason() -> None:
    route = route_study(study("MR"), QueueSettings())
    assert route.pipeline is None
    assert "MR" in route.reason


def test_stat_request_in_the_header_reaches_the_stat_queue(node: DicomNode, tmp_path: Path) -> None:
    [path] = small_study(tmp_path / "in", kind="pneumothorax", modality="CR")
    ds = pydicom.dcmread(path)
    item = pydicom.Dataset()
    item.RequestedProcedurePriority = "STAT"
    item.RequestedProcedureID = "RP1"
    item.ScheduledProcedureStepID = "SPS1"
    ds.RequestAttributesSequence = [item]
    ds.save_as(path, enforce_file_format=True)
    assert storescu([path], host="127.0.0.1", port=node.port, called_aet="PACSAI").returncode == 0
    import time

    deadline = time.time() + 10
    while time.time() < deadline:
        jobs = node.index.study_jobs(str(ds.StudyInstanceUID))
        if jobs and jobs[0].status == JobStatus.QUEUED:
            break
        time.sleep(0.1)
    [job] = node.index.study_jobs(str(ds.StudyInstanceUID))
    assert job.queue == "stat"
