"""Client library against an in-test fake server (tests/client/fake_server.py).

No sleeps are used for synchronisation: tests wait on server-side events and request counts.
Every test is bounded by a pytest-timeout.
"""

from __future__ import annotations

import asyncio
import importlib.util
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest

from dsnode.client import (
    BadRequest,
    Client,
    Conflict,
    ConnectFailed,
    ConnectionLost,
    DeadlineExceeded,
    DsnodeError,
    Expired,
    Internal,
    Op,
    Overloaded,
    SyncClient,
    Timeout,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UnknownOp,
    error_from_wire,
    parse_endpoints,
)


def _load_fake_server() -> Any:
    name = "dsnode_tests_fake_server"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, Path(__file__).with_name("fake_server.py")
        )
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fs = _load_fake_server()
pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def server():
    srv = await fs.FakeServer().start()
    yield srv
    await srv.stop()


@pytest.fixture
async def client(server):
    """A client of the one fake node; routing by the partition map has tests of its own
    (test_client_ring.py), so these count exactly the requests they make."""
    c = Client(server.endpoint, timeout=2.0, ring_aware=False)
    await c.connect()
    yield c
    await c.close()


def _ops(srv: Any, op: str) -> list[dict[str, Any]]:
    return [r for r in srv.requests if r.get("op") == op]


# --------------------------------------------------------------------------- basics


async def test_put_get_delete_roundtrip_accepts_str_and_bytes_and_returns_bytes(client):
    put = await client.put("k", "v1")
    assert put.succeeded and put.version == 1
    got = await client.get(b"k")
    assert got.value == b"v1" and got.version == 1
    assert await client.get("missing") == (None, 0)
    deleted = await client.delete("k")
    assert deleted.succeeded and deleted.existed and deleted.version == 1
    assert (await client.get("k")).value is None


async def test_conditional_put_and_delete_report_failure_as_a_result(client):
    assert (await client.put("k", b"\x00\xff", if_version=0)).succeeded
    failed = await client.put("k", "x", if_version=0)
    assert not failed.succeeded and failed.version == 1
    failed_del = await client.delete("k", if_version=7)
    assert not failed_del.succeeded and failed_del.version == 1
    assert (await client.get("k")).value == b"\x00\xff"


async def test_txn_sends_protocol_shape_and_returns_branch_results(client, server):
    await client.put("a", "1")
    res = await client.txn(
        compares=[("a", 1)],
        then=[Op.get("a"), Op.put("b", "2"), Op.delete("a")],
        else_=[Op.get("b")],
    )
    assert res.succeeded
    assert res.results == [{"value": b"1", "version": 1}, {"version": 1}, {"existed": True}]
    sent = _ops(server, "txn")[0]
    assert sent["if"] == [{"key": b"a", "version": 1}]
    assert sent["then"][1] == {"op": "put", "key": b"b", "value": b"2"}
    assert sent["else"] == [{"op": "get", "key": b"b"}]
    res2 = await client.txn(compares=[("a", 5)], then=[Op.get("a")], else_=[Op.get("b")])
    assert not res2.succeeded and res2.results == [{"value": b"2", "version": 1}]


async def test_status_hello_and_low_level_request_strip_id_and_ok(client):
    status = await client.status()
    assert status["node_id"] == "n1" and "id" not in status and "ok" not in status
    hello = await client.hello()
    assert hello["protocol"] == 1
    assert (await client.request("get", {"key": "nope"}))["version"] == 0
    with pytest.raises(ValueError):
        await client.request("get", {"id": 5})


async def test_ids_are_increasing_ints_from_one_and_timeout_ms_is_sent(client, server):
    await client.get("a")
    await client.get("b")
    await client.put("c", "d")
    ids = [r["id"] for r in server.requests]
    assert ids == [1, 2, 3]
    assert all(0 < r["timeout_ms"] <= 2000 for r in server.requests)
    assert "consistency" not in server.requests[0]
    await client.get("a", consistency="stale")
    assert server.requests[-1]["consistency"] == "stale"


async def test_bad_argument_types_raise_before_sending(client, server):
    with pytest.raises(TypeError):
        await client.get(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        await client.put("k", "v", if_version=-1)
    with pytest.raises(TypeError):
        await client.txn(then=[{"op": "get", "key": "a"}])  # type: ignore[list-item]
    assert server.requests == []


def test_parse_endpoints_accepts_lists_strings_and_ipv6():
    assert parse_endpoints("a:1, b:2") == [("a", 1), ("b", 2)]
    assert parse_endpoints(["[::1]:7379"]) == [("::1", 7379)]
    for bad in ("", "nohost", "h:x", "h:70000"):
        with pytest.raises(ValueError):
            parse_endpoints(bad)


# --------------------------------------------------------------------------- pipelining


async def test_pipelined_responses_answered_out_of_order_reach_the_right_caller(server):
    fast_answered = asyncio.Event()

    async def hook(req, conn):
        if req.get("op") == "get" and req["key"] == b"slow":
            await fast_answered.wait()
            return fs.ok(req, value=b"slow-value", version=1)
        if req.get("op") == "get" and req["key"] == b"fast":
            fast_answered.set()  # the fast answer is written before the slow one
            return fs.ok(req, value=b"fast-value", version=2)
        return None

    server.hook = hook
    async with Client(server.endpoint, timeout=2.0) as c:
        slow = asyncio.create_task(c.get("slow"))
        await server.wait_requests(1, "get")
        fast = await c.get("fast")
        assert fast == (b"fast-value", 2)
        assert await slow == (b"slow-value", 1)
    assert len(server.conns) == 1


async def test_many_concurrent_requests_share_one_connection(client, server):
    results = await asyncio.gather(*(client.put(f"k{i}", str(i)) for i in range(200)))
    assert all(r.succeeded for r in results)
    assert len(server.conns) == 1
    assert sorted(r["id"] for r in server.requests) == list(range(1, 201))


async def test_pool_spreads_requests_to_least_in_flight_connection(server):
    release = asyncio.Event()

    async def hook(req, conn):
        if req.get("op") == "get":
            await release.wait()
        return None

    server.hook = hook
    async with Client(server.endpoint, timeout=3.0, pool_size=2, ring_aware=False) as c:
        assert len(server.conns) == 2
        tasks = [asyncio.create_task(c.get(f"k{i}")) for i in range(4)]
        await server.wait_requests(4, "get")
        assert c.in_flight == 4
        assert sorted(len(conn.requests) for conn in server.conns) == [2, 2]
        release.set()
        await asyncio.gather(*tasks)
        assert c.in_flight == 0


async def test_late_answer_after_client_timeout_is_ignored_and_connection_stays_usable(server):
    release = asyncio.Event()

    async def hook(req, conn):
        if req.get("op") == "get" and req["key"] == b"late":
            await release.wait()
        return None

    server.hook = hook
    async with Client(server.endpoint, timeout=2.0) as c:
        with pytest.raises(Timeout) as info:
            await c.get("late", timeout=0.1)
        assert not info.value.indeterminate
        release.set()
        await server.wait_requests(1, "get")
        assert (await c.put("x", "y")).succeeded
        assert (await c.get("x")).value == b"y"
    assert len(server.conns) == 1


# --------------------------------------------------------------------------- failures


async def test_write_without_request_ids_is_never_resent_after_connection_drops(server):
    async def hook(req, conn):
        return fs.DROP if req.get("op") in ("put", "delete", "txn") else None

    server.hook = hook
    async with Client(server.endpoint, timeout=2.0, request_ids=False) as c:
        for call in (c.put("k", "v"), c.delete("k"), c.txn(then=[Op.put("k", "v")])):
            with pytest.raises(ConnectionLost) as info:
                await call
            assert info.value.indeterminate and info.value.retryable
            assert "outcome unknown" in str(info.value)
    assert len(_ops(server, "put")) == 1
    assert len(_ops(server, "delete")) == 1
    assert len(_ops(server, "txn")) == 1
    assert not any("client_id" in r or "seq" in r for r in server.requests)


async def test_writes_carry_a_client_id_and_increasing_seqs():
    """One random 16-byte client id per client instance; seq 1, 2, 3 over put, delete and
    txn; reads carry neither. Two clients have different ids."""
    server = await fs.FakeServer().start()
    try:
        async with Client(server.endpoint) as a, Client(server.endpoint) as b:
            await a.put("k", "v")
            await a.get("k")
            await a.delete("k")
            await a.txn(then=[Op.put("k", "w")])
            await b.put("k", "x")
        writes = [r for r in server.requests if r["op"] in ("put", "delete", "txn")]
        assert [r["seq"] for r in writes] == [1, 2, 3, 1]
        assert {len(r["client_id"]) for r in writes} == {16}
        assert writes[0]["client_id"] == writes[2]["client_id"] != writes[3]["client_id"]
        assert not any("retry" in r for r in writes)
        assert "client_id" not in _ops(server, "get")[0]
    finally:
        await server.stop()


@pytest.mark.parametrize("op", ["put", "delete", "txn"])
async def test_write_with_request_id_is_retried_on_another_endpoint_after_a_drop(op):
    """The connection drops after the write was applied (its answer is lost): the client
    sends the same (client_id, seq) with retry=true on the next endpoint, gets the first
    result, and the write was applied exactly once."""
    first, second = await fs.FakeServer().start(), await fs.FakeServer().start()
    # both endpoints serve one shared state, as a cluster's nodes do
    second.data, second.versions = first.data, first.versions
    second.applied, second._first = first.applied, first._first

    async def drop_after_apply(req, conn):
        if req.get("op") == op:
            first.answer(req, conn)  # applied, then the connection dies
            return fs.DROP
        return None

    first.hook = drop_after_apply
    try:
        async with Client(f"{first.endpoint},{second.endpoint}", timeout=3.0) as c:
            if op == "put":
                assert (await c.put("k", "v")) == (True, 1)
            elif op == "delete":
                first.data[b"k"], first.versions[b"k"] = (b"v", 1), 1
                assert (await c.delete("k")).existed
            else:
                assert (await c.txn(then=[Op.put("k", "v")])).succeeded
        (a,), (b,) = _ops(first, op), _ops(second, op)
        assert (a["client_id"], a["seq"]) == (b["client_id"], b["seq"])
        assert "retry" not in a and b["retry"] is True
        assert first.applied == {(a["client_id"], a["seq"]): 1}
    finally:
        await first.stop()
        await second.stop()


async def test_indeterminate_unavailable_write_with_id_is_retried_until_it_succeeds(server):
    async def hook(req, conn):
        if req.get("op") == "put" and len(_ops(server, "put")) < 3:
            server.answer(req, conn)  # applied, but the answer says "cannot tell"
            return fs.err(req, "unavailable", "lost leadership", indeterminate=True)
        return None

    server.hook = hook
    async with Client(server.endpoint, timeout=3.0) as c:
        assert (await c.put("k", "v")) == (True, 1)
    puts = _ops(server, "put")
    assert len(puts) == 3 and [p.get("retry") for p in puts] == [None, True, True]
    assert list(server.applied.values()) == [1] and server.data[b"k"] == (b"v", 1)


async def test_expired_answer_is_raised_as_indeterminate_and_not_retried(server):
    async def hook(req, conn):
        if req.get("op") == "put":
            return fs.err(req, "expired", "no longer in the table", indeterminate=True)
        return None

    server.hook = hook
    async with Client(server.endpoint, timeout=1.0) as c:
        with pytest.raises(Expired) as info:
            await c.put("k", "v")
    assert info.value.indeterminate and not info.value.retryable
    assert len(_ops(server, "put")) == 1


async def test_a_retry_that_then_fails_definitely_still_reports_an_unknown_outcome():
    """After an attempt that may have been applied, a later definite failure (here: no
    endpoint reachable any more) must not make the call look definite."""
    server = await fs.FakeServer().start()

    async def hook(req, conn):
        if req.get("op") == "put":
            server._server.close()  # stops listening: the retry cannot connect
            return fs.DROP
        return None

    server.hook = hook
    try:
        async with Client(server.endpoint, timeout=1.0, dial_timeout=0.2) as c:
            with pytest.raises(DsnodeError) as info:
                await c.put("k", "v")
        assert info.value.indeterminate and info.value.code == "connect_failed"
    finally:
        await server.stop()


async def test_server_without_request_ids_makes_the_client_send_writes_without_them(server):
    server.refuse_ids = True
    async with Client(server.endpoint) as c:
        assert (await c.put("k", "v")).succeeded
        assert not c.request_ids
        await c.put("k", "w")
    puts = _ops(server, "put")
    assert ["client_id" in p for p in puts] == [True, False, False]
    assert server.data[b"k"] == (b"w", 2)


async def test_read_is_retried_on_a_new_connection_after_a_drop(server):
    dropped = []

    async def hook(req, conn):
        if req.get("op") == "get" and not dropped:
            dropped.append(req["id"])
            return fs.DROP
        return None

    server.hook = hook
    server.data[b"k"] = (b"v", 3)
    async with Client(server.endpoint, timeout=2.0) as c:
        assert await c.get("k") == (b"v", 3)
    gets = _ops(server, "get")
    assert len(gets) == 2 and gets[0]["id"] != gets[1]["id"]
    assert len(server.conns) == 2


async def test_write_times_out_as_indeterminate_and_read_as_definite(server):
    async def hook(req, conn):
        return fs.SILENT

    server.hook = hook
    async with Client(server.endpoint, timeout=2.0) as c:
        with pytest.raises(Timeout) as w:
            await c.put("k", "v", timeout=0.15)
        assert w.value.indeterminate
        with pytest.raises(Timeout) as r:
            await c.get("k", timeout=0.15)
        assert not r.value.indeterminate
    assert len(_ops(server, "put")) == 1
    assert 0 < _ops(server, "put")[0]["timeout_ms"] <= 150


@pytest.mark.parametrize(
    ("code", "wire_indeterminate", "exc_type", "retryable", "resent"),
    [
        ("bad_request", False, BadRequest, False, False),
        ("unknown_op", False, UnknownOp, False, False),
        ("too_large", False, TooLarge, False, False),
        ("unauthenticated", False, Unauthenticated, False, False),
        ("unavailable", True, Unavailable, True, False),
        ("unavailable", False, Unavailable, True, True),
        ("timeout", True, Timeout, True, False),
        ("timeout", False, Timeout, True, False),
        ("conflict", False, Conflict, True, False),
        ("overloaded", False, Overloaded, True, True),
        ("internal", True, Internal, False, False),
    ],
)
async def test_each_wire_error_code_maps_to_its_exception_and_write_retry_rule(
    server, code, wire_indeterminate, exc_type, retryable, resent
):
    """A write is resent only when the server said retryable and not indeterminate
    (and never for conflict, which the caller handles)."""

    async def hook(req, conn):
        if req.get("op") == "put":
            return fs.err(req, code, f"{code} happened", indeterminate=wire_indeterminate)
        return None

    server.hook = hook
    async with Client(server.endpoint, timeout=0.4, request_ids=False) as c:
        with pytest.raises(exc_type) as info:
            await c.put("k", "v")
    exc = info.value
    assert exc.code == code and exc.message == f"{code} happened"
    assert exc.retryable is retryable
    assert exc.indeterminate is wire_indeterminate
    puts = len(_ops(server, "put"))
    assert (puts > 1) if resent else (puts == 1)


async def test_definite_overload_is_retried_for_a_write_until_it_succeeds(server):
    async def hook(req, conn):
        if req.get("op") == "put" and len(_ops(server, "put")) < 3:
            return fs.err(req, "overloaded")
        return None

    server.hook = hook
    async with Client(server.endpoint, timeout=3.0) as c:
        assert (await c.put("k", "v")).succeeded
    assert len(_ops(server, "put")) == 3
    assert server.data[b"k"] == (b"v", 1)


async def test_unavailable_read_is_retried_within_deadline(server):
    async def hook(req, conn):
        if req.get("op") == "get" and len(_ops(server, "get")) == 1:
            return fs.err(req, "unavailable", "no leader")
        return None

    server.hook = hook
    async with Client(server.endpoint, timeout=3.0) as c:
        assert await c.get("k") == (None, 0)
    assert len(_ops(server, "get")) == 2


async def test_unknown_server_code_becomes_plain_dsnode_error(server):
    async def hook(req, conn):
        return {"id": req["id"], "ok": False, "error": {"code": "shiny", "message": "new"}}

    server.hook = hook
    async with Client(server.endpoint, timeout=1.0) as c:
        with pytest.raises(DsnodeError) as info:
            await c.put("k", "v")
    assert type(info.value) is DsnodeError and info.value.code == "shiny"
    assert info.value.indeterminate  # unknown code on a write: assume the worst


def test_error_from_wire_defaults_follow_the_protocol():
    assert not error_from_wire({"code": "overloaded", "message": "x"}, True).indeterminate
    assert error_from_wire({"code": "timeout", "message": "x"}, True).indeterminate
    assert error_from_wire({"code": "timeout"}, False).retryable
    assert isinstance(error_from_wire("garbage", False), Internal)
    exc = error_from_wire({"code": "unavailable", "message": "m", "indeterminate": True}, False)
    clone = pickle.loads(pickle.dumps(exc))
    assert type(clone) is Unavailable and clone.indeterminate and clone.message == "m"


async def test_connection_level_error_fails_pending_write_as_indeterminate(server):
    async def hook(req, conn):
        if req.get("op") == "put":
            conn.send({"id": 0, "ok": False, "error": {"code": "too_large", "message": "big"}})
            return fs.DROP
        return None

    server.hook = hook
    async with Client(server.endpoint, timeout=1.0) as c:
        with pytest.raises(ConnectionLost) as info:
            await c.put("k", "v")
        assert info.value.indeterminate
        assert "too_large" in info.value.message
        assert (await c.get("k")).version == 0  # reconnects for the next call


async def test_oversized_frame_is_refused_client_side_and_not_sent(server):
    async with Client(server.endpoint, timeout=1.0, max_frame_bytes=1024) as c:
        with pytest.raises(TooLarge) as info:
            await c.put("k", b"x" * 2000)
        assert not info.value.indeterminate and not info.value.retryable
        assert (await c.put("k", b"x" * 100)).succeeded
    assert len(_ops(server, "put")) == 1


async def test_close_fails_waiting_requests_and_later_calls(server):
    async def hook(req, conn):
        return fs.SILENT

    server.hook = hook
    c = Client(server.endpoint, timeout=5.0)
    await c.connect()
    pending = asyncio.create_task(c.get("k"))
    await server.wait_requests(1, "get")
    await c.close()
    with pytest.raises(ConnectionLost):
        await pending
    with pytest.raises(ConnectionLost) as info:
        await c.get("k")
    assert not info.value.retryable


# --------------------------------------------------------------------------- auth, endpoints


async def test_hello_with_token_is_the_first_request_on_every_connection():
    srv = await fs.FakeServer(token="s3cret").start()
    try:
        async with Client(srv.endpoint, timeout=2.0, token="s3cret") as c:
            assert c.server_info is not None and c.server_info["node_id"] == "n1"
            await c.put("k", "v")
            srv.drop_all()
            assert (await c.get("k")).value == b"v"  # retried on a new connection
        assert len(srv.conns) == 2
        for conn in srv.conns:
            assert conn.requests[0]["op"] == "hello"
            assert conn.requests[0]["token"] == "s3cret"
    finally:
        await srv.stop()


async def test_wrong_token_raises_unauthenticated_without_retrying():
    srv = await fs.FakeServer(token="s3cret").start()
    try:
        c = Client(srv.endpoint, timeout=2.0, token="wrong")
        with pytest.raises(Unauthenticated):
            await c.connect()
        await c.close()
        assert len(_ops(srv, "hello")) == 1
    finally:
        await srv.stop()


async def test_connects_to_first_reachable_endpoint_and_rotates_on_loss():
    a = await fs.FakeServer().start()
    b = await fs.FakeServer().start()
    gone = await fs.FakeServer().start()
    dead_endpoint = gone.endpoint
    await gone.stop()
    try:
        async with Client([dead_endpoint, a.endpoint, b.endpoint], timeout=2.0,
                          ring_aware=False) as c:
            await c.get("x")
            assert len(a.requests) == 1 and not b.requests
            a.drop_all()
            await c.get("y")  # a read: retried, reconnecting to the next endpoint
            assert len(b.requests) >= 1
    finally:
        await a.stop()
        await b.stop()


async def test_no_reachable_endpoint_raises_unavailable_within_the_deadline():
    gone = await fs.FakeServer().start()
    endpoint = gone.endpoint
    await gone.stop()
    loop = asyncio.get_running_loop()
    start = loop.time()
    c = Client(endpoint, timeout=0.3)
    with pytest.raises(Unavailable) as info:
        await c.get("k")
    assert not info.value.indeterminate
    assert loop.time() - start < 2.0
    with pytest.raises(Unavailable):
        await c.put("k", "v")  # a write that never reached a socket is definite
    await c.close()


# --------------------------------------------------------------------------- sync client


def test_sync_client_mirrors_the_async_api():
    with fs.ThreadedFakeServer() as srv, SyncClient(srv.endpoint, timeout=2.0) as c:
        assert c.put("k", "v").succeeded
        assert c.get("k") == (b"v", 1)
        res = c.txn([("k", 1)], [Op.put("k", "w")], [])
        assert res.succeeded and res.results == [{"version": 2}]
        assert c.delete("k", if_version=2).succeeded
        assert c.status()["ready"] is True
        assert c.hello()["protocol"] == 1
        with pytest.raises(UnknownOp):
            c.request("frobnicate", {})
    with pytest.raises(ConnectionLost):
        c.get("k")
    c.close()  # idempotent


def test_sync_client_works_from_a_thread_running_an_event_loop():
    with fs.ThreadedFakeServer() as srv:

        async def inside_loop() -> bytes | None:
            with SyncClient(srv.endpoint, timeout=2.0) as c:
                c.put("k", "v")
                return c.get("k").value

        assert asyncio.run(inside_loop()) == b"v"


async def test_pool_keeps_serving_on_survivors_and_refills_a_dropped_slot(server):
    async with Client(server.endpoint, timeout=3.0, pool_size=2) as c:
        assert len(server.conns) == 2
        server.conns[0].writer.transport.abort()
        # The first read goes to the dropped slot and is retried on the survivor; that retry
        # starts a background reconnect of the dead slot.
        for i in range(20):
            assert (await c.get(f"k{i}")).version == 0
        await server.wait_conns(3)
        assert (await c.get("again")).version == 0
        assert c.in_flight == 0


# --------------------------------------------------------------------------- dial, discovery


async def test_refused_endpoints_fail_at_once_with_connect_failed_naming_each():
    gone = [await fs.FakeServer().start() for _ in range(2)]
    eps = [g.endpoint for g in gone]
    for g in gone:
        await g.stop()
    loop = asyncio.get_running_loop()
    c = Client(eps, timeout=5.0, dial_timeout=3.0)
    start = loop.time()
    with pytest.raises(ConnectFailed) as info:
        await c.get("k")
    assert loop.time() - start < 0.5  # neither the dial timeout nor the deadline
    err = info.value
    assert isinstance(err, Unavailable) and err.code == "connect_failed"
    assert not err.indeterminate and err.retryable
    assert [t.split(": ")[0] for t in err.tried] == eps
    assert all(t.endswith("connection refused") for t in err.tried)
    await c.close()


async def test_dial_timeout_bounds_the_wait_for_a_connection(monkeypatch):
    """An endpoint that never completes the handshake: the call gives up after the dial
    timeout, long before its own deadline."""
    loop = asyncio.get_running_loop()

    async def never(*args, **kwargs):
        await asyncio.sleep(3600)

    monkeypatch.setattr(loop, "create_connection", never)
    c = Client("192.0.2.1:7379", timeout=10.0, dial_timeout=0.3)
    start = loop.time()
    with pytest.raises(ConnectFailed) as info:
        await c.put("k", "v")
    assert 0.25 < loop.time() - start < 2.0
    assert "0.3s" in str(info.value) and "192.0.2.1:7379" in str(info.value)
    assert not info.value.indeterminate
    await c.close()


async def test_discover_learns_the_members_from_the_first_node_and_fails_over_to_them():
    b = await fs.FakeServer().start()

    async def members(req, conn):
        if req.get("op") == "status":
            return fs.ok(req, node_id="n1", cluster_id="c1", ready=True, partitions=[],
                         members=[{"node_id": "n1", "addr": a.endpoint, "state": "alive"},
                                  {"node_id": "n2", "addr": b.endpoint, "state": "alive"},
                                  {"node_id": "n3", "addr": "not an address", "state": "dead"}])
        return None

    a = await fs.FakeServer(hook=members).start()
    try:
        async with Client(a.endpoint, timeout=2.0, discover=True) as c:
            assert c.endpoints == [a.endpoint, b.endpoint]
            await c.put("k", "v")
            await a.stop()
            got = await c.get("k2")  # a read: retried on the member it learned
            assert got.value is None and _ops(b, "get")
        async with Client(b.endpoint, timeout=2.0) as c:
            assert c.endpoints == [b.endpoint]  # discovery is off by default
            assert not _ops(b, "status")
    finally:
        await b.stop()


async def test_client_deadline_is_deadline_exceeded_and_the_server_gets_a_margin(server):
    async def silent(req, conn):
        return fs.SILENT if req.get("op") == "put" else None

    server.hook = silent
    async with Client(server.endpoint, timeout=2.0) as c:
        with pytest.raises(DeadlineExceeded) as info:
            await c.put("k", "v", timeout=0.5)
    err = info.value
    assert isinstance(err, Timeout) and err.code == "deadline_exceeded" and err.indeterminate
    assert "outcome unknown: the write may or may not have happened" in str(err)
    sent = _ops(server, "put")[0]["timeout_ms"]
    assert 400 <= sent <= 450  # 10% (at most 200 ms) below the client's own deadline
