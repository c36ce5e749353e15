"""Network partitions between real nodes, each in its own network namespace.

tests/cluster/netns.py builds the namespaces (one per node, a bridge in a hub
namespace, the test process attached from the root namespace) and cuts links
with iptables DROP rules inside a node's namespace. The client workload and the
linearizability check are those of test_replication.py (cluster_harness).

Needs root, ``ip`` (iproute2) and ``iptables``; skipped with the reason otherwise.
Every namespace, veth and process is removed even when a test fails.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import (
    Cluster,
    Workload,
    WorkloadConfig,
    async_wait,
    check_acked_writes_survive,
    check_linearizable,
    final_reads,
    node_status,
)
from netns import NetLab, lab_cluster
from polling import async_wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.timeout(180)]

IDS = ["n1", "n2", "n3"]


@pytest.fixture
def lab_and_cluster(tmp_path: Path) -> Iterator[tuple[NetLab, Cluster]]:
    with lab_cluster(tmp_path, IDS) as lc:
        yield lc


async def isolate_leader_round(lab: NetLab, cluster: Cluster, work: Workload) -> None:
    """Isolate the leader; the majority elects and serves; the old leader acknowledges
    nothing while cut off; heal; everyone converges on one leader."""
    old = await asyncio.to_thread(cluster.wait_leader, IDS, 30.0)
    majority = [n for n in IDS if n != old]
    await asyncio.to_thread(lab.isolate, old)
    t_cut = time.monotonic()

    new = await asyncio.to_thread(cluster.wait_leader, majority, 30.0)
    assert new != old
    await work.wait_acked(30, timeout=30, after=time.monotonic(), via=majority)

    # the isolated node gives up leadership (it hears from no quorum) and keeps
    # answering its clients, with failures only
    def stepped_down() -> bool:
        st = node_status(cluster.nodes[old])
        return st is not None and st["paxos"]["role"] != "leader"

    await async_wait_until(lambda: asyncio.to_thread(stepped_down), 20, f"{old} to step down",
                           lambda: f": {cluster.describe()}", interval=0.05)
    h = work.history

    def failed_via_old() -> int:
        return h.count(lambda r: r.node == old and r.t_call >= t_cut and r.outcome in
                       ("fail", "indeterminate"))

    await async_wait(lambda: failed_via_old() >= 10, 30,
                     f"10 failed ops through the isolated {old}")
    t_heal = time.monotonic()
    await asyncio.to_thread(lab.heal)

    served = [r for r in h.recs if r.node == old and r.t_call >= t_cut and r.outcome == "ok"
              and r.t_ret is not None and r.t_ret < t_heal]
    assert not served, "the isolated old leader answered ok:\n" + "\n".join(
        f"  {r.kind} {r.key!r} {r.value!r} -> {r.result}" for r in served[:10])

    # converge: one leader all agree on, the old one caught up and serving again
    await asyncio.to_thread(cluster.wait_leader, IDS, 30.0)
    await work.wait_acked(10, timeout=30, after=time.monotonic(), via=[old])
    print(f"isolated leader {old}; majority elected {new}; "
          f"{failed_via_old()} ops via {old} failed while cut off")


async def _finish(cluster: Cluster, work: Workload) -> None:
    history = await work.stop()
    final = await final_reads(history, cluster.nodes["n1"].addr, "n1", work.keys)
    check_acked_writes_survive(history, final)
    check_linearizable(history)
    await asyncio.to_thread(cluster.wait_caught_up, "n1", 30.0)
    await asyncio.to_thread(cluster.wait_caught_up, "n2", 30.0)
    await asyncio.to_thread(cluster.wait_caught_up, "n3", 30.0)
    leader = await asyncio.to_thread(cluster.check_single_leader)
    print(f"converged on {leader}: {cluster.describe()}")


async def test_isolated_leader_is_replaced_and_acknowledges_nothing(
    lab_and_cluster: tuple[NetLab, Cluster], seed: int
) -> None:
    lab, cluster = lab_and_cluster
    await asyncio.to_thread(cluster.start)
    work = Workload(cluster.endpoints(), seed, WorkloadConfig(timeout_ms=1000)).start()
    await work.wait_acked(50, timeout=30)
    await isolate_leader_round(lab, cluster, work)
    await _finish(cluster, work)


@pytest.mark.slow
async def test_repeated_leader_isolation(lab_and_cluster: tuple[NetLab, Cluster], seed: int) -> None:
    lab, cluster = lab_and_cluster
    await asyncio.to_thread(cluster.start)
    work = Workload(cluster.endpoints(), seed, WorkloadConfig(timeout_ms=1000)).start()
    await work.wait_acked(50, timeout=30)
    for _ in range(4):
        await isolate_leader_round(lab, cluster, work)
    await _finish(cluster, work)


async def test_a_node_cut_off_from_a_partitioned_cluster_acknowledges_nothing_wrong(
    tmp_path: Path, seed: int
) -> None:
    """Sixteen partitions whose leaders are spread over three nodes: one node is cut
    off while clients keep writing through every node. The partitions it led elect new
    leaders among the other two, writes through it fail, and once the link heals
    leadership spreads back; the whole history stays linearizable and no acknowledged
    write is lost."""
    args = ("--partitions", "16", "--replication", "3", "--prefer-ring-leaders", "true")
    with lab_cluster(tmp_path, IDS, args) as (lab, cluster):
        await asyncio.to_thread(cluster.start)
        work = Workload(cluster.endpoints(), seed, WorkloadConfig(timeout_ms=1000)).start()
        await work.wait_acked(50, timeout=30)
        cut = "n1"
        await asyncio.to_thread(lab.isolate, cut)
        others = [n for n in IDS if n != cut]

        def took_over() -> bool:
            sts = [node_status(cluster.nodes[n]) for n in others]
            return all(st is not None for st in sts) and sum(st["leads"] for st in sts) == 16

        await async_wait_until(lambda: asyncio.to_thread(took_over), 30,
                               "the other two to lead every partition", interval=0.1)
        await work.wait_acked(30, timeout=30, after=time.monotonic(), via=others)
        await asyncio.to_thread(lab.heal)
        await work.wait_acked(10, timeout=30, after=time.monotonic(), via=[cut])

        def spread() -> bool:
            sts = [node_status(cluster.nodes[n]) for n in IDS]
            return all(st is not None and st["ready"] for st in sts) and all(
                1 <= st["leads"] <= 7 for st in sts)  # ceil(16 / 3) + 1

        await async_wait_until(lambda: asyncio.to_thread(spread), 30, "leaders spread again",
                               interval=0.1)
        history = await work.stop()
        final = await final_reads(history, cluster.nodes["n2"].addr, "n2", work.keys)
        check_acked_writes_survive(history, final)
        check_linearizable(history)
