"""Longest event-loop stall of a checkpoint and of installing a peer's snapshot (issue 7.5).

In one process, two ways each, measured with a ticker task that records the
largest gap between its wake-ups (the loop's lag):

- checkpoint of a log window of ``--slots`` accepted values of ``--value-bytes``:
  ``PaxosNode.checkpoint()`` in one call (the old way) versus
  ``checkpoint_writer()`` stepped as the driver does (``CHECKPOINT_RECORDS_PER_STEP``
  and ``CHECKPOINT_BYTES_PER_STEP`` per loop turn, the pieces joined on a thread);
- decoding a snapshot of ``--keys`` keys of 100 bytes: ``DedupKV.restore`` on
  the loop (the old install) versus on a worker thread (``asyncio.to_thread``,
  what the driver does with ``Ready.restores``).

    python bench/install_stall.py --keys 1000000 --slots 20000
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from dsnode.core.commands import Put
from dsnode.core.paxos import PaxosConfig, PaxosNode
from dsnode.core.paxos.statemachine import DedupKV
from dsnode.runtime.driver import CHECKPOINT_BYTES_PER_STEP, CHECKPOINT_RECORDS_PER_STEP


async def max_lag(work) -> tuple[float, float]:
    """(largest ticker gap, seconds the work took) while ``work()`` runs."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        last = time.perf_counter()
        while not done:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    t = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    worst = 0.0
    t0 = time.perf_counter()
    await work()
    took = time.perf_counter() - t0
    done = True
    await t
    return worst, took


def window_node(slots: int, value_bytes: int) -> PaxosNode:
    core = PaxosNode("n1", {0: ("n1",)}, random.Random(1),
                     PaxosConfig(snapshot_interval_slots=10**9))  # fmt: skip
    core.campaign(0)
    core.ready()
    for i in range(slots):
        core.propose(0, i, Put(b"k%d" % i, b"v" * value_bytes))
        core.ready()
    core.tick()
    core.ready()
    return core


def snapshot_blob(keys: int) -> bytes:
    sm = DedupKV()
    kv = sm.kv
    for i in range(keys):
        kv.apply(Put(b"key%09d" % i, b"v" * 100))
    return sm.snapshot()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=1_000_000)
    ap.add_argument("--slots", type=int, default=20_000)
    ap.add_argument("--value-bytes", type=int, default=1000)
    args = ap.parse_args()

    core = window_node(args.slots, args.value_bytes)

    async def one_go() -> None:
        core.checkpoint()

    async def stepped() -> None:
        w = core.checkpoint_writer()
        while not w.step(CHECKPOINT_RECORDS_PER_STEP, CHECKPOINT_BYTES_PER_STEP):
            await asyncio.sleep(0)
        await asyncio.to_thread(w.result)

    blob = snapshot_blob(args.keys)

    async def on_loop() -> None:
        DedupKV.restore(blob)

    async def on_thread() -> None:
        await asyncio.to_thread(DedupKV.restore, blob)

    rows = []
    for what, base, cur in (("checkpoint", one_go, stepped), ("install", on_loop, on_thread)):
        b_lag, b_took = await max_lag(base)
        c_lag, c_took = await max_lag(cur)
        rows.append((what, b_lag, b_took, c_lag, c_took))
    print(f"\ncheckpoint window {args.slots:,} slots x {args.value_bytes} B; "
          f"snapshot {args.keys:,} keys x 100 B ({len(blob) / 1e6:.0f} MB)")
    print(f"{'work':<11} {'old lag max ms':>15} {'old took s':>11} {'new lag max ms':>15} "
          f"{'new took s':>11} {'lag ratio new/old':>18}")
    for what, b_lag, b_took, c_lag, c_took in rows:
        print(f"{what:<11} {b_lag * 1e3:>15.1f} {b_took:>11.2f} {c_lag * 1e3:>15.1f} "
              f"{c_took:>11.2f} {c_lag / b_lag:>18.2f}")


if __name__ == "__main__":
    asyncio.run(main())
