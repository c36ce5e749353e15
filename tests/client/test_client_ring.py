"""The ring-aware client against fake clusters (tests/client/fake_server.py): requests go
to their partition's leader per the ``ring`` map, the map is fetched again after a
forwarded answer (rate-limited), stale gets spread over the replicas by least connections
with seeded ties, and anything the map cannot settle takes the usual route."""

from __future__ import annotations

import asyncio
import math
import ssl

import fake_server as fs  # tests/client is on sys.path (pytest's prepend import mode)
import pytest
from polling import async_wait_until

import dsnode.client.client as client_module
from dsnode.certs import write_bundle
from dsnode.client import Client, Op, SyncClient, Unauthenticated
from dsnode.client.ring import RingMap
from dsnode.core.ring.hashing import partition_of

pytestmark = pytest.mark.timeout(20)

P = 8


@pytest.fixture
async def cluster():
    servers = await fs.fake_cluster(3, partitions=P, replication=3)
    yield servers
    for s in servers:
        await s.stop()


@pytest.fixture
def no_rate_limit(monkeypatch):
    """Let every wanted refetch of the map happen at once (the limit has its own test)."""
    monkeypatch.setattr(client_module, "RING_REFRESH_MIN_S", 0.0)


def _keyed(servers, op: str) -> dict[str, list[bytes]]:
    """Server node id -> keys of the ``op`` requests it received."""
    return {s.node_id: [r["key"] for r in s.requests if r.get("op") == op] for s in servers}


def _leader(servers, key: bytes) -> str:
    ring = servers[0].ring
    return ring["map"][partition_of(key, ring["partitions"])]["leader"]


def _keys_led_by(servers, node: str, n: int) -> list[bytes]:
    keys = (f"k{i}".encode() for i in range(10_000))
    return [k for k in keys if _leader(servers, k) == node][:n]


async def test_each_key_goes_to_its_partitions_leader_per_the_map(cluster):
    keys = [f"key-{i}".encode() for i in range(40)]
    async with Client(cluster[0].endpoint, timeout=2.0) as c:
        for k in keys:
            assert (await c.put(k, b"v")).succeeded
        for k in keys:
            assert (await c.get(k)).value == b"v"
        assert (await c.delete(keys[0])).existed
        assert c.stats["forwarded"] == 0 and c.stats["ring_fetches"] == 1
        assert c.stats["routed"] == 2 * len(keys) + 1
        assert c.partition_map is not None and c.partition_map.partitions == P
    for op in ("put", "get"):
        got = _keyed(cluster, op)
        for s in cluster:
            assert sorted(got[s.node_id]) == sorted(k for k in keys if _leader(cluster, k)
                                                    == s.node_id)
    assert {_leader(cluster, k) for k in keys} == {"n0", "n1", "n2"}  # all three were used
    assert sum(1 for s in cluster for r in s.requests if r["op"] == "ring") == 1


async def test_txn_goes_to_the_leader_of_its_first_written_keys_partition(cluster):
    """The home of a cross-partition txn (its first written key's partition), where the
    node it reaches commits; a txn that writes nothing: its first key's."""
    a = _keys_led_by(cluster, "n2", 1)[0]
    b = _keys_led_by(cluster, "n1", 1)[0]
    async with Client(cluster[0].endpoint, timeout=2.0) as c:
        await c.txn(compares=[(a, 0)], then=[Op.put(b, "1")])  # to n1 (b is written)
        await c.txn(then=[Op.get(b), Op.put(a, "2")])  # to n2 (a is written)
        await c.txn(compares=[(a, 0)], then=[Op.get(b)])  # reads only: a's, n2
        await c.txn()  # no key: the usual route
    txns = {s.node_id: [r for r in s.requests if r["op"] == "txn"] for s in cluster}
    assert [len(txns[n]) for n in ("n0", "n1", "n2")] == [1, 1, 2]
    assert txns["n1"][0]["then"][0]["key"] == b
    assert [t["then"][-1]["key"] for t in txns["n2"]] == [a, b]


async def test_a_forwarded_answer_makes_the_client_fetch_the_map_again_and_follow_it(
    cluster, no_rate_limit
):
    key = _keys_led_by(cluster, "n1", 1)[0]
    part = cluster[0].ring["map"][partition_of(key, P)]
    async with Client(cluster[0].endpoint, timeout=2.0) as c:
        await c.put(key, "1")
        part["leader"] = "n2"  # a leadership change the client has not heard of
        await c.put(key, "2")  # n1 sends it on: forwarded, and the map is fetched again
        assert c.stats["forwarded"] == 1
        await async_wait_until(lambda: c.stats["ring_fetches"] == 2, 5, "the map again")
        await c.put(key, "3")  # straight to n2
        assert c.stats["forwarded"] == 1 and c.stats["ring_fetches"] == 2
    assert [r.get("value") for r in cluster[1].requests if r["op"] == "put"] == [b"1", b"2"]
    assert [r.get("value") for r in cluster[2].requests if r["op"] == "put"] == [b"3"]


async def test_map_fetches_are_rate_limited_however_many_answers_are_forwarded(cluster):
    """Every answer says forwarded (the map names a leader that is not one), yet the map
    is fetched at most once per RING_REFRESH_MIN_S."""
    for s in cluster:
        s.ring = {**s.ring, "map": [{**p, "leader": "n1"} for p in s.ring["map"]]}
        s.node_id = "x" + s.node_id  # no server is the leader the map names
    loop = asyncio.get_running_loop()
    async with Client(cluster[0].endpoint, timeout=2.0) as c:
        start = loop.time()
        for i in range(60):
            await c.get(f"k{i}")
        elapsed = loop.time() - start
        assert c.stats["forwarded"] == 60
        fetches = sum(1 for s in cluster for r in s.requests if r["op"] == "ring")
        assert 1 <= fetches <= 2 + math.floor(elapsed / client_module.RING_REFRESH_MIN_S)


async def test_stale_gets_spread_over_the_replicas_by_least_connections(cluster):
    """Stale gets held unanswered: each new one goes to the replica with the fewest of
    this client's requests in flight, so six land two on each of the three."""
    release = asyncio.Event()

    async def hold(req, conn):
        if req.get("op") == "get":
            await release.wait()
        return None

    for s in cluster:
        s.hook = hold
    async with Client(cluster[0].endpoint, timeout=5.0, seed=1) as c:
        tasks = []
        for i in range(6):
            tasks.append(asyncio.create_task(c.get("same-key", consistency="stale")))
            await async_wait_until(
                lambda n=i + 1: sum(len(_keyed([s], "get")[s.node_id]) for s in cluster) == n,
                5, f"{i + 1} stale gets received",
            )
        assert sorted(len(_keyed([s], "get")[s.node_id]) for s in cluster) == [2, 2, 2]
        assert c.in_flight == 6
        release.set()
        await asyncio.gather(*tasks)
        assert c.stats["forwarded"] == 0  # every replica may answer a stale get


async def test_a_replica_that_refuses_connections_is_left_out_of_stale_picks(cluster):
    await cluster[2].stop()
    loop = asyncio.get_running_loop()
    async with Client(cluster[0].endpoint, timeout=2.0, seed=3) as c:
        start = loop.time()
        for i in range(30):
            assert (await c.get(f"k{i}", consistency="stale")).version == 0
        # the usual way only when n2 was tried and refused, once per DIRECT_RETRY_S
        tries = 1 + math.floor((loop.time() - start) / client_module.DIRECT_RETRY_S)
        assert 30 - c.stats["routed"] <= tries
    got = _keyed(cluster[:2], "get")
    assert len(got["n0"]) + len(got["n1"]) == 30 and got["n1"]


async def _stale_targets(cluster, seed: int, n: int) -> list[str]:
    """Which node each of ``n`` stale gets, one after the other (all ties), went to."""
    before = {s.node_id: len(_keyed([s], "get")[s.node_id]) for s in cluster}
    order = []
    async with Client(cluster[0].endpoint, timeout=2.0, seed=seed) as c:
        for _ in range(n):
            await c.get("k", consistency="stale")
            now = {s.node_id: len(_keyed([s], "get")[s.node_id]) for s in cluster}
            (target,) = [node for node in now if now[node] != before[node]]
            order.append(target)
            before = now
    return order


async def test_ties_are_broken_by_the_seeded_generator(cluster):
    first = await _stale_targets(cluster, seed=7, n=12)
    assert await _stale_targets(cluster, seed=7, n=12) == first
    assert len(set(first)) > 1  # the ties are really broken at random
    others = [await _stale_targets(cluster, seed=s, n=12) for s in (8, 9)]
    assert any(o != first for o in others)


async def test_a_server_without_the_ring_op_is_asked_once_then_used_as_before():
    srv = await fs.FakeServer().start()
    try:
        async with Client(srv.endpoint, timeout=2.0) as c:
            await c.put("a", "1")
            await c.get("a")
            await c.get("b", consistency="stale")
            srv.drop_all()  # a connection loss would refetch a map: not from this server
            await c.get("c")
            assert c.partition_map is None and c.stats["routed"] == 0
            assert c.stats["ring_fetches"] == 0 and c.stats["ring_errors"] == 0
    finally:
        await srv.stop()
    assert [r["op"] for r in srv.requests] == ["ring", "put", "get", "get", "get"]
    ids = [r["id"] for r in srv.requests]
    assert ids == sorted(set(ids))


async def test_ring_aware_false_never_asks_for_the_map(cluster):
    async with Client(cluster[0].endpoint, timeout=2.0, ring_aware=False) as c:
        for i in range(10):
            await c.put(f"k{i}", "v")
        assert c.stats["sent"] == 10 and c.stats["routed"] == 0
        forwarded = c.stats["forwarded"]
    assert all(r["op"] == "put" for r in cluster[0].requests)
    assert not cluster[1].requests and not cluster[2].requests
    # the share of requests the node had to send on: every key n0 does not lead
    assert forwarded == sum(1 for i in range(10) if _leader(cluster, f"k{i}".encode()) != "n0")


async def test_map_not_known_yet_takes_the_usual_route_until_a_later_fetch_has_it(
    cluster, no_rate_limit
):
    known = asyncio.Event()

    async def not_yet(req, conn):
        if req.get("op") == "ring" and not known.is_set():
            return fs.err(req, "unavailable", "partition map not known yet")
        return None

    cluster[0].hook = not_yet
    key = _keys_led_by(cluster, "n2", 1)[0]
    async with Client(cluster[0].endpoint, timeout=2.0) as c:
        await c.put(key, "1")
        assert c.partition_map is None and c.stats["ring_errors"] == 1
        known.set()
        await c.put(key, "2")
        assert c.partition_map is not None
    assert [r["value"] for r in cluster[0].requests if r["op"] == "put"] == [b"1"]
    assert [r["value"] for r in cluster[2].requests if r["op"] == "put"] == [b"2"]


async def test_unknown_leader_or_unreachable_leader_takes_the_usual_route(cluster):
    ring = cluster[0].ring
    no_leader = _keys_led_by(cluster, "n1", 1)[0]
    ring["map"][partition_of(no_leader, P)]["leader"] = None
    gone = _keys_led_by(cluster, "n2", 1)[0]
    await cluster[2].stop()
    async with Client(cluster[0].endpoint, timeout=2.0) as c:
        assert (await c.put(no_leader, "1")).succeeded
        assert (await c.put(gone, "1")).succeeded  # n2 refuses: sent to n0 instead
        assert (await c.put(gone, "2")).succeeded  # n2 is left alone for a while
        assert c.stats["routed"] == 0
    assert [r["key"] for r in cluster[0].requests if r["op"] == "put"] == [
        no_leader, gone, gone
    ]


async def test_a_leader_lost_mid_request_is_retried_on_the_usual_route(cluster, no_rate_limit):
    """A write with a request id whose connection to the leader drops is sent again (same
    id); the leader no longer takes connections, so it goes to the pool's node."""
    key = _keys_led_by(cluster, "n1", 1)[0]

    async def vanish(req, conn):
        if req.get("op") == "put":
            cluster[1]._server.close()  # no new connections from now on
            return fs.DROP
        return None

    cluster[1].hook = vanish
    async with Client(cluster[0].endpoint, timeout=3.0) as c:
        assert (await c.put(key, "v")).succeeded
        assert c.write_retries == 1
    (retry,) = [r for r in cluster[0].requests if r["op"] == "put"]
    assert retry["retry"] is True
    assert sum(1 for r in cluster[0].requests if r["op"] == "ring") >= 2  # fetched again


async def test_member_connections_say_hello_with_the_token_first():
    servers = await fs.fake_cluster(3, partitions=P, token="tok")
    try:
        keys = [f"k{i}".encode() for i in range(20)]
        async with Client(servers[0].endpoint, timeout=2.0, token="tok") as c:
            for k in keys:
                await c.put(k, "v")
            assert c.stats["routed"] == 20
        for s in servers:
            assert s.conns and all(conn.requests[0]["op"] == "hello" for conn in s.conns)
        c = Client(servers[0].endpoint, timeout=2.0, token="bad")
        with pytest.raises(Unauthenticated):
            await c.put(keys[0], "v")
        await c.close()
    finally:
        for s in servers:
            await s.stop()


async def test_member_connections_use_tls_like_the_pool(tmp_path):
    write_bundle(tmp_path, ["n0"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "n0.pem", tmp_path / "n0.key")
    servers = await fs.fake_cluster(3, partitions=P, ssl=ctx)
    try:
        keys = [f"k{i}".encode() for i in range(20)]
        async with Client(servers[0].endpoint, timeout=5.0, cacert=str(tmp_path / "ca.pem")) as c:
            for k in keys:
                await c.put(k, "v")
            assert c.stats["routed"] == 20 and c.stats["forwarded"] == 0
        assert all(len(s.conns) == 1 for s in servers)  # one TLS connection to each
        assert sorted(r["key"] for s in servers for r in s.requests if r["op"] == "put") == sorted(
            keys
        )
    finally:
        for s in servers:
            await s.stop()


def test_ring_map_refuses_malformed_answers():
    good = {"partitions": 2, "replication": 1, "epoch": 3,
            "members": [{"node_id": "a", "addr": "127.0.0.1:1"}, {"node_id": "b", "addr": "?"}],
            "map": [{"id": 0, "replicas": ["a"], "leader": "a"},
                    {"id": 1, "replicas": ["b"], "leader": None}]}
    ring = RingMap.from_wire(good)
    assert ring.addrs == {"a": ("127.0.0.1", 1)}  # b's address does not parse
    assert ring.parts[1].leader is None and ring.epoch == 3
    assert ring.part_of(b"x").id == partition_of(b"x", 2)
    for bad, needle in [
        ({**good, "partitions": 0}, "partitions"),
        ({**good, "epoch": "1"}, "epoch"),
        ({**good, "members": None}, "members"),
        ({**good, "map": good["map"][:1]}, "map"),
        ({**good, "map": good["map"][::-1]}, "ordered by id"),
        ({**good, "map": [good["map"][0], {"id": 1, "replicas": "b", "leader": None}]},
         "replicas"),
        ({**good, "map": [good["map"][0], {"id": 1, "replicas": [], "leader": 5}]}, "leader"),
    ]:
        with pytest.raises(ValueError, match=needle):
            RingMap.from_wire(bad)


def test_sync_client_exposes_the_map_and_the_counters():
    with fs.ThreadedFakeServer() as srv:
        srv.call(lambda: setattr(srv.server, "ring", fs.ring_map([srv.server], 4, 1)))
        with SyncClient(srv.endpoint, timeout=2.0) as c:
            c.put("k", "v")
            assert c.ring()["partitions"] == 4
            assert c.partition_map is not None and c.stats["routed"] == 1
            assert c.stats["sent"] == 3 and c.stats["forwarded"] == 0
