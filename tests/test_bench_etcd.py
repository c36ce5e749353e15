"""Tests for the etcd bench target (``dsnode/bench/etcd.py``) and ``bench/compare_etcd.py``.

The target runs against a tiny in-test HTTP/1.1 server implementing etcd's JSON
gateway (``/version``, ``/v3/kv/put``, ``/v3/kv/range``, ``/v3/kv/txn``,
``/v3/auth/authenticate``) with base64 keys and values and injectable errors.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
from bench_scripts import load_bench_script

from dsnode.bench.etcd import (
    EtcdTarget,
    HttpProtocolError,
    error_code,
    gateway_prefix,
    parse_response,
)
from dsnode.bench.runner import BenchConfig, parse_mix, plan_shards, run_process
from dsnode.bench.stats import decode_histogram
from dsnode.bench.targets import CONNECTION_LOST, TargetOptions, get_target

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- fake gateway


@dataclass
class FakeEtcd:
    version: str | None = "3.5.9"  # None: /version answers 404
    fail_every: int = 0  # every Nth kv request fails with gRPC code ``fail_grpc``
    fail_grpc: int = 14  # unavailable
    chunked: bool = False  # answer kv requests with Transfer-Encoding: chunked
    close_after: int = 0  # close each connection after this many kv answers
    users: dict[str, str] = field(default_factory=dict)
    store: dict[bytes, bytes] = field(default_factory=dict)
    seen: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    kv_requests: int = 0
    connections: int = 0
    auth_headers: set[str] = field(default_factory=set)
    #: Most requests ever answered on one connection (keep-alive reuse).
    max_per_conn: int = 0
    #: Most requests seen on the wire at once on one connection (must stay 1).
    max_unanswered: int = 0
    paths: set[str] = field(default_factory=set)


def _reply(status: int, body: dict[str, Any], chunked: bool = False) -> bytes:
    data = json.dumps(body).encode()
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found"}.get(
        status, "Service Unavailable"
    )
    if chunked:
        half = len(data) // 2
        payload = b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n" % (half, data[:half],
                                                         len(data) - half, data[half:])  # fmt: skip
        return (b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n%s") % (status, reason.encode(), payload)  # fmt: skip
    return b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        status,
        reason.encode(),
        len(data),
        data,
    )


class FakeGateway(asyncio.Protocol):
    def __init__(self, cfg: FakeEtcd) -> None:
        self.cfg = cfg
        self.buf = bytearray()
        self.answered = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.cfg.connections += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        requests = []
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(self.buf[:end]).decode()
            lines = head.split("\r\n")
            method, path, _ = lines[0].split(" ")
            headers = {k.lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
            n = int(headers.get("content-length", "0"))
            if len(self.buf) < end + 4 + n:
                break
            body = bytes(self.buf[end + 4 : end + 4 + n])
            del self.buf[: end + 4 + n]
            requests.append((method, path, headers, body))
        self.cfg.max_unanswered = max(self.cfg.max_unanswered, len(requests))
        assert self.transport is not None
        for method, path, headers, body in requests:
            self.answered += 1
            self.cfg.max_per_conn = max(self.cfg.max_per_conn, self.answered)
            self.transport.write(self.answer(method, path, headers, body))
            if self.cfg.close_after and path.startswith("/v3/kv/"):
                if self.answered > self.cfg.close_after:
                    self.transport.close()
                    return

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
        cfg = self.cfg
        cfg.paths.add(path)
        if path == "/version":
            if cfg.version is None:
                return _reply(404, {"error": "not found"})
            return _reply(200, {"etcdserver": cfg.version, "etcdcluster": "3.5.0"})
        assert method == "POST" and headers["content-type"] == "application/json"
        req = json.loads(body)
        if path.endswith("/auth/authenticate"):
            if cfg.users.get(req["name"]) == req["password"]:
                return _reply(200, {"token": f"tok-{req['name']}"})
            return _reply(400, {"error": "auth failed", "code": 3, "message": "auth failed"})
        if "authorization" in headers:
            cfg.auth_headers.add(headers["authorization"])
        kind = path.rsplit("/", 1)[1]
        cfg.kv_requests += 1
        cfg.seen.append((path, req))
        if cfg.fail_every and cfg.kv_requests % cfg.fail_every == 0:
            msg = "etcdserver: injected"
            return _reply(503, {"error": msg, "message": msg, "code": cfg.fail_grpc})
        hdr = {"cluster_id": "1", "member_id": "2", "revision": "3", "raft_term": "4"}
        try:
            if kind == "put":
                cfg.store[base64.b64decode(req["key"], validate=True)] = base64.b64decode(
                    req.get("value", ""), validate=True
                )
                return _reply(200, {"header": hdr}, cfg.chunked)
            if kind == "range":
                key = base64.b64decode(req["key"], validate=True)
                kvs = []
                if key in cfg.store:
                    kvs.append({"key": req["key"], "value": base64.b64encode(cfg.store[key])
                                .decode()})  # fmt: skip
                return _reply(200, {"header": hdr, "kvs": kvs, "count": str(len(kvs))},
                              cfg.chunked)  # fmt: skip
            if kind == "txn":
                for op in req["success"]:
                    if "requestPut" in op:
                        p = op["requestPut"]
                        cfg.store[base64.b64decode(p["key"])] = base64.b64decode(p["value"])
                return _reply(200, {"header": hdr, "succeeded": True}, cfg.chunked)
        except (ValueError, KeyError) as exc:
            msg = f"bad request: {exc}"
            return _reply(400, {"error": msg, "message": msg, "code": 3})
        return _reply(404, {"error": "Not Found", "code": 5, "message": "Not Found"})


@contextlib.asynccontextmanager
async def serve(cfg: FakeEtcd) -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeGateway(cfg), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


def _config(port: int, **kw: Any) -> BenchConfig:
    base: dict[str, Any] = {
        "target": "etcd",
        "endpoints": (f"127.0.0.1:{port}",),
        "connections": 4,
        "inflight": 4,
        "requests": 800,
        "keyspace": 100,
        "drain_timeout": 5.0,
    }
    base.update(kw)
    return BenchConfig(**base).validated()


# --------------------------------------------------------------------------- unit


def test_registered_and_helpers() -> None:
    assert get_target("etcd") is EtcdTarget and EtcdTarget.default_port == 2379
    assert gateway_prefix("3.4.23") == "/v3" and gateway_prefix("3.5.9") == "/v3"
    assert gateway_prefix("3.3.25") == "/v3beta" and gateway_prefix("3.2.1") == "/v3alpha"
    assert gateway_prefix(None) == "/v3" and gateway_prefix("weird") == "/v3"
    assert error_code(503, b'{"error":"x","code":14}') == "unavailable"
    assert error_code(400, b'{"code":3}') == "invalid_argument"
    assert error_code(502, b"<html>bad gateway</html>") == "http_502"


def test_parse_response() -> None:
    full = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    assert parse_response(full) == (len(full), 200, b"{}", True)
    assert parse_response(full[:-1]) is None
    assert parse_response(full[:10]) is None
    closing = b"HTTP/1.1 503 X\r\nConnection: close\r\ncontent-length: 0\r\n\r\n"
    assert parse_response(closing) == (len(closing), 503, b"", False)
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
    )
    assert parse_response(chunked) == (len(chunked), 200, b"abcde", True)
    for cut in range(len(chunked) - 1):
        assert parse_response(chunked[:cut]) is None
    with pytest.raises(HttpProtocolError):
        parse_response(b"SSH-2.0-OpenSSH\r\n\r\n")
    with pytest.raises(HttpProtocolError):
        parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n")


# --------------------------------------------------------------------------- target


async def test_put_get_txn_base64_and_consistency() -> None:
    fake = FakeEtcd()
    async with serve(fake) as port:
        t = EtcdTarget("127.0.0.1", port)
        await t.connect()
        key, value = b"k\x00\xff/1", bytes(range(256))
        assert await t.put(key, value) is None
        assert fake.store[key] == value  # decoded by the fake: base64 round-trips
        path, req = fake.seen[-1]
        assert path == "/v3/kv/put"
        assert req == {"key": base64.b64encode(key).decode(), "value": base64.b64encode(value)
                       .decode()}  # fmt: skip
        assert await t.get(key) is None
        path, req = fake.seen[-1]
        assert path == "/v3/kv/range" and req == {"key": base64.b64encode(key).decode()}
        assert "serializable" not in req  # linearizable: etcd's default range
        assert await t.txn([("put", b"a", b"1"), ("get", b"b", None)]) is None
        path, req = fake.seen[-1]
        assert path == "/v3/kv/txn"
        assert req["success"] == [
            {"requestPut": {"key": "YQ==", "value": "MQ=="}},
            {"requestRange": {"key": "Yg=="}},
        ]
        assert fake.store[b"a"] == b"1"
        assert t.server_info["server_version"] == "3.5.9"
        assert fake.connections == 1 and fake.max_per_conn == 4  # version + 3, one socket
        t.close()
        await t.wait_closed()
        assert not t.is_open
        assert await t.put(b"k", b"v") == CONNECTION_LOST

        stale = EtcdTarget("127.0.0.1", port, TargetOptions(consistency="stale"))
        await stale.connect()
        assert await stale.get(b"a") is None
        assert fake.seen[-1][1] == {"key": "YQ==", "serializable": True}
        stale.close()
        await stale.wait_closed()


async def test_gateway_prefix_from_version_and_chunked_replies() -> None:
    fake = FakeEtcd(version="3.3.25", chunked=True)
    async with serve(fake) as port:
        t = EtcdTarget("127.0.0.1", port)
        await t.connect()
        assert await t.put(b"x", b"y") is None
        assert await t.get(b"x") is None
        assert fake.seen[0][0] == "/v3beta/kv/put"
        t.close()
        await t.wait_closed()
    fake = FakeEtcd(version=None)  # no /version: assume 3.4+
    async with serve(fake) as port:
        t = EtcdTarget("127.0.0.1", port)
        await t.connect()
        assert await t.put(b"x", b"y") is None
        assert fake.seen[0][0] == "/v3/kv/put"
        t.close()
        await t.wait_closed()


async def test_authentication() -> None:
    fake = FakeEtcd(users={"root": "pw"})
    async with serve(fake) as port:
        t = EtcdTarget("127.0.0.1", port, TargetOptions(token="root:pw"))
        await t.connect()
        assert await t.put(b"x", b"y") is None
        assert fake.auth_headers == {"tok-root"}
        t.close()
        await t.wait_closed()
        bad = EtcdTarget("127.0.0.1", port, TargetOptions(token="root:nope"))
        with pytest.raises(Exception, match="invalid_argument"):
            await bad.connect()
        assert not bad.is_open


async def test_runner_one_request_per_socket_and_keepalive_reuse() -> None:
    fake = FakeEtcd()
    async with serve(fake) as port:
        # 2 runner connections x 4 deep: the target grows to 4 sockets each, never pipelines.
        cfg = _config(port, connections=2, inflight=8, requests=1000,
                      mix=parse_mix("put=2,get=1,txn=1"))  # fmt: skip
        result = await run_process(cfg, plan_shards(cfg)[0])
    assert sum(result.ok.values()) == 1000
    assert fake.kv_requests == 1000  # nothing issued beyond the request count
    assert all(not e for e in result.errors.values())
    assert result.incomplete == 0 and result.connect_errors == 0
    assert fake.max_unanswered == 1  # one request on the wire per connection
    assert fake.connections == 8  # = in-flight, reused (keep-alive) for all 1000
    assert fake.max_per_conn > 50
    assert result.server_info["server_version"] == "3.5.9"
    for op, enc in result.histograms.items():
        assert decode_histogram(enc).get_total_count() == result.ok[op]
    puts = [r for p, r in fake.seen if p.endswith("/put")]
    assert all(len(base64.b64decode(r["value"])) == 100 for r in puts)
    assert all(len(base64.b64decode(r["key"])) == 16 for r in puts)


async def test_error_accounting() -> None:
    fake = FakeEtcd(fail_every=5, fail_grpc=14)
    async with serve(fake) as port:
        cfg = _config(port, requests=1000)
        result = await run_process(cfg, plan_shards(cfg)[0])
    assert result.ok["put"] == 800
    assert result.errors["put"] == {"unavailable": 200}
    assert fake.connections == 4  # error replies keep the connection


async def test_server_closing_connections_counts_and_reconnects() -> None:
    fake = FakeEtcd(close_after=50)
    async with serve(fake) as port:
        cfg = _config(port, connections=2, inflight=2, requests=600)
        result = await run_process(cfg, plan_shards(cfg)[0])
    lost = result.errors["put"].get(CONNECTION_LOST, 0)
    assert result.ok["put"] + lost == 600
    assert fake.connections > 2  # reconnected after drops


async def test_connect_refused() -> None:
    async with serve(FakeEtcd()) as port:
        pass
    t = EtcdTarget("127.0.0.1", port, TargetOptions(connect_timeout=2))
    with pytest.raises(OSError):
        await t.connect()


# --------------------------------------------------------------------------- compare script


def _load_compare() -> Any:
    return load_bench_script("compare_etcd")


def test_compare_parse_check_perf_and_ratios() -> None:
    mod = _load_compare()
    text = (
        " 60 / 60 Booooooo! 100.00% 1m0s\r"
        "PASS: Throughput is 14875 writes/s\n"
        "Slowest request took too long: 1.2s\n"
        "PASS: Stddev is 0.05s\n"
        "FAIL\n"
    )
    perf = mod.parse_check_perf(text, 1)
    assert perf["writes_s"] == 14875 and not perf["passed"]
    assert "Slowest request took too long: 1.2s" in perf["verdicts"]
    assert mod.parse_check_perf("FAIL: Throughput too low: 812 writes/s\n", 1)["writes_s"] == 812
    rows = [
        {"system": s, "op": op, "inflight": i, "ops_s": v, "p50_us": 1000.0, "p99_us": 2000.0}
        for s, v in (("dsnode", 3000.0), ("etcd", 2000.0))
        for op in ("put", "get")
        for i in mod.INFLIGHTS
    ]
    ratios = mod.compute_ratios(rows, {"writes_s": 6000.0})
    assert ratios["put throughput dsnode/etcd (inflight 64)"] == 1.5
    assert ratios["get p99 latency dsnode/etcd (inflight 256)"] == 1.0
    assert ratios["dsnode puts/s (inflight 64) / etcdctl check perf writes/s"] == 0.5


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.skipif(shutil.which("etcd") is None, reason="needs the etcd binary")
def test_compare_etcd_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    p = subprocess.run(
        [sys.executable, str(REPO / "bench/compare_etcd.py"), "--duration", "1", "--warmup",
         "0.5", "--keyspace", "500", "--check-perf-load", "s", "--json", str(out)],
        capture_output=True, text=True, timeout=840, env=env, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    data = json.loads(out.read_text())
    systems = {(r["system"], r["op"], r["inflight"]) for r in data["rows"]}
    assert len(systems) == 8
    assert all(r["ops_s"] > 0 for r in data["rows"])
    assert data["check_perf"]["writes_s"] > 0
    assert "put throughput dsnode/etcd (inflight 64)" in p.stdout
