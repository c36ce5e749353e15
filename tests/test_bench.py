"""Tests for ``dsnode bench``: runner, targets, report shape, error accounting, CLI.

The servers are in-test fakes (asyncio): a dsnode-protocol server answering
hello/put/get/txn and a RESP server answering PING/SET/GET/MULTI/EXEC, each able
to inject errors deterministically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import click.testing
import msgpack
import pytest

from dsnode.bench.cli import bench_command
from dsnode.bench.runner import (
    BenchConfig,
    BenchError,
    parse_endpoint,
    parse_mix,
    plan_shards,
    run_bench,
    run_process,
)
from dsnode.bench.stats import BenchReport, decode_histogram
from dsnode.bench.targets import (
    CONNECTION_LOST,
    DsnodeTarget,
    RedisTarget,
    TargetOptions,
    resp_skip,
)
from dsnode.wire.framing import FrameDecoder, pack_frame, unpack_payload

pytestmark = pytest.mark.timeout(60)


# --------------------------------------------------------------------------- fakes


@dataclass
class FakeConfig:
    """Error injection for the fakes: the Nth request overall (1-based) of each kind."""

    fail_every: int = 0  # every Nth put/get/txn gets error ``fail_code``
    fail_code: str = "overloaded"
    drop_after: int = 0  # close each connection after answering this many requests
    on_drop: Callable[[], None] | None = None
    seen: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    store: dict[bytes, bytes] = field(default_factory=dict)
    connections: int = 0


class FakeDsnode(asyncio.Protocol):
    """Minimal dsnode protocol server: versions, store, txn without compares."""

    def __init__(self, cfg: FakeConfig) -> None:
        self.cfg = cfg
        self.dec = FrameDecoder()
        self.answered = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.cfg.connections += 1

    def data_received(self, data: bytes) -> None:
        out = []
        for payload in self.dec.feed(data):
            req = unpack_payload(payload)
            assert isinstance(req, dict)
            out.append(pack_frame(self.answer(req)))
            self.answered += 1
            if self.cfg.drop_after and self.answered >= self.cfg.drop_after:
                assert self.transport is not None
                self.transport.write(b"".join(out))
                self.transport.close()
                if self.cfg.on_drop is not None:
                    self.cfg.on_drop()
                return
        assert self.transport is not None
        self.transport.write(b"".join(out))

    def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        op = req["op"]
        rid = req["id"]
        if op == "hello":
            return {
                "id": rid,
                "ok": True,
                "node_id": "fake",
                "cluster_id": "c",
                "protocol": 1,
                "server_version": "fake-0",
            }
        n = self.cfg.counts[op] = self.cfg.counts.get(op, 0) + 1
        self.cfg.seen.append(req)
        if self.cfg.fail_every and n % self.cfg.fail_every == 0:
            err = {
                "code": self.cfg.fail_code,
                "message": "injected",
                "retryable": True,
                "indeterminate": False,
            }
            return {"id": rid, "ok": False, "error": err}
        if op == "put":
            self.cfg.store[req["key"]] = req["value"]
            return {"id": rid, "ok": True, "succeeded": True, "version": n}
        if op == "get":
            v = self.cfg.store.get(req["key"])
            return {"id": rid, "ok": True, "value": v, "version": 1 if v is not None else 0}
        if op == "txn":
            results = []
            for sub in req.get("then", []):
                if sub["op"] == "put":
                    self.cfg.store[sub["key"]] = sub["value"]
                    results.append({"version": n})
                else:
                    results.append({"value": self.cfg.store.get(sub["key"]), "version": 0})
            return {"id": rid, "ok": True, "succeeded": True, "results": results}
        return {
            "id": rid,
            "ok": False,
            "error": {
                "code": "unknown_op",
                "message": op,
                "retryable": False,
                "indeterminate": False,
            },
        }


def _resp_bulk(v: bytes | None) -> bytes:
    return b"$-1\r\n" if v is None else b"$%d\r\n%s\r\n" % (len(v), v)


class FakeRedis(asyncio.Protocol):
    """Minimal RESP2 server: PING, AUTH, SET, GET, MULTI/EXEC with queued commands."""

    def __init__(self, cfg: FakeConfig) -> None:
        self.cfg = cfg
        self.buf = bytearray()
        self.queued: list[list[bytes]] | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.cfg.connections += 1

    def _parse_command(self) -> list[bytes] | None:
        buf = self.buf
        if not buf:
            return None
        assert buf[0:1] == b"*", bytes(buf[:20])
        eol = buf.find(b"\r\n")
        if eol < 0:
            return None
        n = int(buf[1:eol])
        pos = eol + 2
        parts = []
        for _ in range(n):
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            ln = int(buf[pos + 1 : eol])
            if len(buf) < eol + 2 + ln + 2:
                return None
            parts.append(bytes(buf[eol + 2 : eol + 2 + ln]))
            pos = eol + 2 + ln + 2
        del buf[:pos]
        return parts

    def _exec(self, cmd: list[bytes]) -> bytes:
        name = cmd[0].upper()
        if name in (b"SET", b"GET"):
            kind = "put" if name == b"SET" else "get"
            n = self.cfg.counts[kind] = self.cfg.counts.get(kind, 0) + 1
            if self.cfg.fail_every and n % self.cfg.fail_every == 0:
                return b"-" + self.cfg.fail_code.upper().encode() + b" injected\r\n"
            if name == b"SET":
                self.cfg.store[cmd[1]] = cmd[2]
                return b"+OK\r\n"
            return _resp_bulk(self.cfg.store.get(cmd[1]))
        return b"-ERR unknown command\r\n"

    def data_received(self, data: bytes) -> None:
        self.buf += data
        out = []
        while (cmd := self._parse_command()) is not None:
            name = cmd[0].upper()
            if name == b"PING":
                out.append(b"+PONG\r\n")
            elif name == b"AUTH":
                out.append(b"+OK\r\n" if cmd[1] == b"secret" else b"-WRONGPASS invalid\r\n")
            elif name == b"MULTI":
                self.queued = []
                out.append(b"+OK\r\n")
            elif name == b"EXEC":
                queued, self.queued = self.queued or [], None
                self.cfg.counts["txn"] = self.cfg.counts.get("txn", 0) + 1
                replies = [self._exec(c) for c in queued]
                out.append(b"*%d\r\n" % len(replies) + b"".join(replies))
            elif self.queued is not None:
                self.queued.append(cmd)
                out.append(b"+QUEUED\r\n")
            else:
                out.append(self._exec(cmd))
        assert self.transport is not None
        self.transport.write(b"".join(out))


@contextlib.asynccontextmanager
async def serve(factory: Callable[[], asyncio.Protocol]) -> AsyncIterator[int]:
    """Run a fake on 127.0.0.1 (free port) in the current loop; yields the port."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


@contextlib.contextmanager
def serve_in_thread(factory: Callable[[], asyncio.Protocol]) -> Iterator[int]:
    """Run a fake in its own thread and loop (for the synchronous entry points)."""
    loop = asyncio.new_event_loop()
    ready: asyncio.Future[int] = loop.create_future()
    stop = asyncio.Event()

    async def main() -> None:
        async with serve(factory) as port:
            ready.set_result(port)
            await stop.wait()

    def run() -> None:
        loop.run_until_complete(main())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    port = asyncio.run_coroutine_threadsafe(_wait(ready), loop).result(timeout=10)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set)
        t.join(timeout=10)
        loop.close()


async def _wait(fut: asyncio.Future[int]) -> int:
    return await fut


def _config(port: int, **kw: Any) -> BenchConfig:
    base: dict[str, Any] = {
        "target": "dsnode",
        "endpoints": (f"127.0.0.1:{port}",),
        "connections": 4,
        "inflight": 16,
        "requests": 2000,
        "keyspace": 1000,
        "drain_timeout": 5.0,
    }
    base.update(kw)
    return BenchConfig(**base).validated()


def _report(cfg: BenchConfig, results: list[Any]) -> BenchReport:
    ops = [op for op, w in cfg.mix if w > 0]
    return BenchReport.merge(cfg.to_json(), ops, results)


# --------------------------------------------------------------------------- unit


def test_parse_mix_and_endpoints() -> None:
    assert dict(parse_mix("put=1,get=3")) == {"put": 1.0, "get": 3.0, "txn": 0.0}
    with pytest.raises(BenchError):
        parse_mix("put=0")
    with pytest.raises(BenchError):
        parse_mix("delete=1")
    with pytest.raises(BenchError):
        parse_mix("put=x")
    assert parse_endpoint("127.0.0.1:7000", None) == ("127.0.0.1", 7000)
    assert parse_endpoint("[::1]:7000", None) == ("::1", 7000)
    assert parse_endpoint("localhost", 6379) == ("localhost", 6379)
    with pytest.raises(BenchError):
        parse_endpoint("localhost", None)


def test_config_validation_and_sharding() -> None:
    assert BenchConfig(target="dsnode").validated().endpoints == ("127.0.0.1:7379",)
    with pytest.raises(BenchError):
        BenchConfig(endpoints=("h:1",), duration=1, requests=5).validated()
    with pytest.raises(BenchError):
        BenchConfig(endpoints=("h:1",), key_size=3, keyspace=10_000).validated()
    cfg = BenchConfig(target="redis").validated()
    assert cfg.endpoints == ("127.0.0.1:6379",) and cfg.duration == 10.0
    cfg = BenchConfig(
        endpoints=("a:1", "b:2"), connections=5, inflight=13, processes=2, requests=7
    ).validated()
    shards = plan_shards(cfg)
    assert [s.requests for s in shards] == [4, 3]
    depths = [d for s in shards for _, _, d in s.conns]
    assert sorted(depths) == [2, 2, 3, 3, 3] and sum(depths) == 13
    hosts = sorted(h for s in shards for h, _, _ in s.conns)
    assert hosts == ["a", "a", "a", "b", "b"]
    # Fewer in-flight slots than connections: connections are capped.
    assert BenchConfig(endpoints=("h:1",), connections=16, inflight=1).validated().connections == 1


def test_resp_skip() -> None:
    assert resp_skip(b"+OK\r\n", 0) == (5, None)
    assert resp_skip(b"$3\r\nabc\r\n", 0) == (9, None)
    assert resp_skip(b"$3\r\nab", 0) == (-1, None)
    assert resp_skip(b"$-1\r\n", 0) == (5, None)
    assert resp_skip(b"-WRONGTYPE bad\r\n", 0) == (16, "wrongtype")
    assert resp_skip(b"*2\r\n+OK\r\n-ERR x\r\n", 0) == (17, "err")
    assert resp_skip(b"*2\r\n+OK\r\n", 0) == (-1, None)


# --------------------------------------------------------------------------- runner


async def test_dsnode_fixed_requests_counts_and_histogram() -> None:
    fake = FakeConfig()
    async with serve(lambda: FakeDsnode(fake)) as port:
        cfg = _config(port, mix=parse_mix("put=1,get=1,txn=1"), value_size=50, key_size=12)
        shard = plan_shards(cfg)[0]
        result = await run_process(cfg, shard)
    assert fake.connections == 4
    assert sum(result.ok.values()) == 2000
    assert sum(fake.counts.values()) == 2000  # nothing issued beyond the request count
    assert all(v > 0 for v in result.ok.values())
    assert result.errors == {"put": {}, "get": {}, "txn": {}}
    assert result.incomplete == 0 and result.connect_errors == 0
    assert result.server_info["node_id"] == "fake"
    for op, enc in result.histograms.items():
        h = decode_histogram(enc)
        assert h.get_total_count() == result.ok[op]
        assert 1 <= h.get_min_value() <= h.get_max_value()
    # Request shape on the wire.
    put = next(r for r in fake.seen if r["op"] == "put")
    assert isinstance(put["key"], bytes) and len(put["key"]) == 12 and len(put["value"]) == 50
    get = next(r for r in fake.seen if r["op"] == "get")
    assert get["consistency"] == "linearizable"
    txn = next(r for r in fake.seen if r["op"] == "txn")
    assert [s["op"] for s in txn["then"]] == ["put", "get"]
    assert txn["then"][0]["key"] != txn["then"][1]["key"]

    report = _report(cfg, [result]).to_json()
    assert report["ok"] == 2000 and report["requests"] == 2000 and report["errors"] == 0
    assert report["throughput"] > 0
    assert set(report["ops"]) == {"put", "get", "txn"}
    lat = report["latency_us"]
    assert set(lat) == {"min", "mean", "p50", "p90", "p99", "p99_9", "max"}
    assert lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p99_9"] <= lat["max"]
    json.dumps(report)  # serialisable


async def test_dsnode_error_accounting() -> None:
    fake = FakeConfig(fail_every=4, fail_code="overloaded")
    async with serve(lambda: FakeDsnode(fake)) as port:
        cfg = _config(port, requests=1000)
        result = await run_process(cfg, plan_shards(cfg)[0])
    assert result.ok["put"] == 750
    assert result.errors["put"] == {"overloaded": 250}
    report = _report(cfg, [result]).to_json()
    assert report["errors"] == 250 and report["errors_by_code"] == {"overloaded": 250}
    assert report["ops"]["put"]["errors_by_code"] == {"overloaded": 250}
    assert report["requests"] == 1000
    assert decode_histogram(result.histograms["put"]).get_total_count() == 750


async def test_dsnode_connection_drops_are_counted_and_reconnected() -> None:
    fake = FakeConfig(drop_after=100)
    async with serve(lambda: FakeDsnode(fake)) as port:
        cfg = _config(port, requests=1500, connections=2, inflight=8)
        result = await run_process(cfg, plan_shards(cfg)[0])
    lost = result.errors["put"].get(CONNECTION_LOST, 0)
    assert result.ok["put"] + lost == 1500
    assert lost > 0
    assert fake.connections > 2  # it reconnected


async def test_run_ends_when_server_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    import dsnode.bench.runner as runner_mod

    monkeypatch.setattr(runner_mod, "RECONNECT_GIVE_UP_S", 0.3)
    fake = FakeConfig(drop_after=50)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeDsnode(fake), "127.0.0.1", 0)
    fake.on_drop = server.close  # stop listening: reconnects are refused from now on
    port = server.sockets[0].getsockname()[1]
    cfg = _config(port, requests=1_000_000, connections=2, inflight=4, connect_timeout=1.0)
    result = await run_process(cfg, plan_shards(cfg)[0])
    await server.wait_closed()
    assert result.connect_errors >= 2
    assert result.last_connect_error is not None
    assert result.errors["put"].get(CONNECTION_LOST, 0) >= 1
    assert result.ok["put"] < 1_000_000


async def test_dsnode_duration_mode_with_warmup() -> None:
    fake = FakeConfig()
    async with serve(lambda: FakeDsnode(fake)) as port:
        cfg = _config(port, requests=None, duration=0.3, warmup=0.2)
        result = await run_process(cfg, plan_shards(cfg)[0])
    assert 0.25 <= result.window_s <= 0.35
    # Warmup requests reached the server but were not recorded.
    assert 0 < result.ok["put"] < fake.counts["put"]


async def test_target_awaitable_api_and_closed_connection() -> None:
    fake = FakeConfig()
    async with serve(lambda: FakeDsnode(fake)) as port:
        t = DsnodeTarget("127.0.0.1", port, TargetOptions(consistency="stale"))
        await t.connect()
        assert await t.put(b"k", b"v") is None
        assert await t.get(b"k") is None
        assert await t.txn([("put", b"a", b"1"), ("get", b"b", None)]) is None
        assert fake.seen[1]["consistency"] == "stale"
        t.close()
        await t.wait_closed()
        assert not t.is_open
        assert await t.put(b"k", b"v") == CONNECTION_LOST


async def test_connect_failure_is_a_bench_error() -> None:
    async with serve(lambda: FakeDsnode(FakeConfig())) as port:
        pass  # now closed: nothing listens on this port
    cfg = _config(port, connect_timeout=2.0)
    with pytest.raises(BenchError, match="cannot connect"):
        await run_process(cfg, plan_shards(cfg)[0])


async def test_redis_target_counts_and_errors() -> None:
    fake = FakeConfig(fail_every=5, fail_code="err")
    async with serve(lambda: FakeRedis(fake)) as port:
        cfg = _config(
            port, target="redis", requests=1000, mix=parse_mix("put=1,get=1"), token="secret"
        )
        result = await run_process(cfg, plan_shards(cfg)[0])
    total_ok = result.ok["put"] + result.ok["get"]
    total_err = sum(sum(e.values()) for e in result.errors.values())
    assert total_ok + total_err == 1000
    assert total_err == fake.counts["put"] // 5 + fake.counts["get"] // 5
    assert set().union(*result.errors.values()) == {"err"}


async def test_redis_txn_and_auth_failure() -> None:
    fake = FakeConfig()
    async with serve(lambda: FakeRedis(fake)) as port:
        cfg = _config(port, target="redis", requests=300, mix=parse_mix("txn=1"), txn_ops=3)
        result = await run_process(cfg, plan_shards(cfg)[0])
        assert result.ok["txn"] == 300 and fake.counts["txn"] == 300
        assert fake.counts["put"] == 600 and fake.counts["get"] == 300
        t = RedisTarget("127.0.0.1", port, TargetOptions(token="wrong"))
        with pytest.raises(Exception, match="wrongpass"):
            await t.connect()


# --------------------------------------------------------------------------- entry points


def test_run_bench_sync_and_cli_json() -> None:
    fake = FakeConfig()
    with serve_in_thread(lambda: FakeDsnode(fake)) as port:
        report = run_bench(_config(port, requests=500))
        assert report.overall.ok == 500
        res = click.testing.CliRunner().invoke(
            bench_command,
            [
                "--endpoints",
                f"127.0.0.1:{port}",
                "--requests",
                "400",
                "--connections",
                "2",
                "--inflight",
                "8",
                "--output",
                "json",
                "--mix",
                "put=1,get=1",
            ],
        )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["requests"] == 400 and out["ok"] == 400
    assert out["config"]["connections"] == 2 and out["config"]["inflight"] == 8
    assert out["config"]["mix"] == {"put": 1.0, "get": 1.0, "txn": 0.0}
    assert set(out["ops"]) == {"put", "get"}
    assert out["server"]["node_id"] == "fake"
    assert decode_histogram(out["histograms"]["put"]).get_total_count() == out["ops"]["put"]["ok"]


def test_cli_text_and_usage_errors() -> None:
    fake = FakeConfig(fail_every=10, fail_code="unavailable")
    runner = click.testing.CliRunner()
    with serve_in_thread(lambda: FakeRedis(fake)) as port:
        res = runner.invoke(
            bench_command,
            [
                "--target",
                "redis",
                "--endpoints",
                f"127.0.0.1:{port}",
                "--requests",
                "200",
                "--no-progress",
            ],
        )
    assert res.exit_code == 0, res.output
    assert "ops/s" in res.stdout and "errors by code: unavailable=20" in res.stdout
    bad = runner.invoke(bench_command, ["--duration", "1", "--requests", "1", "--endpoints", "h:1"])
    assert bad.exit_code == 2 and "not both" in bad.output
    bad = runner.invoke(bench_command, ["--mix", "put=0"])
    assert bad.exit_code == 2


def test_cli_inherits_group_settings() -> None:
    """Registered under a group that stores endpoints/output in ctx.obj (like ``dsnode``)."""

    @dataclass(frozen=True)
    class Settings:
        endpoints: str
        token: str | None
        output: str

    @click.group()
    @click.option("--endpoints", default="127.0.0.1:1")
    @click.option("--output", default="text")
    @click.pass_context
    def group(ctx: click.Context, endpoints: str, output: str) -> None:
        ctx.obj = Settings(endpoints, None, output)

    group.add_command(bench_command)
    fake = FakeConfig()
    with serve_in_thread(lambda: FakeDsnode(fake)) as port:
        res = click.testing.CliRunner().invoke(
            group,
            ["--endpoints", f"127.0.0.1:{port}", "--output", "json", "bench", "--requests", "50"],
        )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["ok"] == 50


def test_multiprocess_merge() -> None:
    fake = FakeConfig()
    with serve_in_thread(lambda: FakeDsnode(fake)) as port:
        report = run_bench(_config(port, requests=1001, processes=2, connections=4))
    assert report.processes == 2
    assert report.overall.ok == 1001 and fake.counts["put"] == 1001
    assert report.overall.histogram.get_total_count() == 1001
    assert report.to_json()["ops"]["put"]["ok"] == 1001


def test_python_dash_m_entry_point() -> None:
    import subprocess
    import sys

    res = subprocess.run(
        [sys.executable, "-m", "dsnode.bench", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0 and "--inflight" in res.stdout
    msgpack.packb({})  # the bench depends on msgpack being importable
