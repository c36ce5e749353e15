"""Idle cost of the Paxos core per node tick, by number of groups, quiescence on and off.

Three in-memory nodes (no I/O: messages delivered at once, records dropped) host
P groups each (every node in every group); each group elects a leader and
commits one write, then the cluster idles. Measured: CPU microseconds per node
per tick, and peer messages per node per second at a 10 ms tick, over
``--ticks`` idle ticks. The runtime adds its own fixed cost (the ticker's
wake-ups, metrics); this isolates what grows with P.

    python bench/core_idle.py [--groups 1,64,256] [--ticks 2000]
"""

from __future__ import annotations

import argparse
import random
import time

from dsnode.core.commands import Put
from dsnode.core.paxos import PaxosConfig, PaxosNode

NODES = ("n1", "n2", "n3")
TICK_S = 0.01


def build(groups: int, quiesce: bool) -> dict[str, PaxosNode]:
    cfg = PaxosConfig(election_timeout_ticks=50, heartbeat_interval_ticks=5,
                      leader_quorum_timeout_ticks=50, quiesce=quiesce, formation_group=None)
    placement = {g: NODES[g % 3:] + NODES[: g % 3] for g in range(groups)}
    return {n: PaxosNode(n, placement, random.Random(n), cfg) for n in NODES}


def settle(nodes: dict[str, PaxosNode]) -> int:
    sent = 0
    while True:
        queue = []
        for n, core in nodes.items():
            r = core.ready()
            queue.extend((n, dst, m) for dst, m in r.send)
        if not queue:
            return sent
        sent += len(queue)
        for src, dst, m in queue:
            nodes[dst].step(src, m)


def run(groups: int, quiesce: bool, ticks: int) -> tuple[float, float]:
    nodes = build(groups, quiesce)
    for g in range(groups):
        leader = NODES[g % 3]
        nodes[leader].campaign(g)
        settle(nodes)
        nodes[leader].propose(g, ("w", g), Put(b"k", b"v"), request_id=("c", g + 1))
        settle(nodes)
    for _ in range(200):  # let heartbeats, commits and the quiet settle
        for core in nodes.values():
            core.tick()
        settle(nodes)
    cpu = 0.0
    sent = 0
    for _ in range(ticks):
        t0 = time.process_time()
        for core in nodes.values():
            core.tick()
        sent += settle(nodes)
        cpu += time.process_time() - t0
    us_per_node_tick = cpu / ticks / len(NODES) * 1e6
    msgs_per_node_s = sent / len(NODES) / (ticks * TICK_S)
    return us_per_node_tick, msgs_per_node_s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--groups", default="1,64,256")
    ap.add_argument("--ticks", type=int, default=2000)
    args = ap.parse_args()
    print(f"{'groups':>7}{'quiesce':>9}{'us/node/tick':>14}{'CPU % at 10 ms':>16}{'msgs/node/s':>13}")
    for p in (int(x) for x in args.groups.split(",")):
        rows = {}
        for q in (False, True):
            us, msgs = run(p, q, args.ticks)
            rows[q] = us
            print(f"{p:>7}{'on' if q else 'off':>9}{us:>14.1f}{us / (TICK_S * 1e6) * 100:>16.2f}"
                  f"{msgs:>13.0f}")
        print(f"{'':>7}{'ratio on/off':>23}{rows[True] / rows[False]:>7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
