"""The durability order (``effects.py`` contract), through the real ``Driver``.

A real ``PaxosNode`` core runs inside the real driver; the WAL is a stand-in
whose fsync the test holds open. While it is held, nothing that depends on an
appended record may leave: no peer message, no client reply. Released, the
held effects go out in order, after the fsync completed.
"""

from __future__ import annotations

import asyncio
import random

from dsnode.core.commands import STALE, Get, Put
from dsnode.core.paxos import PaxosConfig, PaxosNode
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.messages import Accept, Accepted, Prepare, Promise, from_wire, to_wire
from dsnode.core.paxos.statemachine import pack_batch
from dsnode.runtime.driver import Driver, Pending

TRIO = ("n1", "n2", "n3")


class HeldWAL:
    """Appends in memory; ``sync`` completes only once the test sets ``gate``."""

    def __init__(self, events: list) -> None:
        self.events = events
        self.records: list[bytes] = []
        self.gate = asyncio.Event()
        self.last_lsn = 0
        self.durable_lsn = 0

    def append_many(self, payloads) -> int:
        self.records.extend(payloads)
        self.last_lsn += len(payloads)
        self.events.append(("append", self.last_lsn))
        return self.last_lsn

    async def sync(self) -> int:
        target = self.last_lsn
        await self.gate.wait()
        if target > self.durable_lsn:
            self.durable_lsn = target
            self.events.append(("durable", target))
        return self.durable_lsn


class RecordingNet:
    def __init__(self, events: list) -> None:
        self.events = events
        self.links: dict = {}

    def send(self, peer: str, msg: list) -> None:
        self.events.append(("send", peer, from_wire(msg)))

    def connected(self, peer: str) -> bool:
        return True


class Shell:
    """A driver around a fresh core, with every effect recorded in one ``events`` list."""

    def __init__(self, members: tuple[str, ...]) -> None:
        self.events: list = []
        self.wal = HeldWAL(self.events)
        self.core = PaxosNode("n1", {0: members}, random.Random(7), PaxosConfig())
        self.driver = Driver(
            self.core, self.wal, self._deliver, RecordingNet(self.events), node_id="n1",
            tick_seconds=3600.0,  # no ticks during the test: the test is the only input
            checkpoint_every_records=10**9,
        )
        self.task = asyncio.create_task(self.driver.run())

    def _deliver(self, replies) -> None:
        for r in replies:
            self.events.append(("reply", r.token.rid, r.result, r.error))

    async def settle(self) -> None:
        """Let the driver run every loop turn it has work for."""
        for _ in range(20):
            await asyncio.sleep(0)

    def outgoing(self) -> list:
        return [e for e in self.events if e[0] in ("send", "reply")]

    def index(self, pred) -> int:
        return next(i for i, e in enumerate(self.events) if pred(e))

    async def release(self) -> None:
        self.wal.gate.set()
        await self.settle()

    async def close(self) -> None:
        self.wal.gate.set()
        self.driver.stop()
        async with asyncio.timeout(10):
            await self.task


def _tags(records: list[bytes]) -> list[str]:
    return [rec.decode(r)[0] for r in records]


async def test_a_followers_accepted_waits_for_its_accept_record():
    s = Shell(TRIO)
    value = pack_batch([(None, Put(b"k", b"v"))])
    s.driver.on_peer_messages("n2", [to_wire(Accept(0, (1, "n2"), ((1, value),), 0))])
    await s.settle()
    assert _tags(s.wal.records) == [rec.ACCEPT]
    assert s.outgoing() == []  # the accept is appended, not durable: no Accepted yet
    await s.release()
    durable = s.index(lambda e: e == ("durable", 1))
    sent = s.index(lambda e: e[0] == "send" and type(e[2]) is Accepted)
    assert durable < sent
    msg = s.events[sent][2]
    assert s.events[sent][1] == "n2" and msg.ok and msg.slots == (1,)
    await s.close()


async def test_a_promise_waits_for_its_promise_record():
    s = Shell(TRIO)
    s.driver.on_peer_messages("n3", [to_wire(Prepare(0, (4, "n3"), 1))])
    await s.settle()
    assert _tags(s.wal.records) == [rec.PROMISE]
    assert s.outgoing() == []
    await s.release()
    sent = s.index(lambda e: e[0] == "send" and type(e[2]) is Promise)
    assert s.index(lambda e: e[0] == "durable") < sent
    assert s.events[sent][1] == "n3" and s.events[sent][2].ok
    await s.close()


async def test_a_leaders_reply_waits_for_the_accept_records_of_its_slot():
    s = Shell(("n1",))  # a group of one: elected, proposes and chooses within one input
    s.core.campaign(0)
    s.wal.gate.set()
    async with asyncio.timeout(10):
        while not s.core.is_leader(0) or s.driver._waiting or s.core.applied_index(0) < 1:
            s.driver._schedule_flush()
            await asyncio.sleep(0)
    s.wal.gate.clear()
    before = len(s.wal.records)
    s.driver.submit(Pending(None, 1, True), Put(b"k", b"v1"), timeout_s=60)
    s.driver.submit(Pending(None, 2, True), Put(b"k", b"v2"), timeout_s=60)
    await s.settle()
    assert rec.ACCEPT in _tags(s.wal.records[before:])
    assert s.core.applied_index(0) >= 2  # chosen and applied in the core already...
    assert not any(e[0] == "reply" for e in s.events)  # ...but not answered
    appended = s.wal.last_lsn
    await s.release()
    durable = s.index(lambda e: e[0] == "durable" and e[1] >= appended)
    replies = [i for i, e in enumerate(s.events) if e[0] == "reply"]
    assert [s.events[i][1] for i in replies] == [1, 2]  # released in order
    assert all(durable < i for i in replies)
    assert all(s.events[i][3] is None for i in replies)
    await s.close()


async def test_a_reply_waits_for_the_records_of_an_earlier_ready():
    """Rule 2: a stale read persists nothing itself, yet it reads state that an
    accept record of an earlier Ready (still not durable) may have shaped."""
    s = Shell(TRIO)
    value = pack_batch([(None, Put(b"k", b"v"))])
    s.driver.on_peer_messages("n2", [to_wire(Accept(0, (1, "n2"), ((1, value),), 0))])
    await s.settle()
    records = len(s.wal.records)
    router = s.driver._router()
    for busy in ("n2", "n3"):  # the peers have requests in flight: the least busy is n1
        router.inflight.start(busy)
    s.driver.submit(Pending(None, 9, False), Get(b"k", consistency=STALE), timeout_s=60)
    await s.settle()
    assert len(s.wal.records) == records  # the read appended nothing of its own
    assert s.outgoing() == []
    await s.release()
    durable = s.index(lambda e: e[0] == "durable")
    sent = s.index(lambda e: e[0] == "send")
    reply = s.index(lambda e: e[0] == "reply")
    assert durable < sent < reply  # in the order the Ready batches came
    await s.close()
