"""End to end with real parts: dcmtk storescu → listener → queue → worker → SR in a real Orthanc.

The queue is the Redis at 127.0.0.1:6379 (a real broker, not eager mode) or the embedded Valkey;
the classifier is the demo model trained on phantoms and loaded through the real adapter.
"""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest

from dicom_node.index import Index, JobStatus
from dicom_node.settings import DestinationSettings
from tests.dicom_node.helpers import small_study
from tests.servers import (
    MllpReceiver,
    Orthanc,
    SmtpSink,
    dciodvfy,
    free_port,
    require,
    storescu,
)
from worker.demo.sink import WebhookSink
from worker.outputs.sr import read_findings_sr
from worker.service import Stack
from worker.settings import Settings, write_settings

REAL = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "data"
    / "real"
    / "siim_cr_jpeg_baseline.dcm"
)
FINDINGS = {"pneumothorax", "pleural_effusion", "cardiomegaly"}


def _settings(
    tmp_path: Path,
    broker_url: str,
    model_dir: Path,
    orthanc: Orthanc,
    webhook: str,
    mllp: MllpReceiver,
    smtp: SmtpSink,
) -> Settings:
    settings = Settings()
    settings.listener.port = free_port()
    settings.storage.data_dir = tmp_path / "data"
    settings.queue.broker_url = broker_url
    settings.completion.quiet_period_s = 2.0
    settings.completion.poll_interval_s = 0.1
    settings.models.cxr_triage.path = model_dir
    settings.outputs.destinations = [
        DestinationSettings(
            name="orthanc", ae_title=orthanc.aet, host="127.0.0.1", port=orthanc.dicom_port
        )
    ]
    settings.alerts.webhook.url = webhook
    settings.alerts.webhook.secret = "test-secret"
    settings.alerts.hl7.host, settings.alerts.hl7.port = "127.0.0.1", mllp.port
    settings.alerts.email.host, settings.alerts.email.port = "127.0.0.1", smtp.port
    settings.alerts.email.starttls = False
    settings.alerts.email.recipients = ["er-team@example.org"]
    return settings


def _wait_for_results(
    index: Index, study_uids: list[str], timeout: float = 180.0
) -> dict[str, dict[str, object]]:
    deadline = time.time() + timeout
    results: dict[str, dict[str, object]] = {}
    while time.time() < deadline and len(results) < len(study_uids):
        for uid in study_uids:
            done = [j for j in index.study_jobs(uid) if j.status == JobStatus.DONE and j.result]
            failed = [j for j in index.study_jobs(uid) if j.status == JobStatus.FAILED]
            assert not failed, f"job failed: {failed[0].error}"
            if done and done[-1].result is not None:
                results[uid] = done[-1].result
        time.sleep(0.2)
    assert len(results) == len(study_uids), (
        f"only {len(results)} of {len(study_uids)} studies finished"
    )
    return results


@pytest.mark.e2e
@pytest.mark.parametrize("broker", ["redis", "embedded"])
def test_studies_sent_by_storescu_come_back_as_valid_srs_in_orthanc_and_pneumothorax_alerts(
    broker: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
    orthanc: Orthanc,
    webhook_sink: WebhookSink,
    mllp_receiver: MllpReceiver,
    smtp_sink: SmtpSink,
    demo_model_dir: Path,
) -> None:
    sink = webhook_sink
    require(REAL.is_file(), f"real test file missing: {REAL}")
    broker_url = request.getfixturevalue("redis_url") if broker == "redis" else "embedded"
    settings = _settings(
        tmp_path, broker_url, demo_model_dir, orthanc, sink.url, mllp_receiver, smtp_sink
    )
    config = tmp_path / "site.yaml"
    write_settings(settings, config)

    ptx = small_study(tmp_path / "ptx", kind="pneumothorax", seed=7, patient_id="E2E-PTX", size=256)
    normal = small_study(
        tmp_path / "normal",
        kind="normal",
        seed=8,
        patient_id="E2E-NORMAL",
        views=("PA", "LL"),
        size=256,
    )
    queues = [[settings.queue.urgent_queue, settings.queue.routine_queue]]
    with Stack(settings, config, queues, log_dir=tmp_path / "logs") as stack:
        assert stack.node is not None
        assert stack.wait_for_workers() == 1, f"worker did not start: {tmp_path / 'logs'}"
        port = stack.node.port
        assert storescu(ptx, host="127.0.0.1", port=port, called_aet="PACSAI").returncode == 0
        assert storescu(normal, host="127.0.0.1", port=port, called_aet="PACSAI").returncode == 0
        real = storescu(
            [REAL], host="127.0.0.1", port=port, called_aet="PACSAI", extra_args=("-xy",)
        )
        assert real.returncode == 0, real.stderr

        studies = {
            "ptx": str(pydicom.dcmread(ptx[0]).StudyInstanceUID),
            "normal": str(pydicom.dcmread(normal[0]).StudyInstanceUID),
            "real": str(pydicom.dcmread(REAL, stop_before_pixels=True).StudyInstanceUID),
        }
        sources = {
            "ptx": {str(pydicom.dcmread(f).SOPInstanceUID) for f in ptx},
            "normal": {str(pydicom.dcmread(f).SOPInstanceUID) for f in normal},
            "real": {str(pydicom.dcmread(REAL, stop_before_pixels=True).SOPInstanceUID)},
        }
        index = Index(settings.index_url)
        results = _wait_for_results(index, list(studies.values()))

        for name, study_uid in studies.items():
            result = results[study_uid]
            sr_uid = str(result["sr_sop_instance_uid"])
            raw = orthanc.wait_for_sop(sr_uid, timeout=60)
            path = tmp_path / f"{name}-sr.dcm"
            path.write_bytes(raw)
            validation = dciodvfy(path)
            assert validation.ok, validation.output
            sr = pydicom.dcmread(path)
            assert sr.StudyInstanceUID == study_uid, "the SR must join the study it reports on"
            assert "DEMO / NOT FOR CLINICAL USE" in sr.SeriesDescription
            read = read_findings_sr(sr)
            assert {f.finding for f in read} == FINDINGS
            for finding in read:
                assert 0.0 <= finding.probability <= 1.0
                assert set(finding.source_sop_instance_uids) <= sources[name]
                assert finding.source_sop_instance_uids
            referenced = {
                ref.ReferencedSOPInstanceUID
                for study in sr.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence
                for ref in series.ReferencedSOPSequence
            }
            assert referenced == sources[name], "the SR's evidence must list every source image"
            deliveries = index.deliveries_of(sr_uid)
            assert [d["status"] for d in deliveries] == ["delivered"]
            # The narrative draft travels with it and passes the validator too.
            draft_path = tmp_path / f"{name}-draft.dcm"
            draft_path.write_bytes(
                orthanc.wait_for_sop(str(result["report_sop_instance_uid"]), timeout=60)
            )
            assert dciodvfy(draft_path).ok
            assert pydicom.dcmread(draft_path).PreliminaryFlag == "PRELIMINARY"

        by_finding = {f["finding"]: f for f in results[studies["ptx"]]["findings"]}  # type: ignore[attr-defined]
        assert by_finding["pneumothorax"]["present"] and by_finding["pneumothorax"]["urgent"]
        normal_findings = results[studies["normal"]]["findings"]
        assert not any(f["present"] for f in normal_findings)  # type: ignore[attr-defined]

        time.sleep(0.5)
        alerts = [body for _, body in sink.received()]
        ptx_alerts = [a for a in alerts if a["study_instance_uid"] == studies["ptx"]]
        assert len(ptx_alerts) == 1 and ptx_alerts[0]["finding"] == "pneumothorax"
        assert ptx_alerts[0]["label"] == "DEMO / NOT FOR CLINICAL USE"
        assert "patient_name" not in ptx_alerts[0] and "E2E-PTX" not in str(ptx_alerts[0])
        assert not [a for a in alerts if a["study_instance_uid"] == studies["normal"]]
        assert all(r.signature_ok for r in sink.requests), "every webhook call is signed"
        # HL7 and e-mail: one each per urgent study (the pneumothorax phantom; the real file may
        # score above the demo threshold too), never for the normal study.
        accession = str(pydicom.dcmread(ptx[0]).AccessionNumber)
        hl7_ptx = [m for m in mllp_receiver.messages if str(m.segment("ORC")[3]) == accession]
        assert len(hl7_ptx) == 1
        assert [str(o[8]) for o in hl7_ptx[0].segments("OBX")] == ["AA", "AA"]
        assert str(hl7_ptx[0].segment("OBR")[25]) == "P"
        mails = [m for m in smtp_sink.messages if accession in m["Subject"]]
        assert len(mails) == 1 and "Pneumothorax" in mails[0]["Subject"]
        normal_accession = str(pydicom.dcmread(normal[0]).AccessionNumber)
        assert not [m for m in smtp_sink.messages if normal_accession in m["Subject"]]
        index.close()
