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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Literal

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


def _remove(path: Path) -> None:
    # Cleanup after a failed write must not hide the failure (the folder may be gone or a file).
    with suppress(OSError):
        path.unlink(missing_ok=True)


def _write_temp(target: Path, chunks: Sequence[bytes]) -> Path:
    """Write and fsync ``chunks`` to a temporary file beside ``target``; return its path."""
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _remove(tmp)
        raise OutOfResources(f"cannot store {target.name}: {exc.strerror or exc}") from exc
    return tmp


def _publish(tmp: Path, target: Path) -> None:
    """Rename the temporary file into place and make the rename durable."""
    try:
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        _remove(tmp)
        raise OutOfResources(f"cannot store {target.name}: {exc.strerror or exc}") from exc


def durable_write(target: Path, chunks: Sequence[bytes]) -> int:
    """Write ``chunks`` to ``target`` atomically and durably; return the number of bytes written.

    Raises ``OutOfResources`` when the bytes cannot be made durable (disk full, permissions); no
    partial file is left behind.
    """
    _publish(_write_temp(target, chunks), target)
    return sum(len(c) for c in chunks)


def disk_used_fraction(path: Path) -> float:
    """Fraction of the file system holding ``path`` that is in use (as ``df`` counts it)."""
    usage = shutil.disk_usage(path)
    return (usage.total - usage.free) / usage.total if usage.total else 1.0


class Spool:
    """The folder tree of received instances: ``<study>/<series>/<sop>.dcm``."""

    def __init__(
        self,
        root: Path,
        max_disk_used_fraction: float = 0.95,
        on_duplicate: Literal["keep", "replace"] = "keep",
    ) -> None:
        self.root = root
        self.max_disk_used_fraction = max_disk_used_fraction
        # What the listener does with a SOP Instance UID it already holds (storage.on_duplicate).
        self.on_duplicate = on_duplicate
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

    def store(self, study_uid: str, series_uid: str, sop_uid: str, chunks: Sequence[bytes]) -> Path:
        """Store one instance durably and return its path."""
        self.check_space()
        target = self.path_for(study_uid, series_uid, sop_uid)
        durable_write(target, chunks)
        return target

    @contextmanager
    def replacing(
        self, study_uid: str, series_uid: str, sop_uid: str, chunks: Sequence[bytes]
    ) -> Iterator[Path]:
        """Stage a new version of an instance; it replaces the file only if the block succeeds.

        The new bytes are fsynced under a temporary name first, so while the block records the
        change (in the index) the old file stays whole, and a failing block leaves it untouched.
        """
        self.check_space()
        target = self.path_for(study_uid, series_uid, sop_uid)
        tmp = _write_temp(target, chunks)
        try:
            yield target
        except BaseException:
            _remove(tmp)
            raise
        _publish(tmp, target)

    def sweep_partials(self) -> int:
        """Remove temporary files left by a crash mid-write; return how many."""
        removed = 0
        for path in self.root.rglob(f"*{PARTIAL_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed
