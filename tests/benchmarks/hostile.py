#!/usr/bin/env python
"""Lock-out probe: an allowed sender's studies while attackers hold connections that never associate.

Starts ``pacs-ai node`` (allow-list: CR_ER_1 from 127.0.0.1), measures an allowed sender's
``storescu`` of one small study, repeated, first alone, then while attackers from other loopback
addresses (127.0.0.2 and up) keep as many stalled connections open as they can: silent ones, a few
header bytes, half an A-ASSOCIATE-RQ, a long PDU announced and never sent, a byte every half
second; each attacker reconnects as soon as the listener closes it. Prints the allowed sender's
success count and latency with and without the attack (and their ratio), how the attackers'
connections ended (refused at once, closed by the ACSE timeout) and their longest life, and the
listener's peak memory. Not collected by pytest; run on demand (docs/reliability.md):

    .venv/bin/python tests/benchmarks/hostile.py                 # 30 sends, 10 attacker addresses
    .venv/bin/python tests/benchmarks/hostile.py --sends 100 --attackers 20 --per-attacker 20
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.benchmarks.ingest import MemorySampler, _wait_echo, redis_broker  # noqa: E402
from tests.servers import free_port, reap, storescu  # noqa: E402


def _openings(request: bytes) -> list[bytes]:
    return [
        b"",
        b"\x01\x00\x00",
        request[: len(request) // 2],
        b"\x01\x00" + struct.pack(">L", 4000) + b"\x00" * 10,
    ]


class Attacker(threading.Thread):
    """Keeps ``count`` stalled connections from ``source`` open until told to stop."""

    def __init__(self, port: int, source: str, count: int, request: bytes) -> None:
        super().__init__(daemon=True)
        self.port, self.source, self.count, self.request = port, source, count, request
        self.stop = threading.Event()
        self.lifetimes: list[float] = []
        self.opened = 0
        self.failed_to_connect = 0

    def _one(self, n: int) -> None:
        while not self.stop.is_set():
            start = time.monotonic()
            try:
                sock = socket.create_connection(
                    ("127.0.0.1", self.port), timeout=5, source_address=(self.source, 0)
                )
            except OSError:
                self.failed_to_connect += 1
                time.sleep(0.05)
                continue
            self.opened += 1
            opening = _openings(self.request)[n % 4]
            trickle = n % 5 == 4
            try:
                if opening:
                    sock.sendall(opening)
                sock.settimeout(0.5)
                sent = 0
                while not self.stop.is_set():
                    try:
                        if not sock.recv(4096):
                            break
                    except TimeoutError:
                        if trickle and sent < len(self.request):
                            sock.sendall(self.request[sent : sent + 1])
                            sent += 1
            except OSError:
                pass
            finally:
                sock.close()
            if not self.stop.is_set():
                self.lifetimes.append(time.monotonic() - start)

    def run(self) -> None:
        threads = [
            threading.Thread(target=self._one, args=(n,), daemon=True) for n in range(self.count)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def _request() -> bytes:
    from tests.dicom_node.test_security import _associate_rq

    return _associate_rq()


def _sends(files: list[Path], port: int, count: int) -> list[float | None]:
    times: list[float | None] = []
    for _ in range(count):
        start = time.monotonic()
        result = storescu(files, host="127.0.0.1", port=port, called_aet="PACSAI",
                          calling_aet="CR_ER_1")  # fmt: skip
        times.append(time.monotonic() - start if result.returncode == 0 else None)
    return times


def _summary(times: list[float | None]) -> tuple[int, float, float]:
    ok = [t for t in times if t is not None]
    if not ok:
        return 0, float("nan"), float("nan")
    return len(ok), statistics.median(ok) * 1000, max(ok) * 1000


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sends", type=int, default=30, help="allowed sends per phase (30)")
    parser.add_argument("--attackers", type=int, default=10, help="attacking addresses (10)")
    parser.add_argument("--per-attacker", type=int, default=12, help="connections each keeps (12)")
    parser.add_argument(
        "--acse-timeout", type=float, default=5.0, help="listener.acse_timeout_s (5)"
    )
    parser.add_argument("--listener-processes", type=int, help="listener.processes (default)")
    args = parser.parse_args()

    from dicom_node.settings import PeerSettings
    from tests.dicom_node.helpers import small_study
    from worker.settings import Settings, write_settings

    work = Path(tempfile.mkdtemp(prefix="pacs-ai-hostile-"))
    with redis_broker() as redis_url:
        settings = Settings()
        settings.listener.port = free_port()
        settings.listener.acse_timeout_s = args.acse_timeout
        if args.listener_processes is not None:
            settings.listener.processes = args.listener_processes
        settings.listener.peers = [
            PeerSettings.model_validate({"ae_title": aet, "address": "127.0.0.1"})
            for aet in ("CR_ER_1", "ECHOSCU")  # the sender, and the readiness check
        ]
        settings.storage.data_dir = work / "data"
        settings.queue.broker_url = redis_url
        config = work / "site.yaml"
        write_settings(settings, config)
        log = (work / "node.log").open("wb")
        node = subprocess.Popen(  # this checkout's code (a worktree of an older commit, say)
            [sys.executable, "-m", "worker.cli", "node", "--config", str(config)],
            cwd=REPO_ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_echo("PACSAI", settings.listener.port, node)
            memory = MemorySampler(node.pid).__enter__()
            files = small_study(work / "in", size=256)
            alone = _sends(files, settings.listener.port, args.sends)
            attackers = [
                Attacker(settings.listener.port, f"127.0.0.{2 + n}", args.per_attacker, _request())
                for n in range(args.attackers)
            ]
            for attacker in attackers:
                attacker.start()
            time.sleep(1.0)  # let them take what they can
            attacked = _sends(files, settings.listener.port, args.sends)
            for attacker in attackers:
                attacker.stop.set()
            for attacker in attackers:
                attacker.join(timeout=args.acse_timeout + 5)
            memory.__exit__()
        finally:
            node.terminate()
            reap(node, 30)
            log.close()

    lifetimes = [t for a in attackers for t in a.lifetimes]
    at_once = sum(1 for t in lifetimes if t < 0.5)
    by_timeout = [t for t in lifetimes if t >= 0.5]
    ok_alone, median_alone, max_alone = _summary(alone)
    ok_attacked, median_attacked, max_attacked = _summary(attacked)
    ratio = median_attacked / median_alone if ok_attacked and ok_alone else float("nan")
    print(f"machine: {platform.node()} {platform.machine()}, {platform.platform()}")
    processes = "default" if args.listener_processes is None else args.listener_processes
    print(
        f"listener: acse_timeout_s {args.acse_timeout:g}, processes {processes}, "
        "defaults otherwise (max_pending_connections 32, max_pending_per_address 8)"
    )
    print(
        f"allowed sender alone:     {ok_alone}/{len(alone)} stored, median {median_alone:.0f} ms, max {max_alone:.0f} ms"
    )
    print(
        f"under attack:             {ok_attacked}/{len(attacked)} stored, median {median_attacked:.0f} ms, "
        f"max {max_attacked:.0f} ms ({ratio:.2f}x the median alone)"
    )
    print(
        f"attackers: {args.attackers} addresses x {args.per_attacker} connections kept open; "
        f"{len(lifetimes)} connections ended: {at_once} refused at once, {len(by_timeout)} closed "
        f"after {min(by_timeout, default=0):.1f}-{max(by_timeout, default=0):.1f} s"
    )
    print(f"listener peak RSS (all its processes): {memory.peak / 2**20:.0f} MB")
    return 0 if ok_attacked == len(attacked) else 1


if __name__ == "__main__":
    raise SystemExit(main())
