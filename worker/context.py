"""What a worker process holds for its lifetime: settings, the index and models loaded once."""

from __future__ import annotations

import threading
from pathlib import Path

from dicom_node.index import Index
from worker.alerting import AlertDispatcher
from worker.heartbeat import Heartbeat
from worker.imaging.decode import FrameDecoder, InProcessDecoder
from worker.imaging.isolated import IsolatedDecoder
from worker.models import load_classifier
from worker.models.base import Classifier
from worker.models.batching import BatchingClassifier
from worker.outbox import OutboxDispatcher
from worker.settings import Settings


class WorkerContext:
    """One per worker process; models load on first use and stay loaded."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.index = Index(settings.index_url)
        self.dispatcher = AlertDispatcher(self.index, settings.alerts)
        self.outbox = OutboxDispatcher(self.index, settings.outputs)
        # This process's heartbeat; jobs record it as their worker (worker.heartbeat).
        self.heartbeat = Heartbeat(self.index, settings.queue, settings.worker.queues)
        worker = settings.worker
        # Compressed pixel data from senders is decoded apart (worker.imaging.isolated).
        self.decoder: FrameDecoder = (
            IsolatedDecoder(worker.decode_timeout_s, worker.decoder_memory_mb, worker.concurrency)
            if worker.isolate_decoding
            else InProcessDecoder()
        )
        self._classifier: Classifier | None = None
        self._lock = threading.Lock()

    @property
    def demo_model_dir(self) -> Path:
        return self.settings.storage.data_dir / "models" / "demo-cxr"

    def cxr_classifier(self) -> Classifier:
        with self._lock:
            if self._classifier is None:
                model_settings = self.settings.models.cxr_triage
                model = load_classifier(model_settings, demo_dir=self.demo_model_dir)
                if self.settings.worker.concurrency > 1:
                    # Jobs running side by side share forward passes instead of queueing for them.
                    model = BatchingClassifier(
                        model,
                        max_images=model_settings.batch_max_images,
                        wait_ms=model_settings.batch_wait_ms,
                    )
                self._classifier = model
            return self._classifier

    @property
    def worker_id(self) -> str:
        return self.heartbeat.worker_id

    def close(self) -> None:
        self.heartbeat.stop()
        self.dispatcher.stop()
        self.outbox.stop()
        if isinstance(self.decoder, IsolatedDecoder):
            self.decoder.close()
        self.index.close()
