"""Failover time of a 3-node dsnode cluster: median of N leader SIGKILLs under load.

For each round: a client workload runs against all three nodes; the current
leader is SIGKILLed; the time from the SIGKILL to the first write that was
invoked after it and acknowledged through a surviving node is measured; the
killed node is restarted and allowed to catch up before the next round. The
whole history is checked for linearizability at the end.

    python bench/failover_time.py [--rounds 10] [--seed 1] [serve flags ...]

Extra arguments go to every ``dsnode serve`` (for example
``--election-timeout-ms 300``). Prints each round and the median in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "tests" / "cluster")]

from cluster_harness import (  # noqa: E402
    Cluster,
    Workload,
    WorkloadConfig,
    check_linearizable,
    repeated_failover,
)
from harness import ServerPool  # noqa: E402


async def run(rounds: int, seed: int, serve_args: list[str], base: Path) -> list[float]:
    pool = ServerPool(base)
    times: list[float] = []
    try:
        cluster = await asyncio.to_thread(lambda: Cluster(pool, args=serve_args).start())
        work = Workload(cluster.endpoints(), seed, WorkloadConfig(timeout_ms=2000)).start()
        await work.wait_acked(50, timeout=30)
        times = await repeated_failover(cluster, work, rounds)
        await work.stop()
        check_linearizable(work.history)
    finally:
        pool.close()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--seed", type=int, default=1)
    args, serve_args = ap.parse_known_args()
    with tempfile.TemporaryDirectory(prefix="dsnode-failover-") as tmp:
        times = asyncio.run(run(args.rounds, args.seed, serve_args, Path(tmp)))
    ms = sorted(t * 1000 for t in times)
    print(f"failover over {len(ms)} leader kills: median {statistics.median(ms):.0f} ms, "
          f"min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms")


if __name__ == "__main__":
    main()
