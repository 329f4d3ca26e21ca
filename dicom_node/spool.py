"""Durable storage of received instances: write, fsync, rename into place, fsync the folder.

A file in the spool is either complete or absent: the bytes go to a temporary ``.partial`` name
first (a received instance to ``.incoming/`` while it arrives, see ``StagedFile``), so a crash at
any point leaves at most a ``.partial`` file that is never indexed and is swept at start-up.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import re
import shutil
import sys
import threading
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Literal, cast

from dicom_node.errors import OutOfResources

# A DICOM UID: dot-separated numbers without leading zeros, at most 64 characters. Validated before a
# UID becomes a path part so that no sender can write outside the spool.
UID_RE = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
PARTIAL_SUFFIX = ".partial"
INCOMING_DIR = ".incoming"
# Lock files that instances are spread over by SOP Instance UID: two instances rarely share one.
LOCK_BUCKETS = 256
# While an instance arrives, its bytes are flushed to the disk in the background every this many
# bytes, so that the fsync before the answer has only the last piece left to wait for.
FLUSH_STEP = 1 << 20
# And every this many bytes the kernel is asked to start writing them out at once (Linux
# ``sync_file_range``), so that each background flush finds most of its bytes on their way.
WRITEBACK_STEP = 256 << 10
# And every this many bytes the disk watermark is checked again while an instance arrives.
SPACE_CHECK_STEP = 1 << 20
_SYNC_FILE_RANGE_WRITE = 2
_flush_pool: ThreadPoolExecutor | None = None
_flush_pool_lock = threading.Lock()


def _flusher() -> ThreadPoolExecutor:
    """The process's threads for background flushes (made on first use, after any fork)."""
    global _flush_pool
    with _flush_pool_lock:
        if _flush_pool is None:
            _flush_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-flush")
        return _flush_pool


def _writeback_starter() -> Callable[[int, int, int, int], int] | None:
    """libc's ``sync_file_range`` where there is one (Linux), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


# Only a hint to start the writeback: it makes nothing durable (the fdatasyncs do) and a failure
# of it is ignored (the fdatasync that follows reports a real one).
_start_writeback = _writeback_starter()


def is_valid_uid(value: str) -> bool:
    """True for a syntactically valid DICOM UID (safe to use as a path part)."""
    return 0 < len(value) <= 64 and UID_RE.fullmatch(value) is not None


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(folder: Path) -> None:
    """Create ``folder`` and missing parents, each made durable in its parent."""
    missing = []
    while not folder.is_dir():
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        with suppress(FileExistsError):  # another association made it first
            made.mkdir()
        _fsync_dir(made.parent)


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


class StagedFile:
    """An instance being written under a ``.partial`` name until it is checked and published.

    The listener writes a C-STORE data set here while its PDUs arrive (see ``dicom_node.stream``)
    and flushes it to the disk in the background as it goes (``fdatasync`` on a pool thread each
    ``FLUSH_STEP`` bytes, one at a time), so that the fsync before success waits for the last
    megabyte rather than the whole image: on a virtual disk with a write-back cache the flush,
    not the write, is what takes the time. Between flushes the kernel is asked to start writing
    each ``WRITEBACK_STEP`` out as it arrives, so a flush mostly waits for bytes already on their
    way (a 10 MB image: the wait after its last byte fell from about 15 to 7-10 ms). It also has
    the small file-object surface pynetdicom's DIMSE layer uses for a data set it keeps in a file
    (``write``, ``file.flush``, ``name``, ``close``).

    A write error (disk full, I/O error) does not raise: pynetdicom would abort the association,
    and the sender must get 0xA700 instead. It is kept in ``error`` and raised by ``sync``.

    Limits hold while the bytes arrive, not only when the file is published: past ``max_size``
    bytes (``too_large`` says why) or once ``check_space`` finds the disk above its watermark
    (checked every ``SPACE_CHECK_STEP`` bytes), the file is removed at once and the rest of the
    data set is not written; ``error`` says why. A file made with ``error`` set holds nothing.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_size: int | None = None,
        check_space: Callable[[], None] | None = None,
        error: OSError | None = None,
    ) -> None:
        self.path = path
        self.name = str(path)
        self.size = 0
        self.dataset_offset = 0  # where the data set starts, after the preamble and file meta
        self.error: OSError | None = error
        # Why the data set was cut off: larger than max_size (the association should end).
        self.too_large: str | None = None
        self.published = False
        self._max_size = max_size
        self._check_space = check_space
        self._flushed = 0  # bytes covered by the last background flush
        self._written_back = 0  # bytes whose writeback was started (sync_file_range)
        self._flush: Future[None] | None = None
        self._fd: int | None = (
            None if error is not None else os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o640)
        )

    def _give_up(self, error: OSError) -> None:
        """Stop writing: remove what was written, keep ``error`` for ``sync`` to raise."""
        self.error = error
        self.close()
        _remove(self.path)

    @property
    def file(self) -> StagedFile:
        return self

    def flush(self) -> None:
        pass  # every write goes straight to the kernel

    def write(self, data: bytes | bytearray | memoryview) -> int:
        """Append ``data``; always reports it written (a failure is kept for ``sync``)."""
        length = len(data)
        if self.error is not None or self._fd is None:
            return length
        if self._max_size is not None and self.size + length > self._max_size:
            self.too_large = f"the instance is larger than listener.max_instance_bytes ({self._max_size:,} bytes)"
            self._give_up(OSError(errno.EFBIG, self.too_large))
            return length
        if (
            self._check_space is not None
            and (self.size + length) // SPACE_CHECK_STEP != self.size // SPACE_CHECK_STEP
        ):
            try:
                self._check_space()
            except OutOfResources as exc:
                self._give_up(OSError(errno.ENOSPC, str(exc)))
                return length
        view = memoryview(data).cast("B")
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            self.error = exc
            return length
        self.size += length
        if _start_writeback is not None and self.size - self._written_back >= WRITEBACK_STEP:
            _start_writeback(
                self._fd, self._written_back, self.size - self._written_back, _SYNC_FILE_RANGE_WRITE
            )
            self._written_back = self.size
        if self.size - self._flushed >= FLUSH_STEP and self._flush_done():
            self._flush = _flusher().submit(os.fdatasync, self._fd)
            self._flushed = self.size
        return length

    def complete(self) -> None:
        """Every byte is in: start flushing the rest now, while the data set is being checked."""
        fd = self._fd
        if (
            self.error is None
            and fd is not None
            and self.size > self._flushed
            and self._flush_done()
        ):
            self._flush = _flusher().submit(os.fdatasync, fd)
            self._flushed = self.size

    def _flush_done(self) -> bool:
        """True when no background flush is running; keeps the error of one that failed."""
        flush = self._flush
        if flush is None:
            return True
        if not flush.done():
            return False
        self._flush = None
        error = flush.exception()
        if isinstance(error, OSError) and self.error is None:
            # An fsync error is reported once: the final fsync might not see it again.
            self.error = error
        return True

    def _wait_flush(self) -> None:
        if self._flush is not None:
            with suppress(Exception):
                self._flush.exception()  # waits
            self._flush_done()

    def write_all(self, chunks: Iterable[bytes]) -> StagedFile:
        for chunk in chunks:
            self.write(chunk)
        return self

    def sync(self) -> None:
        """Make the bytes durable; raise ``OutOfResources`` if any could not be written."""
        self._wait_flush()
        if self.error is not None:
            raise OutOfResources(f"cannot store: {self.error.strerror or self.error}")
        if self._fd is None:
            raise OutOfResources("cannot store: the file was closed before it was complete")
        if self._flushed == self.size:
            return  # the background flush that just ended covered every byte
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise OutOfResources(f"cannot store: {exc.strerror or exc}") from exc

    @contextmanager
    def mapped(self) -> Iterator[memoryview]:
        """The bytes written so far, mapped read-only (no copy)."""
        if self._fd is None or self.size == 0:
            yield memoryview(b"")
            return
        mapping = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
        view = memoryview(mapping)
        try:
            yield view
        finally:
            # A slice still referenced (by a traceback, say) keeps the mapping until it goes.
            with suppress(BufferError):
                view.release()
                mapping.close()

    def read_bytes(self) -> bytes:
        return self.path.read_bytes()

    def close(self) -> None:
        self._wait_flush()  # never close the descriptor under a running flush
        if self._fd is not None:
            with suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        """Close and remove the file unless it was published (nothing of it stays behind)."""
        self.close()
        if not self.published:
            _remove(self.path)

    def publish(self, target: Path) -> None:
        """fsync, rename to ``target`` and fsync its folder; ``OutOfResources`` leaves nothing."""
        try:
            self.sync()
            try:
                os.replace(self.path, target)
            except FileNotFoundError:  # the first instance of its series: make the folders
                _make_dirs(target.parent)
                os.replace(self.path, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            self.discard()
            raise OutOfResources(f"cannot store {target.name}: {exc.strerror or exc}") from exc
        except OutOfResources:
            self.discard()
            raise
        finally:
            self.close()
        self.path = target
        self.published = True


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
        locks: Path | None = None,
        max_instance_bytes: int | None = None,
    ) -> None:
        self.root = root
        # A received instance larger than this is cut off as it arrives (listener setting).
        self.max_instance_bytes = max_instance_bytes
        self.max_disk_used_fraction = max_disk_used_fraction
        # What the listener does with a SOP Instance UID it already holds (storage.on_duplicate).
        self.on_duplicate = on_duplicate
        self.incoming = root / INCOMING_DIR
        self.incoming.mkdir(parents=True, exist_ok=True)
        # Beside the spool, not in it: the spool holds instances and nothing else.
        self.locks = locks if locks is not None else root.with_name(f"{root.name}-locks")
        self.locks.mkdir(parents=True, exist_ok=True)
        self._bucket_locks = [threading.Lock() for _ in range(LOCK_BUCKETS)]
        self._lock_fds: dict[int, int] = {}

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid UID {uid!r}")
        return self.root / study_uid / series_uid / f"{sop_uid}.dcm"

    @contextmanager
    def instance_lock(self, sop_uid: str) -> Iterator[None]:
        """Hold the lock of one SOP Instance UID: one keeper at a time in every process.

        Two associations keeping the same instance at the same moment (in two listener
        processes, say) would otherwise each find no file, publish, and write the index row:
        the row could then describe the copy that the other rename replaced. The UID's bucket
        (one of ``LOCK_BUCKETS``, by a hash) is locked with a thread lock, for the threads of this
        process, and an ``flock`` on the bucket's lock file, for the other processes; the second
        keeper then finds the first's file and row and keeps or replaces it as configured.
        """
        bucket = zlib.crc32(sop_uid.encode()) % LOCK_BUCKETS
        with self._bucket_locks[bucket]:
            fd = self._lock_file(bucket)
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        """Close the lock files (the spool itself needs no closing)."""
        for bucket in list(self._lock_fds):
            with self._bucket_locks[bucket]:
                os.close(self._lock_fds.pop(bucket))

    def _lock_file(self, bucket: int) -> int:
        """The descriptor of a bucket's lock file, opened once (its thread lock held)."""
        fd = self._lock_fds.get(bucket)
        if fd is not None:
            return fd
        path = self.locks / f"{bucket:03d}"
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
            except FileNotFoundError:  # the folder went (an admin cleaned up): make it again
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        except OSError as exc:
            raise OutOfResources(f"cannot lock the instance: {exc.strerror or exc}") from exc
        self._lock_fds[bucket] = fd
        return fd

    def check_space(self) -> None:
        """Raise ``OutOfResources`` when the disk is above the configured watermark."""
        used = disk_used_fraction(self.root)
        if used > self.max_disk_used_fraction:
            raise OutOfResources(
                f"disk {used:.1%} full, above the {self.max_disk_used_fraction:.0%} watermark"
            )

    def stage(self, chunks: Iterable[bytes] = ()) -> StagedFile:
        """A new ``StagedFile`` under ``.incoming/``, holding ``chunks``.

        It keeps to ``max_instance_bytes`` and the disk watermark as it is written. When the disk
        is above the watermark already, or not even an empty file can be made, the staged file
        holds nothing and says why in ``error``: the data set is received without being kept,
        and the sender is answered 0xA700, whatever its size.
        """
        path = self.incoming / f"{uuid.uuid4().hex}{PARTIAL_SUFFIX}"

        def make() -> StagedFile:
            return StagedFile(path, max_size=self.max_instance_bytes, check_space=self.check_space)

        try:
            self.check_space()
            try:
                staged = make()
            except FileNotFoundError:  # the folder went (an admin cleaned up): make it again
                self.incoming.mkdir(parents=True, exist_ok=True)
                staged = make()
        except OutOfResources as exc:
            return StagedFile(path, error=OSError(errno.ENOSPC, str(exc)))
        except OSError as exc:
            return StagedFile(path, error=exc)
        return staged.write_all(chunks)

    def store(self, study_uid: str, series_uid: str, sop_uid: str, staged: StagedFile) -> Path:
        """Publish a staged instance at its place in the spool and return the path."""
        try:
            self.check_space()
            target = self.path_for(study_uid, series_uid, sop_uid)
        except BaseException:
            staged.discard()
            raise
        staged.publish(target)
        return target

    @contextmanager
    def replacing(
        self, study_uid: str, series_uid: str, sop_uid: str, staged: StagedFile
    ) -> Iterator[Path]:
        """Publish a new version of an instance only if the block succeeds.

        The new bytes are fsynced under their staging name first, so while the block records
        the change (in the index) the old file stays whole, and a failing block leaves it
        untouched.
        """
        try:
            self.check_space()
            target = self.path_for(study_uid, series_uid, sop_uid)
            staged.sync()
        except BaseException:
            staged.discard()
            raise
        try:
            yield target
        except BaseException:
            staged.discard()
            raise
        staged.publish(target)

    def sweep_partials(self) -> int:
        """Remove temporary files left by a crash mid-write; return how many."""
        removed = 0
        for path in self.root.rglob(f"*{PARTIAL_SUFFIX}"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed
