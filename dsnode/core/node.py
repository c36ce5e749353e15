"""NodeCore for a one-node cluster: the KV state machine behind the log.

Inputs: ``submit(token, cmd)``; ``recover(snapshot, records)`` once at start.
Output: ``ready()``. Writes are applied at once and their log record is
returned in ``Ready.persist``; their replies ride in the same ``Ready`` and the
shell releases them only once that record is durable (effects.py contract).
Reads are answered from the applied state; the shell holds their replies until
everything persisted before them is durable, so a read never reports a write
that a crash could still take back.

The Paxos work replaces the direct apply with a replicated log; the record
format keeps a type tag first so acceptor records can share the same WAL.
"""

from __future__ import annotations

from typing import Any

import msgpack

from dsnode.core import commands
from dsnode.core.commands import Command, Get
from dsnode.core.effects import Ready, Reply
from dsnode.core.errors import InvariantBroken
from dsnode.core.kv.store import KVStore

# Record type tags (first element of every WAL record).
REC_KV = "kv"  # ["kv", encoded command]: a write applied by a one-node cluster

SNAPSHOT_FORMAT = 1

_packb = msgpack.Packer(use_bin_type=True).pack


class NodeCore:
    __slots__ = ("node_id", "store", "_ready", "records_since_snapshot", "_recovered")

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self.store = KVStore()
        self._ready = Ready()
        self.records_since_snapshot = 0
        self._recovered = False

    # ------------------------------------------------------------ recovery
    def recover(self, snapshot: bytes | None, records: list[bytes]) -> None:
        """Rebuild state from the newest snapshot and the log records after it."""
        if self._recovered:
            raise InvariantBroken("recover called twice")
        self._recovered = True
        if snapshot is not None:
            fmt, kv_blob = msgpack.unpackb(snapshot, raw=False)
            if fmt != SNAPSHOT_FORMAT:
                raise ValueError(f"unknown node snapshot format {fmt}")
            self.store = KVStore.restore(kv_blob)
        for rec in records:
            tag, body = msgpack.unpackb(rec, raw=False)
            if tag != REC_KV:
                raise ValueError(f"unknown log record type {tag!r}")
            self.store.apply(commands.decode(body))
        self.records_since_snapshot = len(records)

    def snapshot(self) -> bytes:
        """The whole node state; valid for the log position of the last persisted record."""
        self.records_since_snapshot = 0
        return _packb([SNAPSHOT_FORMAT, self.store.snapshot()])

    # ------------------------------------------------------------ inputs
    def submit(self, token: Any, cmd: Command) -> None:
        result = self.store.apply(cmd)
        if type(cmd) is not Get:
            self._ready.persist.append(_packb([REC_KV, commands.encode(cmd)]))
            self.records_since_snapshot += 1
        self._ready.reply.append(Reply(token, result))

    def ready(self) -> Ready:
        r = self._ready
        self._ready = Ready()
        return r

    def has_ready(self) -> bool:
        return bool(self._ready)

    # ------------------------------------------------------------ status
    def status(self) -> dict:
        return {
            "revision": self.store.revision,
            "keys": len(self.store),
        }
