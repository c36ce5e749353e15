"""PROTOCOL.md against a real one-node server: every op, pipelining, bad input, auth.

Three servers are shared by the whole module (started in parallel): a default
one, one with small limits (``--max-frame-bytes 65536 --max-key-bytes 16
--max-value-bytes 1024``) and one with ``--auth-token``. Tests use keys of
their own, so they do not see each other's data.
"""

from __future__ import annotations

import asyncio
import random
import struct
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
from harness import (
    ConnectionClosed,
    RawConn,
    ServerPool,
    ServerProcess,
    assert_error,
    assert_ok,
    raw_frame,
    single_error_line,
)

pytestmark = pytest.mark.cluster

CLUSTER_ID = "c-single"
TOKEN = "s3cret"
MAX_FRAME = 65536
MAX_KEY = 16
MAX_VALUE = 1024


@dataclass
class Servers:
    plain: ServerProcess
    limited: ServerProcess
    auth: ServerProcess


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    pool = ServerPool(tmp_path_factory.mktemp("single"))
    try:
        s = Servers(
            plain=pool.new("--cluster-id", CLUSTER_ID),
            limited=pool.new(
                "--max-frame-bytes", str(MAX_FRAME),
                "--max-key-bytes", str(MAX_KEY),
                "--max-value-bytes", str(MAX_VALUE),
            ),
            auth=pool.new(auth_token=TOKEN),
        )
        for srv in (s.plain, s.limited, s.auth):
            srv.spawn()
        for srv in (s.plain, s.limited, s.auth):
            srv.wait_ready()
        yield s
    finally:
        pool.close()


@pytest.fixture
async def conn(servers: Servers) -> AsyncIterator[RawConn]:
    c = await RawConn.open(servers.plain.addr)
    yield c
    await c.close()


def k(name: str) -> bytes:
    return name.encode()


# ====================================================================== hello / status
async def test_hello_reports_node_cluster_protocol_1_and_server_version(conn: RawConn) -> None:
    """hello -> {node_id, cluster_id, protocol: 1, server_version: str} (PROTOCOL.md "Ops")."""
    r = assert_ok(await conn.call("hello", client="harness"))
    assert r["node_id"] == "n1"
    assert r["cluster_id"] == CLUSTER_ID
    assert r["protocol"] == 1 and type(r["protocol"]) is int
    assert isinstance(r["server_version"], str) and r["server_version"]


async def test_hello_is_optional_without_auth(conn: RawConn) -> None:
    """Without --auth-token, requests work with no hello first."""
    assert_ok(await conn.call("get", key=b"hello-optional"))


async def test_status_lists_members_partitions_and_ready(servers: Servers, conn: RawConn) -> None:
    """status -> node_id, cluster_id, ready, members[{node_id, addr, state}], partitions."""
    r = assert_ok(await conn.call("status"))
    assert r["node_id"] == "n1" and r["cluster_id"] == CLUSTER_ID
    assert r["ready"] is True
    members = r["members"]
    assert [m["node_id"] for m in members] == ["n1"]
    assert members[0]["addr"] == servers.plain.listen
    assert members[0]["state"] in ("alive", "suspect", "dead", "left")
    assert members[0]["state"] == "alive"
    assert r["partitions"], "a cluster has at least one partition"
    for p in r["partitions"]:
        assert type(p["id"]) is int
        assert p["replicas"] == ["n1"]
        assert p["leader"] in ("n1", None)
    assert r["partitions"][0]["leader"] == "n1", "a ready one-node cluster leads every partition"
    cpu = r["cpu_seconds"]
    assert type(cpu) is float and cpu > 0
    for i in range(200):
        assert_ok(await conn.call("put", key=b"cpu%d" % i, value=b"v"))
    assert assert_ok(await conn.call("status"))["cpu_seconds"] > cpu


# ====================================================================== get / put / delete
async def test_get_of_absent_key_is_nil_with_version_0(conn: RawConn) -> None:
    """Version 0 means absent; get answers value nil."""
    r = assert_ok(await conn.call("get", key=b"never-written"))
    assert r["value"] is None and r["version"] == 0


async def test_put_then_get_returns_the_value_as_bin_and_the_new_version(conn: RawConn) -> None:
    """put -> {succeeded: true, version > 0}; get returns that value (bin) and version."""
    p = assert_ok(await conn.call("put", key=b"pg", value=b"\x00\xffbinary"))
    assert p["succeeded"] is True and type(p["version"]) is int and p["version"] > 0
    g = assert_ok(await conn.call("get", key=b"pg"))
    assert g["value"] == b"\x00\xffbinary" and isinstance(g["value"], bytes)
    assert g["version"] == p["version"]
    e = assert_ok(await conn.call("put", key=b"pg-empty", value=b""))
    g = assert_ok(await conn.call("get", key=b"pg-empty"))
    assert g["value"] == b"" and g["version"] == e["version"], "an empty value is not absence"


async def test_put_if_version_applies_only_on_the_current_version(conn: RawConn) -> None:
    """if_version: put only if the current version equals it, else succeeded=false and
    version = the current version (nothing written)."""
    key = b"piv"
    v1 = assert_ok(await conn.call("put", key=key, value=b"a"))["version"]
    stale = assert_ok(await conn.call("put", key=key, value=b"x", if_version=v1 + 1000))
    assert stale["succeeded"] is False and stale["version"] == v1
    assert (await conn.call("get", key=key))["value"] == b"a"
    ok = assert_ok(await conn.call("put", key=key, value=b"b", if_version=v1))
    assert ok["succeeded"] is True and ok["version"] > v1
    g = await conn.call("get", key=key)
    assert (g["value"], g["version"]) == (b"b", ok["version"])
    again = assert_ok(await conn.call("put", key=key, value=b"c", if_version=v1))
    assert again["succeeded"] is False and again["version"] == ok["version"]


async def test_put_if_version_0_means_only_if_absent(conn: RawConn) -> None:
    """if_version 0: only if absent."""
    key = b"piv0"
    first = assert_ok(await conn.call("put", key=key, value=b"first", if_version=0))
    assert first["succeeded"] is True and first["version"] > 0
    second = assert_ok(await conn.call("put", key=key, value=b"second", if_version=0))
    assert second["succeeded"] is False and second["version"] == first["version"]
    assert (await conn.call("get", key=key))["value"] == b"first"


async def test_delete_reports_existed_and_the_version_before(conn: RawConn) -> None:
    """delete -> {succeeded, existed, version}: version is the one just before (0 if absent);
    on a failed if_version it is the current version and nothing is deleted."""
    absent = assert_ok(await conn.call("delete", key=b"del-absent"))
    assert (absent["succeeded"], absent["existed"], absent["version"]) == (True, False, 0)

    key = b"del"
    v = assert_ok(await conn.call("put", key=key, value=b"v"))["version"]
    bad = assert_ok(await conn.call("delete", key=key, if_version=v + 7))
    assert bad["succeeded"] is False and bad["version"] == v
    assert (await conn.call("get", key=key))["version"] == v, "failed delete removed the key"
    zero = assert_ok(await conn.call("delete", key=key, if_version=0))
    assert zero["succeeded"] is False and zero["version"] == v
    ok = assert_ok(await conn.call("delete", key=key, if_version=v))
    assert (ok["succeeded"], ok["existed"], ok["version"]) == (True, True, v)
    g = await conn.call("get", key=key)
    assert (g["value"], g["version"]) == (None, 0)

    v2 = assert_ok(await conn.call("put", key=key, value=b"w"))["version"]
    plain = assert_ok(await conn.call("delete", key=key))
    assert (plain["succeeded"], plain["existed"], plain["version"]) == (True, True, v2)
    absent_iv = assert_ok(await conn.call("delete", key=key, if_version=0))
    assert absent_iv["succeeded"] is True and absent_iv["existed"] is False
    assert absent_iv["version"] == 0


async def test_versions_strictly_increase_and_are_never_reused_after_delete(
    conn: RawConn, seed: int
) -> None:
    """A key's version strictly increases with each change and is never reused for it,
    even after a delete and re-create."""
    rng = random.Random(seed)
    key = b"ver"
    seen: list[int] = []
    present = False
    for _ in range(60):
        if present and rng.random() < 0.3:
            r = assert_ok(await conn.call("delete", key=key))
            assert r["existed"] is True and r["version"] == seen[-1]
            present = False
        else:
            r = assert_ok(await conn.call("put", key=key, value=rng.randbytes(8)))
            assert r["succeeded"] is True
            assert not seen or r["version"] > seen[-1], (seen[-3:], r)
            seen.append(r["version"])
            present = True
        if rng.random() < 0.3:  # other keys change in between
            assert_ok(await conn.call("put", key=b"ver-other", value=b"o"))
    assert len(set(seen)) == len(seen)


async def test_str_keys_and_values_are_accepted_and_answered_as_bin(conn: RawConn) -> None:
    """A str key/value means its UTF-8 bytes; responses always use bin."""
    p = assert_ok(await conn.call("put", key="clé-ü", value="välue"))
    g = assert_ok(await conn.call("get", key="clé-ü".encode()))
    assert g["value"] == "välue".encode() and type(g["value"]) is bytes
    assert g["version"] == p["version"]
    t = assert_ok(await conn.call("txn", then=[{"op": "get", "key": "clé-ü"}]))
    assert type(t["results"][0]["value"]) is bytes
    # the raw msgpack of the answer uses the bin type, not str
    rid = conn.send({"op": "get", "key": "clé-ü"})
    raw = await _raw_answer(conn, rid)
    assert msgpack.unpackb(raw, raw=True)[b"value"] == "välue".encode()


async def _raw_answer(conn: RawConn, rid: int) -> bytes:
    """The undecoded payload of the answer with ``rid`` (bypasses RawConn's decoding)."""
    from dsnode.wire.framing import FrameDecoder

    decoder = FrameDecoder()
    async with asyncio.timeout(10):
        while True:
            data = await conn.reader.read(1 << 16)
            if not data:
                raise ConnectionClosed("EOF")
            for payload in decoder.feed(data):
                if msgpack.unpackb(payload, raw=False).get("id") == rid:
                    return payload


async def test_stale_get_answers_value_and_version(conn: RawConn) -> None:
    """consistency 'stale' is accepted; on a one-node cluster it sees acknowledged writes."""
    v = assert_ok(await conn.call("put", key=b"stale", value=b"s"))["version"]
    r = assert_ok(await conn.call("get", key=b"stale", consistency="stale"))
    assert (r["value"], r["version"]) == (b"s", v)
    r = assert_ok(await conn.call("get", key=b"stale", consistency="linearizable"))
    assert (r["value"], r["version"]) == (b"s", v)
    assert_error(await conn.call("get", key=b"stale", consistency="eventual"),
                 "bad_request", names="consistency")


async def test_timeout_ms_is_accepted_on_every_request(conn: RawConn) -> None:
    """timeout_ms (int > 0) is optional on every request; a bad one is bad_request."""
    assert_ok(await conn.call("put", key=b"tmo", value=b"t", timeout_ms=5000))
    assert_ok(await conn.call("status", timeout_ms=5000))
    assert_error(await conn.call("get", key=b"tmo", timeout_ms=0), "bad_request",
                 names="timeout_ms")


# ====================================================================== txn
async def test_txn_runs_then_when_every_compare_holds(conn: RawConn) -> None:
    """All compares hold -> then runs, succeeded=true; results answer the then sub-ops in
    order with {value, version} / {version} / {existed}."""
    va = assert_ok(await conn.call("put", key=b"ta", value=b"A"))["version"]
    assert_ok(await conn.call("put", key=b"tc", value=b"C"))
    r = assert_ok(await conn.call(
        "txn",
        **{
            "if": [{"key": b"ta", "version": va}, {"key": b"tb", "version": 0}],
            "then": [
                {"op": "get", "key": b"ta"},
                {"op": "put", "key": b"tb", "value": b"B"},
                {"op": "delete", "key": b"tc"},
                {"op": "delete", "key": b"t-absent"},
            ],
            "else": [{"op": "put", "key": b"t-else", "value": b"no"}],
        },
    ))
    assert r["succeeded"] is True
    res = r["results"]
    assert len(res) == 4
    assert set(res[0]) >= {"value", "version"} and (res[0]["value"], res[0]["version"]) == (
        b"A", va)
    assert set(res[1]) >= {"version"} and res[1]["version"] > va
    assert set(res[2]) >= {"existed"} and res[2]["existed"] is True
    assert res[3]["existed"] is False
    g = await conn.call("get", key=b"tb")
    assert (g["value"], g["version"]) == (b"B", res[1]["version"])
    assert (await conn.call("get", key=b"tc"))["version"] == 0
    assert (await conn.call("get", key=b"t-else"))["version"] == 0, "else ran too"


async def test_txn_runs_else_when_a_compare_fails(conn: RawConn) -> None:
    """One compare fails -> else runs, succeeded=false, results answer the else sub-ops;
    nothing of then happens."""
    v = assert_ok(await conn.call("put", key=b"te", value=b"E"))["version"]
    r = assert_ok(await conn.call(
        "txn",
        **{
            "if": [{"key": b"te", "version": v}, {"key": b"te-absent", "version": 5}],
            "then": [{"op": "put", "key": b"te-then", "value": b"x"}],
            "else": [{"op": "get", "key": b"te"}, {"op": "put", "key": b"te-else", "value": b"y"}],
        },
    ))
    assert r["succeeded"] is False
    assert len(r["results"]) == 2
    assert (r["results"][0]["value"], r["results"][0]["version"]) == (b"E", v)
    assert r["results"][1]["version"] > v
    assert (await conn.call("get", key=b"te-then"))["version"] == 0
    assert (await conn.call("get", key=b"te-else"))["value"] == b"y"


async def test_txn_if_then_else_default_to_empty(conn: RawConn) -> None:
    """if/then/else are optional; an empty if always holds; an empty branch gives []."""
    r = assert_ok(await conn.call("txn"))
    assert r["succeeded"] is True and r["results"] == []
    r = assert_ok(await conn.call("txn", **{"if": [{"key": b"te0", "version": 1}]}))
    assert r["succeeded"] is False and r["results"] == []


async def test_txn_gets_see_the_state_before_its_own_writes(conn: RawConn) -> None:
    """Gets in a txn see the state before the transaction's own writes."""
    v = assert_ok(await conn.call("put", key=b"tg", value=b"old"))["version"]
    r = assert_ok(await conn.call("txn", then=[
        {"op": "put", "key": b"tg", "value": b"new"},
        {"op": "get", "key": b"tg"},
        {"op": "put", "key": b"tg2", "value": b"x"},
        {"op": "get", "key": b"tg2"},
    ]))
    assert (r["results"][1]["value"], r["results"][1]["version"]) == (b"old", v)
    assert (r["results"][3]["value"], r["results"][3]["version"]) == (None, 0)
    assert (await conn.call("get", key=b"tg"))["value"] == b"new"


async def test_txn_writes_to_many_keys_are_atomic(servers: Servers, seed: int) -> None:
    """A txn's writes appear together: a reader on another connection racing with txns
    that set 8 keys to one value never sees a mix of two txns' values."""
    rng = random.Random(seed)
    keys = [f"atom-{i}".encode() for i in range(8)]
    async with await RawConn.open(servers.plain.addr) as w, \
            await RawConn.open(servers.plain.addr) as rd:
        assert_ok(await w.call("txn", then=[{"op": "put", "key": x, "value": b"0"} for x in keys]))
        writes = [
            w.send({"op": "txn", "then": [
                {"op": "put", "key": x, "value": str(n).encode()} for x in rng.sample(keys, 8)
            ]})
            for n in range(1, 101)
        ]
        mixes = 0
        for _ in range(40):
            r = assert_ok(await rd.call("txn", then=[{"op": "get", "key": x} for x in keys]))
            mixes += len({x["value"] for x in r["results"]}) != 1
        for rid in writes:
            assert_ok(await w.recv_id(rid))
        assert mixes == 0, "a reader saw part of a transaction"
        final = assert_ok(await rd.call("txn", then=[{"op": "get", "key": x} for x in keys]))
        assert {x["value"] for x in final["results"]} == {b"100"}


async def test_txn_rejects_a_key_written_twice_in_a_branch(conn: RawConn) -> None:
    """A key may be written at most once per branch: bad_request, nothing written."""
    r = await conn.call("txn", then=[
        {"op": "put", "key": b"tw", "value": b"1"},
        {"op": "delete", "key": b"tw"},
    ])
    assert_error(r, "bad_request")
    assert (await conn.call("get", key=b"tw"))["version"] == 0


# ====================================================================== pipelining
async def test_500_pipelined_requests_are_each_answered_once_matched_by_id(
    servers: Servers, seed: int
) -> None:
    """Many requests may be sent without waiting; every one is answered exactly once, by
    id, and answers may come back in a different order than the requests (here: a status,
    a hello and an invalid request sent right after a batch of puts overtake the puts,
    whose answers wait for the fsync)."""
    rng = random.Random(seed)
    async with await RawConn.open(servers.plain.addr) as c:
        base = {f"pl-base-{i}".encode(): rng.randbytes(rng.randrange(0, 64)) for i in range(20)}
        for key, value in base.items():
            assert_ok(await c.call("put", key=key, value=value))

        reqs: list[tuple[str, dict]] = []
        for i in range(60):  # a batch of puts first ...
            reqs.append(("put", {"op": "put", "key": f"pl-{i}".encode(), "value": b"v%d" % i}))
        # ... then requests the server answers without touching the log
        reqs.append(("status", {"op": "status"}))
        reqs.append(("hello", {"op": "hello"}))
        reqs.append(("unknown", {"op": "frobnicate"}))
        n = 60
        while len(reqs) < 500:
            kind = rng.choices(
                ["put", "get", "status", "hello", "unknown", "badtype", "txn", "delete"],
                weights=[40, 25, 3, 3, 3, 4, 12, 10],
            )[0]
            if kind == "put":
                n += 1
                req = {"op": "put", "key": f"pl-{n}".encode(), "value": b"v%d" % n}
            elif kind == "get":
                req = {"op": "get", "key": rng.choice(list(base))}
            elif kind == "status":
                req = {"op": "status"}
            elif kind == "hello":
                req = {"op": "hello", "client": "pipeline"}
            elif kind == "unknown":
                req = {"op": "frobnicate"}
            elif kind == "badtype":
                req = {"op": "put", "key": 42, "value": b"x"}
            elif kind == "txn":
                n += 1
                req = {"op": "txn", "then": [
                    {"op": "put", "key": f"pl-{n}".encode(), "value": b"v%d" % n},
                    {"op": "get", "key": rng.choice(list(base))},
                ]}
            else:
                n += 1
                req = {"op": "delete", "key": f"pl-never-{n}".encode()}
            reqs.append((kind, req))

        ids = c.send_many([{"id": 10_000 + i, **req} for i, (_, req) in enumerate(reqs)])
        by_id = {rid: (kind, req) for rid, (kind, req) in zip(ids, reqs, strict=True)}
        order: list[int] = []
        answers: dict[int, dict] = {}
        async with asyncio.timeout(30):
            while len(answers) < len(ids):
                resp = await c.recv()
                rid = resp["id"]
                assert rid in by_id, f"answer to an id never sent: {resp!r}"
                assert rid not in answers, f"id {rid} answered twice"
                answers[rid] = resp
                order.append(rid)

        for rid, (kind, req) in by_id.items():
            resp = answers[rid]
            if kind == "put":
                assert_ok(resp)
                assert resp["succeeded"] is True and resp["version"] > 0
            elif kind == "get":
                assert_ok(resp)
                assert resp["value"] == base[req["key"]]
            elif kind in ("status", "hello"):
                assert_ok(resp)
                assert resp["node_id"] == "n1"
            elif kind == "unknown":
                assert_error(resp, "unknown_op")
            elif kind == "badtype":
                assert_error(resp, "bad_request", names="key")
            elif kind == "txn":
                assert_ok(resp)
                assert resp["results"][1]["value"] == base[req["then"][1]["key"]]
            else:
                assert_ok(resp)
                assert resp["existed"] is False

        assert order != ids, "every answer came back in request order"
        pos = {rid: i for i, rid in enumerate(order)}
        first_put = ids[0]
        for fast in ids[60:63]:  # status, hello, unknown op: sent after 60 puts
            assert pos[fast] < pos[first_put], (
                f"{by_id[fast][0]} (sent after the puts) was answered after the first put")

        versions = [answers[r]["version"] for r in ids if by_id[r][0] == "put"]
        assert len(set(versions)) == len(versions), "two puts got the same version"
        # every acknowledged put is readable afterwards
        puts = [req for kind, req in reqs if kind == "put"]
        gets = c.send_many([{"op": "get", "key": req["key"]} for req in puts])
        for rid, req in zip(gets, puts, strict=True):
            assert (await c.recv_id(rid))["value"] == req["value"]


# ====================================================================== bad input
async def _sentinel(srv: ServerProcess, name: str) -> tuple[RawConn, bytes, int]:
    """A second connection, opened before the bad input, with a key written on it."""
    other = await RawConn.open(srv.addr)
    key = f"sentinel-{name}".encode()[:MAX_KEY]
    v = assert_ok(await other.call("put", key=key, value=b"keep me"))["version"]
    return other, key, v


async def _assert_unharmed(srv: ServerProcess, other: RawConn, key: bytes, version: int) -> None:
    """Other connections keep working and nothing stored is lost."""
    g = assert_ok(await other.call("get", key=key))
    assert (g["value"], g["version"]) == (b"keep me", version), "stored data changed"
    assert_ok(await other.call("put", key=b"after-bad", value=b"fine"))
    async with await RawConn.open(srv.addr) as fresh:
        g = assert_ok(await fresh.call("get", key=key))
        assert (g["value"], g["version"]) == (b"keep me", version)
    await other.close()


FATAL_INPUTS = {
    "garbage_payload": (raw_frame(b"\xc1\xc1\xc1\xc1"), "bad_request"),
    "zero_length_frame": (b"\x00\x00\x00\x00", "bad_request"),
    "oversized_frame": (struct.pack(">I", MAX_FRAME + 1) + b"\x80" * 64, "too_large"),
    "huge_length_header": (b"\xff\xff\xff\xff", "too_large"),
    "msgpack_array": (raw_frame(msgpack.packb([1, "op", "get"])), "bad_request"),
    "msgpack_int": (raw_frame(msgpack.packb(7)), "bad_request"),
    "map_with_int_keys": (raw_frame(msgpack.packb({1: 2})), "bad_request"),
    "trailing_bytes": (raw_frame(msgpack.packb({"id": 1, "op": "status"}) + b"\x00"),
                       "bad_request"),
}


@pytest.mark.parametrize("name", list(FATAL_INPUTS))
async def test_undecodable_frame_gets_one_id_0_error_then_close(
    servers: Servers, name: str
) -> None:
    """A frame of length 0 or over max_frame_bytes, or bytes that do not decode to a map:
    one error with id 0 (bad_request or too_large, definite), then the connection is
    closed; other connections keep working and nothing stored is lost."""
    data, code = FATAL_INPUTS[name]
    srv = servers.limited
    other, key, v = await _sentinel(srv, name)
    async with await RawConn.open(srv.addr) as bad:
        assert_ok(await bad.call("get", key=b"before"))  # a working connection, then ...
        bad.send_bytes(data)
        answers = await bad.wait_closed_by_server()
    assert len(answers) == 1, f"expected exactly one answer before close, got {answers!r}"
    assert_error(answers[0], code, rid=0)
    await _assert_unharmed(srv, other, key, v)


async def test_frame_of_exactly_max_frame_bytes_is_accepted(servers: Servers) -> None:
    """1 <= L <= max_frame_bytes: the limit itself is allowed (here the value is too large
    for max_value_bytes, so the answer is too_large for the field, not for the frame)."""
    async with await RawConn.open(servers.limited.addr) as c:
        body = {"id": 5, "op": "put", "key": b"edge", "value": b""}
        pad = MAX_FRAME - len(msgpack.packb(body))
        body["value"] = b"p" * pad
        payload = msgpack.packb(body)
        body["value"] = b"p" * (pad - (len(payload) - MAX_FRAME))  # bin8 -> bin16 header
        payload = msgpack.packb(body)
        assert len(payload) == MAX_FRAME, len(payload)
        c.send_bytes(raw_frame(payload))
        assert_error(await c.recv_id(5), "too_large", names="value")
        assert_ok(await c.call("get", key=b"edge"))  # still open


WRONG_TYPES = [
    ({"op": "get", "key": 12}, "key"),
    ({"op": "put", "key": b"wt", "value": 3}, "value"),
    ({"op": "put", "key": b"wt", "value": b"v", "if_version": "1"}, "if_version"),
    ({"op": "delete", "key": b"wt", "if_version": 1.5}, "if_version"),
    ({"op": "put", "key": b"wt", "value": b"v", "if_version": True}, "if_version"),
    ({"op": "put", "key": b"wt", "value": b"v", "if_version": -1}, "if_version"),
    ({"op": "get", "key": None}, "key"),
    ({"op": "get", "key": b""}, "key"),
    ({"op": "put", "value": b"v"}, "key"),
    ({"op": "put", "key": b"wt"}, "value"),
    ({"op": 7, "key": b"wt"}, "op"),
    ({"key": b"wt"}, "op"),
    ({"op": "txn", "if": {"key": b"wt"}}, "if"),
    ({"op": "txn", "then": [{"op": "put", "key": b"wt"}]}, "value"),
    ({"op": "txn", "if": [{"key": b"wt", "version": "0"}]}, "version"),
    ({"op": "hello", "token": 5}, "token"),
]


@pytest.mark.parametrize("req,field", WRONG_TYPES, ids=[f for _, f in WRONG_TYPES])
async def test_missing_or_wrongly_typed_field_is_bad_request_naming_it(
    servers: Servers, req: dict, field: str
) -> None:
    """Missing or wrongly typed fields get bad_request (definite, not retryable) whose
    message names the field; the connection stays open; nothing is written."""
    async with await RawConn.open(servers.limited.addr) as c:
        rid = c.send(req)
        assert_error(await c.recv_id(rid), "bad_request", rid=rid, names=field)
        g = assert_ok(await c.call("get", key=b"wt"))
        assert g["version"] == 0, "a rejected request wrote something"


async def test_unknown_op_is_unknown_op_and_keeps_the_connection(servers: Servers) -> None:
    """Unknown ops get unknown_op (definite, not retryable); the connection stays open."""
    async with await RawConn.open(servers.limited.addr) as c:
        rid = c.send({"op": "increment", "key": b"u"})
        assert_error(await c.recv_id(rid), "unknown_op", rid=rid)
        assert_ok(await c.call("status"))


@pytest.mark.parametrize("req,field", [
    ({"op": "get", "key": b"uf", "colour": "red"}, "colour"),
    ({"op": "put", "key": b"uf", "value": b"v", "ttl": 5}, "ttl"),
    ({"op": "status", "verbose": True}, "verbose"),
    ({"op": "txn", "then": [{"op": "get", "key": b"uf", "extra": 1}]}, "extra"),
])
async def test_unknown_field_is_bad_request_naming_it(
    servers: Servers, req: dict, field: str
) -> None:
    """Unknown fields get bad_request naming the field; the connection stays open."""
    async with await RawConn.open(servers.limited.addr) as c:
        rid = c.send(req)
        assert_error(await c.recv_id(rid), "bad_request", rid=rid, names=field)
        assert (await c.call("get", key=b"uf"))["version"] == 0


@pytest.mark.parametrize("req,field", [
    ({"op": "get", "key": b"k" * (MAX_KEY + 1)}, "key"),
    ({"op": "put", "key": b"k" * (MAX_KEY + 1), "value": b"v"}, "key"),
    ({"op": "put", "key": b"big", "value": b"v" * (MAX_VALUE + 1)}, "value"),
    ({"op": "txn", "then": [{"op": "put", "key": b"big", "value": b"v" * (MAX_VALUE + 1)}]},
     "value"),
    ({"op": "delete", "key": "é" * (MAX_KEY // 2 + 1)}, "key"),
])
async def test_key_or_value_over_its_limit_is_too_large(
    servers: Servers, req: dict, field: str
) -> None:
    """Keys are 1..max_key_bytes, values 0..max_value_bytes: more is too_large (definite);
    the connection stays open and nothing is written; the limits themselves are fine."""
    async with await RawConn.open(servers.limited.addr) as c:
        rid = c.send(req)
        assert_error(await c.recv_id(rid), "too_large", rid=rid, names=field)
        assert (await c.call("get", key=b"big"))["version"] == 0
        at_limit = assert_ok(await c.call("put", key=b"K" * MAX_KEY, value=b"V" * MAX_VALUE))
        assert at_limit["succeeded"] is True


async def test_request_without_id_gets_bad_request_with_id_0(servers: Servers) -> None:
    """A request with no (or an invalid) id cannot be matched: it is answered with id 0
    and bad_request naming 'id'; other connections and stored data are unaffected."""
    srv = servers.limited
    other, key, v = await _sentinel(srv, "noid")
    for bad in ({"op": "get", "key": b"x"}, {"id": 0, "op": "status"},
                {"id": "7", "op": "status"}, {"id": -3, "op": "status"}, {"id": 1 << 63}):
        async with await RawConn.open(srv.addr) as c:
            c.send_bytes(raw_frame(msgpack.packb(bad)))
            assert_error(await c.recv(), "bad_request", rid=0, names="id")
    await _assert_unharmed(srv, other, key, v)


async def test_request_without_id_does_not_close_the_connection(servers: Servers) -> None:
    """Missing fields (id included) get bad_request; that does not close the connection."""
    async with await RawConn.open(servers.limited.addr) as c:
        c.send_bytes(raw_frame(msgpack.packb({"op": "status"})))
        assert_error(await c.recv(), "bad_request", rid=0, names="id")
        assert_ok(await c.call("status", timeout=5))


# ====================================================================== auth
async def test_auth_requests_before_hello_are_unauthenticated(servers: Servers) -> None:
    """With an auth token configured, hello is required first: earlier requests get
    unauthenticated (definite) and the connection stays usable for a hello."""
    async with await RawConn.open(servers.auth.addr) as c:
        assert_error(await c.call("get", key=b"a"), "unauthenticated")
        assert_error(await c.call("put", key=b"a", value=b"x"), "unauthenticated")
        assert_error(await c.call("status"), "unauthenticated")
        assert_ok(await c.call("hello", token=TOKEN))
        assert (await c.call("get", key=b"a"))["version"] == 0, "unauthenticated put applied"


async def test_auth_hello_with_wrong_or_missing_token_is_unauthenticated(
    servers: Servers,
) -> None:
    """hello with a wrong (or no) token gets unauthenticated and does not log in."""
    async with await RawConn.open(servers.auth.addr) as c:
        assert_error(await c.call("hello", token="s3cret-not"), "unauthenticated")
        assert_error(await c.call("hello", token=""), "unauthenticated")
        assert_error(await c.call("hello"), "unauthenticated")
        assert_error(await c.call("get", key=b"a"), "unauthenticated")


async def test_auth_correct_hello_then_requests_work(servers: Servers) -> None:
    """After hello with the right token the connection works; other connections still
    need their own hello."""
    async with await RawConn.open(servers.auth.addr) as c, \
            await RawConn.open(servers.auth.addr) as other:
        h = assert_ok(await c.call("hello", token=TOKEN, client="t"))
        assert h["protocol"] == 1 and h["node_id"] == "n1"
        p = assert_ok(await c.call("put", key=b"authed", value=b"yes"))
        g = assert_ok(await c.call("get", key=b"authed"))
        assert (g["value"], g["version"]) == (b"yes", p["version"])
        assert_ok(await c.call("status"))
        assert_error(await other.call("get", key=b"authed"), "unauthenticated")


# ====================================================================== start-up errors


async def test_port_in_use_exits_2_with_one_line(servers: Servers, pool: ServerPool) -> None:
    """Bad configuration (port in use): one clear line on stderr, exit status 2; the node
    already on that port is unaffected."""
    rc, out = pool.run_to_exit(port=servers.plain.port)
    assert rc == 2, out
    line = single_error_line(out)
    assert str(servers.plain.port) in line and "in use" in line, line
    async with await RawConn.open(servers.plain.addr) as c:
        assert_ok(await c.call("status"))


@pytest.mark.parametrize("toml,names", [
    ("max_keys_bytes = 16\n", "max_keys_bytes"),
    ("max_key_bytes = \"16\"\n", "max_key_bytes"),
    ("[limits]\nmax_key_bytes = 16\n", "limits"),
    ("max_key_bytes = \n", "not valid TOML"),
], ids=["unknown_key", "wrong_type", "unknown_table", "syntax"])
def test_bad_config_file_exits_2_naming_the_problem(
    pool: ServerPool, tmp_path: Path, toml: str, names: str
) -> None:
    """Bad configuration in the TOML file (unknown key, wrong type): exit 2, one line
    naming the setting."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(toml)
    rc, out = pool.run_to_exit("--config", str(cfg))
    assert rc == 2, out
    assert names in single_error_line(out)


@pytest.mark.parametrize("env,names", [
    ({"DSNODE_MAX_KEY_BYTES": "abc"}, "max_key_bytes"),
    ({"DSNODE_FSYNC": "sometimes"}, "fsync"),
    ({"DSNODE_NODE_ID": "Bad Id"}, "node_id"),
], ids=["int_setting", "bool_setting", "node_id"])
def test_wrong_type_in_environment_exits_2_naming_the_setting(
    pool: ServerPool, env: dict, names: str
) -> None:
    """DSNODE_<SETTING> with a value of the wrong type: exit 2, one line naming it."""
    # no --node-id flag when the environment sets it: a flag would win
    node_id = None if "DSNODE_NODE_ID" in env else "n1"
    rc, out = pool.run_to_exit(env=env, node_id=node_id)
    assert rc == 2, out
    assert names in single_error_line(out)


def test_flag_with_wrong_type_exits_2_naming_the_setting(pool: ServerPool) -> None:
    """--max-key-bytes abc: exit 2, one line naming the setting."""
    rc, out = pool.run_to_exit("--max-key-bytes", "abc")
    assert rc == 2, out
    assert "max_key_bytes" in single_error_line(out)


def test_data_dir_that_is_a_file_exits_2_naming_it(pool: ServerPool, tmp_path: Path) -> None:
    """An unusable data dir (a regular file): exit 2, one line naming the directory."""
    f = tmp_path / "not-a-dir"
    f.write_bytes(b"x")
    rc, out = pool.run_to_exit(data_dir=f)
    assert rc == 2, out
    assert str(f) in single_error_line(out)
