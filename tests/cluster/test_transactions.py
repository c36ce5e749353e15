"""Cross-partition transactions across real processes (issue 9 part 7): a bank over
5 nodes and P = 64 under SIGKILL and SIGSTOP with every read-all transaction checked,
a coordinator killed between its prepares and its decision, and hot accounts under
contention with no deadlock. After each, nothing stays prepared or locked."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from bank import Bank, endpoints, final_total, quiet
from cluster_harness import Cluster, node_status
from polling import async_wait_until

from dsnode.client import Client
from dsnode.client.client import Op
from dsnode.client.errors import DsnodeError
from dsnode.core.ring import Ring

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

P, R = 64, 3
PARTITIONED = ("--partitions", str(P), "--replication", str(R), "--prefer-ring-leaders", "true",
               "--txn-prepare-timeout-ms", "1000", "--txn-decision-timeout-ms", "2000")


async def test_bank_over_five_nodes_survives_sigkill_and_sigstop(pool):
    cluster = Cluster(pool, 5, PARTITIONED).start(60)
    ids = list(cluster.nodes)
    ring = Ring(ids, P, R, 1)
    bank = Bank([b"acct-%02d" % i for i in range(24)])
    assert len({ring.partition_of(k) for k in bank.accounts}) > 10
    async with Client(endpoints(cluster, ids), timeout=5) as client:
        await bank.open(client)
        await bank.run(client, 3.0, 8, seed=1)
        calm = bank.transfers
        assert calm > 0 and bank.read_alls > 0, bank.outcomes

        # SIGKILL a node in the middle of the load, restart it in the middle too
        async def kill_and_restart() -> None:
            await asyncio.sleep(1.0)
            cluster.nodes["n3"].kill()
            await asyncio.sleep(2.0)
            await asyncio.to_thread(cluster.nodes["n3"].restart, 60)

        await asyncio.gather(bank.run(client, 6.0, 8, seed=2), kill_and_restart())

        # SIGSTOP another for longer than an election timeout and the prepare timeout
        async def stop_and_resume() -> None:
            await asyncio.sleep(1.0)
            cluster.nodes["n5"].proc.send_signal(signal.SIGSTOP)
            await asyncio.sleep(2.5)
            cluster.nodes["n5"].proc.send_signal(signal.SIGCONT)

        await asyncio.gather(bank.run(client, 6.0, 8, seed=3), stop_and_resume())
        assert bank.transfers > calm, bank.outcomes
        await quiet(cluster, ids)
        assert await final_total(client, bank) == bank.total
        assert await bank.read_all(client) == bank.total


async def test_coordinator_killed_before_its_decision_is_resolved_by_the_home(pool):
    """n1 coordinates and dies (a test-only fault point) when about to ask the home
    partition to commit: its participants, prepared on other nodes, ask the home after
    the prepare timeout, the home chooses abort, the locks go and nothing is applied."""
    cluster = Cluster(pool, 3, PARTITIONED)
    cluster.nodes["n1"].env["DSNODE_TEST_TXN_FAULT"] = "before_decide"
    cluster.start(60)
    ids = list(cluster.nodes)
    ring = Ring(ids, P, R, 1)
    keys = [b"k-%d" % i for i in range(64)]
    by_pid: dict[int, bytes] = {}
    for k in keys:
        by_pid.setdefault(ring.partition_of(k), k)
    a, b = list(by_pid.values())[:2]
    async with Client(endpoints(cluster, ["n2", "n3"]), timeout=5) as client:
        await client.put(a, b"a0")
        await client.put(b, b"b0")
    async with Client(endpoints(cluster, ["n1"]), timeout=3, ring_aware=False) as one:
        attempt = asyncio.ensure_future(one.txn(then=[Op.put(a, b"a1"), Op.put(b, b"b1")]))
        await async_wait_until(lambda: cluster.nodes["n1"].proc.poll() is not None, 10.0,
                               "n1 died at the fault point", interval=0.02)
        killed = time.monotonic()
        with pytest.raises(DsnodeError) as e:
            await attempt
        assert e.value.indeterminate or e.value.code in ("unavailable", "timeout")
    async with Client(endpoints(cluster, ["n2", "n3"]), timeout=15) as client:
        # a linearizable get of a key the in-doubt transaction locks waits for it
        got = await asyncio.gather(client.get(a), client.get(b))
        resolved = time.monotonic() - killed
        assert [g.value for g in got] == [b"a0", b"b0"]  # aborted: nothing applied
        await quiet(cluster, ["n2", "n3"], timeout=20.0)
        await client.put(a, b"a2")  # and the keys are free again
    sts = [node_status(cluster.nodes[n]) for n in ("n2", "n3")]
    assert sum(st["txns"]["counters"].get("recovery_participant_abort", 0) for st in sts) >= 1
    assert resolved >= 0.5  # it did wait for the prepare timeout (1 s, from the prepare)
    print(f"participants resolved {resolved:.2f} s after the coordinator died")


async def test_hot_accounts_under_contention_finish_without_deadlock(pool):
    """64 clients moving money among 10 hot accounts: every request ends (no deadlock:
    wait-die), some commit, conflicts are answered `conflict`, the total holds, and
    afterwards no lock is left. Each node's in-flight limit is low (24), so a loaded node
    hands transactions to a less busy one to coordinate (Router.coordinator)."""
    cluster = Cluster(pool, 3, (*PARTITIONED, "--inflight-requests-max", "24")).start(60)
    ids = list(cluster.nodes)
    bank = Bank([b"hot-%d" % i for i in range(10)])
    async with Client(endpoints(cluster, ids), timeout=5) as client:
        await bank.open(client)
        started = time.monotonic()
        await asyncio.wait_for(bank.run(client, 5.0, 64, seed=4), timeout=60)
        assert time.monotonic() - started < 30  # every request ended within its deadline
        assert bank.transfers > 0, bank.outcomes
        assert set(bank.outcomes) <= {"ok", "stale", "conflict", "timeout?", "timeout",
                                      "overloaded"}, bank.outcomes
        await quiet(cluster, ids)
        assert await final_total(client, bank) == bank.total
    sts = [node_status(cluster.nodes[n]) for n in ids]
    print("outcomes", bank.outcomes, "handed off",
          [st["txns"]["handed_off"] for st in sts], "resolves",
          [st["txns"]["resolves"] for st in sts])
    assert sum(st["txns"]["handed_off"] for st in sts) > 0
    assert sum(st["txns"]["coordinated_for_peers"] for st in sts) > 0
    # resolves rode in the slots of the commands (and reads) waiting for their locks
    assert sum(st["txns"]["resolves"]["rode"] for st in sts) > 0
