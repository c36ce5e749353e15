"""Capacity per core: a 3-node against a 6-node cluster (P = 64, R = 3), with the
ring-aware client and with a client that talks to one node only.

This 2-core machine cannot show 6 nodes outrunning 3 by wall-clock throughput, so
the figure compared is the one ``dsnode bench`` derives from every node's
``cpu_seconds``: the busiest node's CPU seconds per 1,000 acknowledged puts, and
the puts/s that implies with one core per node (``1000 / that``). For each size in
``--nodes`` a fresh cluster is started (settings ``partitions`` and ``replication``
as ``DSNODE_PARTITIONS`` / ``DSNODE_REPLICATION``), and the same put load runs
against it with ``--route ring`` and with ``--route one-node``. Prints one table
(nodes, route, acked puts, busiest node CPU s per 1k puts, projected puts/s per
core per node, share of answers forwarded) and, per route, the ratio of the
largest to the smallest cluster's projected capacity (target >= 1.7x for 6/3).

    python bench/capacity.py [--duration 10] [--warmup 2] [--inflight 64] [--nodes 3,6]

A build without the ``ring`` op runs ``--route ring`` as one-node (the route column
says so); a build that does not partition yet keeps one group led by one node, so
its ratio stays near 1x.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs  # noqa: E402

ROUTES = ("ring", "one-node")
TARGET_RATIO = 1.7


def bench_args(args: argparse.Namespace, endpoints: str, route: str) -> list[str]:
    """The ``dsnode bench`` arguments of one measured run (the same load every time)."""
    return ["--endpoints", endpoints, "--route", route, "--mix", "put=1",
            "--duration", str(args.duration), "--warmup", str(args.warmup),
            "--inflight", str(args.inflight), "--connections", str(args.connections),
            "--keyspace", str(args.keyspace), "--value-size", str(args.value_size),
            "--output", "json"]  # fmt: skip


def row_of(nodes: int, requested: str, report: dict[str, Any]) -> dict[str, Any]:
    """One table row from a ``dsnode bench --output json`` report."""
    cap = report.get("capacity") or {}
    routing = report.get("routing") or {}
    used = routing.get("route", requested)
    return {
        "nodes": nodes,
        "route": requested,
        "ran_as": used,
        "acked_puts": cap.get("acked_puts", report["ops"]["put"]["ok"]),
        "cpu_s_per_1k": cap.get("busiest_cpu_s_per_1k_puts"),
        "busiest": cap.get("busiest_node"),
        "projected": cap.get("projected_puts_per_s_per_core"),
        "forwarded_share": routing.get("forwarded_share"),
        "puts_s": report["ops"]["put"]["throughput"],
        "notes": [*cap.get("notes", []), *([routing["note"]] if routing.get("note") else [])],
    }


def measure(nodes: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    work = _procs.tmpdir(f"dsnode-capacity-{nodes}-")
    env = {"DSNODE_PARTITIONS": str(args.partitions), "DSNODE_REPLICATION": str(args.replication)}
    procs, ports = _procs.start_dsnode_cluster(work, [sys.executable, "-m", "dsnode"], nodes, env)
    endpoints = ",".join(f"127.0.0.1:{p}" for p in ports)
    rows = []
    try:
        for route in ROUTES:
            report = _procs.run_dsnode_bench(bench_args(args, endpoints, route),
                                      timeout=args.duration + args.warmup + 120)  # fmt: skip
            row = row_of(nodes, route, report)
            _procs.log(f"{nodes} nodes, route {route}: {row['acked_puts']} puts acked, "
                f"{fmt(row['projected'], ',.0f')} projected puts/s per core")  # fmt: skip
            for note in row["notes"]:
                _procs.log(f"  note: {note}")
            rows.append(row)
    finally:
        for p in procs:
            _procs.stop(p)
    return rows


def fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def ratios(rows: list[dict[str, Any]]) -> dict[str, tuple[int, int, float | None]]:
    """Per route: (smallest, largest cluster size, their projected-capacity ratio)."""
    out: dict[str, tuple[int, int, float | None]] = {}
    for route in dict.fromkeys(r["route"] for r in rows):
        mine = sorted((r for r in rows if r["route"] == route), key=lambda r: r["nodes"])
        lo, hi = mine[0], mine[-1]
        ratio = None
        if lo is not hi and lo["projected"] and hi["projected"] is not None:
            ratio = hi["projected"] / lo["projected"]
        out[route] = (lo["nodes"], hi["nodes"], ratio)
    return out


def render(rows: list[dict[str, Any]]) -> str:
    head = ("nodes", "route", "acked puts", "busiest cpu s/1k puts", "puts/s per core",
            "forwarded", "wall puts/s")  # fmt: skip
    table = [head]
    for r in rows:
        route = r["route"] if r["ran_as"] == r["route"] else f"{r['route']} (ran as {r['ran_as']})"
        share = r["forwarded_share"]
        table.append((str(r["nodes"]), route, f"{r['acked_puts']:,}", fmt(r["cpu_s_per_1k"], ".3f"),
                      fmt(r["projected"], ",.0f"), "n/a" if share is None else f"{share:.1%}",
                      f"{r['puts_s']:,.0f}"))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                       enumerate(zip(row, widths, strict=True))) for row in table]  # fmt: skip
    for route, (lo, hi, ratio) in ratios(rows).items():
        if lo == hi:
            continue  # one cluster size: nothing to compare
        got = "n/a (a projected figure is missing)" if ratio is None else (
            f"{ratio:.2f}x " + ("ok" if ratio >= TARGET_RATIO else "below target"))
        lines.append(f"ratio {hi}/{lo} nodes, route {route}: {got} "
                     f"(target >= {TARGET_RATIO}x)")  # fmt: skip
    return "\n".join(lines)


def parse_nodes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--nodes wants sizes like 3,6, got {text!r}") from None
    if not sizes or any(n < 1 for n in sizes):
        raise argparse.ArgumentTypeError(f"--nodes wants sizes >= 1, got {text!r}")
    return sizes


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=parse_nodes, default=[3, 6], help="cluster sizes (3,6)")
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--keyspace", type=int, default=100_000)
    ap.add_argument("--value-size", type=int, default=100)
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--replication", type=int, default=3)
    args = ap.parse_args()
    _procs.install_signal_handlers(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    rows: list[dict[str, Any]] = []
    try:
        for n in args.nodes:
            rows.extend(measure(n, args))
    finally:
        _procs.cleanup()
    print(render(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
