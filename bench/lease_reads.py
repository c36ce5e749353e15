"""Linearizable gets with and without leader leases, on one 3-node cluster build.

For each mode (``--leader-leases false`` then ``true``, repeated ``--rounds``
times, alternating) a fresh 3-node cluster on this machine is loaded with
``--keyspace`` keys, then ``dsnode bench --mix get=1`` runs with ``--inflight``
requests in flight over connections to all three nodes. Prints gets/s and p99
per run, the medians per mode, and the ratio leases on / off.

    python bench/lease_reads.py [--duration 10] [--inflight 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import signal
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _procs import (  # noqa: E402
    cleanup,
    install_signal_handlers,
    log,
    run_dsnode_bench,
    start_dsnode_cluster,
    stop,
    tmpdir,
)


def one_run(leases: bool, args: argparse.Namespace, i: int) -> dict:
    work = tmpdir(f"dsnode-lease-{'on' if leases else 'off'}-{i}-")
    env = {"DSNODE_LEADER_LEASES": "true" if leases else "false"}
    procs, ports = start_dsnode_cluster(work, [sys.executable, "-m", "dsnode"], env=env)
    endpoints = ",".join(f"127.0.0.1:{p}" for p in ports)
    common = ["--endpoints", endpoints, "--keyspace", str(args.keyspace), "--output", "json",
              "--value-size", "100"]
    try:
        run_dsnode_bench([*common, "--mix", "put=1", "--requests", str(args.keyspace),
                          "--inflight", "64"], timeout=300)
        res = run_dsnode_bench([*common, "--mix", "get=1", "--inflight", str(args.inflight),
                                "--duration", str(args.duration), "--warmup", str(args.warmup)],
                               timeout=args.duration + args.warmup + 120)
    finally:
        for p in procs:
            stop(p)
    o = res["ops"]["get"]
    out = {"gets_s": o["throughput"], "p99_us": res["latency_us"]["p99"],
           "errors": res["errors"]}
    log(f"leases {'on ' if leases else 'off'} run {i}: {out['gets_s']:.0f} gets/s, "
        f"p99 {out['p99_us'] / 1000:.2f} ms, errors {out['errors']}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--keyspace", type=int, default=10_000)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    install_signal_handlers(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    runs: dict[bool, list[dict]] = {False: [], True: []}
    try:
        for i in range(args.rounds):
            for leases in (False, True):
                runs[leases].append(one_run(leases, args, i))
    finally:
        cleanup()
    med = {m: (statistics.median(r["gets_s"] for r in rs),
               statistics.median(r["p99_us"] for r in rs)) for m, rs in runs.items()}
    print(f"{'leases':<8}{'gets/s':>12}{'p99 ms':>10}")
    for m in (False, True):
        print(f"{'on' if m else 'off':<8}{med[m][0]:>12.0f}{med[m][1] / 1000:>10.2f}")
    print(f"ratio on/off: gets/s {med[True][0] / med[False][0]:.2f}x, "
          f"p99 {med[True][1] / med[False][1]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
