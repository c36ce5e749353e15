"""Idle CPU per node of a 3-node cluster: what a node costs when nothing happens.

For each build (``--baseline REV`` first, in a temporary git worktree, then the
current code) a fresh 3-node cluster starts on this machine, settles for
``--settle`` seconds, and then each node's CPU time (user + system, from
/proc/PID/stat) is read over ``--seconds`` seconds of idleness. Prints CPU per
node as a percentage of one core and the ratio current / baseline. The current
build runs once per ``--partitions`` value (issue 8: the cost of an idle node must
not grow with the partitions it hosts); the baseline runs with its own defaults.

    python bench/idle_cpu.py [--seconds 20] [--settle 5] [--partitions 1,64,256]
                             [--baseline eb6c63e]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import cleanup, install_signal_handlers, log, start_dsnode_cluster, stop, tmpdir  # noqa: E402
from _storage import builds  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def idle_cpu(code: Path, args: argparse.Namespace, partitions: int | None) -> list[float]:
    work = tmpdir("dsnode-idle-")
    env = {"PYTHONPATH": str(code)}
    if partitions is not None:
        env["DSNODE_PARTITIONS"] = str(partitions)
    procs, _ports = start_dsnode_cluster(work, [sys.executable, "-m", "dsnode"], env=env)
    try:
        time.sleep(args.settle)  # a benchmark's settle period, not a test's synchronisation
        before = [cpu_seconds(p.pid) for p in procs]
        t0 = time.monotonic()
        time.sleep(args.seconds)
        elapsed = time.monotonic() - t0
        after = [cpu_seconds(p.pid) for p in procs]
    finally:
        for p in procs:
            stop(p)
    return [100 * (a - b) / elapsed for a, b in zip(after, before, strict=True)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--settle", type=float, default=5.0)
    ap.add_argument("--baseline", default=None, help="commit to compare with (e.g. eb6c63e)")
    ap.add_argument("--partitions", default="64",
                    help="comma-separated P values for the current build (default 64)")
    args = ap.parse_args()
    counts = [int(x) for x in args.partitions.split(",") if x.strip()]
    install_signal_handlers(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    results: dict[str, list[float]] = {}
    try:
        with builds(args.baseline) as codes:
            for name, code in codes:
                if name == "current":
                    for p in counts:
                        label = f"current P={p}"
                        results[label] = idle_cpu(code, args, p)
                        log(f"{label}: idle CPU per node {[round(x, 2) for x in results[label]]} %")
                else:
                    results[name] = idle_cpu(code, args, None)
                    log(f"{name}: idle CPU per node {[round(x, 2) for x in results[name]]} %")
    finally:
        cleanup()
    print(f"{'build':<24}{'node CPU % (each)':>28}{'mean':>8}")
    for name, xs in results.items():
        print(f"{name:<24}{', '.join(f'{x:.2f}' for x in xs):>28}{sum(xs) / len(xs):>8.2f}")
    if args.baseline is not None and len(results) >= 2:
        (b, bx), *rest = results.items()
        for c, cx in rest:
            print(f"ratio {c} / {b}: {sum(cx) / max(sum(bx), 1e-9):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
