#!/usr/bin/env python3
"""Compare one dsnode node with Redis on this machine, same workload, same client.

What it does (everything on 127.0.0.1, free ports, private temp dirs):

1. Installs Redis from Debian (``apt-get install -y redis-server redis-tools``) if
   ``redis-server``/``redis-benchmark`` are missing.
2. Starts a private ``redis-server --appendonly yes --appendfsync always --save ''``.
3. Starts one ``dsnode serve`` node (durable, default settings).
4. Runs ``dsnode bench`` (put only, 100-byte values) against both, with 64 requests
   in flight (16 connections pipelining 4 each; ``--connections 64`` for one each)
   and with 1 in flight (1 connection).
5. Runs ``redis-benchmark -c 64 -d 100 -t set -n 200000 -q`` (Redis's own C client).
6. Restarts dsnode with ``DSNODE_FSYNC=false`` (fresh data dir) and repeats its runs;
   also reruns Redis with ``appendfsync no`` so the no-fsync rows have a peer.
7. Prints a table and the ratios; ``--json FILE`` saves every number.

Every process it started and every temp dir is removed on exit, including on
Ctrl-C, SIGTERM and SIGHUP.

Usage: ``python bench/compare_redis.py [--duration 10] [--warmup 2] [--processes 1]``
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when loaded by path

from _procs import (  # noqa: E402
    apt_install,
    cleanup,
    communicate,
    free_port,
    install_signal_handlers,
    log,
    run_dsnode_bench,
    spawn,
    start_dsnode,
    stop,
    tmpdir,
    wait_ready,
)

from dsnode.bench.targets import RedisTarget, TargetError  # noqa: E402


def ensure_redis() -> None:
    if shutil.which("redis-server") and shutil.which("redis-benchmark"):
        return
    apt_install("redis-server", "redis-tools")


# --------------------------------------------------------------------------- servers


async def _probe_redis(port: int) -> bool:
    t = RedisTarget("127.0.0.1", port)
    try:
        await t.connect()
    except (OSError, TimeoutError, TargetError):
        return False
    t.close()
    return True


def start_redis(work: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    data = work / "redis"
    data.mkdir()
    logfile = work / "redis.log"
    p = spawn(
        [
            "redis-server",
            "--port", str(port),
            "--bind", "127.0.0.1",
            "--dir", str(data),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
        ],
        logfile,
    )  # fmt: skip
    wait_ready("redis-server", p, lambda: _probe_redis(port), logfile, 20)
    return p, port


def redis_config_set(port: int, key: str, value: str) -> None:
    subprocess.run(
        ["redis-cli", "-h", "127.0.0.1", "-p", str(port), "CONFIG", "SET", key, value],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=30,
    )


# --------------------------------------------------------------------------- runs


def run_bench(target: str, port: int, inflight: int, args: argparse.Namespace) -> dict[str, Any]:
    conns = 1 if inflight == 1 else args.connections
    argv = [
        "--target", target,
        "--endpoints", f"127.0.0.1:{port}",
        "--mix", "put=1",
        "--value-size", "100",
        "--connections", str(conns),
        "--inflight", str(inflight),
        "--duration", str(args.duration),
        "--warmup", str(args.warmup),
        "--processes", str(args.processes if inflight > 1 else 1),
        "--output", "json",
        "--no-progress",
    ]  # fmt: skip
    log(f"dsnode bench --target {target} --inflight {inflight} ({args.duration}s)")
    return run_dsnode_bench(argv, timeout=args.duration + args.warmup + 180)


def run_redis_benchmark(port: int, n: int) -> dict[str, Any]:
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "64", "-d", "100",
            "-t", "set", "-n", str(n), "-q"]  # fmt: skip
    log(" ".join(argv))
    p, out, _ = communicate(argv, 600, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    text = out.decode(errors="replace").replace("\r", "\n")
    m = re.search(r"SET:\s*([\d.]+)\s+requests per second(?:,\s*p50=([\d.]+)\s*msec)?", text)
    if p.returncode != 0 or not m:
        raise SystemExit(f"redis-benchmark failed ({p.returncode}): {text[-500:]}")
    return {
        "throughput": float(m.group(1)),
        "p50_ms": float(m.group(2)) if m.group(2) else None,
        "raw": text.strip().splitlines()[-1],
    }


# --------------------------------------------------------------------------- report


def row(system: str, client: str, inflight: int, res: dict[str, Any]) -> dict[str, Any]:
    if client == "redis-benchmark":
        p50 = res["p50_ms"] * 1000 if res.get("p50_ms") is not None else None
        return {"system": system, "client": client, "inflight": inflight,
                "puts_s": res["throughput"], "p50_us": p50, "p99_us": None, "errors": None}  # fmt: skip
    return {
        "system": system,
        "client": client,
        "inflight": inflight,
        "puts_s": res["ops"]["put"]["throughput"],
        "p50_us": res["latency_us"]["p50"],
        "p99_us": res["latency_us"]["p99"],
        "errors": res["errors"],
    }


def fmt_us(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.0f}us" if v < 1000 else f"{v / 1000:.2f}ms"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("system", "client", "inflight", "puts/s", "p50", "p99", "errors")
    cells = [head] + [
        (
            r["system"],
            r["client"],
            str(r["inflight"]),
            f"{r['puts_s']:,.0f}",
            fmt_us(r["p50_us"]),
            fmt_us(r["p99_us"]),
            "-" if r["errors"] is None else str(r["errors"]),
        )  # fmt: skip
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(head))]
    for c in cells:
        print("  ".join(x.ljust(w) if i < 2 else x.rjust(w)
                        for i, (x, w) in enumerate(zip(c, widths, strict=True))))  # fmt: skip


def ratio(a: float, b: float) -> str:
    return f"{a / b:.3f}" if b else "n/a"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per dsnode bench run")
    ap.add_argument("--warmup", type=float, default=2.0, help="warmup seconds per run")
    ap.add_argument("--processes", type=int, default=1,
                    help="dsnode bench load processes for the 64-in-flight runs")  # fmt: skip
    ap.add_argument("--connections", type=int, default=16,
                    help="dsnode bench connections for the 64-in-flight runs (64 = one request "
                         "per connection, like redis-benchmark -c 64)")  # fmt: skip
    ap.add_argument("-n", "--redis-benchmark-requests", type=int, default=200_000)
    ap.add_argument("--json", type=Path, default=None, help="also write all results here")
    ap.add_argument("--no-fsync-redis", action=argparse.BooleanOptionalAction, default=True,
                    help="also run Redis with appendfsync no next to dsnode with fsync off")  # fmt: skip
    ap.add_argument("--dsnode-cmd", default=f"{shlex.quote(sys.executable)} -m dsnode",
                    help="command that runs the dsnode CLI (before 'serve ...')")  # fmt: skip
    args = ap.parse_args()
    dsnode_cmd = shlex.split(args.dsnode_cmd)

    install_signal_handlers(signal.SIGTERM, signal.SIGHUP)
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    try:
        ensure_redis()
        work = tmpdir("dsnode-compare-")

        redis, rport = start_redis(work)
        log(f"redis-server on 127.0.0.1:{rport} (appendfsync always)")
        dsn, dport = start_dsnode(work, "dsnode-durable", fsync=True, cmd=dsnode_cmd)
        log(f"dsnode serve on 127.0.0.1:{dport} (durable defaults)")

        for name, target, port in (("dsnode fsync=on", "dsnode", dport),
                                   ("redis appendfsync=always", "redis", rport)):  # fmt: skip
            for inflight in (64, 1):
                res = run_bench(target, port, inflight, args)
                raw[f"{name}/{inflight}"] = res
                rows.append(row(name, "dsnode bench", inflight, res))
        rb = run_redis_benchmark(rport, args.redis_benchmark_requests)
        raw["redis appendfsync=always/redis-benchmark"] = rb
        rows.append(row("redis appendfsync=always", "redis-benchmark", 64, rb))
        stop(dsn)

        dsn, dport = start_dsnode(work, "dsnode-nofsync", fsync=False, cmd=dsnode_cmd)
        log(f"dsnode serve on 127.0.0.1:{dport} (DSNODE_FSYNC=false)")
        for inflight in (64, 1):
            res = run_bench("dsnode", dport, inflight, args)
            raw[f"dsnode fsync=off/{inflight}"] = res
            rows.append(row("dsnode fsync=off", "dsnode bench", inflight, res))
        stop(dsn)
        if args.no_fsync_redis:
            redis_config_set(rport, "appendfsync", "no")
            for inflight in (64, 1):
                res = run_bench("redis", rport, inflight, args)
                raw[f"redis appendfsync=no/{inflight}"] = res
                rows.append(row("redis appendfsync=no", "dsnode bench", inflight, res))
            rb2 = run_redis_benchmark(rport, args.redis_benchmark_requests)
            raw["redis appendfsync=no/redis-benchmark"] = rb2
            rows.append(row("redis appendfsync=no", "redis-benchmark", 64, rb2))
        stop(redis)
    finally:
        cleanup()

    def get(system: str, client: str, inflight: int) -> float:
        for r in rows:
            if (r["system"], r["client"], r["inflight"]) == (system, client, inflight):
                return float(r["puts_s"])
        return 0.0

    print()
    print_table(rows)
    print()
    ratios: dict[str, str] = {}
    rb_always = get("redis appendfsync=always", "redis-benchmark", 64)
    for ds in ("dsnode fsync=on", "dsnode fsync=off"):
        for inflight in (64, 1):
            d = get(ds, "dsnode bench", inflight)
            ratios[f"{ds} / redis appendfsync=always (dsnode bench, inflight {inflight})"] = ratio(
                d, get("redis appendfsync=always", "dsnode bench", inflight)
            )
        ratios[f"{ds} / redis-benchmark appendfsync=always (inflight 64)"] = ratio(
            get(ds, "dsnode bench", 64), rb_always
        )
    if args.no_fsync_redis:
        for inflight in (64, 1):
            ratios[f"dsnode fsync=off / redis appendfsync=no (dsnode bench, inflight {inflight})"] = (
                ratio(get("dsnode fsync=off", "dsnode bench", inflight),
                      get("redis appendfsync=no", "dsnode bench", inflight))
            )  # fmt: skip
        ratios["dsnode fsync=off / redis-benchmark appendfsync=no (inflight 64)"] = ratio(
            get("dsnode fsync=off", "dsnode bench", 64),
            get("redis appendfsync=no", "redis-benchmark", 64),
        )
    print("ratios (puts/s):")
    width = max(len(k) for k in ratios)
    for k, v in ratios.items():
        print(f"  {k.ljust(width)}  {v}")
    print()
    print("note: 'dsnode bench' is one Python client process per run (about 15-40k req/s on its")
    print("own); when it saturates, client-side numbers for Redis understate Redis, which is why")
    print("the redis-benchmark (C client) figure is shown too. Client and servers share the CPUs.")
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "ratios": ratios, "raw": raw}, indent=2))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
