"""``pacs-ai quarantine list/show/retry``: an admin sees why input was refused and can retry it."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest

from dicom_node.node import DicomNode
from tests.dicom_node.helpers import send_raw, small_study
from worker.cli import main


def _quarantine_pixel_less(node: DicomNode, tmp_path: Path) -> tuple[str, pydicom.Dataset, Path]:
    [good] = small_study(tmp_path / "in", patient_id="PAT-SECRET-1")
    ds = pydicom.dcmread(good)
    broken = pydicom.dcmread(good)
    del broken.PixelData
    path = tmp_path / "nopixels.dcm"
    broken.save_as(path, enforce_file_format=True)
    assert send_raw(path, node.port, ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) == 0xA900
    [entry] = node.index.list_quarantine()
    return entry.id, ds, good


def test_show_explains_the_refusal_without_patient_identifiers(
    site: tuple[Path, DicomNode], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, node = site
    entry_id, ds, _ = _quarantine_pixel_less(node, tmp_path)
    assert main(["quarantine", "show", entry_id, "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "pixel data" in out and "0xA900" in out
    assert str(ds.SOPInstanceUID) in out and "Digital X-Ray" in out
    assert "PAT-SECRET-1" not in out and str(ds.PatientName) not in out
    assert main(["quarantine", "show", "no-such-entry", "--config", str(config)]) == 2


def test_retry_stores_a_fixed_instance_and_clears_the_entry(
    site: tuple[Path, DicomNode], tmp_path: Path
) -> None:
    config, node = site
    entry_id, ds, good = _quarantine_pixel_less(node, tmp_path)
    # Still broken: refused again, the entry stays with its reason.
    assert main(["quarantine", "retry", entry_id, "--config", str(config)]) == 1
    assert node.index.quarantine_entry(entry_id) is not None
    # The operator puts the complete file in place of the broken one.
    entry = node.index.quarantine_entry(entry_id)
    assert entry is not None
    (Path(entry.path) / "instance.dcm").write_bytes(good.read_bytes())
    assert main(["quarantine", "retry", entry_id, "--config", str(config)]) == 0
    record = node.index.instance(str(ds.SOPInstanceUID))
    assert record is not None and Path(record.path).is_file()
    assert node.index.quarantine_entry(entry_id) is None
    assert main(["quarantine", "retry", entry_id, "--config", str(config)]) == 2
