"""The failure detector across real processes (issue 10 part 3): a SIGSTOPped node is
reported suspect by the others within about two seconds and alive again once it
resumes; a SIGKILLed one suspect, then dead after failure_dead_after_ms; `dsnode member
list` shows the states; stale reads avoid a suspect replica."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
from cluster_harness import Cluster, node_status
from polling import wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

ARGS = ("--partitions", "8", "--replication", "3", "--failure-dead-after-ms", "3000")


def _state(cluster: Cluster, viewer: str, peer: str) -> str | None:
    st = node_status(cluster.nodes[viewer])
    if st is None:
        return None
    return next(m["state"] for m in st["members"] if m["node_id"] == peer)


def _member_list(cluster: Cluster, nid: str) -> list[dict]:
    host, port = cluster.nodes[nid].addr
    out = subprocess.run([sys.executable, "-m", "dsnode", "member", "list", "-o", "json",
                          "--endpoints", f"{host}:{port}"],
                         capture_output=True, text=True, timeout=30, check=True)
    return json.loads(out.stdout)


def test_sigstop_is_suspect_then_alive_and_sigkill_dead(pool):
    cluster = Cluster(pool, 3, ARGS).start(60)
    wait_until(lambda: all(_state(cluster, v, p) == "alive" for v in ("n1", "n2")
                           for p in ("n1", "n2", "n3")), 20.0, "everyone alive")
    members = _member_list(cluster, "n1")
    assert [m["state"] for m in members] == ["alive"] * 3
    assert all(m["replicas"] == 8 for m in members)

    cluster.nodes["n3"].proc.send_signal(signal.SIGSTOP)
    t0 = time.monotonic()
    try:
        wait_until(lambda: _state(cluster, "n1", "n3") == "suspect" or None, 10.0,
                   "n1 to suspect the stopped n3", interval=0.05)
        suspected = time.monotonic() - t0
        assert _state(cluster, "n1", "n2") == "alive"
    finally:
        cluster.nodes["n3"].proc.send_signal(signal.SIGCONT)
    assert 0.8 <= suspected <= 3.0, suspected
    wait_until(lambda: _state(cluster, "n1", "n3") == "alive" or None, 10.0,
               "n3 alive again")

    cluster.nodes["n3"].kill()
    t0 = time.monotonic()
    wait_until(lambda: _state(cluster, "n2", "n3") == "suspect" or None, 10.0,
               "n2 to suspect the killed n3", interval=0.05)
    to_suspect = time.monotonic() - t0
    wait_until(lambda: _state(cluster, "n2", "n3") == "dead" or None, 10.0,
               "n2 to find n3 dead", interval=0.05)
    to_dead = time.monotonic() - t0
    assert to_suspect < to_dead and 2.5 <= to_dead <= 6.0, (to_suspect, to_dead)
    assert [m["state"] for m in _member_list(cluster, "n1")] == ["alive", "alive", "dead"]
    print(f"SIGSTOP -> suspect {suspected:.2f} s; SIGKILL -> suspect {to_suspect:.2f} s, "
          f"dead {to_dead:.2f} s (failure_dead_after_ms 3000)")


async def test_a_busy_cluster_suspects_nobody(pool):
    """256 puts in flight through every node for several seconds (each loop busy, its
    turns long): no node suspects another."""
    import asyncio

    from dsnode.client import Client

    cluster = Cluster(pool, 3, ARGS).start(60)
    wait_until(lambda: all(_state(cluster, v, p) == "alive" for v in cluster.nodes
                           for p in cluster.nodes), 20.0, "everyone alive")
    before = {n: node_status(cluster.nodes[n])["detector"]["suspicions"] for n in cluster.nodes}
    eps = [f"{h}:{p}" for h, p in (cluster.nodes[n].addr for n in cluster.nodes)]
    stop = time.monotonic() + 6.0

    async def worker(c: Client, i: int) -> None:
        n = 0
        while time.monotonic() < stop:
            await c.put(b"busy-%d-%d" % (i, n % 50), b"x" * 200)
            n += 1

    async with Client(eps, timeout=10) as c:
        await asyncio.gather(*(worker(c, i) for i in range(256)))
    after = {n: node_status(cluster.nodes[n])["detector"]["suspicions"] for n in cluster.nodes}
    assert after == before, (before, after)
