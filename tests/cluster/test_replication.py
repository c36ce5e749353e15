"""A real 3-node cluster under faults: SIGKILL, SIGSTOP, lost majority, whole-cluster crash.

Every test runs a concurrent client workload (cluster_harness.Workload: several
connections to different nodes; puts, conditional puts, deletes, linearizable
gets on a small keyspace, unique values), records the history with each op's
outcome (ok / definite failure / indeterminate) and ends with the
linearizability check of that history (PROTOCOL.md "Guarantees").

The time from SIGKILLing the leader to the first acknowledged write through a
surviving node is printed by test (a); bench/failover_time.py gives the median
of 10 such kills.
"""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from cluster_harness import (
    Cluster,
    History,
    Workload,
    WorkloadConfig,
    async_wait,
    check_acked_writes_survive,
    check_linearizable,
    final_reads,
    kill_leader_and_time_failover,
    median,
    node_status,
    put_once,
    repeated_failover,
)
from harness import RawConn, ServerPool

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]




async def finish(cluster: Cluster, work: Workload, via: str | None = None) -> dict:
    """Stop the load, read every key linearizably through ``via``, check the history."""
    history = await work.stop()
    via = via or cluster.running()[0]
    final = await final_reads(history, cluster.nodes[via].addr, via, work.keys)
    check_acked_writes_survive(history, final)
    check_linearizable(history)
    return final


# ====================================================================== (a)
async def test_leader_sigkill_under_load_fails_over_and_the_node_catches_up(
    pool: ServerPool, seed: int
) -> None:
    """SIGKILL the leader mid-load: a survivor is elected, writes continue through the
    survivors; the killed node restarts and applies up to the leader's commit."""
    cluster = Cluster(pool).start()
    work = Workload(cluster.endpoints(), seed, WorkloadConfig(timeout_ms=2000)).start()
    await work.wait_acked(150, timeout=30)

    old, took, first = await kill_leader_and_time_failover(cluster, work)
    print(f"\nfailover: SIGKILL of leader {old} -> first acknowledged write via "
          f"{first.node}: {took * 1000:.0f} ms")
    survivors = [n for n in cluster.nodes if n != old]
    new = await asyncio.to_thread(cluster.wait_leader, survivors, 20.0)
    assert new != old
    # writes keep flowing through both survivors
    t = time.monotonic()
    for nid in survivors:
        await work.wait_acked(5, timeout=20, after=t, via=[nid])

    await asyncio.to_thread(cluster.nodes[old].restart)
    t = time.monotonic()
    await work.wait_acked(20, timeout=20, after=t)
    await finish(cluster, work)
    target, applied = await asyncio.to_thread(cluster.wait_caught_up, old, 30.0)
    print(f"restarted {old} applied {applied} >= leader commit {target}")
    assert took < 10.0


# ====================================================================== (b)
async def test_sigstopped_leader_is_replaced_and_steps_down_after_sigcont(
    pool: ServerPool, seed: int
) -> None:
    """SIGSTOP the leader past the election timeout: the others elect a leader and keep
    serving; after SIGCONT the old leader steps down, one leader remains, no split brain."""
    cluster = Cluster(pool).start()
    work = Workload(cluster.endpoints(), seed, WorkloadConfig(timeout_ms=1000)).start()
    await work.wait_acked(150, timeout=30)
    old = await asyncio.to_thread(cluster.wait_leader)
    st = await asyncio.to_thread(node_status, cluster.nodes[old])
    assert st is not None
    old_ballot = tuple(st["paxos"]["ballot"])
    others = [n for n in cluster.nodes if n != old]
    cluster.nodes[old].pause()
    try:
        t_stop = time.monotonic()
        new = await asyncio.to_thread(cluster.wait_leader, others, 20.0)
        assert new != old
        await work.wait_acked(30, timeout=20, after=t_stop, via=others)
        # stay stopped well past the election timeout (500 ms) and then some
        await async_wait(lambda: time.monotonic() - t_stop >= 2.0, 5, "2 s of pause")
    finally:
        cluster.nodes[old].resume()
    t_cont = time.monotonic()
    # the old leader learns of the higher ballot and follows; load continues meanwhile
    await asyncio.to_thread(cluster.wait_leader, list(cluster.nodes), 20.0)
    await work.wait_acked(20, timeout=20, after=t_cont, via=[old])
    await finish(cluster, work)
    final_leader = await asyncio.to_thread(cluster.check_single_leader)
    sts = cluster.statuses()
    if final_leader == old:  # it may win again, but only by a new election
        assert tuple(sts[old]["paxos"]["ballot"]) > old_ballot, cluster.describe()
    else:
        assert sts[old]["paxos"]["role"] == "follower", cluster.describe()
    print(f"old leader {old}, new leader {new}, converged on {final_leader}")


# ====================================================================== (c)
SNAP_ARGS = ("--snapshot-interval-slots", "50", "--snapshot-every-records", "200")


async def test_follower_restarted_after_compaction_catches_up_by_snapshot(
    pool: ServerPool, seed: int
) -> None:
    """Kill a follower, write past several compactions, restart it: it catches up (the
    leader's log no longer holds its missing slots, so by snapshot transfer) and then serves
    the latest value with a local stale read."""
    cluster = Cluster(pool, args=SNAP_ARGS).start()
    leader = cluster.wait_leader()
    follower = next(n for n in sorted(cluster.nodes) if n != leader)
    work = Workload(cluster.endpoints(), seed, WorkloadConfig(timeout_ms=2000, think_s=0)).start()
    await work.wait_acked(30, timeout=20)
    await asyncio.to_thread(cluster.nodes[follower].kill)
    st = await asyncio.to_thread(node_status, cluster.nodes[leader])
    assert st is not None
    lagging_from = st["paxos"]["commit"]

    def compacted_past() -> bool:
        s = node_status(cluster.nodes[leader])
        return s is not None and s["paxos"]["snapshot_index"] >= lagging_from + 300

    await async_wait(lambda: asyncio.to_thread(compacted_past), 60, "compaction",
                     lambda: f": {cluster.describe()}", interval=0.1)
    await finish(cluster, work, via=leader)

    await asyncio.to_thread(cluster.nodes[follower].restart)
    lead_st = node_status(cluster.nodes[leader])
    assert lead_st is not None
    # The follower's missing slots are below the leader's snapshot: log entries cannot help.
    assert lead_st["paxos"]["snapshot_index"] > lagging_from
    target, applied = await asyncio.to_thread(cluster.wait_caught_up, follower, 30.0)
    fst = node_status(cluster.nodes[follower])
    assert fst is not None and fst["paxos"]["snapshot_index"] > lagging_from, cluster.describe()

    # the latest value, then a stale read served by the follower itself
    key, value = b"k-latest", f"latest-{seed}".encode()
    resp = await put_once(cluster.nodes[leader].addr, key, value)
    await asyncio.to_thread(cluster.wait_caught_up, follower, 30.0)
    async with await RawConn.open(cluster.nodes[follower].addr) as c:
        r = await c.call("get", key=key, consistency="stale")
    assert r["ok"] and r["value"] == value and r["version"] == resp["version"], r
    print(f"follower {follower}: missed slots from {lagging_from}, caught up to {applied} "
          f"(leader commit {target}), snapshot_index {fst['paxos']['snapshot_index']}")


# ====================================================================== (d)
async def test_lost_majority_refuses_writes_then_recovers(pool: ServerPool, seed: int) -> None:
    """SIGKILL 2 of 3: writes fail (unavailable/timeout, indeterminate where they may still
    commit) and none is acknowledged; restart them: writes succeed, nothing acked is lost."""
    cluster = Cluster(pool).start()
    work = Workload(cluster.endpoints(), seed, WorkloadConfig(timeout_ms=1000)).start()
    await work.wait_acked(150, timeout=30)
    leader = await asyncio.to_thread(cluster.wait_leader)
    victims = [n for n in sorted(cluster.nodes) if n != leader]
    for nid in victims:
        cluster.nodes[nid].send_signal(signal.SIGKILL)
    for nid in victims:
        await asyncio.to_thread(cluster.nodes[nid].wait_exit, 10)
    t_dead = time.monotonic()
    # let the lone node see enough requests fail (bounded by the load, not a fixed sleep)
    h = work.history

    def failed_after() -> int:
        return h.count(lambda r: r.is_write and r.t_call >= t_dead and r.outcome in
                       ("fail", "indeterminate"))

    await async_wait(lambda: failed_after() >= 20, 30, "20 failed writes without a majority")
    t_restart = time.monotonic()
    bad = [r for r in h.recs if r.is_write and r.t_call >= t_dead and r.outcome == "ok"
           and r.t_ret <= t_restart]
    assert not bad, f"writes acknowledged without a majority: {bad[:5]}"
    codes = {r.error["code"] for r in h.recs if r.is_write and r.t_call >= t_dead
             and r.error is not None}
    # A client whose connection went to a killed node sees it drop: an unknown outcome too.
    codes_seen = {c.split(":")[0] for c in codes}
    assert codes_seen <= {"unavailable", "timeout", "client_deadline", "connection_lost"}, codes

    for nid in victims:
        cluster.nodes[nid].spawn()
    await asyncio.to_thread(cluster.wait_ready, victims, 30.0)
    await work.wait_acked(30, timeout=30, after=time.monotonic())
    await finish(cluster, work)
    print(f"without majority: {failed_after()} writes failed; codes {sorted(codes)}")


# ====================================================================== (e)
async def test_whole_cluster_sigkill_mid_load_keeps_every_acknowledged_write(
    pool: ServerPool, seed: int
) -> None:
    """SIGKILL all three at once under load, restart them on their data dirs: every
    acknowledged write survives and the whole history stays linearizable."""
    cluster = Cluster(pool).start()
    work = Workload(cluster.endpoints(), seed, WorkloadConfig(timeout_ms=1000)).start()
    await work.wait_acked(150, timeout=30)
    for srv in cluster.nodes.values():
        srv.send_signal(signal.SIGKILL)
    for srv in cluster.nodes.values():
        await asyncio.to_thread(srv.wait_exit, 10)
    acked_before = len(work.history.acked_writes())
    for srv in cluster.nodes.values():
        srv.spawn()
    await asyncio.to_thread(cluster.wait_ready, list(cluster.nodes), 30.0)
    await work.wait_acked(30, timeout=30, after=time.monotonic())
    final = await finish(cluster, work)
    print(f"{acked_before} writes acknowledged before the crash; final state {len(final)} keys")


# ====================================================================== slow variants
@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_failover_time_median_of_10_leader_kills(pool: ServerPool, seed: int) -> None:
    """The failover figure for the report: 10 leader SIGKILLs under load (each node restarted
    and caught up before the next), median time to the first acknowledged write."""
    cluster = Cluster(pool).start()
    work = Workload(cluster.endpoints(), seed, WorkloadConfig(timeout_ms=2000)).start()
    await work.wait_acked(150, timeout=30)
    times = await repeated_failover(cluster, work, 10)
    await finish(cluster, work)
    ms = sorted(t * 1000 for t in times)
    print(f"failover over {len(ms)} leader kills: median {median(ms):.0f} ms, "
          f"min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms")
    assert median(ms) < 5000


# ====================================================================== the checks themselves
def test_history_checks_catch_a_stale_read_and_a_lost_write() -> None:
    """The recording and both checks flag what they must (no processes involved)."""
    h = History()
    w = h.invoke(0, "n1", {"op": "put", "key": b"k", "value": b"a"})
    h.complete(w, {"id": 1, "ok": True, "succeeded": True, "version": 1})
    w2 = h.invoke(0, "n1", {"op": "put", "key": b"k", "value": b"b"})
    h.complete(w2, {"id": 2, "ok": True, "succeeded": True, "version": 2})
    lost = h.invoke(1, "n2", {"op": "put", "key": b"k", "value": b"c"})
    h.lost(lost, "client_deadline")
    assert lost.outcome == "indeterminate" and lost.ret is None
    check_linearizable(h)
    check_acked_writes_survive(h, {b"k": (b"b", 2)})
    check_acked_writes_survive(h, {b"k": (b"c", 3)})  # the unknown write may have landed
    with pytest.raises(AssertionError, match="final value"):
        check_acked_writes_survive(h, {b"k": (b"a", 1)})  # acked "b" lost
    r = h.invoke(2, "n3", {"op": "get", "key": b"k"})
    h.complete(r, {"id": 3, "ok": True, "value": b"a", "version": 1})  # stale read
    with pytest.raises(AssertionError, match="not linearizable"):
        check_linearizable(h)
