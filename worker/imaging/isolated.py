"""Compressed frames decoded in child processes: a decoder that crashes costs one image, not the worker.

Native decoders read bytes that any sender can craft. gdcm, the only permissive decoder for JPEG
Lossless, aborts the whole process on some corrupt streams (a C++ exception nobody catches): in
the worker that killed the job's worker, and the redelivered job killed the next one. Here each
decode runs in a long-lived child (``python -I -m worker.imaging.isolated``) with its address
space capped (``worker.decoder_memory_mb`` on top of what it needs to start) and each frame
bounded in time (``worker.decode_timeout_s``). A child that dies, runs out of memory or
overruns is replaced; the image gets an ``UndecodableImage`` that says which, and the job goes on
to fail with that reason like any other undecodable image.

Requests and answers travel pickled over a socket pair (``multiprocessing.connection``): the
frame's encoded bytes and the pixel header out, the stored values back. Pickles come only from
the child this process started, with the bytes this process sent it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import resource
import signal
import socket
import subprocess
import threading
from multiprocessing.connection import Connection
from typing import Any

import numpy.typing as npt

from dicom_node.process import exit_reason, python_module_command
from worker.imaging.decode import FrameRequest, UndecodableImage, decode_frame

log = logging.getLogger(__name__)

READY = "ready"
# How long a new child may take to import its decoders and say it is ready.
_START_TIMEOUT_S = 120.0


class _Child:
    """One decoder process and our end of its connection."""

    def __init__(self, memory_mb: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.process = subprocess.Popen(
            python_module_command(
                "worker.imaging.isolated",
                "--fd",
                str(theirs.fileno()),
                "--memory-mb",
                str(memory_mb),
            ),
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.conn = Connection(ours.detach())
        if not self.conn.poll(_START_TIMEOUT_S) or self._receive() != READY:
            self.kill()
            raise UndecodableImage(
                f"the decoder process did not start ({exit_reason(self.process.poll())})"
            )

    def _receive(self) -> Any:
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            return None

    def decode(self, request: FrameRequest, timeout_s: float) -> npt.NDArray[Any]:
        with contextlib.suppress(OSError):  # it died before it could read: found below
            self.conn.send(request)
        if not self.conn.poll(timeout_s):
            self.kill()
            raise UndecodableImage(
                f"decoding took longer than {timeout_s:g} s (worker.decode_timeout_s); "
                "the decoder was stopped"
            )
        answer = self._receive()
        if answer is None:
            self.kill()
            raise UndecodableImage(
                f"the decoder process died decoding this image ({exit_reason(self.process.returncode)}): "
                "its pixel data is corrupt in a way the native decoder does not survive"
            )
        kind, payload = answer
        if kind == "ok":
            return payload
        raise UndecodableImage(str(payload))

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()  # end of file: the child exits
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()


class IsolatedDecoder:
    """A ``FrameDecoder`` whose decoders run in up to ``processes`` child processes."""

    def __init__(self, timeout_s: float, memory_mb: int, processes: int = 1) -> None:
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self.processes = processes
        self._idle: list[_Child] = []
        self._running = 0
        self._free = threading.Condition()

    def start(self) -> None:
        """Start a decoder process now, so that the first image does not wait for it."""
        self._give_back(self._take())

    def decode(self, request: FrameRequest) -> npt.NDArray[Any]:
        child = self._take()
        try:
            return child.decode(request, self.timeout_s)
        finally:
            self._give_back(child)

    def _take(self) -> _Child:
        with self._free:
            while not self._idle and self._running >= self.processes:
                self._free.wait()
            if self._idle:
                return self._idle.pop()
            self._running += 1
        try:
            return _Child(self.memory_mb)
        except BaseException:
            with self._free:
                self._running -= 1
                self._free.notify()
            raise

    def _give_back(self, child: _Child) -> None:
        with self._free:
            if child.alive:
                self._idle.append(child)
            else:
                log.warning("decoder process %d ended; a new one starts for the next image",
                            child.process.pid)  # fmt: skip
                self._running -= 1
            self._free.notify()

    def close(self) -> None:
        with self._free:
            idle, self._idle = self._idle, []
            self._running -= len(idle)
        for child in idle:
            child.close()


# --- the child ------------------------------------------------------------------------------


def _address_space() -> int | None:
    """This process's virtual memory size in bytes (Linux), or None."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _load_decoders() -> None:
    """Import every decoder now, so that the memory cap is set above what they need to load."""
    import pydicom.pixels  # noqa: F401

    for module in ("gdcm", "PIL.Image", "openjpeg", "jpeg_ls", "rle", "pylibjpeg"):
        with contextlib.suppress(ImportError):
            __import__(module)


def child_main(argv: list[str] | None = None) -> int:
    """``python -I -m worker.imaging.isolated --fd N --memory-mb M``: decode until end of file."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--memory-mb", type=int, required=True)
    args = parser.parse_args(argv)
    # Ctrl-C in the worker's terminal is the worker's to handle; this child ends with its pipe.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _load_decoders()
    used = _address_space()
    if used is not None:
        cap = used + args.memory_mb * (1 << 20)
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    conn = Connection(args.fd)
    conn.send(READY)
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return 0
        try:
            answer: tuple[str, Any] = ("ok", decode_frame(request))
        except MemoryError:
            answer = (
                "error",
                f"decoding needed more than worker.decoder_memory_mb ({args.memory_mb} MB)",
            )
        except UndecodableImage as exc:
            answer = ("error", str(exc))
        except Exception as exc:
            answer = ("error", f"{type(exc).__name__}: {exc}")
        try:
            conn.send(answer)
        except MemoryError:
            conn.send(("error", f"the decoded frame does not fit in {args.memory_mb} MB"))


if __name__ == "__main__":
    raise SystemExit(child_main())
