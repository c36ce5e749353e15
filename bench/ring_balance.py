"""Balance, leader spread, movement and build time of the consistent-hash ring.

For N = 3, 5, 10, 20 members at P = 64 and 256 partitions, R = 3, prints:
replicas held per member against the fair share R*P/N (max and min), the most
partitions one member is preferred leader of against ceil(P/N), replicas
moved when a member is added (against the minimum, the newcomer's fair share)
and when one is removed (against what it held: worst and mean over removing
each member in turn), and the time to build the ring. The same figures for
plain rendezvous hashing (each partition on its R highest-affinity members,
no load bounds) are printed alongside as the baseline, in the same run.

    python bench/ring_balance.py [--sizes 3,5,10,20] [--partitions 64,256] [--replication 3]
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import time

from dsnode.core.ring import Ring
from dsnode.core.ring.hashing import affinity, node_hash, partition_hash
from dsnode.core.ring.placement import place


class Rendezvous:
    """Baseline: every partition on its R highest-affinity members."""

    def __init__(self, members, partitions, replication):
        self.members = tuple(sorted(members))
        self.partitions = partitions
        self.replication = min(replication, len(self.members))
        hs = {m: node_hash(m) for m in self.members}
        self._replicas = []
        for p in range(partitions):
            ph = partition_hash(p)
            ranked = sorted(self.members, key=lambda m, ph=ph: (-affinity(ph, hs[m]), m))
            self._replicas.append(tuple(ranked[: self.replication]))

    def replicas(self, pid):
        return self._replicas[pid]

    def partitions_of(self, node):
        return tuple(p for p, r in enumerate(self._replicas) if node in r)

    def led_by(self, node):
        return tuple(p for p, r in enumerate(self._replicas) if r[0] == node)


def moved(old, new) -> int:
    return sum(len(set(new.replicas(p)) - set(old.replicas(p))) for p in range(old.partitions))


def measure(kind, names, n, p, r):
    members = names[:n]
    t0 = time.perf_counter()
    ring = kind(members, p, r)
    build_ms = (time.perf_counter() - t0) * 1000
    fair = ring.replication * p / n
    held = [len(ring.partitions_of(m)) for m in members]
    led = max(len(ring.led_by(m)) for m in members)
    grown = kind(names[: n + 1], p, r)
    minimum = min(r, n + 1) * p / (n + 1) if n + 1 > r else p * (min(r, n + 1) - min(r, n))
    add = moved(ring, grown) / minimum
    removal = []
    if n - 1 < r:
        shrunk = kind(members[1:], p, r)
        assert moved(ring, shrunk) == 0, "removal with R capped must only drop copies"
    else:
        for k, gone in enumerate(members):
            shrunk = kind(members[:k] + members[k + 1:], p, r)
            removal.append(moved(ring, shrunk) / len(ring.partitions_of(gone)))
    return dict(
        max=max(held) / fair, min=min(held) / fair, led=led, led_cap=math.ceil(p / n),
        add=add, rem_max=max(removal) if removal else float("nan"),
        rem_mean=statistics.fmean(removal) if removal else float("nan"), ms=build_ms,
    )


def sweep(kind, p: int, r: int, seed: int = 64) -> list[float]:
    """moved/minimum for every add (N = 3..19) and every third removal (N = 4..20),
    over one set of names like n1, n2, ... and two seeded random sets."""
    rng = random.Random(seed)
    sets = [[f"n{i}" for i in range(1, 22)]]
    sets += [[f"{rng.getrandbits(40):x}" for _ in range(21)] for _ in range(2)]
    ratios = []
    for names in sets:
        for n in range(3, 21):
            ring = kind(names[:n], p, r)
            if n < 20:
                fair_new = min(r, n + 1) * p / (n + 1)
                ratios.append(moved(ring, kind(names[: n + 1], p, r)) / fair_new)
            if n - 1 >= r:
                for k in range(0, n, 3):
                    shrunk = kind(names[:k] + names[k + 1:n], p, r)
                    ratios.append(moved(ring, shrunk) / len(ring.partitions_of(names[k])))
    return sorted(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="3,5,10,20")
    ap.add_argument("--partitions", default="64,256")
    ap.add_argument("--replication", type=int, default=3)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    parts = [int(x) for x in args.partitions.split(",")]
    names = [f"n{i}" for i in range(1, max(sizes) + 2)]
    r = args.replication
    print(f"R = {r}; columns: ring (bounded loads) / baseline (plain rendezvous)")
    print("| P | N | max/fair | min/fair | most led (ceil(P/N)) | add: moved/min | "
          "remove: worst moved/held | remove: mean | build ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in parts:
        for n in sizes:
            a = measure(Ring, names, n, p, r)
            b = measure(Rendezvous, names, n, p, r)
            if n - 1 >= r:
                rem = (f"{a['rem_max']:.2f} / {b['rem_max']:.2f} | {a['rem_mean']:.2f} / "
                       f"{b['rem_mean']:.2f}")
            else:
                rem = "R capped: 0 / 0 | 0 / 0"
            print(f"| {p} | {n} | {a['max']:.2f} / {b['max']:.2f} | {a['min']:.2f} / {b['min']:.2f} "
                  f"| {a['led']} / {b['led']} ({a['led_cap']}) | {a['add']:.2f} / {b['add']:.2f} "
                  f"| {rem} | {a['ms']:.1f} / {b['ms']:.1f} |")
    print("\nmovement over N = 3..20, three name sets (moved / minimum):")
    print("| P | ring p50 | p90 | max | over 1.5x | rendezvous p50 | p90 | max | over 1.5x |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in parts:
        cells = []
        for kind in (Ring, Rendezvous):
            x = sweep(kind, p, r)
            over = sum(v > 1.5 for v in x)
            cells.append(f"{x[len(x) // 2]:.2f} | {x[int(len(x) * 0.9)]:.2f} | {x[-1]:.2f} | "
                         f"{over} of {len(x)}")
        print(f"| {p} | {cells[0]} | {cells[1]} |")
    print()
    for p, n in ((4096, 20), (4096, 3)):
        names = tuple(f"m{i}" for i in range(n))
        ring_s = best_of(3, lambda names=names, p=p: place(names, p, r))
        base_s = best_of(3, lambda names=names, p=p: Rendezvous(names, p, r))
        print(f"build P = {p}, N = {n} (best of 3): ring {ring_s * 1000:.0f} ms, rendezvous "
              f"{base_s * 1000:.0f} ms ({ring_s / base_s:.2f}x)")


def best_of(times: int, build) -> float:
    best = float("inf")
    for _ in range(times):
        t0 = time.perf_counter()
        build()
        best = min(best, time.perf_counter() - t0)
    return best


if __name__ == "__main__":
    main()
