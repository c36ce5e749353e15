#!/usr/bin/env python3
"""What request ids cost: puts/s with ``client_id``/``seq`` on every put versus without.

One node (its own one-member cluster) on 127.0.0.1, started fresh for every run, loaded
by ``dsnode bench`` with puts only, 100-byte values, ``--inflight`` requests in flight
(default 64) over ``--connections`` connections:

* ``plain``: puts without request ids (the state machine skips its table);
* ``ids``: ``dsnode bench --request-ids``: every put carries a client id (one per
  connection) and an increasing seq, as dsnode's Python client sends them, so every put
  also goes through the deduplication table (a window of results per client, bounded).

First, in this process, the state machine alone: ``DedupKV.apply`` of 200,000 puts from 16
clients (64 per log entry), plain and with ids, alternating three times: the steadiest
number, the table's own cost per write. Then runs alternate plain, ids, plain, ids ... for ``--rounds`` rounds so that drift in the
machine's load hits both alike; the script prints every run, the median of each mode and
the ratio ids/plain of puts/s and of the node's CPU time per put (steadier than puts/s
when other work shares the machine), of the medians and round by round.

Usage: ``python bench/request_ids_overhead.py [--rounds 3] [--duration 8] [--warmup 2]
[--fsync true|false] [--inflight 64] [--connections 16]``. Every process and temp dir it
made is removed on exit, including on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when loaded by path

from _procs import cleanup, log, tmpdir  # noqa: E402
from metrics_overhead import bench_parser, one_run, parse_bench_args  # noqa: E402

from dsnode.core.commands import Put  # noqa: E402  (_procs put the repository on the path)
from dsnode.core.paxos.statemachine import DedupKV  # noqa: E402

MODES = ("plain", "ids")


def apply_cost(n: int = 200_000, clients: int = 16) -> dict[str, float]:
    """Microseconds per ``DedupKV.apply`` of a put, plain and with request ids (the best
    of three alternating passes each: the least disturbed by other work)."""
    cids = [os.urandom(16) for _ in range(clients)]
    cmds = [Put(b"bench/%08d" % i, b"v" * 100, None) for i in range(1000)]
    best = {m: float("inf") for m in MODES}
    for _ in range(3):
        for mode in MODES:
            sm, seqs = DedupKV(), [0] * clients
            rids: list = [None] * n
            if mode == "ids":
                for i in range(n):
                    c = i % clients
                    seqs[c] += 1
                    rids[i] = [cids[c], seqs[c]]
            apply = sm.apply
            t0 = time.perf_counter()
            for i in range(n):
                apply(rids[i], cmds[i % 1000], i // 64 + 1)
            best[mode] = min(best[mode], (time.perf_counter() - t0) / n * 1e6)
    return best


def run(work: Path, n: int, mode: str, args: argparse.Namespace, cmd: list[str]) -> dict:
    """A fresh node (no admin listener), loaded with puts with or without request ids."""
    args.scrape_interval = 1.0  # unused: no admin listener in either mode
    extra = ("--request-ids",) if mode == "ids" else ()
    return one_run(work, n, "off", args, cmd, bench_extra=extra, label=mode)


def main() -> int:
    args, cmd = parse_bench_args(bench_parser(__doc__, "plain/ids"))
    cost = apply_cost()
    print(f"state machine apply, 16 clients: plain {cost['plain']:.2f} us, ids "
          f"{cost['ids']:.2f} us per put (+{cost['ids'] - cost['plain']:.2f} us)", flush=True)
    runs: list[dict] = []
    try:
        work = tmpdir("dsnode-request-ids-")
        for n in range(args.rounds):
            for mode in MODES:
                log(f"round {n + 1}/{args.rounds}: {mode}")
                runs.append(run(work, n, mode, args, cmd))
    finally:
        cleanup()
    print(f"puts only, 100-byte values, {args.inflight} in flight over {args.connections} "
          f"connections, fsync={args.fsync}, {args.duration:g}s per run")
    for r in runs:
        print(f"  {r['mode']:>5}: {r['puts_s']:10.0f} puts/s  {r['cpu_us_per_put']:7.1f} us "
              f"CPU/put  p99 {r['p99_us'] / 1000:7.1f} ms  errors {r['errors']}")
    med = {m: {k: statistics.median(r[k] for r in runs if r["mode"] == m)
               for k in ("puts_s", "cpu_us_per_put")} for m in MODES}
    for m in MODES:
        print(f"median {m:>5}: {med[m]['puts_s']:.0f} puts/s, "
              f"{med[m]['cpu_us_per_put']:.1f} us CPU/put")
    print(f"ratio ids/plain of the medians: puts/s "
          f"{med['ids']['puts_s'] / med['plain']['puts_s']:.3f}, CPU/put "
          f"{med['ids']['cpu_us_per_put'] / med['plain']['cpu_us_per_put']:.3f}")
    # each ids run against the plain run just before it: drift in the machine's load
    # between rounds cancels out
    pairs = list(zip(runs[0::2], runs[1::2], strict=True))
    for key in ("puts_s", "cpu_us_per_put"):
        ratios = [b[key] / a[key] for a, b in pairs]
        print(f"per-round ratios ids/plain of {key}: "
              f"{', '.join(f'{r:.3f}' for r in ratios)}; median {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
