"""The output outbox: every SR goes to every destination through rows in the index, exactly once.

A job only records its outputs and creates one ``deliveries`` row per object and destination, then
gives the dispatcher a push. The dispatcher (one thread per worker process; rows are leased so two
processes never send the same one) sends all due rows of a destination on one association, and
decides each row's fate from the destination's answer:

- stored (success or warning status): delivered, never sent again;
- a refusal that will not change on retry (SOP class not accepted, a failure status such as
  0xA900 or 0xC000): dead at once, with the status, for an operator to look at;
- anything else (destination down, out of resources): pending again after an exponential backoff
  with jitter, until the retry horizon (24 h by default) has passed; then dead.

A destination with ``verify: commitment`` is also asked for Storage Commitment of what it stored
(one N-ACTION per batch, on the same association). Those rows wait as ``committing`` until the
destination's N-EVENT-REPORT reaches the listener (:meth:`dicom_node.scp.StorageSCP.handle_event_report`
records it in the index): committed objects are delivered there; objects it failed, and any
without a report within ``commitment_timeout_s``, are sent again by a later pass like any transient
failure.

Association failures also count against the destination's circuit breaker: after N in a row nobody
tries it for a cool-down, then one sender probes it. ``pacs-ai outbox`` lists, revives and purges.
"""

from __future__ import annotations

import logging
import random
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.background import BackgroundPass
from dicom_node.errors import DestinationUnavailable
from dicom_node.index import DeliveryStatus, Index
from dicom_node.scu import RemoteNode, StoreOutcome, store_datasets
from dicom_node.settings import DestinationSettings
from worker.outputs.kos import KIND as KOS_KIND
from worker.outputs.summary import KIND as SUMMARY_KIND
from worker.settings import OutputSettings

log = logging.getLogger(__name__)

# A sender holds its rows this long beyond the association's own timeouts before another may.
LEASE_MARGIN_S = 30.0


def retryable_status(status: int) -> bool:
    """C-STORE failure statuses that may go away on their own (PS3.4 B.2.3, PS3.7 C)."""
    return (
        0xA700 <= status <= 0xA7FF  # refused: out of resources
        or status in (0x0110, 0x0210, 0x0213)  # processing failure, duplicate invocation, resources
    )


def retry_delay(attempts: int, max_delay_s: float) -> float:
    """Exponential backoff with jitter: about 1 s, 2 s, 4 s, ... up to ``max_delay_s``."""
    base = min(max_delay_s, 2.0 ** min(attempts, 30))
    return float(base * (0.8 + 0.4 * random.random()))


def wants(dest: DestinationSettings, kind: str) -> bool:
    """Does this destination take outputs of this kind? KOS and summary images only on request."""
    if kind == KOS_KIND:
        return dest.kos
    if kind == SUMMARY_KIND:
        return dest.summary_image
    return True


def enqueue_outputs(
    index: Index,
    settings: OutputSettings,
    outputs: Sequence[tuple[str, str]],
    now: float | None = None,
) -> int:
    """Create the outbox rows of these ``(SOP Instance UID, kind)`` outputs for every destination
    that takes their kind; return how many rows are new."""
    now = time.time() if now is None else now
    created = 0
    for uid, kind in outputs:
        names = [d.name for d in settings.destinations if wants(d, kind)]
        if names:
            created += index.enqueue_deliveries(uid, names, now)
    return created


@dataclass
class DispatchResult:
    """What one pass did, row by row."""

    delivered: int = 0
    retrying: int = 0
    dead: int = 0
    # Stored and waiting for a Storage Commitment report.
    committing: int = 0
    # Destinations passed over because their circuit is open (or another sender probes them).
    held_back: int = 0


class OutboxDispatcher(BackgroundPass):
    """Sends due outbox rows, one association per destination and pass; safe in every worker."""

    def __init__(self, index: Index, settings: OutputSettings) -> None:
        super().__init__("outbox-dispatcher", settings.poll_interval_s)
        self.index = index
        self.settings = settings

    def run_once(self, now: float | None = None) -> DispatchResult:
        """One pass over every destination with due rows. ``now`` injects the clock (tests)."""
        injected = now
        now = time.time() if now is None else now
        result = DispatchResult()
        for row in self.index.overdue_commitments(now):
            error = row.get("last_error") or "no Storage Commitment report in time"
            self._failed(row, now, row.get("last_status"), error, result, DeliveryStatus.COMMITTING)
        by_destination: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in self.index.due_deliveries(now):
            by_destination[row["destination"]].append(row)
        configured = {d.name: d for d in self.settings.destinations}
        for name, rows in by_destination.items():
            dest = configured.get(name)
            if dest is None:
                for row in rows:
                    self._failed(row, now, None, f"destination {name!r} is not configured", result)
                continue
            self._send_batch(dest, rows, now, injected, result)
        return result

    def _send_batch(
        self,
        dest: DestinationSettings,
        rows: list[dict[str, Any]],
        now: float,
        injected: float | None,
        result: DispatchResult,
    ) -> None:
        hold = dest.timeout_s * (len(rows) + 2) + LEASE_MARGIN_S
        if not self.index.admit_to_destination(dest.name, now, probe_until=now + hold):
            result.held_back += 1
            return
        leased = [
            r for r in rows if self.index.lease_delivery(r["id"], r["next_attempt_at"], now + hold)
        ]
        batch: list[tuple[dict[str, Any], Dataset]] = []
        for row in leased:
            dataset = self._read(row, now, result)
            if dataset is not None:
                batch.append((row, dataset))
        if not batch:
            # Nothing was sent, so the destination was not tested: give a probe slot back.
            self.index.release_destination_probe(dest.name)
            return
        remote = RemoteNode.from_destination(dest)

        def await_report(transaction_uid: str, stored: Sequence[int]) -> None:
            stamp = time.time() if injected is None else now
            ids = [batch[i][0]["id"] for i in stored]
            self.index.await_commitment(
                ids, transaction_uid, stamp, stamp + dest.commitment_timeout_s
            )

        try:
            outcomes = store_datasets(
                remote,
                [ds for _, ds in batch],
                confirm_by_find=dest.verify == "find",
                commit=await_report if dest.verify == "commitment" else None,
            )
        except (DestinationUnavailable, OSError) as exc:
            stamp = time.time() if injected is None else now
            message = f"{dest.name}: {exc}"
            opened = self._count(dest, stamp, message)
            for row, _ in batch:
                self._failed(row, stamp, None, message, result)
            log.warning(
                "outbox: %s unreachable, %d object(s) wait%s: %s",
                dest.name,
                len(batch),
                " (circuit open)" if opened else "",
                exc,
            )
            return
        stamp = time.time() if injected is None else now
        lost = any(o.status is None and not o.refused for o in outcomes)
        self._count(dest, stamp, f"{dest.name}: association lost mid-batch" if lost else None)
        delivered = 0
        for (row, _), outcome in zip(batch, outcomes, strict=True):
            if self._settle(row, stamp, outcome, result):
                delivered += 1
        if delivered:
            log.info("outbox: delivered %d object(s) to %s on one association", delivered, remote)

    def _read(self, row: dict[str, Any], now: float, result: DispatchResult) -> Dataset | None:
        path = row.get("path")
        try:
            if not path:
                raise FileNotFoundError("the output is no longer recorded in the index")
            return dcmread(Path(path))
        except (OSError, InvalidDicomError) as exc:
            self._dead(row, now, None, f"output file unreadable: {exc}", result)
            return None

    def _settle(
        self, row: dict[str, Any], now: float, outcome: StoreOutcome, result: DispatchResult
    ) -> bool:
        if outcome.stored and outcome.commitment is not None:
            # Written as committing before the request went out; the report settles it.
            result.committing += 1
            return False
        if outcome.stored and outcome.confirmed is False:
            # Stored by its own account but not there when asked: send it again later.
            self._failed(row, now, outcome.status, outcome.message, result)
            return False
        if outcome.stored:
            self.index.record_delivery_attempt(
                row["id"], now, status=DeliveryStatus.DELIVERED, dimse_status=outcome.status
            )
            result.delivered += 1
            return True
        if outcome.refused or (outcome.status is not None and not retryable_status(outcome.status)):
            self._dead(row, now, outcome.status, outcome.message, result)
        else:
            self._failed(row, now, outcome.status, outcome.message, result)
        return False

    def _failed(
        self,
        row: dict[str, Any],
        now: float,
        status: int | None,
        error: str,
        result: DispatchResult,
        only_if: DeliveryStatus | None = None,
    ) -> None:
        """A transient failure: retry after the backoff, or give up past the horizon."""
        deadline = (row.get("revived_at") or row["created_at"]) + self.settings.retry_horizon_s
        if now >= deadline:
            hours = self.settings.retry_horizon_s / 3600
            self._dead(
                row,
                now,
                status,
                f"gave up after {row['attempts'] + 1} attempts over {hours:g} h: {error}",
                result,
                only_if,
            )
            return
        delay = retry_delay(row["attempts"], self.settings.retry_max_delay_s)
        self.index.record_delivery_attempt(
            row["id"],
            now,
            status=DeliveryStatus.PENDING,
            dimse_status=status,
            error=error,
            next_attempt_at=min(now + delay, deadline),
            only_if=only_if,
        )
        result.retrying += 1

    def _dead(
        self,
        row: dict[str, Any],
        now: float,
        status: int | None,
        error: str,
        result: DispatchResult,
        only_if: DeliveryStatus | None = None,
    ) -> None:
        self.index.record_delivery_attempt(
            row["id"],
            now,
            status=DeliveryStatus.DEAD,
            dimse_status=status,
            error=error,
            only_if=only_if,
        )
        result.dead += 1
        log.error(
            "outbox: %s of study %s will not reach %s (dead letter, see pacs-ai outbox list): %s",
            row.get("kind") or "output",
            row.get("study_instance_uid") or "?",
            row["destination"],
            error,
        )

    def _count(self, dest: DestinationSettings, now: float, error: str | None) -> bool:
        return self.index.record_destination_result(
            dest.name,
            now,
            error=error,
            open_after=self.settings.circuit_failures,
            cooldown_s=self.settings.circuit_cooldown_s,
        )
