"""What ``bench/snapshot_stall.py`` and ``bench/storage.py`` share: one
``dsnode serve`` node per build (this checkout, or a baseline commit checked out
in a temporary git worktree), a pipelined loader, a latency-recording writer,
and readings of the node's RSS, data directory and ``status``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _procs import REPO, dsnode_status, free_port, log, probe_dsnode, spawn, tail, tmpdir

from dsnode.bench.targets import DsnodeTarget


@contextmanager
def builds(baseline: str | None) -> Iterator[list[tuple[str, Path]]]:
    """``[(name, source dir)]``: the baseline commit (a temporary worktree) first, if
    given; each with its bytecode compiled (``__pycache__``), as an installed node has."""
    out = [("current", REPO)]
    wt = None
    try:
        if baseline:
            wt = tmpdir("dsnode-baseline-") / "src"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt),
                            baseline], check=True, capture_output=True)  # fmt: skip
            out.insert(0, (f"baseline {baseline}", wt))
        for _, code in out:  # as installed: restart times must not include compiling
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(code / "dsnode")],
                           check=True, capture_output=True)  # fmt: skip
        yield out
    finally:
        if wt is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)],
                           capture_output=True)  # fmt: skip


class NodeProc:
    """One single-member ``dsnode serve`` node from ``code``, on ``data``."""

    def __init__(self, code: Path, data: Path, env: dict[str, str], name: str) -> None:
        self.code = code
        self.data = data
        self.env = dict(os.environ, PYTHONPATH=str(code), **env)
        self.name = name
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> float:
        """Start it; returns seconds until ``status`` says ready (SystemExit on failure)."""
        addr = f"127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "dsnode", "serve", "--node-id", "n1", "--listen", addr,
                "--peers", f"n1={addr}", "--data-dir", str(self.data)]  # fmt: skip
        self.starts += 1
        self.logfile = self.data.parent / f"{self.name}.{self.starts}.log"
        t0 = time.monotonic()
        self.proc = spawn(argv, self.logfile, self.env, cwd=self.code)
        while time.monotonic() - t0 < 600:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}:\n"
                                 f"{tail(self.logfile)}")  # fmt: skip
            if asyncio.run(probe_dsnode(self.port)):
                return time.monotonic() - t0
            time.sleep(0.02)
        raise SystemExit(f"{self.name} not ready after 600 s:\n{tail(self.logfile)}")

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def rss_bytes(self) -> int:
        assert self.proc is not None
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def status(self) -> dict[str, Any]:
        return asyncio.run(dsnode_status(self.port)) or {}

    def dir_bytes(self) -> int:
        total = 0
        for root, _dirs, files in os.walk(self.data):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(root, f))
                except FileNotFoundError:
                    pass
        return total


def key(i: int) -> bytes:
    return b"key%012d" % i


def value(i: int, size: int, round_: int = 0) -> bytes:
    head = b"%d:%d:" % (round_, i)
    return head + b"v" * (size - len(head))


async def _load(port: int, n: int, size: int, round_: int, inflight: int) -> None:
    t = DsnodeTarget("127.0.0.1", port)
    await t.connect()
    done = asyncio.Event()
    state = {"next": 0, "acked": 0, "failed": 0}
    loop = asyncio.get_running_loop()

    def start_one() -> None:
        i = state["next"]
        state["next"] += 1
        t.start_put(key(i), value(i, size, round_), lambda code, i=i: finished(i, code))

    def finished(i: int, code: str | None) -> None:
        if code is not None:
            state["failed"] += 1
            if state["failed"] > 1000:
                done.set()
                return
            loop.call_later(0.05, lambda: t.start_put(key(i), value(i, size, round_),
                                                      lambda c, i=i: finished(i, c)))
            return
        state["acked"] += 1
        if state["acked"] == n:
            done.set()
        elif state["next"] < n:
            start_one()

    for _ in range(min(inflight, n)):
        start_one()
    await done.wait()
    t.close()
    if state["acked"] != n:
        raise SystemExit(f"load failed: {state}")


def load(node: NodeProc, n: int, size: int, round_: int = 0, inflight: int = 512) -> float:
    """Put keys 0..n-1 (``size``-byte values); returns puts per second."""
    t0 = time.monotonic()
    asyncio.run(_load(node.port, n, size, round_, inflight))
    rate = n / (time.monotonic() - t0)
    log(f"{node.name}: loaded {n:,} keys at {rate:,.0f} puts/s")
    return rate


async def _timed_writes(port: int, n_keys: int, size: int, seconds: float,
                        inflight: int) -> list[float]:
    t = DsnodeTarget("127.0.0.1", port)
    await t.connect()
    lat: list[float] = []
    stop_at = time.monotonic() + seconds
    done = asyncio.Event()
    live = [0]
    seq = [0]

    def start_one() -> None:
        i = (seq[0] * 7919) % n_keys
        seq[0] += 1
        t0 = time.perf_counter()
        live[0] += 1
        t.start_put(key(i), value(i, size, 1), lambda code: finished(t0, code))

    def finished(t0: float, code: str | None) -> None:
        live[0] -= 1
        if code is None:
            lat.append(time.perf_counter() - t0)
        if time.monotonic() < stop_at:
            start_one()
        elif live[0] == 0:
            done.set()

    for _ in range(inflight):
        start_one()
    await done.wait()
    t.close()
    return lat


def timed_writes(node: NodeProc, n_keys: int, size: int, seconds: float,
                 inflight: int = 32) -> list[float]:
    """Overwrite random keys for ``seconds`` with ``inflight`` puts in flight; latencies."""
    return asyncio.run(_timed_writes(node.port, n_keys, size, seconds, inflight))


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def loop_lag_buckets(metrics_port: int) -> dict[float, int]:
    """The node's event-loop lag histogram from its admin ``/metrics``: cumulative
    counts per upper bound ``le`` in seconds (``inf`` for all)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[float, int] = {}
    for m in re.finditer(r'^dsnode_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([0-9.e+]+)$',
                         text, re.M):
        out[float(m.group(1))] = int(float(m.group(2)))
    return out


def window_lag(before: dict[float, int], after: dict[float, int]) -> tuple[float, int]:
    """Between two readings: the smallest bucket bound covering every lag measured
    (the window's maximum is at most this, in ms), and how many lags exceeded 25 ms."""
    diff = {le: after.get(le, 0) - before.get(le, 0) for le in after}
    total = diff.get(float("inf"), 0)
    bound = min((le for le, n in diff.items() if n == total), default=float("inf"))
    over = total - diff.get(0.025, 0)
    return bound * 1000, over
