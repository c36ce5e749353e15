"""``python -m dsnode.sim --seed N`` or ``--seeds A-B``: run simulations.

Prints one line per failing seed with the exact repro command, and for a
range the throughput in seeds/s and cluster-seconds simulated per wall second
(ticks x nodes x ``--tick-ms``). Exit status 1 if any seed failed.

Two kinds of cluster (``dsnode.sim.world``): by default ``--groups`` groups of
``--replicas`` members drawn by the world (the fast mode the 1,000 CI seeds
run); with ``--partitions P`` a partitioned cluster as the runtime runs one, a
metadata group and a ring of P partitions with ``--replication`` (alias of
``--replicas``) replicas each, created by the cores themselves, e.g.
``python -m dsnode.sim --seeds 0-99 --nodes 5 --partitions 16 --replication 3``.
``--membership`` (partitioned only) forms the cluster without some nodes and
changes the membership during the faults (``dsnode.sim.membership``): spares
join, members leave, dead ones are removed, every node's replica mover moves
the partitions to each new ring; once quiet every partition's voters are the
final ring's placement and no node keeps a group it no longer holds; ``--broken
eager-moved`` or ``keeps-retired`` runs a broken variant of it.
``--txns`` adds cross-partition transactions (``dsnode.sim.txns``): a bank
workload through every node's two-phase-commit coordinator, coordinators
crashed at their steps, and the atomicity and bank checks; ``--broken
decide-early`` or ``release-on-timeout`` runs a broken 2PC variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from dsnode.sim.broken import (
    BROKEN,
    BROKEN_GROUPS,
    CONF_BROKEN,
    LIVENESS_BROKEN,
    MEMBER_BROKEN,
    RING_BROKEN,
    TXN_BROKEN,
    WORLD_BROKEN,
    configure,
)
from dsnode.sim.trace import Trace
from dsnode.sim.txns import TxConfig
from dsnode.sim.world import SimConfig, SimWorld, partitioned_config


def _range(text: str) -> range:
    a, _, b = text.partition("-")
    return range(int(a), int(b or a) + 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsnode.sim")
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--seed", type=int, help="run one seed")
    which.add_argument("--seeds", type=_range, help="run a range, e.g. 0-999")
    ap.add_argument("--ticks", type=int, default=600, help="fault-phase ticks")
    ap.add_argument("--heal-ticks", type=int, default=600, help="convergence budget")
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--groups", type=int, default=2, help="groups drawn by the world")
    ap.add_argument("--partitions", type=int, default=0,
                    help="a partitioned cluster with this many partitions (0: --groups)")
    ap.add_argument("--replicas", "--replication", dest="replicas", type=int, default=3,
                    help="members per group; partitioned, the ring's replication")
    ap.add_argument("--clients", type=int, help="default 4; partitioned 8")
    ap.add_argument("--keys", type=int, help="default 6; partitioned 24")
    ap.add_argument("--no-swarm", action="store_true", help="fixed timing and fault mix")
    ap.add_argument("--broken", choices=sorted(BROKEN) + sorted(BROKEN_GROUPS)
                    + sorted(LIVENESS_BROKEN) + list(WORLD_BROKEN) + sorted(RING_BROKEN)
                    + sorted(TXN_BROKEN) + sorted(CONF_BROKEN) + sorted(MEMBER_BROKEN),
                    help="run a deliberately broken variant")
    ap.add_argument("--txns", action="store_true",
                    help="cross-partition transactions: a bank workload over 2PC "
                         "(partitioned clusters only)")
    ap.add_argument("--reconfig", action="store_true",
                    help="replica-set changes of the groups during the faults: add a "
                         "learner, promote it, remove a voter (not partitioned)")
    ap.add_argument("--membership", action="store_true",
                    help="membership changes during the faults: the cluster forms without "
                         "some nodes, which join later; members leave, dead ones are "
                         "removed (partitioned clusters only)")
    ap.add_argument("--trace", action="store_true", help="print every event")
    ap.add_argument("--tick-ms", type=float, default=10.0, help="for cluster-seconds only")
    args = ap.parse_args(argv)
    if args.partitions < 0:
        ap.error("--partitions must be >= 0")
    if args.partitions and args.groups != 2:
        ap.error("--groups and --partitions choose two kinds of cluster: give one")

    run = dict(fault_ticks=args.ticks, heal_ticks_max=args.heal_ticks,
               swarm=not args.no_swarm)
    for name in ("clients", "keys"):
        if getattr(args, name) is not None:
            run[name] = getattr(args, name)
    if args.txns or args.broken in TXN_BROKEN:
        run["txns"] = TxConfig()
    if args.reconfig:
        run["reconfig"] = True
    if args.membership:
        run["membership"] = True
    try:
        if args.partitions:
            cfg = partitioned_config(args.nodes, args.partitions, args.replicas, **run)
        else:
            cfg = SimConfig(nodes=args.nodes, groups=args.groups, replicas=args.replicas, **run)
        if args.broken:
            cfg = configure(cfg, args.broken)
        SimWorld.check_config(cfg)
    except ValueError as e:
        ap.error(str(e))
    seeds = (
        range(args.seed, args.seed + 1) if args.seed is not None else (args.seeds or range(0, 1))
    )
    flags = [f"--ticks {args.ticks}"]
    for name, default in (
        ("heal_ticks", 600),
        ("nodes", 3),
        ("groups", 2),
        ("partitions", 0),
        ("replicas", 3),
        ("clients", None),
        ("keys", None),
    ):
        if getattr(args, name) != default:
            flags.append(f"--{name.replace('_', '-')} {getattr(args, name)}")
    if args.no_swarm:
        flags.append("--no-swarm")
    if args.txns:
        flags.append("--txns")
    if args.reconfig:
        flags.append("--reconfig")
    if args.membership:
        flags.append("--membership")
    if args.broken:
        flags.append(f"--broken {args.broken}")

    t0 = time.perf_counter()
    failed = 0
    ticks = 0
    inconclusive = 0
    for seed in seeds:
        trace = Trace(enabled=True, echo=args.trace)
        res = SimWorld(seed, dataclasses.replace(cfg), trace).run()
        ticks += res.ticks
        inconclusive += res.lin_inconclusive
        if len(seeds) == 1:
            print(
                f"seed {seed}: {'ok' if res.ok else 'FAILED'} ticks={res.ticks} ops={res.ops} "
                f"ok={res.ops_ok} indeterminate={res.ops_indeterminate} messages={res.messages} "
                f"wall={res.wall_s:.2f}s"
            )
            if res.stats:
                print("  " + " ".join(f"{k}={v}" for k, v in sorted(res.stats.items())))
        if not res.ok:
            failed += 1
            if not args.trace:
                print(res.trace_tail[-4000:])
            print(f"FAILED seed {seed}: {res.error}")
            print(f"repro: python -m dsnode.sim --seed {seed} {' '.join(flags)}")
    wall = time.perf_counter() - t0
    n = len(seeds)
    cluster_s = ticks * cfg.nodes * args.tick_ms / 1000
    print(
        f"{n - failed}/{n} seeds passed in {wall:.1f}s: {n / wall:.1f} seeds/s, "
        f"{cluster_s / wall:.0f} cluster-seconds per wall second"
        + (f", {inconclusive} linearizability checks inconclusive" if inconclusive else "")
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
