"""Membership that changes while serving (issue 10) across real processes: a node joins
through any member (``serve --join``), one leaves (``member leave``), a dead one is
removed (``member remove``); partitions move their replicas through their own logs
while a client workload runs, and nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time

import pytest
from cluster_harness import (
    DEFAULT_TIMING,
    Cluster,
    Workload,
    WorkloadConfig,
    async_status,
    check_acked_writes_survive,
    check_linearizable,
    final_reads,
    node_status,
)
from harness import free_port
from polling import async_wait_until, wait_until

from dsnode.client import Client
from dsnode.core.ring import Ring

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

P, R = 16, 3
SHAPE = ("--partitions", str(P), "--replication", str(R), "--prefer-ring-leaders", "true")


def _joiner(pool, cluster: Cluster, nid: str, via: list[str]):
    port = free_port()
    # (--partitions is the cluster's: the harness's environment sets another by default)
    args = [*(x for v in via for x in ("--join", v)), *DEFAULT_TIMING, *SHAPE]
    srv = pool.new(*args, node_id=nid, port=port)
    cluster.nodes[nid] = srv
    return srv


def _settled(cluster: Cluster, ids: list[str], epoch: int) -> dict | None:
    """Every node in ``ids`` reports the ring at ``epoch`` settled and is ready."""
    out = {}
    for nid in ids:
        st = node_status(cluster.nodes[nid], timeout=2.0)
        if not _at(st, epoch):
            return None
        out[nid] = st
    return out


async def _asettled(cluster: Cluster, ids: list[str], epoch: int) -> dict | None:
    out = {}
    for nid in ids:
        st = await async_status(cluster.nodes[nid], timeout=2.0)
        if not _at(st, epoch):
            return None
        out[nid] = st
    return out


def _at(st: dict | None, epoch: int) -> bool:
    return (st is not None and st["ring"]["epoch"] == epoch and not st["moves"]["pending"]
            and st["moves"]["settled"] == epoch and st["ready"])


def _check_placement(sts: dict[str, dict], members: list[str]) -> None:
    ring = Ring(members, P, R, 1)
    for nid, st in sts.items():
        assert [p["replicas"] for p in st["partitions"]] == [list(r) for r in ring.placement()]
        assert st["hosted"] == len(ring.partitions_of(nid)), (nid, st["hosted"])


def _addr(cluster: Cluster, nid: str) -> str:
    h, p = cluster.nodes[nid].addr
    return f"{h}:{p}"


def _describe(cluster: Cluster) -> str:
    out = []
    for nid, srv in cluster.nodes.items():
        st = node_status(srv, timeout=2.0)
        if st is None:
            out.append(f"{nid}: no answer")
            continue
        out.append(f"{nid}: ring {st['ring']} moves {st['moves']} hosted {st['hosted']} "
                   f"ready {st['ready']} members {[(m['node_id'], m['state']) for m in st['members']]}")
    return "\n" + "\n".join(out) + "\n" + cluster.output_tails()


def _cli(*args: str, endpoint: tuple[str, int]) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "dsnode", "--endpoints", f"{endpoint[0]}:{endpoint[1]}",
         "--output", "json", *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr + out.stdout
    return json.loads(out.stdout)


def test_join_leave_and_remove_while_a_workload_runs(pool):
    cluster = Cluster(pool, 3, SHAPE).start(60)
    addr = {nid: f"{a[0]}:{a[1]}" for nid, a in cluster.endpoints().items()}

    def live() -> dict[str, tuple[str, int]]:
        return {nid: s.addr for nid, s in cluster.nodes.items() if s.running}

    async def cli(*args: str, via: str) -> dict:
        return await asyncio.to_thread(_cli, *args, endpoint=cluster.nodes[via].addr)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        work = Workload(live, seed=10, cfg=WorkloadConfig(clients=4, keys=24)).start()
        await work.wait_acked(20, 30.0)
        # -- a fourth node joins through n2
        n4 = _joiner(pool, cluster, "n4", [addr["n2"]])
        n4.spawn()
        four = ["n1", "n2", "n3", "n4"]
        await async_wait_until(lambda: _asettled(cluster, four, 2), 120.0,
                               "n4 joined and the ring of epoch 2 settled",
                               lambda: _describe(cluster))
        _check_placement(await _asettled(cluster, four, 2), four)
        await work.wait_acked(20, 30.0, after=time.monotonic())
        # -- n1 leaves (its replicas move away first, then it stops)
        res = await cli("member", "leave", "n1", via="n3")
        assert res["state"] == "leaving" and res["epoch"] == 3
        three = ["n2", "n3", "n4"]
        await async_wait_until(lambda: _asettled(cluster, three, 3), 120.0,
                               "n1 left and the ring of epoch 3 settled")
        await async_wait_until(lambda: cluster.nodes["n1"].proc.poll() is not None or None,
                               30.0, "n1 stopped after leaving")
        assert cluster.nodes["n1"].proc.returncode == 0, cluster.nodes["n1"].output_tail(8)
        _check_placement(await _asettled(cluster, three, 3), three)
        await work.wait_acked(20, 30.0, after=time.monotonic())
        # -- n3 dies and is removed; its replicas are rebuilt on n2 and n4
        cluster.nodes["n3"].kill()
        res = await cli("member", "remove", "n3", via="n2")
        assert res["state"] == "removed" and res["epoch"] == 4
        await async_wait_until(lambda: _asettled(cluster, ["n2", "n4"], 4), 120.0,
                               "n3 removed and the ring of epoch 4 settled")
        members = {m["node_id"]: m["state"] for m in await cli("member", "list", via="n4")}
        assert members == {"n1": "left", "n2": "alive", "n3": "left", "n4": "alive"}, members
        await work.wait_acked(20, 30.0, after=time.monotonic())
        hist = await work.stop()
        final = await final_reads(hist, cluster.nodes["n4"].addr, "n4", work.keys)
        check_acked_writes_survive(hist, final)
        check_linearizable(hist)
        del loop

    asyncio.run(run())


def test_a_join_through_a_node_that_does_not_answer_tries_the_next(pool):
    cluster = Cluster(pool, 3, SHAPE).start(60)
    dead = f"127.0.0.1:{free_port()}"
    n4 = _joiner(pool, cluster, "n4", [dead, _addr(cluster, "n1")])
    n4.spawn()
    wait_until(lambda: _settled(cluster, ["n1", "n4"], 2), 120.0, "n4 joined")
    # a second start of the joined node (no --join needed) rejoins as the same member
    n4.kill()
    n4.extra_args = [*DEFAULT_TIMING, *SHAPE]
    n4.spawn()
    wait_until(lambda: _settled(cluster, ["n1", "n4"], 2), 60.0, "n4 back")


def test_client_sees_the_new_member(pool):
    cluster = Cluster(pool, 3, SHAPE).start(60)
    n4 = _joiner(pool, cluster, "n4", [_addr(cluster, "n1")])
    n4.spawn()
    wait_until(lambda: _settled(cluster, ["n1", "n2", "n3", "n4"], 2), 120.0, "n4 joined")

    async def go() -> None:
        async with Client(_addr(cluster, "n4"), timeout=10) as c:
            await c.put(b"k", b"v")
            assert (await c.get(b"k")).value == b"v"
            st = await async_status(n4)
            assert st is not None and st["hosted"] > 0

    asyncio.run(go())


def test_leave_on_stop_then_the_left_node_cannot_start_again_but_its_id_can_rejoin(pool):
    cluster = Cluster(pool, 3, SHAPE).start(60)
    n4 = _joiner(pool, cluster, "n4", [_addr(cluster, "n1")])
    n4.extra_args += ["--leave-on-stop", "true"]
    n4.spawn()
    wait_until(lambda: _settled(cluster, ["n1", "n2", "n3", "n4"], 2), 120.0, "n4 joined",
               lambda: _describe(cluster))
    assert n4.terminate(timeout=120) == 0  # SIGTERM: leaves first, then stops
    sts = wait_until(lambda: _settled(cluster, ["n1", "n2", "n3"], 3), 60.0, "n4 left",
                     lambda: _describe(cluster))
    _check_placement(sts, ["n1", "n2", "n3"])
    assert {m["node_id"]: m["state"] for m in sts["n1"]["members"]}["n4"] == "left"
    # its data directory holds nothing any more: a start on it is refused, naming the fix
    n4.extra_args = [*DEFAULT_TIMING, *SHAPE]
    n4.spawn()
    assert n4.wait_exit(30) == 2
    assert "left the cluster" in n4.last_run_output()
    # the same id with a new data directory joins again (the cluster pins it anew)
    again = pool.new("--join", _addr(cluster, "n2"), *DEFAULT_TIMING, *SHAPE, node_id="n4",
                     port=n4.port)
    cluster.nodes["n4"] = again
    again.spawn()
    wait_until(lambda: _settled(cluster, ["n1", "n2", "n3", "n4"], 4), 120.0, "n4 back",
               lambda: _describe(cluster))


def test_a_join_the_cluster_refuses_ends_the_node_with_status_2(pool):
    cluster = Cluster(pool, 3, SHAPE).start(60)
    n4 = _joiner(pool, cluster, "n4", [_addr(cluster, "n1")])
    n4.spawn()
    wait_until(lambda: _settled(cluster, ["n1", "n4"], 2), 120.0, "n4 joined")
    # another data directory under the same id
    twin = pool.new("--join", _addr(cluster, "n2"), *DEFAULT_TIMING, *SHAPE, node_id="n4")
    twin.spawn()
    assert twin.wait_exit(60) == 2
    assert "belongs to another member's data directory" in twin.last_run_output()
    # a join refused before it was asked (another P): the same directory may try again
    n5 = pool.new("--join", _addr(cluster, "n2"), *DEFAULT_TIMING, "--partitions", "8",
                  node_id="n5")
    n5.spawn()
    assert n5.wait_exit(60) == 2
    assert "has partitions = 16" in n5.last_run_output()
    n5.extra_args = ["--join", _addr(cluster, "n2"), *DEFAULT_TIMING, *SHAPE]
    cluster.nodes["n5"] = n5
    n5.spawn()
    wait_until(lambda: _settled(cluster, ["n1", "n5"], 3), 120.0, "n5 joined",
               lambda: _describe(cluster))
    # --join on a data directory that holds a cluster already
    n1 = cluster.nodes["n1"]
    n1.kill()
    n1.extra_args = [*DEFAULT_TIMING, *SHAPE, "--join", _addr(cluster, "n2")]
    rc, out = _run_to_exit(n1)
    assert rc == 2 and "--join only on a new data directory" in out, out


def _run_to_exit(srv) -> tuple[int, str]:
    srv.spawn()
    return srv.wait_exit(30), srv.last_run_output()


def test_a_node_dead_for_longer_than_auto_remove_dead_ms_is_removed(pool):
    auto = ("--failure-dead-after-ms", "1000", "--auto-remove-dead-ms", "2000")
    cluster = Cluster(pool, 3, (*SHAPE, *auto)).start(60)
    n4 = _joiner(pool, cluster, "n4", [_addr(cluster, "n1")])
    n4.extra_args += list(auto)
    n4.spawn()
    wait_until(lambda: _settled(cluster, ["n1", "n2", "n3", "n4"], 2), 120.0, "n4 joined",
               lambda: _describe(cluster))
    cluster.nodes["n3"].kill()
    sts = wait_until(lambda: _settled(cluster, ["n1", "n2", "n4"], 3), 120.0,
                     "n3 removed automatically", lambda: _describe(cluster))
    _check_placement(sts, ["n1", "n2", "n4"])
    assert {m["node_id"]: m["state"] for m in sts["n1"]["members"]}["n3"] == "left"


@pytest.mark.timeout(900)
def test_100k_keys_grow_3_to_5_then_remove_one_and_one_leaves_under_a_checked_workload(pool):
    """Issue 10 part 5: 3 nodes with 100,000 keys; a fourth and a fifth join while a client
    workload runs; then one is removed (killed first) and another leaves. The history is
    linearizable, every acknowledged write and every loaded key is there at the end, and
    each node holds its share of the replicas within the ring's balance bound."""
    p = 64
    shape = ("--partitions", str(p), "--replication", "3", "--prefer-ring-leaders", "true")
    cluster = Cluster(pool, 3, shape).start(60)

    def live() -> dict[str, tuple[str, int]]:
        return {nid: s.addr for nid, s in cluster.nodes.items() if s.running}

    def joiner(nid: str, via: str):
        srv = pool.new("--join", _addr(cluster, via), *DEFAULT_TIMING, *shape, node_id=nid,
                       port=free_port())
        cluster.nodes[nid] = srv
        srv.spawn()

    async def settle(ids: list[str], epoch: int) -> dict:
        return await async_wait_until(lambda: _asettled(cluster, ids, epoch), 300.0,
                                      f"the ring of epoch {epoch} settled on {ids}",
                                      lambda: _describe(cluster))

    def balanced(sts: dict, members: list[str]) -> None:
        ring = Ring(members, p, 3, 1)
        fair = 3 * p / len(members)
        for nid, st in sts.items():
            assert st["hosted"] == len(ring.partitions_of(nid))
            assert 0.5 * fair <= st["hosted"] <= 1.25 * fair, (nid, st["hosted"], fair)

    async def run() -> None:
        eps = ",".join(_addr(cluster, n) for n in ("n1", "n2", "n3"))
        async with Client(eps, timeout=30, pool_size=4) as c:
            it = iter(range(100_000))

            async def loader() -> None:
                for i in it:
                    await c.put(b"bulk%06d" % i, b"x%d" % i)

            await asyncio.gather(*(loader() for _ in range(64)))
        work = Workload(live, seed=7, cfg=WorkloadConfig(clients=4, keys=16)).start()
        await work.wait_acked(20, 60.0)
        joiner("n4", "n1")
        four = ["n1", "n2", "n3", "n4"]
        balanced(await settle(four, 2), four)
        joiner("n5", "n3")
        five = [*four, "n5"]
        balanced(await settle(five, 3), five)
        await work.wait_acked(20, 60.0, after=time.monotonic())
        cluster.nodes["n2"].kill()
        res = await asyncio.to_thread(_cli, "member", "remove", "n2",
                                      endpoint=cluster.nodes["n1"].addr)
        assert res["state"] == "removed"
        rest = ["n1", "n3", "n4", "n5"]
        balanced(await settle(rest, 4), rest)
        res = await asyncio.to_thread(_cli, "member", "leave", "n4",
                                      endpoint=cluster.nodes["n5"].addr)
        assert res["state"] == "leaving"
        three = ["n1", "n3", "n5"]
        balanced(await settle(three, 5), three)
        await work.wait_acked(20, 60.0, after=time.monotonic())
        hist = await work.stop()
        final = await final_reads(hist, cluster.nodes["n5"].addr, "n5", work.keys)
        check_acked_writes_survive(hist, final)
        check_linearizable(hist)
        async with Client(_addr(cluster, "n3"), timeout=30) as c:
            rng = random.Random(3)
            for i in rng.sample(range(100_000), 2_000):
                assert (await c.get(b"bulk%06d" % i)).value == b"x%d" % i

    asyncio.run(run())
