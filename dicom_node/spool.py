"""Durable storage of received instances: write, fsync, rename into place, fsync the folder.

A file in the spool is either complete or absent: the bytes go to a temporary name in the target
folder first, so a crash at any point leaves at most a ``.partial`` file that is never indexed and
is swept at start-up.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from dicom_node.errors import OutOfResources

# A DICOM UID: dot-separated numbers without leading zeros, at most 64 characters. Validated before a
# UID becomes a path part so that no sender can write outside the spool.
UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
PARTIAL_SUFFIX = ".partial"


def is_valid_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID (safe to use as a path part)."""
    return 0 < len(value) <= 64 and UID_RE.match(value) is not None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(target: Path, chunks: list[bytes] | tuple[bytes, ...]) -> int:
    """Write ``chunks`` to ``target`` atomically and durably; return the number of bytes written.

    Raises ``OutOfResources`` when the bytes cannot be made durable (disk full, permissions); no
    partial file is left behind.
    """
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        written = 0
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    n = os.write(fd, view)
                    written += n
                    view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
        _fsync_dir(target.parent)
        return written
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutOfResources(f"cannot store {target.name}: {exc.strerror or exc}") from exc


def disk_used_fraction(path: Path) -> float:
    """Fraction of the file system holding ``path`` that is in use (as ``df`` counts it)."""
    usage = shutil.disk_usage(path)
    return (usage.total - usage.free) / usage.total if usage.total else 1.0


class Spool:
    """The folder tree of received instances: ``<study>/<series>/<sop>.dcm``."""

    def __init__(self, root: Path, max_disk_used_fraction: float = 0.95) -> None:
        self.root = root
        self.max_disk_used_fraction = max_disk_used_fraction
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid UID {uid!r}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    def check_space(self) -> None:
        """Raise ``OutOfResources`` when the disk is above the configured watermark."""
        used = disk_used_fraction(self.root)
        if used > self.max_disk_used_fraction:
            raise OutOfResources(
                f"disk {used:.1%} full, above the {self.max_disk_used_fraction:.0%} watermark"
            )

    def store(self, study_uid: str, series_uid: str, sop_uid: str, chunks: list[bytes]) -> Path:
        """Store one instance durably and return its path."""
        self.check_space()
        target = self.path_for(study_uid, series_uid, sop_uid)
        durable_write(target, chunks)
        return target

    def sweep_partials(self) -> int:
        """Remove temporary files left by a crash mid-write; return how many."""
        removed = 0
        for path in self.root.rglob(f"*{PARTIAL_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed
