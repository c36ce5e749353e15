#!/usr/bin/env python3
"""What TLS costs: puts/s with TLS off versus on, 1 node and 3 nodes, in one invocation.

For each cluster size (1 and 3 nodes, on 127.0.0.1, durable default settings) it starts the
cluster twice, once in plain text and once with TLS (``dsnode certs``: node certificates,
mutual TLS between nodes), waits until every node agrees on a leader, and runs the same
``dsnode bench`` workload: puts of 100-byte values, 64 in flight over 16 connections to all
nodes, after a warm-up. Plain and TLS runs alternate (``--rounds``), and the best round of
each counts, so a noisy neighbour on a shared machine hurts both alike. Prints a table and
the ratio TLS/plain (issue 11 target: TLS costs at most 25%, ratio >= 0.75).

Every process and temp dir is removed on exit, including on Ctrl-C and SIGTERM.

Usage: ``python bench/tls_overhead.py [--duration 8] [--warmup 2] [--rounds 2] [--json out]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when loaded by path

from _procs import (  # noqa: E402
    child_env,
    cleanup,
    free_ports,
    install_signal_handlers,
    log,
    run_dsnode_bench,
    spawn,
    stop,
    tail,
    tmpdir,
)

from dsnode.certs import write_bundle  # noqa: E402
from dsnode.client import Client  # noqa: E402

INFLIGHT = 64
CONNECTIONS = 16


async def _status(port: int, cacert: str | None) -> dict[str, Any] | None:
    try:
        async with Client(f"127.0.0.1:{port}", timeout=1.0, cacert=cacert) as c:
            return await c.status()
    except Exception:  # not up yet: any failure means "ask again"
        return None


def start_cluster(work: Path, n: int, tls: Path | None) -> tuple[list[subprocess.Popen], list[int]]:
    ports = free_ports(n)
    ids = [f"n{i + 1}" for i in range(n)]
    peers = ",".join(f"{i}=127.0.0.1:{p}" for i, p in zip(ids, ports, strict=True))
    procs = []
    for nid, port in zip(ids, ports, strict=True):
        argv = [sys.executable, "-m", "dsnode", "serve", "--node-id", nid,
                "--listen", f"127.0.0.1:{port}", "--peers", peers,
                "--data-dir", str(work / f"data-{nid}"), "--log-level", "warning"]
        if tls is not None:
            argv += ["--tls-cert-file", str(tls / f"{nid}.pem"), "--tls-key-file",
                     str(tls / f"{nid}.key"), "--tls-ca-file", str(tls / "ca.pem")]
        procs.append(spawn(argv, work / f"{nid}.log", child_env()))
    cacert = str(tls / "ca.pem") if tls is not None else None
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for nid, p in zip(ids, procs, strict=True):
            if p.poll() is not None:
                raise SystemExit(f"{nid} exited {p.returncode}:\n{tail(work / f'{nid}.log')}")
        sts = [asyncio.run(_status(p, cacert)) for p in ports]
        leaders = [(s or {}).get("partitions", [{}])[0].get("leader") for s in sts]
        if leaders[0] is not None and all(ld == leaders[0] for ld in leaders) \
                and all((s or {}).get("ready") for s in sts):
            return procs, ports
        time.sleep(0.2)
    raise SystemExit("cluster not ready after 90 s:\n" + tail(work / "n1.log"))


def one_run(n: int, tls: Path | None, args: argparse.Namespace) -> float:
    work = tmpdir(f"dsnode-tls-{n}-{'on' if tls else 'off'}-")
    procs, ports = start_cluster(work, n, tls)
    try:
        bench = ["--endpoints", ",".join(f"127.0.0.1:{p}" for p in ports),
                 "--inflight", str(INFLIGHT), "--connections", str(CONNECTIONS),
                 "--mix", "put=1", "--value-size", "100", "--duration", str(args.duration),
                 "--warmup", str(args.warmup), "--output", "json"]
        if tls is not None:
            bench += ["--cacert", str(tls / "ca.pem")]
        report = run_dsnode_bench(bench, timeout=args.duration + args.warmup + 120)
    finally:
        for p in procs:
            stop(p)
    ops = float(report["throughput"])
    errors = report["errors"]
    log(f"{n} node(s), TLS {'on ' if tls else 'off'}: {ops:,.0f} puts/s"
        + (f" (errors {errors})" if errors else ""))
    return ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--warmup", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    install_signal_handlers(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    try:
        certs = tmpdir("dsnode-tls-certs-")
        write_bundle(certs, ["n1", "n2", "n3"])
        results: dict[str, dict[str, float]] = {}
        for n in (1, 3):
            best = {"off": 0.0, "on": 0.0}
            for _ in range(args.rounds):
                best["off"] = max(best["off"], one_run(n, None, args))
                best["on"] = max(best["on"], one_run(n, certs, args))
            results[f"{n} node" + ("s" if n > 1 else "")] = best
    finally:
        cleanup()
    print(f"\nputs/s, 100-byte values, {INFLIGHT} in flight, best of {args.rounds} "
          f"x {args.duration:.0f} s")
    print(f"{'cluster':<10}{'TLS off':>12}{'TLS on':>12}{'on/off':>9}")
    for name, r in results.items():
        ratio = r["on"] / r["off"] if r["off"] else float("nan")
        r["ratio"] = ratio
        print(f"{name:<10}{r['off']:>12,.0f}{r['on']:>12,.0f}{ratio:>9.2f}")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
