"""The command line an admin uses: complete help, echo and send against real nodes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from dicom_node.index import Index
from dicom_node.node import DicomNode, NodeConfig
from dicom_node.settings import CompletionSettings, ListenerSettings, QueueSettings, StorageSettings
from tests.dicom_node.helpers import small_study
from tests.servers import Orthanc, free_port
from worker.cli import build_parser, main

SUBCOMMANDS = [
    ["demo"],
    ["serve"],
    ["node"],
    ["worker"],
    ["echo"],
    ["send"],
    ["studies"],
    ["alerts"],
    ["alerts", "list"],
    ["alerts", "ack"],
    ["quarantine"],
    ["quarantine", "list"],
    ["quarantine", "show"],
    ["quarantine", "retry"],
    ["model"],
    ["model", "build-demo"],
]


def test_top_level_help_names_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("demo", "serve", "node", "worker", "echo", "send", "studies", "quarantine"):
        assert command in out


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_every_subcommand_has_help(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: pacs-ai" in capsys.readouterr().out


def test_every_option_is_explained() -> None:
    parser = build_parser()
    pending = [parser]
    while pending:
        current = pending.pop()
        for action in current._actions:
            if getattr(action, "choices", None) and isinstance(action.choices, dict):
                pending.extend(action.choices.values())
            elif action.dest not in ("help", "command", "action"):
                assert action.help, f"{current.prog}: {action.dest} has no help text"


@pytest.fixture
def node(tmp_path: Path, redis_url: str) -> Iterator[DicomNode]:
    config = NodeConfig(
        listener=ListenerSettings(port=0),
        storage=StorageSettings(data_dir=tmp_path / "data"),
        completion=CompletionSettings(),
        queue=QueueSettings(broker_url=redis_url),
        index_url=f"sqlite:///{tmp_path / 'index.sqlite3'}",
        broker_url=redis_url,
    )
    n = DicomNode(config)
    n.start()
    yield n
    n.stop()


def test_echo_succeeds_against_the_listener(
    node: DicomNode, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["echo", f"PACSAI@127.0.0.1:{node.port}"]) == 0
    assert "status 0x0000 (success)" in capsys.readouterr().out


def test_echo_to_a_closed_port_fails_with_a_clear_message(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["echo", f"PACSAI@127.0.0.1:{free_port()}"]) == 2
    assert "FAILED" in capsys.readouterr().err


def test_send_folder_lands_in_orthanc(
    orthanc: Orthanc, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    files = small_study(tmp_path / "study", views=("PA", "LL"))
    assert (
        main(
            [
                "send",
                str(tmp_path / "study"),
                "--to",
                f"{orthanc.aet}@127.0.0.1:{orthanc.dicom_port}",
            ]
        )
        == 0
    )
    assert "2 instance(s) stored" in capsys.readouterr().out
    for f in files:
        assert orthanc.find_sop(str(pydicom.dcmread(f).SOPInstanceUID)) is not None


def test_console_script_runs_as_a_separate_process() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "--help"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0
    assert "pacs-ai demo" in result.stdout


def test_invalid_settings_file_stops_with_the_offending_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "site.yaml"
    bad.write_text("listener:\n  portt: 1\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["studies", "--config", str(bad)])
    assert "portt" in str(exit_info.value.code)


def _site_with_index(tmp_path: Path) -> tuple[Path, Index]:
    """A site file with default settings and the index it names, open."""
    from worker.settings import Settings, write_settings

    settings = Settings()
    settings.storage.data_dir = tmp_path / "data"
    config = tmp_path / "site.yaml"
    write_settings(settings, config)
    return config, Index(settings.index_url)


def test_alerts_ack_records_who_acknowledged_and_list_shows_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, index = _site_with_index(tmp_path)
    alert_id, _ = index.claim_alert("1.2.3", "pneumothorax", "webhook", 0.97, now=1.0, payload={})
    index.close()
    assert main(["alerts", "ack", str(alert_id), "--by", "dr.er", "--config", str(config)]) == 0
    assert main(["alerts", "ack", "999", "--by", "dr.er", "--config", str(config)]) == 2
    capsys.readouterr()
    assert main(["alerts", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "pneumothorax" in out and "by dr.er" in out


def test_alerts_list_shows_hostile_acknowledger_text_escaped_not_raw(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, index = _site_with_index(tmp_path)
    alert_id, _ = index.claim_alert("1.2.3", "pneumothorax", "webhook", 0.97, now=1.0, payload={})
    # What anyone holding the link may put in its "by" field: a title change, a screen clear,
    # a colour, a bell and a right-to-left override.
    hostile = "\x1b]0;owned\x07\x1b[2J\x1b[31mdr.evil\u202e\x9b"
    index.acknowledge_alert(alert_id, hostile, now=2.0)
    index.record_alert_attempt(alert_id, 3.0, error="HTTP 500: \x1b[1mboom", next_attempt_at=9.0)
    index.close()
    capsys.readouterr()
    assert main(["alerts", "list", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out and "\x9b" not in out
    assert "by \\x1b]0;owned\\x07\\x1b[2J\\x1b[31mdr.evil\\u202e\\x9b" in out
    assert "last error: HTTP 500: \\x1b[1mboom" in out


def test_studies_shows_each_study_s_latest_job_and_why_it_waits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dicom_node.index import InstanceRecord

    config, index = _site_with_index(tmp_path)
    for study in ("1.2.3", "1.2.4"):
        index.record_instance(
            InstanceRecord(
                sop_instance_uid=study + ".1.1",
                study_instance_uid=study,
                series_instance_uid=study + ".1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                modality="CR",
                path=f"/spool/{study}.dcm",
                size_bytes=10,
                calling_aet="MODALITY",
                received_at=100.0,
            ),
            urgent=False,
            complete_after=130.0,
        )
    waiting = index.create_job("1.2.3", "cxr", "urgent", now=131.0)
    assert waiting is not None
    index.mark_job_error(waiting, "broker unavailable: ConnectionError: refused")
    done = index.create_job("1.2.4", "cxr", "routine", now=131.0)
    assert done is not None
    index.start_job(done, now=132.0)
    index.finish_job(done, now=133.0, result={})
    index.close()

    assert main(["studies", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "job cxr created: broker unavailable: ConnectionError: refused" in out
    assert "job cxr done, 1 attempt\n" in out
