#!/usr/bin/env python3
"""Cross-partition transactions (issue 9) against plain puts, in one invocation.

On a 3-node cluster (P = 64, R = 3 by default; ``DSNODE_PARTITIONS`` /
``DSNODE_REPLICATION`` / ``DSNODE_TXN_PREPARE_TIMEOUT_MS`` for every node), with
``--inflight`` requests in flight (default 64), ``dsnode bench`` runs one phase after
the other:

1. plain puts (the baseline);
2. txns whose 2 keys are in one partition (``--txn-partitions 1``);
3. txns whose 2 keys are in two partitions (two-phase commit);
4. txns whose 4 keys are in four partitions;
5. the hot-accounts bank: ``--hot-keys`` accounts (10), each transfer reads two
   balances and commits a txn with version compares and puts: goodput (committed
   transfers/s) and conflict rate ((conflict answers + failed compares) / attempts).

Each rate is printed with p50 and p99 and its ratio to the put rate (target for
two partitions: >= 0.33x), and with the cluster's CPU per acknowledged op (every
node's ``cpu_seconds`` over the run, warmup included, over the ops acknowledged in
it) and its ratio to a put's: on a machine shared with other work the wall rates
follow whatever CPU is left, the CPU per op much less. Then, on a fresh 3-node cluster whose n1 runs with
``DSNODE_TEST_TXN_FAULT=before_decide`` (n1 SIGKILLs itself when its coordinator is
about to ask the home partition to commit), one cross-partition txn goes to n1 alone
(a client that is not ring-aware, one endpoint), on two keys whose partitions n1
does not lead; the script measures the time from n1's death until ``status`` on n2
and n3 shows ``txns.prepared == 0`` and ``txns.locks_held == 0``, next to the
``--txn-prepare-timeout-ms`` setting (default 3000) that bounds it from below.

    python bench/txn_mix.py [--duration 8] [--warmup 1] [--inflight 64] [--json out.json]

Every process it started and every temp dir is removed on exit, including on
Ctrl-C, SIGTERM and SIGHUP.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when loaded by path

import _procs  # noqa: E402

from dsnode.bench.ring_target import fetch_ring  # noqa: E402
from dsnode.bench.routing import RingMap  # noqa: E402
from dsnode.bench.targets import DsnodeTarget, TargetError, TargetOptions  # noqa: E402
from dsnode.client import Client  # noqa: E402
from dsnode.client.client import Op  # noqa: E402
from dsnode.client.errors import DsnodeError  # noqa: E402

#: (name, extra ``dsnode bench`` arguments) of the load phases, the baseline first.
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("puts", ("--mix", "put=1")),
    ("txn, 1 partition (2 keys)", ("--mix", "txn=1", "--txn-ops", "2", "--txn-partitions", "1")),
    ("txn, 2 partitions (2 keys)", ("--mix", "txn=1", "--txn-ops", "2", "--txn-partitions", "2")),
    ("txn, 4 partitions (4 keys)", ("--mix", "txn=1", "--txn-ops", "4", "--txn-partitions", "4")),
)
#: The phase the target ratio is about, and the target (ratio to the put rate).
TARGET_PHASE = "txn, 2 partitions (2 keys)"
TARGET_RATIO = 0.33
#: The node that runs with the fault point, and the fault point.
FAULTY = "n1"
FAULT = "before_decide"


# --------------------------------------------------------------------------- load phases


def bench_args(args: argparse.Namespace, endpoints: str, extra: tuple[str, ...]) -> list[str]:
    """The ``dsnode bench`` arguments of one phase (the same settings for every phase)."""
    return ["--endpoints", endpoints, "--duration", str(args.duration),
            "--warmup", str(args.warmup), "--inflight", str(args.inflight),
            "--connections", str(args.connections), "--keyspace", str(args.keyspace),
            "--value-size", str(args.value_size), "--prefix", "txnmix/",
            "--output", "json", *extra]  # fmt: skip


def hot_args(args: argparse.Namespace) -> tuple[str, ...]:
    return ("--mix", "txn=1", "--txn-ops", "2", "--hot-keys", str(args.hot_keys))


def row_of(name: str, report: dict[str, Any]) -> dict[str, Any]:
    """One table row from a ``dsnode bench --output json`` report."""
    op = "put" if report["ops"].get("put", {}).get("ok") else "txn"
    r = report["ops"][op]
    lat = r["latency_us"]
    cpu = (report.get("capacity") or {}).get("cpu_s") or {}
    acked = sum((report.get("acked_all") or {}).values())
    cpu_ms = None
    if cpu and acked and all(v is not None for v in cpu.values()):
        cpu_ms = sum(cpu.values()) * 1000 / acked
    return {
        "phase": name,
        "op": op,
        "ok": r["ok"],
        "rate": r["throughput"],
        "p50_us": lat["p50"],
        "p99_us": lat["p99"],
        "errors": r["errors_by_code"],
        "cpu_ms_per_op": cpu_ms,
        "bank": report.get("bank"),
    }


def ratios(rows: list[dict[str, Any]], field: str = "rate") -> dict[str, float | None]:
    """Each txn phase's ``field`` over the put phase's (the first row)."""
    base = rows[0][field] if rows else None
    return {r["phase"]: (r[field] / base if base and r[field] is not None else None)
            for r in rows[1:]}  # fmt: skip


def measure_load(args: argparse.Namespace) -> list[dict[str, Any]]:
    work = _procs.tmpdir("dsnode-txnmix-")
    procs, ports = _procs.start_dsnode_cluster(work, [sys.executable, "-m", "dsnode"], 3,
                                               cluster_env(args))  # fmt: skip
    endpoints = ",".join(f"127.0.0.1:{p}" for p in ports)
    timeout = args.duration + args.warmup + 120
    rows = []
    try:
        for name, extra in (*PHASES, (f"bank, {args.hot_keys} hot accounts", hot_args(args))):
            report = _procs.run_dsnode_bench(bench_args(args, endpoints, extra), timeout)
            row = row_of(name, report)
            _procs.log(f"{name}: {row['rate']:,.0f}/s, p50 {fmt_us(row['p50_us'])}, "
                       f"p99 {fmt_us(row['p99_us'])}, errors {row['errors']}")  # fmt: skip
            rows.append(row)
    finally:
        for p in procs:
            _procs.stop(p)
    return rows


def cluster_env(args: argparse.Namespace) -> dict[str, str]:
    return {"DSNODE_PARTITIONS": str(args.partitions),
            "DSNODE_REPLICATION": str(args.replication),
            "DSNODE_TXN_PREPARE_TIMEOUT_MS": str(args.txn_prepare_timeout_ms)}  # fmt: skip


# --------------------------------------------------------------------------- coordinator killed


def fault_keys(ring: RingMap, faulty: str, prefix: bytes = b"txnmix/fault-") -> tuple[bytes, bytes]:
    """Two keys in distinct partitions, neither led by ``faulty`` (so its death costs
    them no election and the time measured is the transaction's recovery alone)."""
    found: dict[int, bytes] = {}
    for i in range(100_000):
        key = prefix + b"%d" % i
        pid = ring.partition(key)
        leader = ring.leaders[pid]
        if leader is not None and leader != faulty and pid not in found:
            found[pid] = key
            if len(found) == 2:
                a, b = found.values()
                return a, b
    raise SystemExit(f"no two partitions with a leader other than {faulty}: {ring.describe()}")


async def _txns_of(targets: list[DsnodeTarget]) -> list[dict[str, Any]] | None:
    """The ``txns`` part of each node's status, or None when one did not answer."""
    try:
        async with asyncio.timeout(2.0):
            sts = await asyncio.gather(*(t.request({"op": "status"}) for t in targets))
    except (OSError, TimeoutError, TargetError):
        return None
    if not all(st.get("ok") for st in sts):
        return None
    return [st["txns"] for st in sts]


async def measure_resolution(
    proc_alive: Any, faulty_ep: str, other_eps: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    """Send the txn to the faulty node; time from its death until the others hold no
    prepared transaction and no lock. ``proc_alive()`` tells whether it still runs."""
    options = TargetOptions()
    ring = await fetch_ring(*_split(other_eps[0]), options)
    a, b = fault_keys(ring, FAULTY)
    async with Client(other_eps, timeout=5) as client:
        await client.put(a, b"a0")
        await client.put(b, b"b0")
    targets = [DsnodeTarget(*_split(ep), options) for ep in other_eps]
    await asyncio.gather(*(t.connect() for t in targets))
    out: dict[str, Any] = {"keys": [a.decode(), b.decode()],
                           "partitions": [ring.partition(a), ring.partition(b)],
                           "txn_prepare_timeout_ms": args.txn_prepare_timeout_ms}  # fmt: skip
    client_timeout = args.txn_prepare_timeout_ms / 1000 + 5
    try:
        async with Client([faulty_ep], timeout=client_timeout, ring_aware=False) as one:
            attempt = asyncio.ensure_future(one.txn(then=[Op.put(a, b"a1"), Op.put(b, b"b1")]))
            deadline = time.monotonic() + 15
            while proc_alive() and not attempt.done() and time.monotonic() < deadline:
                await asyncio.sleep(0.002)
            if proc_alive():
                attempt.cancel()
                with contextlib.suppress(BaseException):
                    await attempt
                raise SystemExit(f"{FAULTY} did not die at the fault point {FAULT} (its txn "
                                 f"{'ended' if attempt.done() else 'is still running'})")  # fmt: skip
            died = time.monotonic()
            first = await _txns_of(targets)
            out["prepared_at_death"] = None if first is None else sum(t["prepared"] for t in first)
            resolved = None
            limit = died + args.txn_prepare_timeout_ms / 1000 + 30
            while time.monotonic() < limit:
                txns = await _txns_of(targets)
                if txns is not None and all(t["prepared"] == 0 and t["locks_held"] == 0
                                            for t in txns):  # fmt: skip
                    resolved = time.monotonic() - died
                    break
                await asyncio.sleep(0.01)
            out["resolved_s"] = resolved
            with contextlib.suppress(DsnodeError, TimeoutError):
                await attempt
    finally:
        for t in targets:
            t.close()
    async with Client(other_eps, timeout=5) as client:
        got = [g.value for g in await asyncio.gather(client.get(a), client.get(b))]
    out["outcome"] = ("aborted" if got == [b"a0", b"b0"] else
                      "committed" if got == [b"a1", b"b1"] else f"torn {got!r}")  # fmt: skip
    return out


def _split(ep: str) -> tuple[str, int]:
    host, _, port = ep.rpartition(":")
    return host, int(port)


def measure_fault(args: argparse.Namespace) -> dict[str, Any]:
    work = _procs.tmpdir("dsnode-txnmix-fault-")
    procs, ports = _procs.start_dsnode_cluster(
        work, [sys.executable, "-m", "dsnode"], 3, cluster_env(args),
        node_env={FAULTY: {"DSNODE_TEST_TXN_FAULT": FAULT}})  # fmt: skip
    eps = [f"127.0.0.1:{p}" for p in ports]
    try:
        result = asyncio.run(measure_resolution(lambda: procs[0].poll() is None, eps[0],
                                                eps[1:], args))  # fmt: skip
    finally:
        for p in procs:
            _procs.stop(p)
    _procs.log(f"coordinator killed: participants resolved after {fmt_s(result['resolved_s'])} "
               f"(prepare timeout {args.txn_prepare_timeout_ms} ms), {result['outcome']}")  # fmt: skip
    return result


# --------------------------------------------------------------------------- report


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}us" if v < 1000 else f"{v / 1000:.2f}ms"


def fmt_x(rel: dict[str, float | None], row: dict[str, Any], base: dict[str, Any]) -> str:
    """A row's ratio to the baseline row (which is 1.00x by definition)."""
    if row is base:
        return "1.00x"
    ratio = rel.get(row["phase"])
    return "n/a" if ratio is None else f"{ratio:.2f}x"


def fmt_s(v: float | None) -> str:
    return "not within the limit" if v is None else f"{v:.2f} s"


def render(rows: list[dict[str, Any]], fault: dict[str, Any] | None) -> str:
    load = [r for r in rows if r["bank"] is None]
    head = ("phase", "ok", "per s", "p50", "p99", "x puts", "cpu ms/op", "x put cpu", "errors")
    table = [head]
    rel = ratios(load)
    rel_cpu = ratios(load, "cpu_ms_per_op")
    for r in load:
        errs = ",".join(f"{k}={v}" for k, v in sorted(r["errors"].items())) or "0"
        cpu = r["cpu_ms_per_op"]
        table.append((r["phase"], f"{r['ok']:,}", f"{r['rate']:,.0f}", fmt_us(r["p50_us"]),
                      fmt_us(r["p99_us"]), fmt_x(rel, r, load[0]),
                      "n/a" if cpu is None else f"{cpu:.3f}", fmt_x(rel_cpu, r, load[0]),
                      errs))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i in (0, 8) else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))).rstrip() for row in table]  # fmt: skip
    got = rel.get(TARGET_PHASE)
    if TARGET_PHASE in rel:
        verdict = "n/a" if got is None else (
            f"{got:.2f}x " + ("ok" if got >= TARGET_RATIO else "below target"))
        lines.append(f"ratio {TARGET_PHASE} / puts: {verdict} (target >= {TARGET_RATIO}x)")
    for r in rows:
        b = r["bank"]
        if b is None:
            continue
        rate = b["conflict_rate"]
        lines.append(
            f"{r['phase']}, {b['accounts_per_transfer']} per transfer: {b['attempts']:,} "
            f"attempts, {b['committed']:,} committed, goodput {b['goodput']:,.1f} txn/s "
            f"(p50 {fmt_us(r['p50_us'])}, p99 {fmt_us(r['p99_us'])}); conflict rate "
            + ("n/a" if rate is None else f"{rate * 100:.1f}%")
            + f" ({b['conflicts']:,} conflict answers + {b['failed_compares']:,} failed "
            f"compares" + (f"; {b['other_errors']:,} other errors" if b["other_errors"] else "")
            + ")"
        )
    if fault is not None:
        lines.append(
            f"coordinator SIGKILLed before its decision: participants resolved "
            f"{fmt_s(fault['resolved_s'])} after its death (txn_prepare_timeout_ms "
            f"{fault['txn_prepare_timeout_ms']}; prepared at death: "
            f"{fault.get('prepared_at_death')}; outcome: {fault['outcome']})"
        )
    return "\n".join(lines)


def positive(kind: type) -> Any:
    def parse(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if v <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
        return v

    return parse


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=positive(float), default=8.0, help="seconds per phase")
    ap.add_argument("--warmup", type=float, default=1.0, help="unrecorded seconds per phase")
    ap.add_argument("--inflight", type=positive(int), default=64)
    ap.add_argument("--connections", type=positive(int), default=16)
    ap.add_argument("--keyspace", type=positive(int), default=100_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--partitions", type=positive(int), default=64)
    ap.add_argument("--replication", type=positive(int), default=3)
    ap.add_argument("--hot-keys", type=positive(int), default=10, help="accounts of the bank run")
    ap.add_argument("--txn-prepare-timeout-ms", type=positive(int), default=3000,
                    help="the nodes' setting; bounds the resolution time from below")
    ap.add_argument("--no-fault", dest="fault", action="store_false",
                    help="skip the coordinator-killed measurement")
    ap.add_argument("--json", type=Path, default=None, help="also save every number here")
    args = ap.parse_args(argv)
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.hot_keys < 2:
        ap.error("--hot-keys must be >= 2 (a transfer moves money between two accounts)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _procs.install_signal_handlers(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    try:
        rows = measure_load(args)
        fault = measure_fault(args) if args.fault else None
    finally:
        _procs.cleanup()
    print(render(rows, fault))
    if args.json is not None:
        load = [r for r in rows if r["bank"] is None]
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios(load),
                                         "cpu_ratios": ratios(load, "cpu_ms_per_op"),
                                         "fault": fault}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
