"""``pacs-ai reindex``: an index restored from an older backup learns the spool's instances again."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pydicom
import pytest

from dicom_node.node import DicomNode
from tests.dicom_node.helpers import small_study
from tests.servers import storescu
from worker.cli import main


def test_reindex_indexes_what_the_index_lost_and_leaves_a_broken_file_in_place(
    site: tuple[Path, DicomNode], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, node = site
    files = small_study(tmp_path / "in", modality="CR", views=("PA", "LL"))
    result = storescu(
        files, host="127.0.0.1", port=node.port, called_aet="PACSAI", calling_aet="MODALITY1"
    )
    assert result.returncode == 0, result.stderr
    sops = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
    records = [node.index.instance(sop) for sop in sops]
    assert None not in records
    study_uid = str(pydicom.dcmread(files[0]).StudyInstanceUID)
    # The index goes back to before the study (a backup restored); one file is damaged since.
    db = sqlite3.connect(node.config.index_url.removeprefix("sqlite:///"))
    with db:
        db.execute("DELETE FROM instances WHERE study_instance_uid = ?", (study_uid,))
        db.execute("DELETE FROM studies WHERE study_instance_uid = ?", (study_uid,))
    db.close()
    damaged = Path(records[1].path)  # type: ignore[union-attr]
    damaged.write_bytes(damaged.read_bytes()[:-64])

    assert main(["reindex", "--config", str(config)]) == 1  # one file refused
    out = capsys.readouterr().out
    assert "2 instance file(s) in 2 series folder(s): 1 indexed, 1 refused" in out
    back = node.index.instance(sops[0])
    assert back is not None and back.path == records[0].path  # type: ignore[union-attr]
    assert (back.calling_aet, back.called_aet) == ("MODALITY1", "PACSAI")
    assert node.index.instance(sops[1]) is None and damaged.is_file()
    study = node.index.study(study_uid)
    assert study is not None and study.instance_count == 1

    # Run again: nothing new to index, the damaged file still refused.
    assert main(["reindex", "--config", str(config)]) == 1
    assert "0 indexed, 1 refused" in capsys.readouterr().out
