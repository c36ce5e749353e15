"""Cross-partition transactions under a network partition (issue 9 part 7): the bank of
test_transactions.py over 5 nodes with P = 64, each node in its own network namespace
(tests/cluster/netns.py); one node is cut off from the others in the middle of the load
(coordinators and participants on both sides), then the network heals. Every read-all
transaction sees the total, the total holds at the end, and nothing stays prepared,
locked or decided.

Needs root, ``ip`` and ``iptables``; skipped with the reason otherwise."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from bank import Bank, endpoints, final_total, quiet
from netns import lab_cluster

from dsnode.client import Client

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.timeout(240)]

IDS = ["n1", "n2", "n3", "n4", "n5"]
ARGS = ("--partitions", "64", "--replication", "3", "--prefer-ring-leaders", "true",
        "--txn-prepare-timeout-ms", "1000", "--txn-decision-timeout-ms", "2000")


async def test_bank_through_a_node_cut_off_and_back(tmp_path: Path) -> None:
    with lab_cluster(tmp_path, IDS, ARGS) as (lab, cluster):
        await asyncio.to_thread(cluster.start, 90)
        bank = Bank([b"acct-%02d" % i for i in range(24)])
        async with Client(endpoints(cluster, IDS), timeout=3) as client:
            await bank.open(client)
            await bank.run(client, 3.0, 8, seed=5)
            calm = bank.transfers
            assert calm > 0, bank.outcomes

            async def cut_and_heal() -> None:
                await asyncio.sleep(1.0)
                await asyncio.to_thread(lab.isolate, "n2")
                await asyncio.sleep(4.0)
                await asyncio.to_thread(lab.heal)

            await asyncio.gather(bank.run(client, 8.0, 8, seed=6), cut_and_heal())
            await bank.run(client, 2.0, 8, seed=7)
            assert bank.transfers > calm, bank.outcomes
            await quiet(cluster, IDS, timeout=60.0)
            assert await final_total(client, bank) == bank.total
            assert await bank.read_all(client) == bank.total
