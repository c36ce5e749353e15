"""The replicated state machine wrapper: KV store plus client dedup.

An entry value is ``b""`` (no-op) or a msgpack batch of
``[request_id, encoded_command]`` pairs. ``request_id`` is ``None`` or
``[client_id, seq]``; per client only the highest applied ``seq`` and its
result are kept, so a retried command is applied once: the same ``seq``
again returns the remembered result, a lower one is not applied and answers
``{"duplicate": True}``. (Clients must use increasing ``seq`` per
``client_id``; the table is not expired yet.)
"""

from __future__ import annotations

import msgpack

from dsnode.core.commands import Command, decode, encode
from dsnode.core.kv.store import KVStore


def pack_batch(items: list[tuple[list | None, Command]]) -> bytes:
    return msgpack.packb([[rid, encode(cmd)] for rid, cmd in items], use_bin_type=True)


def unpack_batch(value: bytes) -> list[tuple[list | None, Command]]:
    if not value:
        return []
    return [(rid, decode(enc)) for rid, enc in msgpack.unpackb(value, raw=False)]


class DedupKV:
    __slots__ = ("kv", "last")

    def __init__(self) -> None:
        self.kv = KVStore()
        self.last: dict[object, tuple[int, dict]] = {}

    def apply_value(self, value: bytes) -> list[dict]:
        """Apply one chosen entry; one result per command in the batch."""
        return self.apply_items(unpack_batch(value))

    def apply_items(self, items: list[tuple[list | None, Command]]) -> list[dict]:
        """Apply an entry's already-decoded commands (what ``unpack_batch`` gives)."""
        return [self.apply(rid, cmd) for rid, cmd in items]

    def apply(self, rid: list | None, cmd: Command) -> dict:
        if rid is None:
            return self.kv.apply(cmd)
        client, seq = rid
        seen = self.last.get(client)
        if seen is not None:
            if seq == seen[0]:
                return seen[1]
            if seq < seen[0]:
                return {"duplicate": True}
        result = self.kv.apply(cmd)
        self.last[client] = (seq, result)
        return result

    def snapshot(self) -> bytes:
        table = [[c, s, r] for c, (s, r) in self.last.items()]
        return msgpack.packb([self.kv.snapshot(), table], use_bin_type=True)

    @classmethod
    def restore(cls, blob: bytes) -> DedupKV:
        kv_blob, table = msgpack.unpackb(blob, raw=False)
        sm = cls()
        sm.kv = KVStore.restore(kv_blob)
        sm.last = {(tuple(c) if isinstance(c, list) else c): (s, r) for c, s, r in table}
        return sm
