"""Which pipeline a complete study goes to, and with what priority.

This is the walking skeleton's fixed rule set (chest radiographs to the chest X-ray pipeline);
typed, configurable routing rules replace it without changing the callers.
"""

from __future__ import annotations

from dataclasses import dataclass

from dicom_node.index import StudyRow
from dicom_node.settings import QueueSettings

CXR_MODALITIES = frozenset({"CR", "DX"})


@dataclass(frozen=True)
class Route:
    """The decision for one study: a pipeline and a queue, or why it is ignored."""

    pipeline: str | None
    queue: str
    reason: str


def route_study(study: StudyRow, queues: QueueSettings) -> Route:
    """Decide the pipeline and queue for a complete study."""
    urgent = study.urgent or study.calling_aet in queues.urgent_calling_aets
    queue = queues.urgent_queue if urgent else queues.routine_queue
    why_urgent = " (urgent)" if urgent else ""
    if study.modality in CXR_MODALITIES:
        return Route("cxr", queue, f"modality {study.modality} → chest X-ray triage{why_urgent}")
    return Route(None, queue, f"no pipeline for modality {study.modality or 'unknown'}")
