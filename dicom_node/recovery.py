"""Instances whose index rows a power loss took: found in the spool and indexed again at start.

The listener answers success once an instance's file is flushed, renamed into place and its
folder flushed, and its index row is written. On SQLite that row is committed without waiting for
the disk (``Index.rows_wait_for_disk``): a killed process loses nothing, but a power loss or a
kernel crash can take the rows written since the log was last flushed. Their files are whole and
in place. So the first time the node starts after the machine booted, it looks at the series
folders changed since shortly before the newest instance the index still holds, and indexes each
file there that the index does not know, as if it had just arrived: its study then completes, or
reopens and runs again, as for a late instance.

Which boot the node last ran in is kept in ``<data_dir>/node-boot-id``.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.errors import CorruptDataset, DatasetMismatch, OutOfResources
from dicom_node.spool import durable_write, is_valid_uid

if TYPE_CHECKING:
    from dicom_node.scp import StorageSCP

log = logging.getLogger(__name__)

BOOT_MARK = "node-boot-id"  # in the data folder
# How long before the newest indexed instance the look starts. A file is renamed into place before
# its row is written, at most the index's busy timeout (30 s) and the time of one C-STORE earlier;
# the rest is room for the clock being set back.
WINDOW_S = 600.0
_BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
_PROGRESS_EVERY_S = 5.0


@dataclass(frozen=True)
class Recovery:
    since: float  # series folders changed from then on were looked at
    folders: int  # series folders looked at
    files: int  # instance files in them
    indexed: int  # of those, indexed again
    refused: int  # not whole instances where they lie: left in place, logged


def current_boot() -> str | None:
    """This boot's identifier (Linux), or None where there is none."""
    try:
        return _BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def first_start_since_boot(mark: Path) -> bool:
    """True unless ``mark`` says the node already ran in this boot (always True off Linux)."""
    boot = current_boot()
    try:
        last = mark.read_text().strip()
    except OSError:
        return True
    return boot is None or last != boot


def remember_boot(mark: Path) -> None:
    """Note in ``mark`` that the node ran in this boot (after the spool was looked at).

    A note that cannot be written (a full disk) only means the look is made again at the next
    start; the node starts and answers 0xA700 while the disk is full, as it should.
    """
    boot = current_boot()
    if boot is None:
        return
    try:
        durable_write(mark, [f"{boot}\n".encode()])
    except OutOfResources as exc:
        log.warning("could not note this boot in %s (%s): the next start looks again", mark, exc)


def recover_after_boot(scp: StorageSCP, data_dir: Path) -> Recovery | None:
    """At node start: index instances a power loss took from the index; None if not needed."""
    mark = data_dir / BOOT_MARK
    if scp.index.rows_wait_for_disk or not first_start_since_boot(mark):
        return None
    log.info("first start since the machine booted: the index may have lost its last rows")
    try:
        newest = scp.index.latest_received_at()
        since = 0.0 if newest is None else newest - WINDOW_S
        result = reindex_spool(scp, since)
    except Exception:
        # The node starts all the same: it answers 0xA700 while the index cannot take rows,
        # and the next start looks again (this boot is not noted).
        log.exception("could not look for instances the index lost; the next start looks again")
        return None
    remember_boot(mark)
    return result


def reindex_spool(scp: StorageSCP, since: float) -> Recovery:
    """Index every instance file the index does not know, in series folders changed since ``since``.

    A file that is not a whole instance where its UIDs place it is left alone and logged.
    """
    started = time.monotonic()
    log.info(
        "looking for instance files the index does not know, in series folders changed since %s",
        time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if since > 0 else "ever",
    )
    folders = files = indexed = refused = 0
    last_report = started
    for series in _series_folders(scp.spool.root, since):
        folders += 1
        for entry in os.scandir(series):
            sop_uid = entry.name.removesuffix(".dcm")
            if not entry.name.endswith(".dcm") or not is_valid_uid(sop_uid):
                continue
            files += 1
            if scp.index.instance(sop_uid) is not None:
                continue
            try:
                if scp.index_kept_file(Path(entry.path)):
                    indexed += 1
            except (CorruptDataset, DatasetMismatch) as exc:
                refused += 1
                log.error("left %s in place, not indexed: %s", entry.path, exc)
        if time.monotonic() - last_report > _PROGRESS_EVERY_S:
            last_report = time.monotonic()
            log.info(
                "... %d series folders, %d files looked at, %d indexed", folders, files, indexed
            )
    log.log(
        logging.WARNING if indexed or refused else logging.INFO,
        "looked at %d instance files in %d series folders in %.1f s: %d indexed again, %d refused",
        files,
        folders,
        time.monotonic() - started,
        indexed,
        refused,
    )
    return Recovery(since, folders, files, indexed, refused)


def _series_folders(root: Path, since: float) -> list[str]:
    """``<study>/<series>`` folders under ``root`` last changed at or after ``since``."""
    found = []
    with os.scandir(root) as studies:
        for study in studies:
            if not is_valid_uid(study.name) or not study.is_dir(follow_symlinks=False):
                continue
            with os.scandir(study.path) as series_folders:
                for series in series_folders:
                    if not is_valid_uid(series.name) or not series.is_dir(follow_symlinks=False):
                        continue
                    if series.stat(follow_symlinks=False).st_mtime >= since:
                        found.append(series.path)
    return found
