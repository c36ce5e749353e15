#!/usr/bin/env python3
"""What the admin listener costs: puts/s with it on and scraped every second versus off.

One node (its own one-member cluster) on 127.0.0.1, started fresh for every run:

* ``off``: no ``--metrics-listen`` (the default);
* ``on``: ``--metrics-listen 127.0.0.1:PORT`` while this script GETs ``/metrics`` every
  ``--scrape-interval`` seconds (default 1, as a Prometheus with a 1 s scrape interval
  would) and ``/readyz`` and ``/livez`` with it, for the whole run.

Each run is ``dsnode bench`` with puts only, 100-byte values, ``--inflight`` requests in flight
(default 64). Runs alternate off, on, off, on ... for ``--rounds`` rounds so that drift in the
machine's load hits both alike; the script prints every run, the median of each mode and the
ratio on/off (target: at least 0.97, i.e. under 3% cost), and the same for the node's CPU time
per put, which moves less than puts/s when other work shares the machine. First it measures
the node's CPU time per scrape on an idle node, the steadiest number of the three. The hot-path counters exist in both
modes (``status`` carries them); what differs is the listener thread and the scrapes.

Usage: ``python bench/metrics_overhead.py [--rounds 3] [--duration 8] [--warmup 2]
[--fsync true|false] [--inflight 64]``. Every process and temp dir it made is removed on
exit, including on Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/, also when loaded by path

from _procs import (  # noqa: E402
    child_env,
    cleanup,
    free_port,
    install_signal_handlers,
    log,
    probe_dsnode,
    run_dsnode_bench,
    spawn,
    stop,
    tmpdir,
    wait_ready,
)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Scraper(threading.Thread):
    """GET /metrics, /readyz and /livez every ``interval`` seconds until stopped."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(name="scraper", daemon=True)
        self.base = f"http://127.0.0.1:{port}"
        self.interval = interval
        self.halt = threading.Event()
        self.scrapes = 0
        self.failures = 0
        self.bytes = 0
        self.seconds: list[float] = []

    def once(self) -> None:
        t0 = time.monotonic()
        try:
            with urllib.request.urlopen(self.base + "/metrics", timeout=5) as r:
                self.bytes += len(r.read())
            for path in ("/readyz", "/livez"):
                with urllib.request.urlopen(self.base + path, timeout=5) as r:
                    r.read()
            self.scrapes += 1
            self.seconds.append(time.monotonic() - t0)
        except OSError:
            self.failures += 1

    def run(self) -> None:
        next_at = time.monotonic()
        while not self.halt.is_set():
            self.once()
            next_at += self.interval
            self.halt.wait(max(0.0, next_at - time.monotonic()))


def one_run(work: Path, n: int, mode: str, args: argparse.Namespace, cmd: list[str],
            bench_extra: tuple[str, ...] = (), label: str | None = None) -> dict:
    """One fresh node under ``dsnode bench`` (puts only; ``bench_extra`` appended to its
    flags); ``mode`` "on" adds the scraped admin listener. Also used by
    request_ids_overhead.py, which names its modes with ``label``."""
    port = free_port()
    addr = f"127.0.0.1:{port}"
    name = f"{label or mode}-{n}"
    argv = [*cmd, "serve", "--node-id", "n1", "--listen", addr, "--peers", f"n1={addr}",
            "--data-dir", str(work / name), "--fsync", args.fsync]  # fmt: skip
    mport = None
    if mode == "on":
        mport = free_port()
        argv += ["--metrics-listen", f"127.0.0.1:{mport}"]
    logfile = work / f"{name}.log"
    p = spawn(argv, logfile, child_env())
    scraper = None
    try:
        wait_ready(f"dsnode serve ({name})", p, lambda: probe_dsnode(port), logfile, 60)
        if mport is not None:
            scraper = Scraper(mport, args.scrape_interval)
            scraper.start()
        bench_argv = [
            "--target", "dsnode", "--endpoints", addr, "--mix", "put=1",
            "--value-size", "100", "--connections", str(args.connections),
            "--inflight", str(args.inflight), "--duration", str(args.duration),
            "--warmup", str(args.warmup), "--output", "json", "--no-progress", *bench_extra,
        ]  # fmt: skip
        cpu0 = cpu_seconds(p.pid)
        res = run_dsnode_bench(bench_argv, timeout=args.duration + args.warmup + 120)
        cpu = cpu_seconds(p.pid) - cpu0
    finally:
        if scraper is not None:
            scraper.halt.set()
            scraper.join(10)
        stop(p)
    puts_s = float(res["ops"]["put"]["throughput"])
    # CPU the node spent per put over the whole run (warmup included, in both modes alike):
    # steadier than puts/s on a machine shared with other work.
    cpu_us = 1e6 * cpu / max(1.0, puts_s * (args.duration + args.warmup))
    out: dict[str, Any] = {"mode": label or mode, "puts_s": puts_s, "cpu_us_per_put": cpu_us,
                           "p99_us": res["latency_us"]["p99"], "errors": int(res["errors"])}
    if scraper is not None:
        out.update(scrapes=scraper.scrapes, scrape_failures=scraper.failures,
                   scrape_bytes=scraper.bytes // max(1, scraper.scrapes),
                   scrape_ms_max=1000 * max(scraper.seconds, default=0.0))
    return out


def scrape_cost(work: Path, args: argparse.Namespace, cmd: list[str], n: int = 50) -> dict:
    """Node CPU per scrape, measured on an idle node: its CPU time while answering ``n``
    scrapes back to back, less what it spends idle (ticks, heartbeats) over as long.
    CPU time is the node's own, so other load on the machine hardly moves it."""
    port, mport = free_port(), free_port()
    addr = f"127.0.0.1:{port}"
    argv = [*cmd, "serve", "--node-id", "n1", "--listen", addr, "--peers", f"n1={addr}",
            "--data-dir", str(work / "scrape-cost"), "--fsync", args.fsync,
            "--metrics-listen", f"127.0.0.1:{mport}"]
    logfile = work / "scrape-cost.log"
    p = spawn(argv, logfile, child_env())
    try:
        wait_ready("dsnode serve (scrape cost)", p, lambda: probe_dsnode(port), logfile, 60)
        scraper = Scraper(mport, 0.0)
        t0, c0 = time.monotonic(), cpu_seconds(p.pid)
        time.sleep(5.0)  # idle: what the node costs doing nothing
        t1, c1 = time.monotonic(), cpu_seconds(p.pid)
        for _ in range(n):
            scraper.once()
        t2, c2 = time.monotonic(), cpu_seconds(p.pid)
    finally:
        stop(p)
    idle_rate = (c1 - c0) / (t1 - t0)
    per_scrape = ((c2 - c1) - idle_rate * (t2 - t1)) / n
    return {"cpu_ms_per_scrape": 1000 * per_scrape, "idle_cpu_share": idle_rate,
            "bytes": scraper.bytes // max(1, scraper.scrapes), "failures": scraper.failures}


def bench_parser(doc: str, pairs: str) -> argparse.ArgumentParser:
    """The options every fresh-node A/B bench script takes (``one_run`` reads them)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help=f"{pairs} pairs")
    ap.add_argument("--duration", type=float, default=8.0, help="seconds per bench run")
    ap.add_argument("--warmup", type=float, default=2.0, help="warmup seconds per run")
    ap.add_argument("--inflight", type=int, default=64)
    ap.add_argument("--connections", type=int, default=16)
    ap.add_argument("--fsync", choices=("true", "false"), default="true")
    ap.add_argument("--dsnode-cmd", default=f"{shlex.quote(sys.executable)} -m dsnode",
                    help="command that runs the dsnode CLI (before 'serve ...')")  # fmt: skip
    return ap


def parse_bench_args(ap: argparse.ArgumentParser) -> tuple[argparse.Namespace, list[str]]:
    """Parse, check, and make SIGTERM/SIGHUP clean up like Ctrl-C; returns (args, cmd)."""
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    install_signal_handlers(signal.SIGTERM, signal.SIGHUP)
    return args, shlex.split(args.dsnode_cmd)


def main() -> int:
    ap = bench_parser(__doc__, "off/on")
    ap.add_argument("--scrape-interval", type=float, default=1.0)
    args, cmd = parse_bench_args(ap)
    runs: list[dict] = []
    try:
        work = tmpdir("dsnode-metrics-overhead-")
        log("scrape cost on an idle node")
        cost = scrape_cost(work, args, cmd)
        for n in range(args.rounds):
            for mode in ("off", "on"):
                log(f"round {n + 1}/{args.rounds}: admin listener {mode}")
                runs.append(one_run(work, n, mode, args, cmd))
    finally:
        cleanup()
    print(f"puts only, 100-byte values, {args.inflight} in flight, fsync={args.fsync}, "
          f"{args.duration:g}s per run; 'on' = --metrics-listen, scraped every "
          f"{args.scrape_interval:g}s")
    for r in runs:
        extra = ""
        if r["mode"] == "on":
            extra = (f"  scrapes {r['scrapes']} (failed {r['scrape_failures']}), "
                     f"{r['scrape_bytes']} bytes each, slowest {r['scrape_ms_max']:.1f} ms")
        print(f"  {r['mode']:>3}: {r['puts_s']:>10,.0f} puts/s  node CPU "
              f"{r['cpu_us_per_put']:6.1f} us/put{extra}")
    off = statistics.median(r["puts_s"] for r in runs if r["mode"] == "off")
    on = statistics.median(r["puts_s"] for r in runs if r["mode"] == "on")
    print(f"median off {off:,.0f} puts/s, on {on:,.0f} puts/s: ratio on/off {on / off:.3f} "
          f"(cost {100 * (1 - on / off):+.1f}%)")
    cpu_off = statistics.median(r["cpu_us_per_put"] for r in runs if r["mode"] == "off")
    cpu_on = statistics.median(r["cpu_us_per_put"] for r in runs if r["mode"] == "on")
    print(f"median node CPU per put off {cpu_off:.1f} us, on {cpu_on:.1f} us: ratio on/off "
          f"{cpu_on / cpu_off:.3f} (cost {100 * (cpu_on / cpu_off - 1):+.1f}%)")
    print(f"node CPU per scrape (/metrics + /readyz + /livez, {cost['bytes']} bytes): "
          f"{cost['cpu_ms_per_scrape']:.2f} ms, i.e. {cost['cpu_ms_per_scrape'] / 10:.2f}% of a "
          f"core at one scrape per second (idle node: {100 * cost['idle_cpu_share']:.1f}% of a "
          f"core)")
    failed = sum(r.get("scrape_failures", 0) for r in runs) + cost["failures"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
