"""Storage at scale (issue 14): load rate, memory, disk, snapshots, restart.

For each N in ``--keys`` (default 1,000,000): one single-member node
(``--fsync false`` to load fast), N keys of 100-byte values loaded with
pipelined puts; then a steady overwrite load while the data directory is
sampled; then SIGKILL and a restart on the same directory. Reports:

* load rate (puts/s) and RSS per key after the load;
* the data directory's largest size while overwriting, against the live data
  (keys + values);
* the last state-machine snapshot's duration and size (``status``);
* restart-to-serving time after SIGKILL (process start to ``status`` ready),
  the RSS after the restart and the records the restart replayed;

and the ratios against the issue's "before" figures at 1,000,000 keys (100 MB
of data: 1,292 MB directory = 13x, 607 MB RSS = 593 B/key, 18.3 s restart,
920 MB RSS after the restart). With ``--baseline REV`` that commit is measured
too, in the same invocation.

    python bench/storage.py --keys 1000000,10000000
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time

from _procs import cleanup, install_signal_handlers, log, tmpdir
from _storage import NodeProc, builds, load, timed_writes

BEFORE = {"dir_x": 13.0, "rss_per_key": 593.0, "restart_s": 18.3, "rss_after_mb": 920.0}


def _sample_dir(node: NodeProc, seconds: float, n_keys: int, size: int) -> int:
    """Overwrite for ``seconds`` while sampling the directory; its largest size."""
    largest = [node.dir_bytes()]

    async def sampler(stop: asyncio.Event) -> None:
        while not stop.is_set():
            largest[0] = max(largest[0], await asyncio.to_thread(node.dir_bytes))
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except TimeoutError:
                pass

    async def run() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(sampler(stop))
        await asyncio.to_thread(timed_writes, node, n_keys, size, seconds, 64)
        stop.set()
        await task

    asyncio.run(run())
    return largest[0]


def one(name: str, code, n: int, size: int, seconds: float) -> dict:
    work = tmpdir("dsnode-storage-")
    node = NodeProc(code, work / "data", {"DSNODE_FSYNC": "false"}, name.replace(" ", "-"))
    node.start()
    try:
        rate = load(node, n, size)
        time.sleep(1.0)
        rss = node.rss_bytes()
        live = n * (len(b"key%012d" % 0) + size)
        peak_dir = _sample_dir(node, seconds, n, size)
        st = node.status()
        snap = st.get("snapshot_files", {}).get("last", {})
        rss_kill = node.rss_bytes()  # after the overwrites: what a restart must not exceed
        node.kill()
        restart = node.start()
        time.sleep(1.0)
        st2 = node.status()
        rss2 = node.rss_bytes()
        out = {
            "build": name, "keys": n, "rate": rate, "rss_per_key": rss / n,
            "rss_mb": rss / 1e6, "dir_mb": peak_dir / 1e6, "live_mb": live / 1e6,
            "dir_x": peak_dir / live, "snap_s": snap.get("seconds"),
            "snap_mb": snap["bytes"] / 1e6 if "bytes" in snap else None,
            "restart_s": restart, "rss_after_mb": rss2 / 1e6, "rss_kill_mb": rss_kill / 1e6,
            "keys_after": st2.get("keys"),
        }
        log(f"{name}: {out}")
        return out
    finally:
        node.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", default="1000000", help="key counts, comma-separated")
    ap.add_argument("--value-bytes", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=30.0, help="overwrite window")
    ap.add_argument("--baseline", help="a git revision to measure as well (same invocation)")
    args = ap.parse_args()
    install_signal_handlers(signal.SIGINT, signal.SIGTERM)
    rows = []
    try:
        with builds(args.baseline) as bs:
            for n in (int(x) for x in args.keys.split(",")):
                for name, code in bs:
                    rows.append(one(name, code, n, args.value_bytes, args.seconds))
    finally:
        cleanup()
    print(f"\nvalues of {args.value_bytes} B, {args.seconds:.0f} s of overwrites (64 in flight)")
    print(f"{'build':<20} {'keys':>11} {'load/s':>8} {'RSS B/key':>9} {'dir peak MB':>11} "
          f"{'live MB':>8} {'dir/live':>8} {'snap s':>7} {'snap MB':>8} {'restart s':>9} "
          f"{'RSS at kill MB':>14} {'RSS after MB':>12} {'keys after':>11}")
    for r in rows:
        snap_s = f"{r['snap_s']:.2f}" if r["snap_s"] is not None else "n/a"
        snap_mb = f"{r['snap_mb']:.0f}" if r["snap_mb"] is not None else "n/a"
        print(f"{r['build']:<20} {r['keys']:>11,} {r['rate']:>8,.0f} {r['rss_per_key']:>9.0f} "
              f"{r['dir_mb']:>11.0f} {r['live_mb']:>8.0f} {r['dir_x']:>7.1f}x {snap_s:>7} "
              f"{snap_mb:>8} {r['restart_s']:>9.2f} {r['rss_kill_mb']:>14.0f} "
              f"{r['rss_after_mb']:>12.0f} "
              f"{r['keys_after'] or 0:>11,}")
    print("\nratios to the issue's 'before' at 1,000,000 keys (13x dir, 593 B/key, 18.3 s "
          "restart, 920 MB after restart); targets: < 3x, <= 350 B/key, <= 3 s (10 s at 10M):")
    for r in rows:
        print(f"  {r['build']} {r['keys']:,}: dir/live {r['dir_x'] / BEFORE['dir_x']:.2f}, "
              f"RSS/key {r['rss_per_key'] / BEFORE['rss_per_key']:.2f}, "
              f"restart {r['restart_s'] / BEFORE['restart_s']:.2f}, "
              f"RSS after restart {r['rss_after_mb'] / BEFORE['rss_after_mb']:.2f} "
              f"({r['rss_after_mb'] / r['rss_kill_mb']:.2f}x the RSS at the kill)")


if __name__ == "__main__":
    main()
