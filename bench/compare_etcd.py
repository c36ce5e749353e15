#!/usr/bin/env python3
"""Compare a 3-node dsnode cluster with a 3-member etcd cluster on this machine.

What it does (everything on 127.0.0.1, free ports, private temp dirs):

1. Installs etcd from Debian (``apt-get install -y etcd-server etcd-client``) if
   ``etcd``/``etcdctl`` are missing (binaries located with ``dpkg -L``).
2. Starts a 3-member etcd cluster (``--initial-cluster``, default durable settings,
   ``--log-level warn``) and waits for ``/health`` on every member.
3. Runs ``dsnode bench --target etcd`` (JSON gateway over HTTP/1.1, one request per
   TCP connection, so ``--connections`` = in-flight) against all three members:
   puts with 100-byte values at 64 and 256 in flight, then linearizable gets.
4. Runs ``etcdctl check perf --load=xl`` (etcd's own Go gRPC client, 60 s) and
   parses its writes/s as etcd's native-client figure. Then stops etcd.
5. Starts a 3-node dsnode cluster (``dsnode serve --peers ...``, durable, default
   settings), waits until ``status`` shows the same leader on all nodes, and runs
   the same ``dsnode bench`` workload against all three nodes (each connection
   pipelines; ``--dsnode-connections``, default 16).
6. Prints a table, the ratios dsnode/etcd and dsnode puts/s / etcdctl check perf;
   ``--json FILE`` saves every number.

Only one cluster runs at a time (the machine has few cores). Every process it
started and every temp dir is removed on exit, including on Ctrl-C, SIGTERM and
SIGHUP.

Usage: ``python bench/compare_etcd.py [--duration 10] [--warmup 2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when loaded by path

from _procs import (  # noqa: E402
    REPO,
    apt_install,
    child_env,
    cleanup,
    communicate,
    free_ports,
    install_signal_handlers,
    log,
    run_dsnode_bench,
    spawn,
    start_dsnode_cluster,
    stop,
    tail,
    tmpdir,
)
from _storage import builds  # noqa: E402

INFLIGHTS = (64, 256)


# --------------------------------------------------------------------------- plumbing


def _dpkg_binary(package: str, name: str) -> str | None:
    try:
        out = subprocess.run(
            ["dpkg", "-L", package], capture_output=True, text=True, check=False, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        if line.endswith("/bin/" + name) and os.access(line, os.X_OK):
            return line
    return None


def find_etcd_binaries() -> tuple[str, str] | None:
    """``(etcd, etcdctl)`` paths, from PATH or the Debian packages' file lists."""
    etcd = shutil.which("etcd") or _dpkg_binary("etcd-server", "etcd")
    etcdctl = shutil.which("etcdctl") or _dpkg_binary("etcd-client", "etcdctl")
    return (etcd, etcdctl) if etcd and etcdctl else None


def ensure_etcd() -> tuple[str, str]:
    found = find_etcd_binaries()
    if found:
        return found
    apt_install("etcd-server", "etcd-client")
    found = find_etcd_binaries()
    if not found:
        raise SystemExit("etcd/etcdctl not found after installing etcd-server and etcd-client")
    return found


# --------------------------------------------------------------------------- etcd


def etcd_version(etcd: str) -> str:
    out = subprocess.run([etcd, "--version"], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"etcd Version:\s*(\S+)", out)
    return m.group(1) if m else "unknown"


def _etcd_healthy(client_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{client_port}/health", timeout=2) as r:
            return bool(json.loads(r.read()).get("health") in ("true", True))
    except (OSError, ValueError, urllib.error.URLError):
        return False


def start_etcd(work: Path, etcd: str, members: int = 3) -> tuple[list[subprocess.Popen[bytes]],
                                                                  list[int]]:  # fmt: skip
    ports = free_ports(2 * members)
    client = ports[:members]
    peer = ports[members:]
    names = [f"e{i + 1}" for i in range(members)]
    initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in zip(names, peer, strict=True))
    token = f"dsnode-compare-{uuid.uuid4().hex[:8]}"
    procs = []
    for i, name in enumerate(names):
        logfile = work / f"etcd-{name}.log"
        argv = [
            etcd,
            "--name", name,
            "--data-dir", str(work / f"etcd-{name}"),
            "--listen-client-urls", f"http://127.0.0.1:{client[i]}",
            "--advertise-client-urls", f"http://127.0.0.1:{client[i]}",
            "--listen-peer-urls", f"http://127.0.0.1:{peer[i]}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer[i]}",
            "--initial-cluster", initial,
            "--initial-cluster-state", "new",
            "--initial-cluster-token", token,
            "--logger", "zap",
            "--log-level", "warn",
        ]  # fmt: skip
        procs.append(spawn(argv, logfile))
    deadline = time.monotonic() + 60
    pending = set(range(members))
    while pending and time.monotonic() < deadline:
        for i in list(pending):
            if procs[i].poll() is not None:
                raise SystemExit(
                    f"etcd {names[i]} exited with {procs[i].returncode}:\n"
                    f"{tail(work / f'etcd-{names[i]}.log')}"
                )
            if _etcd_healthy(client[i]):
                pending.discard(i)
        time.sleep(0.2)
    if pending:
        i = min(pending)
        raise SystemExit(f"etcd {names[i]} not healthy after 60s:\n"
                         f"{tail(work / f'etcd-{names[i]}.log')}")  # fmt: skip
    return procs, client


def run_check_perf(etcdctl: str, client_ports: list[int], load: str) -> dict[str, Any]:
    """``etcdctl check perf``; returns writes/s (PASS or FAIL alike) and the raw output."""
    eps = ",".join(f"127.0.0.1:{p}" for p in client_ports)
    argv = [etcdctl, "--endpoints", eps, "check", "perf", f"--load={load}", "--auto-compact"]
    log("ETCDCTL_API=3 " + " ".join(argv))
    p, out, _ = communicate(
        argv, 400, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={**os.environ, "ETCDCTL_API": "3"},
    )  # fmt: skip
    return parse_check_perf(out.decode(errors="replace"), p.returncode)


def parse_check_perf(text: str, returncode: int = 0) -> dict[str, Any]:
    """Pick writes/s and the verdicts out of ``etcdctl check perf`` output."""
    # The progress bar is redrawn with \r; keep only the final verdict lines.
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    # Failed latency checks print without a FAIL: prefix ("Slowest request took too long").
    verdicts = [ln for ln in lines if ln.startswith(("PASS", "FAIL", "Slowest request", "Stddev"))]
    m = None
    for ln in verdicts:
        m = re.search(r"([\d.]+)\s*writes/s", ln)
        if m:
            break
    if m is None:
        raise SystemExit(f"etcdctl check perf gave no writes/s ({returncode}):\n{text[-800:]}")
    return {
        "writes_s": float(m.group(1)),
        "passed": returncode == 0 and not any(v.startswith("FAIL") for v in verdicts),
        "verdicts": verdicts,
        "output_tail": lines[-8:],
    }


# --------------------------------------------------------------------------- runs


def run_bench(
    target: str, ports: list[int], op: str, inflight: int, connections: int,
    args: argparse.Namespace,
) -> dict[str, Any]:  # fmt: skip
    argv = [
        "--target", target,
        "--endpoints", ",".join(f"127.0.0.1:{p}" for p in ports),
        "--mix", f"{op}=1",
        "--value-size", "100",
        "--keyspace", str(args.keyspace),
        "--consistency", "linearizable",
        "--connections", str(min(connections, inflight)),
        "--inflight", str(inflight),
        "--duration", str(args.duration),
        "--warmup", str(args.warmup),
        "--processes", str(args.processes),
        "--output", "json",
        "--no-progress",
    ]  # fmt: skip
    log(f"dsnode bench --target {target} --mix {op}=1 --inflight {inflight} "
        f"--connections {min(connections, inflight)} ({args.duration}s)")  # fmt: skip
    return run_dsnode_bench(argv, timeout=args.duration + args.warmup + 180)


def preload(target: str, ports: list[int], connections: int, args: argparse.Namespace) -> None:
    """Write every key once so the get runs read existing 100-byte values."""
    argv = [
        sys.executable, "-m", "dsnode.bench", "--target", target,
        "--endpoints", ",".join(f"127.0.0.1:{p}" for p in ports),
        "--mix", "put=1", "--value-size", "100", "--keyspace", str(args.keyspace),
        "--connections", str(min(connections, 64)), "--inflight", "64",
        "--requests", str(args.keyspace), "--output", "json", "--no-progress",
    ]  # fmt: skip
    p, _, err = communicate(argv, 600, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=child_env(), cwd=REPO)  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"preload failed ({p.returncode}): {err.decode(errors='replace')}")


def workload(
    system: str, target: str, ports: list[int], connections: int | None,
    args: argparse.Namespace, rows: list[dict[str, Any]], raw: dict[str, Any],
) -> None:  # fmt: skip
    """Puts then linearizable gets at each in-flight level; ``connections=None``: one each."""
    for op in ("put", "get"):
        if op == "get":
            log(f"preloading {args.keyspace} keys into {system}")
            preload(target, ports, connections or 64, args)
        for inflight in INFLIGHTS:
            conns = inflight if connections is None else connections
            res = run_bench(target, ports, op, inflight, conns, args)
            raw[f"{system}/{op}/{inflight}"] = res
            rows.append(row(system, op, inflight, min(conns, inflight), res))


# --------------------------------------------------------------------------- report


def row(system: str, op: str, inflight: int, conns: int, res: dict[str, Any]) -> dict[str, Any]:
    o = res["ops"][op]
    return {
        "system": system,
        "op": op,
        "inflight": inflight,
        "connections": conns,
        "ops_s": o["throughput"],
        "p50_us": res["latency_us"]["p50"],
        "p99_us": res["latency_us"]["p99"],
        "errors": res["errors"],
        "errors_by_code": res.get("errors_by_code", {}),
    }


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}us" if v < 1000 else f"{v / 1000:.2f}ms"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("system", "op", "inflight", "conns", "ops/s", "p50", "p99", "errors")
    cells = [head] + [
        (
            r["system"],
            r["op"] if r["op"] != "get" else "get (lin.)",
            str(r["inflight"]),
            str(r["connections"]),
            f"{r['ops_s']:,.0f}",
            fmt_us(r["p50_us"]),
            fmt_us(r["p99_us"]),
            str(r["errors"]),
        )
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for c in cells:
        print("  ".join(x.ljust(w) if i < 2 else x.rjust(w)
                        for i, (x, w) in enumerate(zip(c, widths, strict=True))))  # fmt: skip


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def compute_ratios(rows: list[dict[str, Any]], perf: dict[str, Any] | None) -> dict[str, Any]:
    def get(system: str, op: str, inflight: int, field: str) -> float | None:
        for r in rows:
            if (r["system"], r["op"], r["inflight"]) == (system, op, inflight):
                v = r[field]
                return float(v) if v is not None else None
        return None

    out: dict[str, Any] = {}
    for op in ("put", "get"):
        for inflight in INFLIGHTS:
            d = get("dsnode", op, inflight, "ops_s")
            e = get("etcd", op, inflight, "ops_s")
            out[f"{op} throughput dsnode/etcd (inflight {inflight})"] = ratio(d, e)
            for q in ("p50_us", "p99_us"):
                out[f"{op} {q[:3]} latency dsnode/etcd (inflight {inflight})"] = ratio(
                    get("dsnode", op, inflight, q), get("etcd", op, inflight, q)
                )
    if perf is not None:
        for inflight in INFLIGHTS:
            out[f"dsnode puts/s (inflight {inflight}) / etcdctl check perf writes/s"] = ratio(
                get("dsnode", "put", inflight, "ops_s"), perf["writes_s"]
            )
    base = next((r["system"] for r in rows if r["system"].startswith("dsnode@")), None)
    if base is not None:
        for op in ("put", "get"):
            for inflight in INFLIGHTS:
                out[f"{op} throughput dsnode/{base} (inflight {inflight})"] = ratio(
                    get("dsnode", op, inflight, "ops_s"), get(base, op, inflight, "ops_s"))
                out[f"{op} p99 latency dsnode/{base} (inflight {inflight})"] = ratio(
                    get("dsnode", op, inflight, "p99_us"), get(base, op, inflight, "p99_us"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per dsnode bench run")
    ap.add_argument("--warmup", type=float, default=2.0, help="warmup seconds per run")
    ap.add_argument("--processes", type=int, default=1, help="dsnode bench load processes")
    ap.add_argument("--dsnode-connections", type=int, default=16,
                    help="dsnode connections per run (each pipelines inflight/connections); "
                         "etcd always gets one connection per request in flight")  # fmt: skip
    ap.add_argument("--keyspace", type=int, default=10_000,
                    help="distinct keys (all written once before the get runs)")  # fmt: skip
    ap.add_argument("--check-perf-load", default="xl", choices=("s", "m", "l", "xl", "none"),
                    help="etcdctl check perf --load (none: skip; it runs for 60s)")  # fmt: skip
    ap.add_argument("--json", type=Path, default=None, help="also write all results here")
    ap.add_argument("--no-etcd", action="store_true",
                    help="skip etcd: only the dsnode builds (with --baseline: build against build)")
    ap.add_argument("--baseline", default=None,
                    help="also run the dsnode workload on this commit (a temporary worktree), "
                    "e.g. the single-group build 94d2824")
    ap.add_argument("--dsnode-cmd", default=f"{shlex.quote(sys.executable)} -m dsnode",
                    help="command that runs the dsnode CLI (before 'serve ...')")  # fmt: skip
    args = ap.parse_args()
    dsnode_cmd = shlex.split(args.dsnode_cmd)

    install_signal_handlers(signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    perf: dict[str, Any] | None = None
    try:
        raw["loadavg_start"] = os.getloadavg()
        if not args.no_etcd:
            etcd, etcdctl = ensure_etcd()
            version = etcd_version(etcd)
            raw["etcd_version"] = version
            work = tmpdir("dsnode-compare-etcd-")
            eprocs, eports = start_etcd(work, etcd)
            log(f"etcd {version}: 3 members, client ports {eports}")
            workload("etcd", "etcd", eports, None, args, rows, raw)
            if args.check_perf_load != "none":
                perf = run_check_perf(etcdctl, eports, args.check_perf_load)
                perf["load"] = args.check_perf_load
                raw["etcdctl check perf"] = perf
            for p in eprocs:
                stop(p)

        with builds(args.baseline) as codes:
            for name, code in codes:
                system = "dsnode" if name == "current" else f"dsnode@{args.baseline}"
                run = tmpdir("dsnode-compare-run-")
                dprocs, dports = start_dsnode_cluster(run, dsnode_cmd,
                                                      env={"PYTHONPATH": str(code)})
                log(f"{system}: 3 nodes on ports {dports} (durable defaults)")
                workload(system, "dsnode", dports, args.dsnode_connections, args, rows, raw)
                for p in dprocs:
                    stop(p)
        raw["loadavg_end"] = os.getloadavg()
    finally:
        cleanup()

    ratios = compute_ratios(rows, perf)
    print()
    print_table(rows)
    if perf is not None:
        print(f"\netcdctl check perf --load={perf['load']} (Go gRPC client): "
              f"{perf['writes_s']:,.0f} writes/s ({'PASS' if perf['passed'] else 'FAIL'})")  # fmt: skip
        for v in perf["verdicts"]:
            print(f"  {v}")
    print("\nratios (dsnode / etcd; > 1 means dsnode is higher):")
    width = max(len(k) for k in ratios)
    for k, v in ratios.items():
        print(f"  {k.ljust(width)}  {'n/a' if v is None else f'{v:.3f}'}")
    la0, la1 = raw.get("loadavg_start"), raw.get("loadavg_end")
    print()
    print(f"load average at start {la0[0]:.2f}, at end {la1[0]:.2f} "
          f"({os.cpu_count()} CPUs)" if la0 and la1 else "")  # fmt: skip
    print("note: etcd is driven through its JSON gateway (HTTP/1.1, one request per connection),")
    print("which costs etcd CPU that its gRPC clients do not pay; etcdctl check perf is the")
    print("native-client figure, but a different workload: 256-byte keys, 1 KiB values, one")
    print("gRPC client per worker (xl: 1000 workers) and an offered rate capped at 15,000/s.")
    print("Both clusters and the single Python client share this machine's CPUs.")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios, "check_perf": perf,
                                         "raw": raw}, indent=2))  # fmt: skip
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
