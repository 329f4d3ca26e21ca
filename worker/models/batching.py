"""Dynamic micro-batching: concurrent studies in one worker share one forward pass.

A worker running several jobs at once (``worker.concurrency`` > 1, thread pool) wraps its model
in a ``BatchingClassifier``: each job's ``predict`` call joins a queue, and one thread runs the
model on everything that arrived within ``wait_ms`` of the first request (at most ``max_images``).
On a GPU that turns N small launches into one; on a lone study it costs at most ``wait_ms``.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from worker.findings import DecodedImage, ModelCard
from worker.models.base import Classifier


@dataclass
class _Request:
    images: Sequence[DecodedImage]
    future: Future[list[dict[str, float]]] = field(default_factory=Future)


class BatchingClassifier:
    """A Classifier that batches concurrent ``predict`` calls of other threads into one."""

    def __init__(self, inner: Classifier, *, max_images: int = 16, wait_ms: float = 5.0) -> None:
        self.inner = inner
        self.card: ModelCard = inner.card
        self.default_thresholds = inner.default_thresholds
        self.max_images = max(1, max_images)
        self.wait_s = max(0.0, wait_ms / 1000.0)
        # (number of model calls, images) so far: what a benchmark or test can look at.
        self.calls = 0
        self.images = 0
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="model-batcher", daemon=True)
        self._thread.start()

    def predict(self, images: Sequence[DecodedImage]) -> list[dict[str, float]]:
        """Same contract as the wrapped model; blocks until this request's batch has run."""
        if not images:
            return []
        request = _Request(images)
        self._queue.put(request)
        return request.future.result()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        batch, count = [first], len(first.images)
        deadline = time.monotonic() + self.wait_s
        while count < self.max_images:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                nxt = self._queue.get(timeout=remaining)
            except queue.Empty:
                break
            if nxt is None:
                return batch, True
            batch.append(nxt)
            count += len(nxt.images)
        return batch, False

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch, stopping = self._collect(first)
            images = [image for request in batch for image in request.images]
            try:
                scores = self.inner.predict(images)
            except BaseException as exc:  # every waiting job learns why
                for request in batch:
                    request.future.set_exception(exc)
                continue
            self.calls += 1
            self.images += len(images)
            start = 0
            for request in batch:
                end = start + len(request.images)
                request.future.set_result(scores[start:end])
                start = end
