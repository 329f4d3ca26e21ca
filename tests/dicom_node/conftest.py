"""Fixtures for listener tests: a DicomNode in this process on a free port, real Redis broker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from dicom_node.node import DicomNode, NodeConfig
from dicom_node.settings import (
    CompletionSettings,
    ListenerSettings,
    QueueSettings,
    StorageSettings,
)


def make_config(tmp_path: Path, broker_url: str, port: int = 0, quiet: float = 30.0) -> NodeConfig:
    storage = StorageSettings(data_dir=tmp_path / "data")
    return NodeConfig(
        listener=ListenerSettings(port=port),
        storage=storage,
        completion=CompletionSettings(quiet_period_s=quiet, poll_interval_s=0.1),
        queue=QueueSettings(broker_url=broker_url),
        index_url=f"sqlite:///{tmp_path / 'data' / 'index.sqlite3'}",
        broker_url=broker_url,
    )


@pytest.fixture
def node(tmp_path: Path, redis_url: str) -> Iterator[DicomNode]:
    n = DicomNode(make_config(tmp_path, redis_url))
    n.start()
    yield n
    n.stop()


Configure = Callable[[NodeConfig], None]
StartNode = Callable[..., DicomNode]


@pytest.fixture
def start_node(tmp_path: Path, redis_url: str) -> Iterator[StartNode]:
    """``start_node(configure)``: a running node whose settings ``configure(config)`` adjusted.

    Each node started in a test gets a data folder of its own; all are stopped at the end.
    """
    started: list[DicomNode] = []

    def start(configure: Configure | None = None) -> DicomNode:
        config = make_config(tmp_path / f"node{len(started)}", redis_url)
        if configure is not None:
            configure(config)
        node = DicomNode(config)
        node.start()
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()
