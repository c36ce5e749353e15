"""Seeded client workload: puts, conditional puts, deletes, linearizable and
stale gets. Each client has one op outstanding and retries it (same request
id, so the state machine applies it at most once) until its deadline. The
history records invoke/complete ticks, a global event order for the checker,
and the outcome: ok, fail (definitely no effect) or indeterminate.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass, field
from typing import Any

from dsnode.core.commands import LINEARIZABLE, STALE, Delete, Get, Put
from dsnode.sim.linearizability import HOp

WRITES = ("put", "delete")


@dataclass(slots=True)
class ClientOp:
    id: int
    client: str
    seq: int
    kind: str  # put | delete | get | sget
    key: bytes
    group: Any
    value: bytes | None = None
    if_version: int | None = None
    invoke_tick: int = 0
    invoke_seq: int = 0
    complete_tick: int | None = None
    complete_seq: int | None = None
    outcome: str | None = None  # ok | fail | indeterminate
    result: dict | None = None
    maybe: bool = False  # some attempt may have taken effect
    attempts: int = 0

    def describe(self) -> str:
        extra = f" if_version={self.if_version}" if self.if_version is not None else ""
        val = f" {self.value!r}" if self.value is not None else ""
        return (
            f"op{self.id} {self.client} {self.kind} {self.key!r}{val}{extra} "
            f"[{self.invoke_tick},{self.complete_tick}] {self.outcome} {self.result}"
        )


@dataclass(slots=True)
class SimClient:
    name: str
    seq: int = 0
    op: ClientOp | None = None
    token: Any = None
    outstanding: str | None = None  # node holding the current attempt
    retry_at: int | None = None
    deadline: int = 0
    target: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)


class Workload:
    def __init__(
        self,
        rng: random.Random,
        world,
        clients: int = 4,
        keys: int = 6,
        op_timeout_ticks: int = 80,
        start_chance: float = 0.3,
        large_value_chance: float = 0.0,
        value_bytes_max: int = 1000,
    ) -> None:
        self.rng = rng
        self.world = world
        self.clients = [SimClient(f"c{i}") for i in range(clients)]
        self.by_name = {c.name: c for c in self.clients}
        self.keys = [b"k%d" % i for i in range(keys)]
        self.op_timeout_ticks = op_timeout_ticks
        self.start_chance = start_chance
        self.large_value_chance = large_value_chance
        self.value_bytes_max = value_bytes_max
        self.issuing = True
        self.final_keys: list[bytes] = []
        self.ops: list[ClientOp] = []

    # ------------------------------------------------------------ helpers
    def group_of(self, key: bytes) -> Any:
        """The group serving ``key``: partitioned, the ring's partition (as the
        runtime's router picks it); else one of the world's groups by CRC-32."""
        ring = self.world.ring
        if ring is not None:
            return ring.partition_of(key)
        groups = sorted(self.world.groups, key=str)
        return groups[zlib.crc32(key) % len(groups)]

    def idle(self) -> bool:
        return not self.final_keys and all(c.op is None for c in self.clients)

    def start_final_reads(self) -> None:
        self.final_keys = list(self.keys)

    # ------------------------------------------------------------ driving
    def on_tick(self, now: int) -> None:
        rng = self.rng
        for c in self.clients:
            if c.op is None:
                if self.final_keys:
                    self._begin(c, now, "get", self.final_keys.pop(0))
                elif self.issuing and rng.random() < self.start_chance:
                    self._begin_random(c, now)
                continue
            if now >= c.deadline:
                self._finish_unknown(c, now)
            elif c.retry_at is not None and now >= c.retry_at:
                self._submit(c, now)

    def _begin_random(self, c: SimClient, now: int) -> None:
        rng = self.rng
        key = rng.choice(self.keys)
        r = rng.random()
        if r < 0.35:
            self._begin(c, now, "put", key)
        elif r < 0.5:
            iv = c.versions.get(key, 0) if rng.random() < 0.7 else rng.randint(0, 5)
            self._begin(c, now, "put", key, if_version=iv)
        elif r < 0.6:
            iv = c.versions.get(key, 0) if rng.random() < 0.5 else None
            self._begin(c, now, "delete", key, if_version=iv)
        elif r < 0.9:
            self._begin(c, now, "get", key)
        else:
            self._begin(c, now, "sget", key)

    def _begin(self, c: SimClient, now: int, kind: str, key: bytes, if_version=None) -> None:
        c.seq += 1
        op = ClientOp(len(self.ops), c.name, c.seq, kind, key, self.group_of(key))
        op.if_version = if_version
        if kind == "put":
            op.value = b"v%d" % op.id
            if self.large_value_chance and self.rng.random() < self.large_value_chance:
                size = self.rng.randint(self.value_bytes_max // 2, self.value_bytes_max)
                op.value += b"." * (size - len(op.value))
        op.invoke_tick = now
        op.invoke_seq = self.world.next_event()
        self.ops.append(op)
        c.op = op
        c.deadline = now + self.op_timeout_ticks
        self._submit(c, now)

    def _submit(self, c: SimClient, now: int) -> None:
        op = c.op
        w = self.world
        members = w.groups[op.group]
        node = c.target.get(op.group)
        if node is None or not w.serving(node) or op.kind == "sget":
            up = [m for m in members if w.serving(m)]
            if not up:  # every replica is down or paused: try again next tick
                c.retry_at = now + 1
                return
            node = self.rng.choice(up)
        op.attempts += 1
        c.token = (c.name, op.id, op.attempts)
        c.outstanding = node
        c.retry_at = None
        core = w.cores[node]
        rid = (c.name, op.seq, op.attempts > 1)  # later attempts are marked as retries
        if op.kind == "put":
            cmd = Put(op.key, op.value, op.if_version)
            core.propose(op.group, c.token, cmd, request_id=rid)
        elif op.kind == "delete":
            core.propose(op.group, c.token, Delete(op.key, op.if_version), request_id=rid)
        else:
            consistency = STALE if op.kind == "sget" else LINEARIZABLE
            core.read(op.group, c.token, Get(op.key, consistency))

    def on_reply(self, now: int, node: str, reply) -> None:
        name = reply.token[0]
        c = self.by_name[name]
        if c.op is None or reply.token != c.token:
            return  # an abandoned attempt
        c.outstanding = None
        op = c.op
        if reply.result is not None:
            self._finish(c, now, "ok", reply.result)
            return
        _code, message, indeterminate = reply.error
        if indeterminate:
            op.maybe = True
        hint = message.rpartition("leader=")[2]
        c.target[op.group] = hint if hint in self.world.groups[op.group] else None
        c.retry_at = now + (1 if c.target[op.group] else 3)

    def on_node_crash(self, now: int, node: str) -> None:
        for c in self.clients:
            if c.op is not None and c.outstanding == node:
                c.outstanding = None
                c.op.maybe = True
                c.target[c.op.group] = None
                c.retry_at = now + 1

    def _finish_unknown(self, c: SimClient, now: int) -> None:
        op = c.op
        maybe = op.maybe or c.outstanding is not None
        outcome = "indeterminate" if op.kind in WRITES and maybe else "fail"
        self._finish(c, now, outcome, None)

    def _finish(self, c: SimClient, now: int, outcome: str, result: dict | None) -> None:
        op = c.op
        op.outcome = outcome
        op.result = result
        op.complete_tick = now
        op.complete_seq = self.world.next_event()
        if result is not None and op.kind != "sget":
            if op.kind == "delete":
                if result["succeeded"]:
                    c.versions[op.key] = 0
            else:
                c.versions[op.key] = result["version"]
        c.op = None
        c.token = None
        c.outstanding = None
        c.retry_at = None

    # ------------------------------------------------------------ history
    def history(self) -> list[HOp]:
        """Linearizable ops that matter to the checker (stale reads and
        definite failures excluded; indeterminate writes with no result)."""
        out = []
        for op in self.ops:
            if op.kind == "sget" or op.outcome in (None, "fail"):
                continue
            ret = op.complete_seq if op.outcome == "ok" else None
            out.append(
                HOp(op.invoke_seq, ret, op.kind, op.key, op.value, op.if_version, op.result, op.id)
            )
        return out

    def acknowledged_writes(self) -> list[ClientOp]:
        return [op for op in self.ops if op.kind in WRITES and op.outcome == "ok"]
