#!/usr/bin/env python3
"""What request ids cost: puts/s with ``client_id``/``seq`` on every put versus without.

One node (its own one-member cluster) on 127.0.0.1, started fresh for every run, loaded
by ``dsnode bench`` with puts only, 100-byte values, ``--inflight`` requests in flight
(default 64) over ``--connections`` connections:

* ``plain``: puts without request ids (the state machine skips its table);
* ``ids``: ``dsnode bench --request-ids``: every put carries a client id (one per
  connection) and an increasing seq, as dsnode's Python client sends them, so every put
  also goes through the deduplication table (a window of results per client, bounded).

Runs alternate plain, ids, plain, ids ... for ``--rounds`` rounds so that drift in the
machine's load hits both alike; the script prints every run, the median of each mode and
the ratio ids/plain of puts/s and of the node's CPU time per put (steadier than puts/s
when other work shares the machine).

Usage: ``python bench/request_ids_overhead.py [--rounds 3] [--duration 8] [--warmup 2]
[--fsync true|false] [--inflight 64] [--connections 16]``. Every process and temp dir it
made is removed on exit, including on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when loaded by path

from _procs import cleanup, log, tmpdir  # noqa: E402
from metrics_overhead import bench_parser, one_run, parse_bench_args  # noqa: E402

MODES = ("plain", "ids")


def run(work: Path, n: int, mode: str, args: argparse.Namespace, cmd: list[str]) -> dict:
    """A fresh node (no admin listener), loaded with puts with or without request ids."""
    args.scrape_interval = 1.0  # unused: no admin listener in either mode
    extra = ("--request-ids",) if mode == "ids" else ()
    return one_run(work, n, "off", args, cmd, bench_extra=extra, label=mode)


def main() -> int:
    args, cmd = parse_bench_args(bench_parser(__doc__, "plain/ids"))
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
    print(f"ratio ids/plain: puts/s {med['ids']['puts_s'] / med['plain']['puts_s']:.3f}, "
          f"CPU/put {med['ids']['cpu_us_per_put'] / med['plain']['cpu_us_per_put']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
