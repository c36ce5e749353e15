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
import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsnode.bench.targets import DsnodeTarget, RedisTarget, TargetError  # noqa: E402

_procs: list[subprocess.Popen[bytes]] = []
_tmpdirs: list[str] = []


# --------------------------------------------------------------------------- plumbing


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def spawn(
    argv: list[str], logfile: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a long-running child in its own session (so we can kill its whole group)."""
    out = open(logfile, "wb")  # noqa: SIM115 - closed with the process
    p = subprocess.Popen(
        argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=REPO
    )
    out.close()
    _procs.append(p)
    return p


def stop(p: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the child's process group, then SIGKILL if it lingers."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)
    if p in _procs:
        _procs.remove(p)


def cleanup() -> None:
    for p in list(_procs):
        try:
            stop(p, timeout=10)
        except Exception as exc:  # keep cleaning up
            log(f"could not stop pid {p.pid}: {exc!r}")
    for d in _tmpdirs:
        shutil.rmtree(d, ignore_errors=True)
    _tmpdirs.clear()


def _on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def ensure_redis() -> None:
    if shutil.which("redis-server") and shutil.which("redis-benchmark"):
        return
    log("installing redis-server and redis-tools from Debian packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", "redis-server", "redis-tools"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


# --------------------------------------------------------------------------- servers


async def _probe_redis(port: int) -> bool:
    t = RedisTarget("127.0.0.1", port)
    try:
        await t.connect()
    except (OSError, TimeoutError, TargetError):
        return False
    t.close()
    return True


async def _probe_dsnode(port: int) -> bool:
    """Ready when ``status`` says so, or (without ``status``) when a put succeeds."""
    t = DsnodeTarget("127.0.0.1", port)
    try:
        await t.connect()
        st = await asyncio.wait_for(t.request({"op": "status"}), 5)
        if st.get("ok"):
            return bool(st.get("ready"))
        return await asyncio.wait_for(t.put(b"__compare_ready__", b""), 5) is None
    except (OSError, TimeoutError, TargetError):
        return False
    finally:
        t.close()


def wait_ready(
    name: str, p: subprocess.Popen[bytes], probe: Any, logfile: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"{name} exited with {p.returncode}:\n{tail(logfile)}")
        if asyncio.run(probe()):
            return
        time.sleep(0.2)
    raise SystemExit(f"{name} not ready after {timeout:.0f}s:\n{tail(logfile)}")


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


def start_dsnode(
    work: Path, name: str, fsync: bool, cmd: list[str]
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    addr = f"127.0.0.1:{port}"
    logfile = work / f"{name}.log"
    env = child_env(None if fsync else {"DSNODE_FSYNC": "false"})
    argv = [*cmd, "serve", "--node-id", "n1", "--listen", addr,
            "--peers", f"n1={addr}", "--data-dir", str(work / name)]  # fmt: skip
    p = spawn(argv, logfile, env)
    wait_ready(f"dsnode serve ({name})", p, lambda: _probe_dsnode(port), logfile, 60)
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
        sys.executable, "-m", "dsnode.bench",
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
    p = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(),
        start_new_session=True, cwd=REPO,
    )  # fmt: skip
    _procs.append(p)  # type: ignore[arg-type]
    out, err = p.communicate(timeout=args.duration + args.warmup + 180)
    _procs.remove(p)  # type: ignore[arg-type]
    if p.returncode != 0:
        raise SystemExit(f"dsnode bench failed ({p.returncode}): {err.decode(errors='replace')}")
    return json.loads(out)


def run_redis_benchmark(port: int, n: int) -> dict[str, Any]:
    argv = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "64", "-d", "100",
            "-t", "set", "-n", str(n), "-q"]  # fmt: skip
    log(" ".join(argv))
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         start_new_session=True)  # fmt: skip
    _procs.append(p)  # type: ignore[arg-type]
    out, _ = p.communicate(timeout=600)
    _procs.remove(p)  # type: ignore[arg-type]
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

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {}
    try:
        ensure_redis()
        work = Path(tempfile.mkdtemp(prefix="dsnode-compare-"))
        _tmpdirs.append(str(work))

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
