"""A bank over real processes for the cross-partition transaction tests: accounts spread
over partitions, transfers (version compares, two puts) and read-all transactions whose
total is checked every time; and the checks that nothing stays prepared or locked."""

from __future__ import annotations

import asyncio
import random
import time

from cluster_harness import Cluster, async_status
from polling import async_wait_until

from dsnode.client import Client
from dsnode.client.client import Op
from dsnode.client.errors import DsnodeError

START = 1000


def endpoints(cluster: Cluster, ids: list[str]) -> list[str]:
    return [f"{cluster.nodes[i].addr[0]}:{cluster.nodes[i].addr[1]}" for i in ids]


class Bank:
    """Accounts spread over partitions; transfers and read-all transactions, checked."""

    def __init__(self, accounts: list[bytes]) -> None:
        self.accounts = accounts
        self.total = START * len(accounts)
        self.read_alls = 0
        self.transfers = 0
        self.outcomes: dict[str, int] = {}

    async def open(self, client: Client) -> None:
        await asyncio.gather(*(client.put(k, str(START).encode()) for k in self.accounts))

    async def read_all(self, client: Client) -> int | None:
        try:
            r = await client.txn(then=[Op.get(k) for k in self.accounts])
        except DsnodeError as e:
            self._count(e.code)
            return None
        total = sum(int(x["value"]) for x in r.results)
        assert total == self.total, f"a read-all transaction saw {total}, not {self.total}"
        self.read_alls += 1
        return total

    async def transfer(self, client: Client, rng: random.Random) -> None:
        a, b = rng.sample(self.accounts, 2)
        try:
            ga, gb = await asyncio.gather(client.get(a), client.get(b))
            amount = rng.randint(1, 50)
            r = await client.txn(
                compares=[(a, ga.version), (b, gb.version)],
                then=[Op.put(a, str(int(ga.value) - amount).encode()),
                      Op.put(b, str(int(gb.value) + amount).encode())])
        except DsnodeError as e:
            self._count(e.code + ("?" if e.indeterminate else ""))
            return
        self._count("ok" if r.succeeded else "stale")
        self.transfers += r.succeeded

    def _count(self, what: str) -> None:
        self.outcomes[what] = self.outcomes.get(what, 0) + 1

    async def run(self, client: Client, seconds: float, workers: int, seed: int) -> None:
        stop = time.monotonic() + seconds

        async def worker(i: int) -> None:
            rng = random.Random(seed * 100 + i)
            while time.monotonic() < stop:
                if rng.random() < 0.2:
                    await self.read_all(client)
                else:
                    await self.transfer(client, rng)

        await asyncio.gather(*(worker(i) for i in range(workers)))


async def quiet(cluster: Cluster, ids: list[str], timeout: float = 30.0,
                 decisions: bool = True, interval: float = 0.2) -> None:
    """Every node answers and holds no prepared transaction or lock (and, with
    ``decisions``, no decision kept and nothing it coordinates)."""
    async def settled() -> bool | None:
        for nid in ids:
            st = await async_status(cluster.nodes[nid])
            if st is None:
                return None
            t = st["txns"]
            if t["prepared"] or t["locks_held"]:
                return None
            if decisions and (t["decisions"] or t["coordinating"]):
                return None
        return True

    await async_wait_until(settled, timeout, "no transaction left prepared, locked or decided",
                           interval=interval)


async def final_total(client: Client, bank: Bank) -> int:
    async def read() -> int | None:
        try:
            got = await asyncio.gather(*(client.get(k) for k in bank.accounts))
        except DsnodeError:
            return None
        return sum(int(g.value) for g in got)

    return await async_wait_until(read, 30.0, "every account readable", interval=0.2)
