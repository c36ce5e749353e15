"""Membership changes under load (issue 10): rebalance time, client latency during the
moves against before them, replicas moved against the ring's minimum, and the failure
detector's times to ``suspect`` and ``dead`` after a SIGKILL.

    python bench/rebalance.py [--nodes 5] [--keys 100000] [--partitions 64]
                              [--baseline-seconds 10] [--soak-seconds 0]

1. Start ``--nodes`` nodes (P partitions, R = 3) and load ``--keys`` keys (1 KiB values
   cut to 100 bytes: the moves copy snapshots of them).
2. A steady client load (8 clients, put then linearizable get, through every node) runs
   from here on; its latencies are recorded with their start times.
3. Baseline: ``--baseline-seconds`` of that load.
4. A new node joins (``serve --join``); the time until every node reports the new ring's
   moves done (``status.moves``: settled, nothing pending) is the rebalance time; the
   load's p50/p99 while it ran against the baseline's are printed as ratios.
5. Replicas moved: the add_learner steps every node's mover took, against the least the
   change needs (``core.membership.moves.minimum_moves`` of the two rings' placements).
6. SIGKILL of one node: the time until another node's ``member list`` shows it
   ``suspect``, and ``dead``.
7. With ``--soak-seconds S``: the load runs S more seconds and the detectors'
   suspicions (status ``detector.suspicions``, every node) are reported: with nobody
   failing, each is a false suspicion.

Everything is measured in this one invocation; nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "cluster")]

from cluster_harness import DEFAULT_TIMING, Cluster, async_status  # noqa: E402
from harness import ServerPool, free_port  # noqa: E402

from dsnode.client import Client  # noqa: E402
from dsnode.client.errors import DsnodeError  # noqa: E402
from dsnode.core.membership.moves import minimum_moves  # noqa: E402
from dsnode.core.ring import Ring  # noqa: E402

VALUE = b"v" * 100


def pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def load(endpoints: str, keys: int, concurrency: int = 64) -> float:
    t0 = time.monotonic()
    async with Client(endpoints, timeout=30, pool_size=4) as c:
        it = iter(range(keys))

        async def worker() -> None:
            for i in it:
                await c.put(b"key%08d" % i, VALUE)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() - t0


class Load:
    """Steady clients: put then get, recording (start time, seconds, ok)."""

    def __init__(self, endpoints: str, keys: int, clients: int = 8, seed: int = 1) -> None:
        self.endpoints = endpoints
        self.keys = keys
        self.clients = clients
        self.rng = random.Random(seed)
        self.samples: list[tuple[float, float, bool]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        for i in range(self.clients):
            self._tasks.append(asyncio.create_task(self._client(random.Random(self.rng.random()),
                                                                i)))

    async def _client(self, rng: random.Random, i: int) -> None:
        async with Client(self.endpoints, timeout=10) as c:
            while not self._stop.is_set():
                k = b"key%08d" % rng.randrange(self.keys)
                t0 = time.monotonic()
                try:
                    await c.put(k, VALUE)
                    await c.get(k)
                    ok = True
                except DsnodeError:
                    ok = False
                self.samples.append((t0, time.monotonic() - t0, ok))
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def between(self, a: float, b: float) -> tuple[list[float], int]:
        lat = [d for t, d, ok in self.samples if a <= t < b and ok]
        errors = sum(1 for t, _d, ok in self.samples if a <= t < b and not ok)
        return lat, errors


async def statuses(cluster: Cluster, ids: list[str]) -> dict[str, dict | None]:
    return {n: await async_status(cluster.nodes[n], timeout=3.0) for n in ids}


async def settled(cluster: Cluster, ids: list[str], epoch: int) -> bool:
    for st in (await statuses(cluster, ids)).values():
        if (st is None or st["ring"]["epoch"] != epoch or st["moves"]["pending"]
                or st["moves"]["settled"] != epoch):
            return False
    return True


async def run(args: argparse.Namespace, base: Path) -> None:
    pool = ServerPool(base)
    shape = ("--partitions", str(args.partitions), "--replication", "3",
             "--prefer-ring-leaders", "true", "--fsync", "false" if args.no_fsync else "true")
    try:
        cluster = await asyncio.to_thread(lambda: Cluster(pool, args.nodes, shape).start(90))
        ids = list(cluster.nodes)
        eps = ",".join(f"{h}:{p}" for h, p in cluster.endpoints().values())
        took = await load(eps, args.keys)
        print(f"loaded {args.keys} keys in {took:.1f} s ({args.keys / took:.0f} puts/s)",
              flush=True)
        work = Load(eps, args.keys)
        work.start()
        t_base = time.monotonic()
        await asyncio.sleep(args.baseline_seconds)
        # -- a node joins
        new = f"n{args.nodes + 1}"
        n1 = cluster.nodes["n1"].addr
        srv = pool.new("--join", f"{n1[0]}:{n1[1]}", *DEFAULT_TIMING, *shape,
                       node_id=new, port=free_port())
        cluster.nodes[new] = srv
        t_join = time.monotonic()
        srv.spawn()
        everyone = [*ids, new]
        deadline = t_join + args.timeout
        while not await settled(cluster, everyone, 2):
            if time.monotonic() > deadline:
                raise SystemExit(f"the moves did not finish within {args.timeout} s")
            await asyncio.sleep(0.2)
        t_done = time.monotonic()
        sts = await statuses(cluster, everyone)
        copied = sum((st["moves"].get("steps") or {}).get("add_learner", 0)
                     for st in sts.values() if st)
        before = Ring(ids, args.partitions, 3, 1).placement()
        after = Ring(everyone, args.partitions, 3, 2).placement()
        least = minimum_moves(dict(enumerate(before)), dict(enumerate(after)))
        base_lat, base_err = work.between(t_base, t_join)
        move_lat, move_err = work.between(t_join, t_done)
        print(f"rebalance after adding {new} to {args.nodes} nodes with {args.keys} keys: "
              f"{t_done - t_join:.1f} s")
        print(f"replicas copied to a new place: {copied}, the ring's minimum {least} "
              f"(ratio {copied / least:.2f})" if least else "no replica had to move")
        for name, q in (("p50", 0.5), ("p99", 0.99)):
            b, m = pct(base_lat, q) * 1000, pct(move_lat, q) * 1000
            print(f"client put+get {name}: before {b:.1f} ms, during the moves {m:.1f} ms "
                  f"(ratio {m / b:.2f})")
        print(f"client ops: before {len(base_lat)} ok / {base_err} failed over "
              f"{t_join - t_base:.1f} s; during {len(move_lat)} ok / {move_err} failed over "
              f"{t_done - t_join:.1f} s")
        # -- the detector after a SIGKILL
        victim, watcher = ids[-1], ids[0]
        cluster.nodes[victim].kill()
        t_kill = time.monotonic()
        seen: dict[str, float] = {}
        while "dead" not in seen and time.monotonic() - t_kill < 60:
            st = await async_status(cluster.nodes[watcher], timeout=2.0)
            state = {m["node_id"]: m["state"] for m in (st or {}).get("members", [])}.get(victim)
            if state in ("suspect", "dead") and state not in seen:
                seen[state] = time.monotonic() - t_kill
                seen.setdefault("suspect", seen[state])
            await asyncio.sleep(0.05)
        print(f"SIGKILL of {victim}: {watcher} reports it suspect after "
              f"{seen.get('suspect', float('nan')):.2f} s, dead after "
              f"{seen.get('dead', float('nan')):.2f} s")
        if args.soak_seconds:
            live = [n for n in everyone if n != victim]
            before = {n: (st or {}).get("detector", {}).get("suspicions", 0)
                      for n, st in (await statuses(cluster, live)).items()}
            t_soak = time.monotonic()
            await asyncio.sleep(args.soak_seconds)
            after_st = await statuses(cluster, live)
            false = {n: (st or {}).get("detector", {}).get("suspicions", 0) - before[n]
                     for n, st in after_st.items()}
            lat, err = work.between(t_soak, time.monotonic())
            print(f"soak {args.soak_seconds:.0f} s under load ({len(lat)} ok ops, {err} failed, "
                  f"p99 {pct(lat, 0.99) * 1000:.1f} ms): suspicions of live peers per node "
                  f"{false} (total {sum(false.values())}; the killed node's not counted)")
        await work.stop()
        print(f"median put+get over the whole run: "
              f"{statistics.median(d for _t, d, ok in work.samples if ok) * 1000:.1f} ms")
    finally:
        pool.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--keys", type=int, default=100_000)
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--baseline-seconds", type=float, default=10.0)
    ap.add_argument("--soak-seconds", type=float, default=0.0)
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--no-fsync", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="dsnode-rebalance-") as tmp:
        asyncio.run(run(args, Path(tmp)))


if __name__ == "__main__":
    main()
