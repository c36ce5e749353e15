"""Partitions on the ring across real processes (issue 8 parts 4, 5, 7 and 10): P = 64
groups on R = 3 replicas, leaders spread over the nodes, one node or two killed, the
least-connections choice of a stale read's replica."""

from __future__ import annotations

import asyncio
import math
import signal

import pytest
from cluster_harness import Cluster, node_status
from polling import async_wait_until, wait_until

from dsnode.client import Client
from dsnode.client.errors import DsnodeError
from dsnode.core.ring import Ring

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(240)]

P, R = 64, 3
PARTITIONED = ("--partitions", str(P), "--replication", str(R), "--prefer-ring-leaders", "true")


def _leads(cluster: Cluster, ids: list[str]) -> dict[str, int] | None:
    """Partitions each node leads, once every node answers and is ready."""
    out = {}
    for nid in ids:
        st = node_status(cluster.nodes[nid])
        if st is None or not st["ready"]:
            return None
        out[nid] = st["leads"]
    return out


def _spread(cluster: Cluster, ids: list[str], n: int) -> dict[str, int]:
    """Wait until every partition has a leader and none leads more than ceil(P/N) + 1."""
    bound = math.ceil(P / n) + 1

    def settled() -> dict[str, int] | None:
        leads = _leads(cluster, ids)
        if leads is None or sum(leads.values()) != P or max(leads.values()) > bound:
            return None
        return leads

    return wait_until(settled, 60.0, f"every partition led, none by more than {bound}",
                      lambda: f": {_leads(cluster, ids)}")


@pytest.mark.parametrize("n", [3, 5])
def test_leaders_spread_over_the_nodes(pool, n):
    cluster = Cluster(pool, n, PARTITIONED).start(60)
    ids = list(cluster.nodes)
    leads = _spread(cluster, ids, n)
    assert min(leads.values()) >= 1, leads
    st = node_status(cluster.nodes["n1"])
    assert st["ring"] == {"partitions": P, "replication": min(R, n), "epoch": 1}
    ring = Ring(ids, P, R, 1)
    assert [p["replicas"] for p in st["partitions"]] == [list(r) for r in ring.placement()]
    assert st["hosted"] == len(ring.partitions_of("n1"))


def _endpoints(cluster: Cluster, ids: list[str]) -> list[str]:
    return [f"{cluster.nodes[i].addr[0]}:{cluster.nodes[i].addr[1]}" for i in ids]


async def _put_until_ok(client: Client, key: bytes, value: bytes, deadline_s: float) -> None:
    """A write to a partition that keeps a majority succeeds within an election or two."""
    async def attempt() -> bool | None:
        try:
            await client.put(key, value)
            return True
        except DsnodeError:
            return None

    await async_wait_until(attempt, deadline_s, f"put {key!r}", interval=0.05)


async def test_five_nodes_lose_one_then_two_and_lose_nothing(pool):
    """Kill one of five: every key stays readable and writable. Kill a second: the
    partitions that keep two of their three replicas serve; those that lost two answer
    with an error and acknowledge nothing. Both back: everything serves, nothing lost."""
    cluster = Cluster(pool, 5, PARTITIONED).start(60)
    ids = list(cluster.nodes)
    ring = Ring(ids, P, R, 1)
    keys = [b"key-%03d" % i for i in range(192)]
    async with Client(_endpoints(cluster, ids), timeout=10) as client:
        await asyncio.gather(*(client.put(k, b"v1") for k in keys))

    cluster.nodes["n5"].kill()
    live = ids[:4]
    async with Client(_endpoints(cluster, live), timeout=2) as client:
        await asyncio.gather(*(_put_until_ok(client, k, b"v2", 20.0) for k in keys))
        got = await asyncio.gather(*(client.get(k) for k in keys))
        assert all(g.value == b"v2" for g in got)

    cluster.nodes["n4"].kill()
    dead = {"n4", "n5"}
    live = ids[:3]

    def kept_majority(k: bytes) -> bool:
        return sum(m not in dead for m in ring.replicas(ring.partition_of(k))) >= 2

    served = [k for k in keys if kept_majority(k)]
    cut = [k for k in keys if not kept_majority(k)]
    assert served and cut  # 5 nodes, R = 3, two down: some partitions lose their majority
    maybe: set[bytes] = set()
    async with Client(_endpoints(cluster, live), timeout=2) as client:
        await asyncio.gather(*(_put_until_ok(client, k, b"v3", 20.0) for k in served))

        async def refused(k: bytes) -> None:
            with pytest.raises(DsnodeError) as e:
                await client.put(k, b"v3")
            assert e.value.code in ("unavailable", "timeout"), e.value
            if e.value.indeterminate:
                maybe.add(k)

        await asyncio.gather(*(refused(k) for k in cut))

    cluster.nodes["n4"].restart(60)
    cluster.nodes["n5"].restart(60)
    cluster.wait_ready(ids, 60)
    async with Client(_endpoints(cluster, ids), timeout=10) as client:
        for k in served:
            assert (await client.get(k)).value == b"v3", k
        for k in cut:
            value = (await client.get(k)).value
            assert value == b"v2" or (k in maybe and value == b"v3"), (k, value)
        await asyncio.gather(*(client.put(k, b"v4") for k in keys))
    _spread(cluster, ids, 5)  # leaders spread again once the nodes are back


def test_a_stopped_replica_gets_far_fewer_stale_reads(pool):
    """Stale gets go to the replica with the fewest requests in flight from the node
    routing them: one that stopped answering keeps its requests in flight and stops
    being picked."""
    cluster = Cluster(pool, 3, (*PARTITIONED, "--replication", "3")).start(60)
    ids = list(cluster.nodes)
    _spread(cluster, ids, 3)
    slow = cluster.nodes["n3"]
    slow.send_signal(signal.SIGSTOP)
    try:
        async def reads() -> None:
            async with Client(_endpoints(cluster, ["n1"]), timeout=8) as client:
                async def get(i: int) -> None:
                    try:
                        await client.get(b"s%d" % i, "stale", timeout=6)
                    except DsnodeError:
                        pass  # the ones sent to the stopped node time out

                tasks: list[asyncio.Task] = []
                for wave in range(30):  # load in waves of 10, each let run a moment
                    batch = [asyncio.create_task(get(wave * 10 + i)) for i in range(10)]
                    tasks += batch
                    await asyncio.wait(batch, timeout=0.1)
                await asyncio.gather(*tasks)

        asyncio.run(reads())
        st = node_status(cluster.nodes["n1"])
        to = st["paxos"]["stale_reads_to"]
    finally:
        slow.send_signal(signal.SIGCONT)
    print(f"stale reads by replica, n3 stopped: {to}")
    healthy = min(to.get("n1", 0), to.get("n2", 0))
    assert to.get("n3", 0) * 10 < healthy, to
