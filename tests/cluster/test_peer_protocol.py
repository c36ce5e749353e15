"""Node-to-node traffic on the shared port: who may speak as a peer, and what a bad peer costs.

PROTOCOL.md: "Client and peer traffic share the node's port and are told apart by the
hello handshake; peers authenticate as cluster members." STYLE.md habit 5: a malformed
or stale peer message is dropped and counted, never a crash.
"""

from __future__ import annotations

import msgpack
import pytest
from harness import (
    RawConn,
    ServerPool,
    assert_error,
    assert_ok,
    free_port,
    raw_frame,
    sync_call,
    wait_until,
)

pytestmark = pytest.mark.cluster

TOKEN = "peer-secret"




def _start_n1_of_two(pool: ServerPool, *extra: str):
    """n1 of a two-node cluster whose n2 is not running: n1 serves status, not writes."""
    p1, p2 = free_port(), free_port()
    peers = f"n1=127.0.0.1:{p1},n2=127.0.0.1:{p2}"
    n1 = pool.new("--peers", peers, *extra, node_id="n1", port=p1)
    n1.spawn()

    def answers() -> dict | None:
        reqs = [{"id": 1, "op": "hello", "token": TOKEN}] if "--auth-token" in extra else []
        try:
            got = sync_call(n1.addr, [*reqs, {"id": 2, "op": "status"}], timeout=1.0)[-1]
        except (OSError, TimeoutError, ValueError):
            return None
        return got if got.get("ok") else None

    wait_until(answers, 20.0, "n1 to answer status", n1.output_tail)
    return n1, peers, p2, answers


async def _peer_hello(addr, **fields) -> tuple[RawConn, dict]:
    conn = await RawConn.open(addr)
    return conn, await conn.request({"id": 1, "op": "hello", **fields})


async def _refused_peer_hello(addr, **fields) -> dict:
    """Send a peer hello that must be refused; return the one answer before the close."""
    conn = await RawConn.open(addr)
    conn.send({"id": 1, "op": "hello", **fields})
    answers = await conn.wait_closed_by_server()
    await conn.close()
    assert len(answers) == 1, answers
    return answers[0]


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"peer": "zz", "cluster_id": "dsnode"}, "not a cluster member"),
        ({"peer": "n2", "cluster_id": "other"}, "cluster_id"),
        ({"peer": "n2"}, "cluster_id"),
    ],
)
async def test_peer_hello_from_a_stranger_is_refused_and_closed(pool, fields, needle):
    """Only members of this cluster may switch a connection to peer framing."""
    n1, *_ = _start_n1_of_two(pool)
    answer = await _refused_peer_hello(n1.addr, **fields)
    assert_error(answer, "unauthenticated", rid=0)
    assert needle in answer["error"]["message"]
    assert n1.running


async def test_peer_hello_needs_the_cluster_token_when_auth_is_on(pool):
    """With an auth token configured, a peer must present it like a client."""
    n1, *_ = _start_n1_of_two(pool, "--auth-token", TOKEN)
    answer = await _refused_peer_hello(n1.addr, peer="n2", cluster_id="dsnode")
    assert_error(answer, "unauthenticated", rid=0)
    conn, answer = await _peer_hello(n1.addr, peer="n2", cluster_id="dsnode", token=TOKEN)
    assert_ok(answer)
    await conn.close()


async def test_malformed_peer_messages_are_dropped_and_counted_not_fatal(pool):
    """A member sending garbage after its hello costs nothing but the garbage: the node
    keeps serving, counts what it dropped, and the real cluster still forms and writes."""
    n1, peers, p2, answers = _start_n1_of_two(pool)
    conn, answer = await _peer_hello(n1.addr, peer="n2", cluster_id="dsnode")
    assert_ok(answer)
    junk = [
        msgpack.packb(7),  # not a batch
        msgpack.packb([7, "x", None]),  # entries that are not messages
        msgpack.packb([["px.accept", 0, "not-a-ballot", [], 0, 0]]),
        msgpack.packb([["px.prepare", 0, [1, "n2"]]]),  # wrong field count
        msgpack.packb([["px.nonsense", 0]]),
        msgpack.packb([["fwd", "id?", 0, ["Z"], 5]]),  # unknown command tag
        msgpack.packb([["fwdr", 999, None, None]]),  # answer to nothing
        msgpack.packb([["fwdr", [1], None, "oops"]]),  # unhashable id, error not a triple
        msgpack.packb([["fwd", 1, {"g": 1}, ["P", b"k", b"v", None], 5]]),  # unknown group
        msgpack.packb([["px.promise", 99, [1, "n2"], True, [1, "n2"], 0, []]]),  # no group 99
        b"\xc1",  # not msgpack at all
    ]
    for payload in junk:
        conn.send_bytes(raw_frame(payload))
    await conn.drain()

    def counted() -> dict | None:
        st = answers()
        if st and st["paxos"]["malformed_peer_messages"] >= 7:
            return st
        return None

    st = wait_until(counted, 10.0, "n1 to count the malformed peer messages", n1.output_tail)
    assert st["paxos"]["dropped"].get("unknown_group", 0) >= 1
    assert n1.running
    await conn.close()
    # The real n2 joins; the cluster forms and takes a write through either node.
    n2 = pool.new("--peers", peers, node_id="n2", port=p2)
    n2.start()
    n1.wait_ready()
    async with await RawConn.open(n1.addr) as c:
        assert_ok(await c.call("put", key=b"k", value=b"v", timeout=10))
    async with await RawConn.open(n2.addr) as c:
        got = assert_ok(await c.call("get", key=b"k", timeout=10))
        assert got["value"] == b"v"


async def test_restart_without_peers_takes_membership_from_the_data_dir(pool):
    """PROTOCOL.md: once a data directory holds a cluster, membership comes from it. A
    node restarted with no --peers at all rejoins its cluster, not a cluster of one."""
    p1, p2 = free_port(), free_port()
    peers = f"n1=127.0.0.1:{p1},n2=127.0.0.1:{p2}"
    n1 = pool.new("--peers", peers, node_id="n1", port=p1)
    n2 = pool.new("--peers", peers, node_id="n2", port=p2)
    n1.spawn()
    n2.start()
    n1.wait_ready()
    async with await RawConn.open(n2.addr) as c:
        assert_ok(await c.call("put", key=b"m", value=b"1", timeout=10))
    assert n1.terminate() == 0
    n1.extra_args = [a for a in n1.extra_args if a not in ("--peers", peers)]
    n1.restart()
    st = n1.wait_ready()
    assert sorted(m["node_id"] for m in st["members"]) == ["n1", "n2"]
    async with await RawConn.open(n1.addr) as c:
        assert_ok(await c.call("put", key=b"m", value=b"2", timeout=10))
    async with await RawConn.open(n2.addr) as c:
        got = assert_ok(await c.call("get", key=b"m", timeout=10))
        assert got["value"] == b"2"
