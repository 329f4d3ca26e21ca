"""Fixtures for the CLI tests that need a running node and the site file it was started from."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dicom_node.node import DicomNode
from worker.service import node_config
from worker.settings import Settings, write_settings


@pytest.fixture
def site(tmp_path: Path, redis_url: str) -> Iterator[tuple[Path, DicomNode]]:
    """A site file (free port, data in ``tmp_path``) and a node running on it."""
    settings = Settings()
    settings.listener.port = 0
    settings.storage.data_dir = tmp_path / "data"
    settings.queue.broker_url = redis_url
    config = tmp_path / "site.yaml"
    write_settings(settings, config)
    node = DicomNode(node_config(settings, redis_url))
    node.start()
    yield config, node
    node.stop()
