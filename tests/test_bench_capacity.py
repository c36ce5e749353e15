"""Tests for the capacity-per-core figure and the request routes of ``dsnode bench``.

Pure parts (CPU arithmetic and its formatting, the ring map, the refresh limit) are
tested directly; the routing choice, forwarded counting and the unreachable-node path
run the real load generator against in-test fake nodes that know which node leads
each partition, answer ``forwarded: true`` for keys they do not lead, and charge a
fixed amount of CPU per put they serve.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import click.testing
import pytest
from bench_scripts import REPO, load_bench_script
from test_bench import FakeConfig, FakeDsnode, serve_in_thread

from dsnode.bench.cli import bench_command
from dsnode.bench.cpu import CpuSample, capacity_figures, read_cpu, sample_cluster
from dsnode.bench.routing import RefreshLimiter, RingMap, RingMapError, route_summary
from dsnode.bench.runner import BenchConfig, BenchError, plan_shards, run_bench, run_process
from dsnode.bench.targets import TargetOptions
from dsnode.core.ring.hashing import partition_of
from dsnode.wire.framing import FrameDecoder, pack_frame, unpack_payload

pytestmark = pytest.mark.timeout(60)

#: CPU seconds a fake node charges itself per put it serves.
CPU_PER_PUT = 0.001


# --------------------------------------------------------------------------- CPU arithmetic


def _sample(cpu: dict[str, float], unreachable: dict[str, str] | None = None) -> CpuSample:
    members = {n: f"127.0.0.1:{7000 + i}" for i, n in enumerate(sorted({*cpu, *(unreachable or {})}))}
    return CpuSample(cpu=dict(cpu), unreachable=dict(unreachable or {}), members=members)


def test_busiest_node_cpu_per_1k_puts_and_projection() -> None:
    """The figure is the busiest node's CPU delta per 1,000 acked puts; 1000 / it is
    the puts/s one core per node would carry."""
    before = _sample({"n1": 10.0, "n2": 20.0, "n3": 5.0})
    after = _sample({"n1": 12.0, "n2": 20.5, "n3": 6.0})
    cap = capacity_figures(before, after, acked_puts=4000)
    assert cap.cpu_s == {"n1": 2.0, "n2": 0.5, "n3": 1.0}
    assert cap.busiest == "n1"
    assert cap.cpu_s_per_1k_puts == pytest.approx(0.5)
    assert cap.puts_per_s_per_core == pytest.approx(2000.0)
    assert cap.notes == ()
    assert cap.to_json() == {
        "cpu_s": {"n1": 2.0, "n2": 0.5, "n3": 1.0},
        "acked_puts": 4000,
        "busiest_node": "n1",
        "busiest_cpu_s_per_1k_puts": 0.5,
        "projected_puts_per_s_per_core": 2000.0,
        "notes": [],
    }
    assert cap.render_text() == [
        "cpu seconds per node: n1 2.00, n2 0.50, n3 1.00",
        "busiest node n1: 0.500 cpu s per 1,000 acked puts (4,000 puts) -> 2,000 puts/s "
        "with one core per node",
    ]


def test_mixed_load_keeps_the_figure_and_says_what_the_cpu_covers() -> None:
    cap = capacity_figures(_sample({"n1": 0.0}), _sample({"n1": 1.0}), 500, other_acked=1500)
    assert cap.cpu_s_per_1k_puts == pytest.approx(2.0)
    assert cap.notes == (
        "the CPU also covers 1,500 acked gets/txns: the figure is per put, not for puts "
        "alone (use --mix put=1)",
    )


def test_unreachable_node_is_reported_and_the_busiest_figure_skipped() -> None:
    """A node we could not read may have been the busiest: no figure, but a note,
    and the nodes we did read still show their CPU."""
    before = _sample({"n1": 1.0, "n2": 1.0, "n3": 1.0})
    after = _sample({"n1": 2.0, "n2": 1.5}, unreachable={"n3": "127.0.0.1:7002: timed out"})
    cap = capacity_figures(before, after, acked_puts=1000)
    assert cap.cpu_s == {"n1": 1.0, "n2": 0.5, "n3": None}
    assert cap.busiest is None and cap.cpu_s_per_1k_puts is None
    assert cap.puts_per_s_per_core is None
    assert cap.notes == (
        "node n3 could not be read after the run (127.0.0.1:7002: timed out)",
        "busiest-node figure skipped: not every node was measured",
    )
    text = cap.render_text()
    assert text[0] == "cpu seconds per node: n1 1.00, n2 0.50, n3 ?"
    assert text[1:] == [f"cpu: {n}" for n in cap.notes]
    assert cap.to_json()["projected_puts_per_s_per_core"] is None


@pytest.mark.parametrize(
    ("before", "after", "acked", "note"),
    [
        ({"n1": 5.0}, {"n1": 0.2}, 100, "node n1: cpu_seconds went backwards (5.0 -> 0.2); restarted?"),
        ({"n1": 1.0}, {"n1": 2.0}, 0, "busiest-node figure skipped: no puts were acknowledged"),
        ({"n1": 1.0}, {"n1": 1.0}, 100, "busiest-node figure skipped: no CPU time was measured"),
        ({}, {}, 100, "no cluster members known"),
    ],
)
def test_capacity_figure_skipped_with_a_reason(
    before: dict[str, float], after: dict[str, float], acked: int, note: str
) -> None:
    cap = capacity_figures(_sample(before), _sample(after), acked)
    assert cap.cpu_s_per_1k_puts is None and cap.puts_per_s_per_core is None
    assert note in cap.notes


async def test_read_cpu_turns_failures_into_notes() -> None:
    """Per-node status failures (refused, error answer, no cpu_seconds) never raise."""
    from dsnode.bench.targets import TargetError

    async def status(host: str, port: int, options: TargetOptions) -> dict[str, Any]:
        if port == 1:
            return {"ok": True, "cpu_seconds": 3.5}
        if port == 2:
            raise ConnectionRefusedError("refused")
        if port == 3:
            raise TargetError("unauthenticated", "status failed")
        return {"ok": True}

    members = {"a": "h:1", "b": "h:2", "c": "h:3", "d": "h:4", "e": "no-port"}
    sample = await read_cpu(members, TargetOptions(), status)
    assert sample.cpu == {"a": 3.5}
    assert set(sample.unreachable) == {"b", "c", "d", "e"}
    assert "refused" in sample.unreachable["b"]
    assert "unauthenticated" in sample.unreachable["c"]
    assert "cpu_seconds" in sample.unreachable["d"]
    assert "bad member address" in sample.unreachable["e"]

    async def no_members(host: str, port: int, options: TargetOptions) -> dict[str, Any]:
        return {"ok": True, "members": []}

    got, why = await sample_cluster("h", 9, TargetOptions(), status=no_members)
    assert got is None and why is not None and "member list from h:9" in why


# --------------------------------------------------------------------------- ring map


def _ring_reply(leaders: list[str | None], addrs: dict[str, str], epoch: int = 1) -> dict[str, Any]:
    return {
        "ok": True,
        "partitions": len(leaders),
        "replication": 3,
        "epoch": epoch,
        "members": [{"node_id": n, "addr": a} for n, a in addrs.items()],
        "map": [
            {"id": i, "replicas": sorted(addrs), "leader": ld} for i, ld in enumerate(leaders)
        ],
    }


def test_ring_map_routes_a_key_to_its_partition_leader() -> None:
    addrs = {"n1": "127.0.0.1:1", "n2": "127.0.0.1:2", "n3": "[::1]:3"}
    leaders: list[str | None] = ["n1", "n2", "n3", None, "n2", "n1", "n3", "n2"]
    ring = RingMap.from_reply(_ring_reply(leaders, addrs, epoch=7))
    assert (ring.partitions, ring.replication, ring.epoch) == (8, 3, 7)
    for i in range(200):
        key = b"bench/k%05d" % i
        assert ring.partition(key) == partition_of(key, 8)
        assert ring.leader_of(key) == leaders[partition_of(key, 8)]
    assert "P=8 R=3 epoch 7, 3 members, 7 partitions with a leader" == ring.describe()


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        ({"partitions": 0}, "partitions"),
        ({"partitions": True}, "partitions"),
        ({"replication": "3"}, "replication"),
        ({"epoch": None}, "epoch"),
        ({"members": []}, "members"),
        ({"members": [{"node_id": "n1"}]}, "node_id"),
        ({"members": [{"node_id": "n1", "addr": "nohostport"}]}, "bad member address"),
        ({"map": {}}, "'map'"),
        ({"map": [{"id": 2, "leader": "n1"}]}, r"\[0, 2\)"),
        ({"map": [{"id": 0, "leader": "n9"}]}, "not a member"),
    ],
)
def test_ring_map_rejects_malformed_answers(patch: dict[str, Any], match: str) -> None:
    reply = {**_ring_reply(["n1", "n1"], {"n1": "127.0.0.1:1"}), **patch}
    with pytest.raises(RingMapError, match=match):
        RingMap.from_reply(reply)


def test_refresh_limiter_allows_one_fetch_at_a_time_and_per_interval() -> None:
    lim = RefreshLimiter(1.0)
    assert lim.try_start(100.0)
    assert not lim.try_start(100.5)  # one in flight
    lim.finished()
    assert not lim.try_start(100.9)  # too soon after the last start
    assert lim.try_start(101.0)
    lim.finished()
    with pytest.raises(ValueError):
        RefreshLimiter(-1)


def test_route_summary_share() -> None:
    from dsnode.bench.routing import RouteCounts, render_routing

    s = route_summary("one-node", None, RouteCounts(answers=400, forwarded=100))
    assert s["forwarded_share"] == 0.25
    assert render_routing(s) == ["route: one-node; forwarded 100 of 400 answers (25.0%)"]
    s = route_summary("ring", "fell back", RouteCounts(ring_refreshes=2, ring_refresh_errors=1))
    assert s["forwarded_share"] is None
    assert render_routing(s) == [
        "route: ring; no answers recorded; map fetched again 2 time(s) (1 failed)",
        "note: fell back",
    ]


# --------------------------------------------------------------------------- fake cluster


@dataclass
class FakeCluster:
    """Shared state of fake partitioned nodes: the true leaders, the ring answers."""

    leaders: list[str | None]
    ids: list[str]
    addrs: dict[str, str] = field(default_factory=dict)
    ring_epochs: list[list[str | None]] = field(default_factory=list)  # answers, in order
    ring_requests: int = 0
    ring_supported: bool = True
    extra_members: dict[str, str] = field(default_factory=dict)  # listed, never started
    seen: dict[str, list[tuple[bytes, bool]]] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)

    def true_leader(self, key: bytes) -> str | None:
        return self.leaders[partition_of(key, len(self.leaders))]


class FramedFake(asyncio.Protocol):
    """A fake dsnode node: every request frame is answered with ``answer(request)``."""

    def __init__(self) -> None:
        self.dec = FrameDecoder()
        self.transport: asyncio.Transport | None = None

    def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        out = [pack_frame(self.answer(cast(dict, unpack_payload(p)))) for p in self.dec.feed(data)]
        assert self.transport is not None
        self.transport.write(b"".join(out))


class FakeNode(FramedFake):
    def __init__(self, cluster: FakeCluster, node_id: str) -> None:
        super().__init__()
        self.cluster = cluster
        self.node_id = node_id

    def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        c, op, rid = self.cluster, req["op"], req["id"]
        if op == "hello":
            return {"id": rid, "ok": True, "node_id": self.node_id}
        if op == "status":
            members = {**c.addrs, **c.extra_members}
            return {
                "id": rid,
                "ok": True,
                "node_id": self.node_id,
                "cpu_seconds": round(c.cpu[self.node_id], 6),
                "members": [{"node_id": n, "addr": a, "state": "alive"} for n, a in members.items()],
            }
        if op == "ring" and c.ring_supported:
            leaders = c.ring_epochs[min(c.ring_requests, len(c.ring_epochs) - 1)]
            c.ring_requests += 1
            members = {**c.addrs, **c.extra_members}
            return {"id": rid, **_ring_reply(leaders, members, epoch=c.ring_requests)}
        if op in ("put", "get"):
            forwarded = c.true_leader(req["key"]) != self.node_id
            c.seen[self.node_id].append((req["key"], forwarded))
            if op == "put":
                c.cpu[self.node_id] += CPU_PER_PUT
            return {"id": rid, "ok": True, "version": 1, **({"forwarded": True} if forwarded else {})}
        err = {"code": "unknown_op", "message": op, "retryable": False, "indeterminate": False}
        return {"id": rid, "ok": False, "error": err}


@contextlib.contextmanager
def fake_cluster(
    leaders: list[str | None], nodes: int = 3, ring_epochs: list[list[str | None]] | None = None
) -> Iterator[FakeCluster]:
    ids = [f"n{i + 1}" for i in range(nodes)]
    c = FakeCluster(leaders=leaders, ids=ids, ring_epochs=ring_epochs or [leaders])
    with contextlib.ExitStack() as stack:
        for nid in ids:
            c.seen[nid] = []
            c.cpu[nid] = 100.0
            port = stack.enter_context(serve_in_thread(lambda nid=nid: FakeNode(c, nid)))
            c.addrs[nid] = f"127.0.0.1:{port}"
        yield c


def _leaders(p: int, ids: list[str]) -> list[str | None]:
    return [ids[i % len(ids)] for i in range(p)]


def _cfg(c: FakeCluster, **kw: Any) -> BenchConfig:
    base: dict[str, Any] = {
        "endpoints": tuple(c.addrs[n] for n in c.ids),
        "connections": 4,
        "inflight": 16,
        "requests": 1200,
        "keyspace": 500,
    }
    base.update(kw)
    return BenchConfig(**base).validated()


# --------------------------------------------------------------------------- routing


async def test_ring_route_sends_each_request_to_its_partition_leader() -> None:
    """With a current map every request goes straight to its partition's leader and
    nothing is forwarded; keys of a leaderless partition go to the connection's home
    endpoint (here n2), which forwards them."""
    leaders = _leaders(16, ["n1", "n2", "n3"])
    leaders[5] = None
    with fake_cluster(leaders) as c:
        cfg = _cfg(
            c, endpoints=(c.addrs["n2"],), route="ring", mix=(("put", 1.0), ("get", 1.0), ("txn", 0.0))
        )
        result = await run_process(cfg, plan_shards(cfg)[0])
    assert sum(result.ok.values()) == 1200
    leaderless = 0
    for nid, seen in c.seen.items():
        assert seen, f"{nid} got no requests"
        for key, forwarded in seen:
            p = partition_of(key, 16)
            if leaders[p] is None:
                leaderless += 1
                assert nid == "n2" and forwarded
            else:
                assert nid == leaders[p] and not forwarded
    assert leaderless > 0
    assert result.route_counts["answers"] == 1200
    assert result.route_counts["forwarded"] == leaderless


async def test_ring_route_sends_an_unreachable_leaders_keys_to_the_home_endpoint() -> None:
    """A member that cannot be connected costs no failed requests: its partitions go
    to the home endpoint, which forwards them."""
    leaders = _leaders(12, ["n1", "n2", "n3", "n4"])
    with fake_cluster(leaders) as c:
        with serve_in_thread(lambda: FakeDsnode(FakeConfig())) as gone_port:
            pass  # now closed: nothing listens there
        c.extra_members["n4"] = f"127.0.0.1:{gone_port}"
        cfg = _cfg(c, endpoints=(c.addrs["n1"],), route="ring", connect_timeout=2.0)
        result = await run_process(cfg, plan_shards(cfg)[0])
    assert result.ok["put"] == 1200 and result.errors["put"] == {}
    to_n4 = [k for k, _ in c.seen["n1"] if leaders[partition_of(k, 12)] == "n4"]
    assert to_n4 and all(f == (leaders[partition_of(k, 12)] == "n4") for k, f in c.seen["n1"])
    for nid in ("n2", "n3"):
        assert c.seen[nid] and all(leaders[partition_of(k, 12)] == nid for k, _ in c.seen[nid])
    assert result.route_counts["forwarded"] == len(to_n4)


async def test_one_node_route_counts_forwarded_answers() -> None:
    """Everything goes to the first endpoint, which forwards the keys it does not
    lead; the bench counts exactly the answers that say so."""
    leaders = _leaders(64, ["n1", "n2", "n3"])
    with fake_cluster(leaders) as c:
        cfg = _cfg(c, route="one-node")
        result = await run_process(cfg, plan_shards(cfg)[0])
    assert len(c.seen["n1"]) == 1200 and c.seen["n2"] == [] and c.seen["n3"] == []
    expected = sum(1 for _, f in c.seen["n1"] if f)
    assert 0 < expected < 1200
    assert result.route_counts["answers"] == 1200
    assert result.route_counts["forwarded"] == expected
    assert result.acked_all == {"put": 1200}


async def test_ring_route_refreshes_a_stale_map_after_forwarded_answers() -> None:
    """The first map says n1 leads everything; answers come back forwarded, the bench
    fetches the map again and sends the rest straight to the leaders."""
    leaders = _leaders(32, ["n1", "n2", "n3"])
    stale: list[str | None] = ["n1"] * 32
    with fake_cluster(leaders, ring_epochs=[stale, leaders]) as c:
        cfg = _cfg(c, route="ring", requests=3000, connections=2, inflight=8)
        result = await run_process(cfg, plan_shards(cfg)[0])
    counts = result.route_counts
    assert counts["ring_refreshes"] >= 1 and counts["ring_refresh_errors"] == 0
    assert c.ring_requests == 1 + counts["ring_refreshes"]  # the start, then the refreshes
    assert 0 < counts["forwarded"] < 3000
    assert counts["forwarded"] == sum(f for seen in c.seen.values() for _, f in seen)
    # Once the fresh map is in, nothing more is forwarded: n2 and n3 only ever see their own.
    for nid in ("n2", "n3"):
        assert c.seen[nid] and not any(f for _, f in c.seen[nid])
    assert not any(f for _, f in c.seen["n1"][-100:])


def test_route_validation() -> None:
    with pytest.raises(BenchError, match="--route must be one of"):
        BenchConfig(endpoints=("h:1",), route="nearest").validated()
    with pytest.raises(BenchError, match="needs --target dsnode"):
        BenchConfig(target="redis", endpoints=("h:1",), route="ring").validated()
    cfg = BenchConfig(endpoints=("a:1", "b:2", "c:3"), connections=6, route="one-node")
    hosts = {h for s in plan_shards(cfg.validated()) for h, _, _ in s.conns}
    assert hosts == {"a"}


# --------------------------------------------------------------------------- run_bench / CLI


def test_run_bench_reports_cpu_per_node_and_capacity() -> None:
    """Each fake node charges CPU_PER_PUT per put it serves, so the figure is exact:
    the busiest node served the most puts."""
    leaders = _leaders(64, ["n1", "n2", "n3"])
    with fake_cluster(leaders) as c:
        report = run_bench(_cfg(c, route="ring", requests=2000))
    served = {n: len(s) for n, s in c.seen.items()}
    assert sum(served.values()) == 2000
    cap = report.capacity
    assert cap is not None
    for nid, n in served.items():
        assert cap.cpu_s[nid] == pytest.approx(n * CPU_PER_PUT, abs=1e-6)
    busiest = max(served, key=lambda n: served[n])
    assert cap.busiest == busiest
    assert cap.acked_puts == 2000
    assert cap.cpu_s_per_1k_puts == pytest.approx(served[busiest] * CPU_PER_PUT / 2, rel=1e-4)
    assert cap.puts_per_s_per_core == pytest.approx(2000 / (served[busiest] * CPU_PER_PUT), rel=1e-4)
    assert report.routing is not None
    assert report.routing["route"] == "ring" and report.routing["forwarded"] == 0
    text = report.render_text()
    assert "route: ring; forwarded 0 of 2,000 answers (0.0%)" in text
    assert f"busiest node {busiest}: " in text


def test_unreachable_member_is_noted_and_the_run_completes() -> None:
    leaders = _leaders(8, ["n1", "n2", "n3"])
    with fake_cluster(leaders) as c:
        with serve_in_thread(lambda: FakeDsnode(FakeConfig())) as gone_port:
            pass  # now closed: nothing listens there
        c.extra_members["n4"] = f"127.0.0.1:{gone_port}"
        res = click.testing.CliRunner().invoke(
            bench_command,
            ["--endpoints", c.addrs["n1"], "--requests", "300", "--route", "one-node",
             "--output", "json", "--connect-timeout", "2"],  # fmt: skip
        )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["ok"] == 300
    cap = out["capacity"]
    assert cap["cpu_s"]["n4"] is None and cap["cpu_s"]["n1"] == pytest.approx(0.3, abs=1e-6)
    assert cap["projected_puts_per_s_per_core"] is None
    assert any("node n4 could not be read before the run" in n for n in cap["notes"])
    assert out["routing"]["route"] == "one-node"


def test_server_without_ring_op_falls_back_with_a_note() -> None:
    """An unpartitioned server answers unknown_op to ring and to status here: an
    explicit --route ring runs as one-node, auto as spread, and the CPU figure is
    skipped with the reason; the run itself succeeds."""
    fake = FakeConfig()
    runner = click.testing.CliRunner()
    with serve_in_thread(lambda: FakeDsnode(fake)) as port:
        ep = f"127.0.0.1:{port}"
        ring = runner.invoke(
            bench_command, ["--endpoints", ep, "--requests", "200", "--route", "ring", "--no-progress"]
        )
        auto = runner.invoke(
            bench_command, ["--endpoints", ep, "--requests", "200", "--output", "json"]
        )
    assert ring.exit_code == 0, ring.output
    assert "route: one-node; forwarded 0 of 200 answers (0.0%)" in ring.stdout
    assert "answered unknown_op to the ring op" in ring.stdout
    assert "--route ring ran as --route one-node" in ring.stdout
    assert "cpu: cannot read the member list" in ring.stdout
    assert auto.exit_code == 0, auto.output
    out = json.loads(auto.stdout)
    assert out["routing"]["route"] == "spread" and out["config"]["route"] == "spread"
    assert "--route auto ran as --route spread" in out["routing"]["note"]
    assert out["capacity"]["projected_puts_per_s_per_core"] is None


def test_no_cpu_flag_skips_the_cpu_section() -> None:
    leaders = _leaders(8, ["n1", "n2", "n3"])
    with fake_cluster(leaders) as c:
        res = click.testing.CliRunner().invoke(
            bench_command,
            ["--endpoints", c.addrs["n1"], "--requests", "100", "--no-cpu", "--output", "json"],
        )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["capacity"] is None and out["routing"]["route"] == "ring"


# --------------------------------------------------------------------------- bench/capacity.py



def _report(puts: int, projected: float | None, route: str, share: float, note: str | None):
    cap = {"acked_puts": puts, "busiest_cpu_s_per_1k_puts": None if projected is None
           else 1000 / projected, "busiest_node": "n1", "projected_puts_per_s_per_core":
           projected, "notes": []}  # fmt: skip
    routing = {"route": route, "note": note, "forwarded_share": share}
    return {"ops": {"put": {"ok": puts, "throughput": puts / 10}}, "capacity": cap,
            "routing": routing}  # fmt: skip


def test_capacity_script_table_and_ratios() -> None:
    mod = load_bench_script("capacity")
    rows = [
        mod.row_of(3, "ring", _report(30000, 10000.0, "one-node", 0.0, "fell back")),
        mod.row_of(3, "one-node", _report(29000, 9000.0, "one-node", 0.5, None)),
        mod.row_of(6, "ring", _report(31000, 18000.0, "ring", 0.01, None)),
        mod.row_of(6, "one-node", _report(28000, None, "one-node", 0.8, None)),
    ]
    assert rows[0]["ran_as"] == "one-node" and rows[0]["notes"] == ["fell back"]
    assert mod.ratios(rows) == {"ring": (3, 6, 1.8), "one-node": (3, 6, None)}
    lines = mod.render(rows).splitlines()
    assert lines[0].split() == ["nodes", "route", "acked", "puts", "busiest", "cpu", "s/1k",
                                "puts", "puts/s", "per", "core", "forwarded", "wall", "puts/s"]
    assert lines[1].split() == ["3", "ring", "(ran", "as", "one-node)", "30,000", "0.100",
                                "10,000", "0.0%", "3,000"]
    assert lines[4].split()[-4:] == ["n/a", "n/a", "80.0%", "2,800"]
    assert lines[5] == "ratio 6/3 nodes, route ring: 1.80x ok (target >= 1.7x)"
    assert lines[6] == (
        "ratio 6/3 nodes, route one-node: n/a (a projected figure is missing) (target >= 1.7x)"
    )
    args = mod.argparse.Namespace(duration=5.0, warmup=1.0, inflight=64, connections=16,
                                  keyspace=1000, value_size=100)  # fmt: skip
    argv = mod.bench_args(args, "127.0.0.1:1,127.0.0.1:2", "ring")
    assert argv[argv.index("--route") + 1] == "ring" and "--output" in argv
    with pytest.raises(mod.argparse.ArgumentTypeError):
        mod.parse_nodes("3,0")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_capacity_script_end_to_end() -> None:
    """Starts real 3- and 6-node clusters: a smoke of the whole script (not in the
    default run)."""
    p = subprocess.run(
        [sys.executable, str(REPO / "bench/capacity.py"), "--duration", "1", "--warmup", "0",
         "--keyspace", "1000"],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert len(lines) == 7 and lines[0].startswith("nodes")
    assert lines[5].startswith("ratio 6/3 nodes, route ring: ")
