"""Tests for the transaction workloads of ``dsnode bench`` (``--txn-partitions``,
``--hot-keys``) and for ``bench/txn_mix.py``'s argument handling and report.

The load generator runs against in-test fake nodes that answer ``ring`` with a
fixed partition map and keep a versioned store: ``get`` returns the version, and
``txn`` compares versions and applies its puts atomically (each fake serves its
requests one at a time, and every fake shares one store). A transfer's compare
fails whenever another transfer changed one of its accounts after it read them;
every Nth txn can be answered ``conflict`` instead.
"""

from __future__ import annotations

import contextlib
import json
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import click.testing
import pytest
from bench_scripts import REPO, load_bench_script
from test_bench import serve_in_thread
from test_bench_capacity import FramedFake, _ring_reply

from dsnode.bench.cli import bench_command
from dsnode.bench.routing import RingMap
from dsnode.bench.runner import BenchConfig, BenchError, hot_key_format, key_format, run_bench
from dsnode.bench.txns import (
    COMPARE_FAILED,
    PartitionSpread,
    SpreadError,
    Transfer,
    balance_of,
    bank_summary,
    render_bank,
)
from dsnode.core.ring.hashing import partition_of

pytestmark = pytest.mark.timeout(60)

P = 16


# --------------------------------------------------------------------------- partition spread


@pytest.mark.parametrize(("partitions", "keys"), [(1, 2), (2, 2), (4, 4), (3, 7)])
def test_spread_draws_distinct_keys_in_exactly_n_partitions(partitions: int, keys: int) -> None:
    fmt = key_format(BenchConfig(keyspace=1000))
    spread = PartitionSpread(fmt, 1000, P, partitions, keys)
    rng = random.Random(7)
    for _ in range(300):
        idxs = spread.draw(rng)
        assert len(idxs) == keys == len(set(idxs))
        assert all(0 <= i < 1000 for i in idxs)
        assert len({partition_of(fmt % i, P) for i in idxs}) == partitions


def test_spread_refuses_what_the_cluster_or_keyspace_cannot_give() -> None:
    fmt = key_format(BenchConfig(keyspace=1000))
    with pytest.raises(SpreadError, match="the cluster has only 16 partitions"):
        PartitionSpread(fmt, 1000, P, 17, 17)
    with pytest.raises(SpreadError, match="--keyspace 2 too small: fewer than 3 of the 16"):
        PartitionSpread(fmt, 2, P, 3, 3)  # 2 keys are in 2 partitions at most


# --------------------------------------------------------------------------- transfer


@dataclass
class ScriptedTarget:
    """A CallTarget whose answers the test gives, in the order it chooses."""

    sent: list[tuple[bytes, dict[str, Any]]] = field(default_factory=list)
    replies: list[Any] = field(default_factory=list)

    def start_call(self, key: bytes, msg: dict[str, Any], reply: Any) -> None:
        self.sent.append((key, msg))
        self.replies.append(reply)


def _transfer(target: ScriptedTarget, accounts: list[bytes], amount: int = 30,
              forwarded: list[bool] | None = None) -> list[tuple[str | None, bool]]:  # fmt: skip
    ended: list[tuple[str | None, bool]] = []
    flags = list(forwarded or [])
    Transfer(target, accounts, amount, "linearizable",
             lambda: flags.pop(0) if flags else False,
             lambda code, fwd: ended.append((code, fwd))).start()  # fmt: skip
    return ended


def test_transfer_reads_then_compares_the_versions_read_and_keeps_the_total() -> None:
    """The txn compares each account's version with the one its get returned and puts
    balances whose sum is the sum read; it ends only when the txn is answered."""
    t = ScriptedTarget()
    ended = _transfer(t, [b"a", b"b", b"c"], amount=30, forwarded=[False, True, False, False])
    assert [m["op"] for _, m in t.sent] == ["get", "get", "get"] and ended == []
    assert all(m["consistency"] == "linearizable" for _, m in t.sent)
    t.replies[2]({"ok": True, "value": None, "version": 0}, None)
    t.replies[0]({"ok": True, "value": b"100", "version": 7}, None)
    assert len(t.sent) == 3  # still waiting for b
    t.replies[1]({"ok": True, "value": b"5", "version": 9}, None)
    key, txn = t.sent[3]
    assert key == b"a"  # the txn goes where the first account lives
    assert txn["if"] == [{"key": b"a", "version": 7}, {"key": b"b", "version": 9},
                         {"key": b"c", "version": 0}]  # fmt: skip
    assert txn["then"] == [{"op": "put", "key": b"a", "value": b"40"},
                           {"op": "put", "key": b"b", "value": b"35"},
                           {"op": "put", "key": b"c", "value": b"30"}]  # fmt: skip
    assert ended == []
    t.replies[3]({"ok": True, "succeeded": True, "results": []}, None)
    assert ended == [(None, True)]  # committed; one of its answers came back forwarded


def test_transfer_outcomes_failed_compare_and_errors() -> None:
    t = ScriptedTarget()
    ended = _transfer(t, [b"a", b"b"])
    t.replies[0]({"ok": True, "value": b"1", "version": 1}, None)
    t.replies[1]({"ok": True, "value": b"1", "version": 1}, None)
    t.replies[2]({"ok": True, "succeeded": False, "results": []}, None)
    assert ended == [(COMPARE_FAILED, False)]

    t = ScriptedTarget()
    ended = _transfer(t, [b"a", b"b"])
    t.replies[1](None, "conflict")  # a get answered conflict: the transfer ends there
    t.replies[0]({"ok": True, "value": b"1", "version": 1}, None)  # too late, ignored
    assert ended == [("conflict", False)] and len(t.sent) == 2

    t = ScriptedTarget()
    ended = _transfer(t, [b"a", b"b"])
    t.replies[0]({"ok": True, "value": b"1", "version": 1}, None)
    t.replies[1]({"ok": True, "value": b"1", "version": 1}, None)
    t.replies[2](None, "connection_lost")
    assert ended == [("connection_lost", False)]


def test_balance_of_and_bank_summary() -> None:
    assert [balance_of(v) for v in (b"-12", b"x", None, "7")] == [-12, 0, 0, 0]
    s = bank_summary(30, {"conflict": 40, COMPARE_FAILED: 25, "timeout": 5}, 3.0, 10, 2)
    assert s == {"hot_keys": 10, "accounts_per_transfer": 2, "attempts": 100, "committed": 30,
                 "conflicts": 40, "failed_compares": 25, "other_errors": 5, "goodput": 3.0,
                 "conflict_rate": 0.65}  # fmt: skip
    assert render_bank(s) == [
        "bank: 10 hot accounts, 2 per transfer (gets, then a txn with version compares and "
        "puts): 100 attempts, 30 committed -> goodput 3.0 txn/s",
        "bank: 40 conflict answers + 25 failed compares -> conflict rate 65.0%; 5 other errors",
    ]
    assert bank_summary(0, {}, 0.0, 4, 2)["conflict_rate"] is None


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"txn_partitions": 2}, "needs txns in --mix"),
        ({"hot_keys": 4, "target": "redis"}, "--hot-keys needs --target dsnode"),
        ({"txn_partitions": 3, "txn_ops": 2, "mix": (("txn", 1.0),)}, "cannot span"),
        ({"txn_partitions": 2, "hot_keys": 4, "mix": (("txn", 1.0),)}, "not both"),
        ({"hot_keys": 4, "txn_ops": 1, "mix": (("txn", 1.0),)}, "--txn-ops >= 2"),
        ({"hot_keys": 3, "txn_ops": 4, "mix": (("txn", 1.0),)}, "fewer than --txn-ops"),
        ({"hot_keys": 100_000, "key_size": 10, "keyspace": 10, "mix": (("txn", 1.0),)},
         "too small for --hot-keys"),
        ({"txn_partitions": -1}, "must be >= 0"),
    ],
)
def test_txn_workload_options_are_validated(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(BenchError, match=match):
        BenchConfig(**{"endpoints": ("h:1",), **kw}).validated()


# --------------------------------------------------------------------------- fake nodes


@dataclass
class Store:
    """The fakes' shared state: ``key -> (value, version)`` and what they were asked."""

    conflict_every: int = 0  # answer every Nth txn ``conflict`` (no effect)
    data: dict[bytes, tuple[bytes, int]] = field(default_factory=dict)
    version: int = 0
    txns: list[dict[str, Any]] = field(default_factory=list)
    committed: int = 0
    conflicts: int = 0
    compare_failed: int = 0
    ring_requests: int = 0


class FakeTxnNode(FramedFake):
    def __init__(self, store: Store, node_id: str, addrs: dict[str, str]) -> None:
        super().__init__()
        self.store = store
        self.node_id = node_id
        self.addrs = addrs

    def answer(self, req: dict[str, Any]) -> dict[str, Any]:
        s, op, rid = self.store, req["op"], req["id"]
        if op == "hello":
            return {"id": rid, "ok": True, "node_id": self.node_id}
        if op == "ring":
            s.ring_requests += 1
            ids = sorted(self.addrs)
            return {"id": rid, **_ring_reply([ids[i % len(ids)] for i in range(P)], self.addrs)}
        if op == "get":
            value, version = s.data.get(req["key"], (None, 0))
            return {"id": rid, "ok": True, "value": value, "version": version}
        if op == "txn":
            s.txns.append(req)
            if s.conflict_every and len(s.txns) % s.conflict_every == 0:
                s.conflicts += 1
                err = {"code": "conflict", "message": "injected", "retryable": True,
                       "indeterminate": False}  # fmt: skip
                return {"id": rid, "ok": False, "error": err}
            held = all(s.data.get(c["key"], (None, 0))[1] == c["version"] for c in req.get("if", []))
            if not held:
                s.compare_failed += 1
                return {"id": rid, "ok": True, "succeeded": False, "results": []}
            s.version += 1
            for sub in req.get("then", []):
                if sub["op"] == "put":
                    s.data[sub["key"]] = (sub["value"], s.version)
                elif sub["op"] == "delete":
                    s.data.pop(sub["key"], None)
            s.committed += 1
            return {"id": rid, "ok": True, "succeeded": True, "results": []}
        err = {"code": "unknown_op", "message": op, "retryable": False, "indeterminate": False}
        return {"id": rid, "ok": False, "error": err}


@contextlib.contextmanager
def fake_nodes(store: Store, nodes: int = 3) -> Iterator[dict[str, str]]:
    addrs: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        for i in range(nodes):
            nid = f"n{i + 1}"
            port = stack.enter_context(serve_in_thread(lambda nid=nid: FakeTxnNode(store, nid, addrs)))
            addrs[nid] = f"127.0.0.1:{port}"
        yield addrs


@pytest.mark.parametrize(("route", "partitions", "keys"),
                         [("ring", 2, 2), ("one-node", 1, 2), ("spread", 4, 4)])  # fmt: skip
def test_txn_partitions_puts_every_txn_in_exactly_that_many_partitions(
    route: str, partitions: int, keys: int
) -> None:
    """Whatever the route, the map of the ring op decides the keys: every txn the
    nodes saw has its keys in exactly ``--txn-partitions`` partitions."""
    store = Store()
    with fake_nodes(store) as addrs:
        res = click.testing.CliRunner().invoke(
            bench_command,
            ["--endpoints", ",".join(addrs.values()), "--route", route, "--mix", "txn=1",
             "--txn-ops", str(keys), "--txn-partitions", str(partitions), "--requests", "300",
             "--keyspace", "2000", "--no-cpu", "--output", "json"],  # fmt: skip
        )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["ops"]["txn"]["ok"] == 300 and out["config"]["txn_partitions"] == partitions
    assert out["bank"] is None
    assert len(store.txns) == 300 and store.ring_requests >= 1
    for txn in store.txns:
        subs = txn["then"]
        assert len(subs) == keys == len({s["key"] for s in subs})
        assert len({partition_of(s["key"], P) for s in subs}) == partitions


def test_hot_keys_runs_bank_transfers_and_reports_goodput_and_conflict_rate() -> None:
    """Transfers among 5 accounts, 16 in flight: the fakes see compare-and-put txns on
    the hot accounts only; committed, failed compares and conflict answers are counted
    exactly as the nodes gave them, and the balances still sum to zero."""
    store = Store(conflict_every=7)
    with fake_nodes(store) as addrs:
        res = click.testing.CliRunner().invoke(
            bench_command,
            ["--endpoints", ",".join(addrs.values()), "--mix", "txn=1", "--hot-keys", "5",
             "--requests", "400", "--inflight", "16", "--connections", "4", "--no-cpu",
             "--output", "json"],  # fmt: skip
        )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    bank = out["bank"]
    assert bank["attempts"] == 400 == len(store.txns)
    assert bank["committed"] == store.committed == out["ops"]["txn"]["ok"] > 0
    assert bank["failed_compares"] == store.compare_failed > 0
    assert bank["conflicts"] == store.conflicts == 400 // 7
    assert bank["other_errors"] == 0
    assert bank["conflict_rate"] == round((store.compare_failed + store.conflicts) / 400, 4)
    assert bank["goodput"] == pytest.approx(out["ops"]["txn"]["throughput"], abs=0.1)
    hot = {hot_key_format(BenchConfig()) % i for i in range(5)}
    assert b"bench/h000000003" in hot
    for txn in store.txns:
        assert len(txn["if"]) == 2 and {c["key"] for c in txn["if"]} <= hot
        assert [c["key"] for c in txn["if"]] == [p["key"] for p in txn["then"]]
    assert set(store.data) <= hot
    assert sum(int(v) for v, _ in store.data.values()) == 0


def test_hot_keys_text_report_and_cleanup_of_the_accounts() -> None:
    store = Store()
    with fake_nodes(store, nodes=1) as addrs:
        cfg = BenchConfig(endpoints=tuple(addrs.values()), mix=(("txn", 1.0),), hot_keys=3,
                          requests=50, cpu=False, cleanup=True)  # fmt: skip
        report = run_bench(cfg)
    text = report.render_text()
    assert "bank: 3 hot accounts, 2 per transfer" in text
    assert f"{report.bank['committed']} committed" in text  # type: ignore[index]
    assert report.cleanup == {"deleted": 3, "errors": 0}
    assert store.data == {}  # --cleanup deleted the accounts too


# --------------------------------------------------------------------------- bench/txn_mix.py


def _mod() -> Any:
    return load_bench_script("txn_mix")


def test_txn_mix_arguments_and_defaults() -> None:
    mod = _mod()
    args = mod.parse_args([])
    assert (args.duration, args.warmup, args.inflight, args.partitions) == (8.0, 1.0, 64, 64)
    assert (args.hot_keys, args.txn_prepare_timeout_ms, args.fault) == (10, 3000, True)
    args = mod.parse_args(["--duration", "2", "--hot-keys", "4", "--no-fault",
                           "--txn-prepare-timeout-ms", "500"])  # fmt: skip
    assert (args.duration, args.hot_keys, args.fault, args.txn_prepare_timeout_ms) == (
        2.0, 4, False, 500)
    assert mod.cluster_env(args)["DSNODE_TXN_PREPARE_TIMEOUT_MS"] == "500"
    for bad in (["--duration", "0"], ["--hot-keys", "1"], ["--warmup", "-1"],
                ["--inflight", "x"]):  # fmt: skip
        with pytest.raises(SystemExit):
            mod.parse_args(bad)
    argv = mod.bench_args(args, "127.0.0.1:1", mod.PHASES[2][1])
    assert argv[argv.index("--txn-partitions") + 1] == "2"
    assert argv[argv.index("--duration") + 1] == "2.0" and "--output" in argv
    assert mod.hot_args(args)[-2:] == ("--hot-keys", "4")
    # the phase's own options parse with the bench's CLI
    res = click.testing.CliRunner().invoke(bench_command, [*argv, "--help"])
    assert res.exit_code == 0


def _json_report(op: str, ok: int, rate: float, p50: int, bank: dict[str, Any] | None = None,
                 errors: dict[str, int] | None = None, cpu: float | None = 1.0,
                 ) -> dict[str, Any]:  # fmt: skip
    r = {"ok": ok, "throughput": rate, "errors_by_code": errors or {},
         "latency_us": {"p50": p50, "p99": p50 * 3}}  # fmt: skip
    capacity = {"cpu_s": {"n1": cpu, "n2": 1.0, "n3": 1.0}}
    return {"ops": {op: r}, "bank": bank, "capacity": capacity, "acked_all": {op: ok + 1000}}


def test_txn_mix_table_ratios_and_verdict() -> None:
    mod = _mod()
    bank = bank_summary(20, {"conflict": 10, COMPARE_FAILED: 70}, 2.5, 10, 2)
    rows = [
        mod.row_of("puts", _json_report("put", 8000, 1000.0, 20_000)),  # 3 s / 9,000 ops
        mod.row_of(mod.PHASES[1][0], _json_report("txn", 6400, 800.0, 25_000, cpu=None)),
        mod.row_of(mod.TARGET_PHASE, _json_report("txn", 2400, 300.0, 900, errors={"conflict": 2},
                                                  cpu=4.8)),  # 6.8 s / 3,400 ops  # fmt: skip
        mod.row_of(mod.PHASES[3][0], _json_report("txn", 1600, 200.0, 120_000)),
        mod.row_of("bank, 10 hot accounts", _json_report("txn", 20, 2.5, 400_000, bank)),
    ]
    assert mod.ratios(rows[:4]) == {mod.PHASES[1][0]: 0.8, mod.TARGET_PHASE: 0.3,
                                    mod.PHASES[3][0]: 0.2}  # fmt: skip
    assert rows[0]["cpu_ms_per_op"] == pytest.approx(1 / 3)
    assert rows[1]["cpu_ms_per_op"] is None  # a node could not be read
    assert mod.ratios(rows[:4], "cpu_ms_per_op") == pytest.approx(
        {mod.PHASES[1][0]: None, mod.TARGET_PHASE: 6.0, mod.PHASES[3][0]: 3 / 2.6 * 3})
    fault = {"resolved_s": 3.25, "txn_prepare_timeout_ms": 3000, "prepared_at_death": 2,
             "outcome": "aborted"}  # fmt: skip
    lines = mod.render(rows, fault).splitlines()
    assert lines[0].split() == ["phase", "ok", "per", "s", "p50", "p99", "x", "puts", "cpu",
                                "ms/op", "x", "put", "cpu", "errors"]  # fmt: skip
    assert lines[1].split() == ["puts", "8,000", "1,000", "20.00ms", "60.00ms", "1.00x", "0.333",
                                "1.00x", "0"]  # fmt: skip
    assert lines[2].split()[-4:] == ["0.80x", "n/a", "n/a", "0"]
    assert lines[3].split() == ["txn,", "2", "partitions", "(2", "keys)", "2,400", "300", "900us",
                                "2.70ms", "0.30x", "2.000", "6.00x", "conflict=2"]  # fmt: skip
    assert lines[5] == ("ratio txn, 2 partitions (2 keys) / puts: 0.30x below target "
                        "(target >= 0.33x)")  # fmt: skip
    assert lines[6] == ("bank, 10 hot accounts, 2 per transfer: 100 attempts, 20 committed, "
                        "goodput 2.5 txn/s (p50 400.00ms, p99 1200.00ms); conflict rate 80.0% "
                        "(10 conflict answers + 70 failed compares)")  # fmt: skip
    assert lines[7] == ("coordinator SIGKILLed before its decision: participants resolved "
                        "3.25 s after its death (txn_prepare_timeout_ms 3000; prepared at "
                        "death: 2; outcome: aborted)")  # fmt: skip
    assert "not within the limit" in mod.render(rows[:1], {**fault, "resolved_s": None})


def test_txn_mix_fault_keys_avoid_the_faulty_nodes_partitions() -> None:
    mod = _mod()
    addrs = {"n1": "127.0.0.1:1", "n2": "127.0.0.1:2", "n3": "127.0.0.1:3"}
    leaders: list[str | None] = ["n1", "n1", None, "n2", "n1", "n3", "n2", "n1"] * 2
    ring = RingMap.from_reply(_ring_reply(leaders, addrs))
    a, b = mod.fault_keys(ring, "n1")
    pa, pb = ring.partition(a), ring.partition(b)
    assert pa != pb and leaders[pa] in ("n2", "n3") and leaders[pb] in ("n2", "n3")
    only_n1 = RingMap.from_reply(_ring_reply(["n1"] * 4, addrs))
    with pytest.raises(SystemExit, match="no two partitions"):
        mod.fault_keys(only_n1, "n1")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_txn_mix_script_end_to_end() -> None:
    """Starts real clusters, the second with the fault point: a smoke of the whole
    script (not in the default run)."""
    p = subprocess.run(
        [sys.executable, str(REPO / "bench/txn_mix.py"), "--duration", "1", "--warmup", "0",
         "--keyspace", "2000", "--partitions", "16", "--txn-prepare-timeout-ms", "500"],
        capture_output=True, text=True, timeout=280, cwd=REPO,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert len(lines) == 8 and lines[0].startswith("phase"), p.stdout
    assert lines[5].startswith("ratio txn, 2 partitions (2 keys) / puts: ")
    assert lines[6].startswith("bank, 10 hot accounts, 2 per transfer: ")
    assert lines[7].startswith("coordinator SIGKILLed before its decision: participants "
                               "resolved ") and lines[7].endswith("outcome: aborted)")  # fmt: skip
