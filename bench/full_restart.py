"""Restart every node at once with a large accepted tail: time to the first write.

Issue 13's scenario as a benchmark: 3 nodes, N MB of 256 KiB values written
(all above the last snapshot with the default settings), every node SIGKILLed
together and started again on its data directory; then the time from the
restart to the first acknowledged write, and the largest peer message seen
(``status`` ``paxos.largest_message_bytes`` where the build reports it, and
the messages the nodes logged as ``peer_message_too_large``).

With ``--baseline REV`` the same runs are made with that commit's code too,
in the same invocation (a temporary git worktree), and the table prints both.

    python bench/full_restart.py --mb 40,200 --baseline HEAD~1
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from _procs import (
    REPO,
    cleanup,
    dsnode_status,
    free_ports,
    install_signal_handlers,
    log,
    spawn,
    tmpdir,
)

from dsnode.client import Client
from dsnode.client.errors import DsnodeError

VALUE = 256 * 1024


def start(code: Path, work: Path, ports: list[int], first: bool) -> list[subprocess.Popen]:
    ids = [f"n{i + 1}" for i in range(len(ports))]
    peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in zip(ids, ports, strict=True))
    env = dict(os.environ, PYTHONPATH=str(code))
    procs = []
    for nid, port in zip(ids, ports, strict=True):
        argv = [sys.executable, "-m", "dsnode", "serve", "--node-id", nid,
                "--listen", f"127.0.0.1:{port}", "--peers", peers,
                "--data-dir", str(work / nid)]  # fmt: skip
        logfile = work / f"{nid}.log"
        if not first:
            logfile = work / f"{nid}.after.log"
        procs.append(spawn(argv, logfile, env, cwd=code))  # -m imports from the cwd
    return procs


async def write(ports: list[int], mb: int) -> int:
    """Write ``mb`` MB of 256 KiB values (a failed write is retried once); returns the count."""
    n = mb * 1024 * 1024 // VALUE

    async def put(c: Client, j: int) -> None:
        for _ in range(2):
            try:
                await c.put(b"big%d" % j, b"%08d" % j * (VALUE // 8))
                return
            except DsnodeError:
                await asyncio.sleep(0.5)

    async with Client([f"127.0.0.1:{p}" for p in ports], timeout=60) as c:
        for i in range(0, n, 16):
            await asyncio.gather(*(put(c, j) for j in range(i, min(i + 16, n))))
    return n


async def first_write(ports: list[int], give_up_s: float) -> float | None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < give_up_s:
        for p in ports:
            try:
                async with Client(f"127.0.0.1:{p}", timeout=1.0) as c:
                    await c.put(b"after-restart", b"x")
                    return time.monotonic() - t0
            except (DsnodeError, OSError, TimeoutError):
                pass
        await asyncio.sleep(0.1)
    return None


async def wait_leader(ports: list[int], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sts = [await dsnode_status(p) for p in ports]
        if all(st and st.get("ready") for st in sts):
            return
        await asyncio.sleep(0.2)
    raise SystemExit("cluster not ready")


def largest_message(ports: list[int], work: Path) -> int:
    largest = 0
    for p in ports:
        st = asyncio.run(dsnode_status(p)) or {}
        largest = max(largest, st.get("paxos", {}).get("largest_message_bytes", 0))
    for f in work.glob("*.after.log"):
        for line in f.read_text(errors="replace").splitlines():
            m = re.search(r'"?bytes"?\s*[=:]\s*(\d+)', line)
            if "peer_message_too_large" in line and m:
                largest = max(largest, int(m.group(1)))
    return largest


def kill(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        os.killpg(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(10)


def one_run(code: Path, mb: int, give_up_s: float) -> tuple[float | None, int]:
    work = tmpdir("dsnode-full-restart-")
    ports = free_ports(3)
    procs = start(code, work, ports, first=True)
    try:
        asyncio.run(wait_leader(ports))
        n = asyncio.run(write(ports, mb))
        log(f"{code.name}: wrote {n} values of 256 KiB ({mb} MB); killing all three")
        kill(procs)
        procs = start(code, work, ports, first=False)
        took = asyncio.run(first_write(ports, give_up_s))
        largest = largest_message(ports, work)
        return took, largest
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", default="40,200", help="tail sizes in MB, comma-separated")
    ap.add_argument("--baseline", help="a git revision to measure as well (same invocation)")
    ap.add_argument("--give-up-s", type=float, default=45.0)
    args = ap.parse_args()
    install_signal_handlers(signal.SIGINT, signal.SIGTERM)
    builds = [("current", REPO)]
    wt = None
    try:
        if args.baseline:
            wt = tmpdir("dsnode-baseline-") / "src"
            subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(wt),
                            args.baseline], check=True, capture_output=True)  # fmt: skip
            builds.insert(0, (f"baseline {args.baseline}", wt))
        rows = []
        for mb in (int(x) for x in args.mb.split(",")):
            for name, code in builds:
                took, largest = one_run(code, mb, args.give_up_s)
                rows.append((name, mb, took, largest))
        print(f"{'build':<22} {'tail MB':>8} {'restart -> first write':>24} {'largest peer msg':>18}")
        for name, mb, took, largest in rows:
            t = f"{took:.2f} s" if took is not None else f"never (> {args.give_up_s:.0f} s)"
            print(f"{name:<22} {mb:>8} {t:>24} {largest:>18,}")
    finally:
        cleanup()
        if wt is not None:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(wt)],
                           capture_output=True)  # fmt: skip


if __name__ == "__main__":
    main()
