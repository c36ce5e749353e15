"""Event-loop stalls while a large node snapshots under write load (issue 7.5).

One single-member node per build, ``--fsync false`` (to load fast), loaded with
N keys of 100-byte values; then a steady write load (random overwrites, a fixed
number in flight) for a few seconds, with snapshots and checkpoints frequent
enough that several run inside the window. Reports, per build: put latency
p50 / p99.9 / max in the window, the node's event-loop lag maximum (``status``
``event_loop.lag_ms_max``, read after the load and after the window; and, from
the admin ``/metrics`` lag histogram, a bound on the window's own maximum and
how many lags over 25 ms it had), and whether snapshots ran in the window; then
the ratios current / baseline.

    python bench/snapshot_stall.py --keys 1000000 --baseline eb6c63e
"""

from __future__ import annotations

import argparse
import signal

from _procs import cleanup, free_port, install_signal_handlers, log, tmpdir
from _storage import (
    NodeProc,
    builds,
    load,
    loop_lag_buckets,
    pct,
    timed_writes,
    window_lag,
)


def one_build(name: str, code, keys: int, size: int, seconds: float, interval: int) -> dict:
    work = tmpdir("dsnode-stall-")
    env = {
        "DSNODE_FSYNC": "false",
        "DSNODE_SNAPSHOT_INTERVAL_SLOTS": str(interval),
        "DSNODE_SNAPSHOT_EVERY_RECORDS": str(interval * 2),
        "DSNODE_METRICS_LISTEN": f"127.0.0.1:{free_port()}",
    }
    node = NodeProc(code, work / "data", env, name.replace(" ", "-"))
    node.start()
    try:
        load(node, keys, size)
        st0 = node.status()
        lag_load = st0.get("event_loop", {}).get("lag_ms_max", float("nan"))
        snap0 = st0.get("paxos", {}).get("snapshot_index", 0)
        mport = int(env["DSNODE_METRICS_LISTEN"].rsplit(":", 1)[1])
        h0 = loop_lag_buckets(mport)
        lat = timed_writes(node, keys, size, seconds)
        bound, over = window_lag(h0, loop_lag_buckets(mport))
        st1 = node.status()
        lag_all = st1.get("event_loop", {}).get("lag_ms_max", float("nan"))
        snap1 = st1.get("paxos", {}).get("snapshot_index", 0)
        out = {
            "build": name, "puts": len(lat), "p50": pct(lat, 50) * 1e3,
            "p999": pct(lat, 99.9) * 1e3, "max": max(lat) * 1e3, "lag_load": lag_load,
            "lag_all": lag_all, "snapshots": (snap1 - snap0) // interval if snap1 else 0,
            "snap_moved": snap1 > snap0, "win_lag": bound, "win_over": over,
        }
        log(f"{name}: {out}")
        return out
    finally:
        node.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--value-bytes", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the write window")
    ap.add_argument("--interval-slots", type=int, default=300,
                    help="snapshot_interval_slots for both builds (checkpoints every 2x "
                         "that many records)")
    ap.add_argument("--baseline", help="a git revision to measure as well (same invocation)")
    args = ap.parse_args()
    install_signal_handlers(signal.SIGINT, signal.SIGTERM)
    try:
        with builds(args.baseline) as bs:
            rows = [one_build(name, code, args.keys, args.value_bytes, args.seconds,
                              args.interval_slots) for name, code in bs]  # fmt: skip
    finally:
        cleanup()
    print(f"\n{args.keys:,} keys of {args.value_bytes} B, {args.seconds:.0f} s of overwrites "
          f"(32 in flight), snapshot_interval_slots={args.interval_slots}")
    print(f"{'build':<22} {'puts':>8} {'p50 ms':>8} {'p99.9 ms':>9} {'max ms':>8} "
          f"{'lag max ms (load / +window)':>28} {'window lag max <= ms':>21} "
          f"{'lags > 25 ms':>13} {'snapshots':>10}")
    for r in rows:
        print(f"{r['build']:<22} {r['puts']:>8,} {r['p50']:>8.1f} {r['p999']:>9.1f} "
              f"{r['max']:>8.1f} {r['lag_load']:>12.1f} / {r['lag_all']:>13.1f} "
              f"{r['win_lag']:>21.0f} {r['win_over']:>13} "
              f"{'yes' if r['snap_moved'] else 'no':>10}")
    if len(rows) == 2:
        base, cur = rows
        print("ratios current / baseline: "
              + ", ".join(f"{k} {cur[k] / base[k]:.2f}" for k in ("p999", "max", "lag_all")
                          if base[k]))  # fmt: skip


if __name__ == "__main__":
    main()
