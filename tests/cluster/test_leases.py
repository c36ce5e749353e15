"""Leader leases in a real cluster (issue 7.6).

A leader holding a lease answers linearizable gets from its own state; a
stopped leader that resumes after its lease ran out must not, even before its
ticker runs: the driver reads the clock before it handles any input.
"""

from __future__ import annotations

import time

import pytest
from cluster_harness import Cluster, async_status, async_wait
from harness import RawConn, ServerPool, assert_ok

pytestmark = pytest.mark.cluster


async def _reads(cluster: Cluster, leader: str, n: int) -> dict:
    async with await RawConn.open(cluster.nodes[leader].addr) as c:
        assert_ok(await c.call("put", key=b"k", value=b"v"))
        for _ in range(n):
            assert assert_ok(await c.call("get", key=b"k"))["value"] == b"v"
    st = await async_status(cluster.nodes[leader])
    assert st is not None
    return st["paxos"]


@pytest.mark.parametrize("leases", [True, False])
async def test_leader_answers_gets_by_lease_or_by_read_index(pool: ServerPool, leases) -> None:
    cluster = Cluster(pool, args=("--leader-leases", str(leases).lower())).start()
    leader = await cluster.async_wait_leader(list(cluster.nodes))
    if leases:  # the lease starts with the first round a quorum acknowledges
        await async_wait(lambda: _held(cluster, leader), 10, "a lease")
    px = await _reads(cluster, leader, 50)
    assert px["lease"]["enabled"] is leases
    if leases:
        assert px["lease"]["duration_ms"] == 400  # (50 - 1) ticks x 0.9 / 1.1, of 10 ms
        assert px["reads"]["lease"] >= 45, px["reads"]
    else:
        assert px["reads"] == {"lease": 0, "read_index": 50}


def _held(cluster: Cluster, nid: str) -> bool:
    from cluster_harness import node_status

    st = node_status(cluster.nodes[nid])
    return bool(st and st["paxos"]["lease"]["held"])


async def test_a_resumed_leader_never_answers_from_an_expired_lease(pool: ServerPool) -> None:
    """SIGSTOP the leader, let the others elect a leader and overwrite the key, queue a
    get on a connection to the stopped leader, SIGCONT it: the answer is the new value
    or an error, never the old one."""
    cluster = Cluster(pool).start()
    old = await cluster.async_wait_leader(list(cluster.nodes))
    await async_wait(lambda: _held(cluster, old), 10, "a lease")
    others = [n for n in cluster.nodes if n != old]
    async with await RawConn.open(cluster.nodes[old].addr) as c_old:
        assert_ok(await c_old.call("put", key=b"k", value=b"old"))
        assert assert_ok(await c_old.call("get", key=b"k"))["value"] == b"old"
        cluster.nodes[old].pause()
        try:
            t_stop = time.monotonic()
            new = await cluster.async_wait_leader(others, 20.0)
            async with await RawConn.open(cluster.nodes[new].addr) as c_new:
                assert_ok(await c_new.call("put", key=b"k", value=b"new", timeout=10))
            rid = c_old.send({"op": "get", "key": b"k", "timeout_ms": 5000})
            await c_old.writer.drain()
            assert time.monotonic() - t_stop > 0.4  # the lease is over in real time
        finally:
            cluster.nodes[old].resume()
        r = await c_old.recv_id(rid, 10)
    assert not (r.get("ok") and r.get("value") == b"old"), r
    if r.get("ok"):
        assert r["value"] == b"new"
    # and once everyone caught up, a get anywhere sees the new value
    async with await RawConn.open(cluster.nodes[old].addr) as c:
        r = await c.call("get", key=b"k", timeout=15, timeout_ms=10000)
        assert assert_ok(r)["value"] == b"new"
