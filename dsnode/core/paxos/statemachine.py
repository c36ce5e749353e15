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

from dsnode.core.commands import Command, Form, decode, encode
from dsnode.core.kv.store import KVStore, SnapshotWriter


def pack_batch(items: list[tuple[list | None, Command]]) -> bytes:
    return msgpack.packb([[rid, encode(cmd)] for rid, cmd in items], use_bin_type=True)


def unpack_batch(value: bytes) -> list[tuple[list | None, Command]]:
    if not value:
        return []
    return [(rid, decode(enc)) for rid, enc in msgpack.unpackb(value, raw=False)]


class DedupKV:
    __slots__ = ("kv", "last", "cluster_uuid")

    def __init__(self) -> None:
        self.kv = KVStore()
        self.last: dict[object, tuple[int, dict]] = {}
        self.cluster_uuid: str | None = None  # from the Form command (the metadata group)

    def apply_value(self, value: bytes) -> list[dict]:
        """Apply one chosen entry; one result per command in the batch."""
        return self.apply_items(unpack_batch(value))

    def apply_items(self, items: list[tuple[list | None, Command]]) -> list[dict]:
        """Apply an entry's already-decoded commands (what ``unpack_batch`` gives)."""
        return [self.apply(rid, cmd) for rid, cmd in items]

    def apply(self, rid: list | None, cmd: Command) -> dict:
        if type(cmd) is Form:
            if self.cluster_uuid is None:
                self.cluster_uuid = cmd.cluster_uuid
            return {"cluster_uuid": self.cluster_uuid}
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
        """The whole state in one go; same bytes as :meth:`snapshot_writer` gives."""
        return msgpack.packb(
            [self.kv.snapshot(), self._table(), self.cluster_uuid], use_bin_type=True
        )

    def snapshot_writer(self) -> DedupSnapshotWriter:
        """Capture the state now (shallow copies); encode it later, step by step."""
        return DedupSnapshotWriter(self.kv.snapshot_writer(), self._table(), self.cluster_uuid)

    def _table(self) -> list[list]:
        # Results are fresh dicts per applied command and never changed afterwards.
        return [[c, s, r] for c, (s, r) in self.last.items()]

    @classmethod
    def restore(cls, blob: bytes) -> DedupKV:
        parts = msgpack.unpackb(blob, raw=False)
        kv_blob, table = parts[0], parts[1]
        sm = cls()
        sm.cluster_uuid = parts[2] if len(parts) > 2 else None  # format of 0.1: no uuid
        sm.kv = KVStore.restore(kv_blob)
        sm.last = {(tuple(c) if isinstance(c, list) else c): (s, r) for c, s, r in table}
        return sm


def _bin_header(n: int) -> bytes:
    """The msgpack bin header for ``n`` bytes (spec: bin 8/16/32)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


class DedupSnapshotWriter:
    """Encodes a captured ``DedupKV`` piecewise into exactly the bytes of
    :meth:`DedupKV.snapshot` at capture time (``[kv_blob, table, cluster_uuid]``).

    ``step(n, max_bytes)`` encodes up to ``n`` KV entries (fewer once about
    ``max_bytes`` are encoded); the step after the last entry
    encodes the dedup table. The shell calls ``step`` once per event-loop turn
    until it returns True, then writes :meth:`pieces` to the group's snapshot
    file (``result`` joins them).

    Streaming, so the encoded state never sits in memory whole: after each
    step the shell takes the new KV bytes (:meth:`take_kv_parts`) and writes
    them after :data:`STREAM_HEAD_BYTES` reserved bytes; when done it writes
    :meth:`stream_head` there and :meth:`tail` at the end. Those bytes differ
    from :meth:`result` only in using the 4-byte bin length form (which every
    msgpack reader accepts), so ``DedupKV.restore`` reads them the same.
    """

    __slots__ = ("_kv", "_table", "_uuid", "_tail", "_pieces")

    STREAM_HEAD_BYTES = 6

    def __init__(self, kv: SnapshotWriter, table: list[list], uuid: str | None) -> None:
        self._kv = kv
        self._table = table
        self._uuid = uuid
        self._tail: bytes | None = None
        self._pieces: list[bytes] | None = None

    def step(self, max_entries: int, max_bytes: int | None = None) -> bool:
        if self._tail is not None:
            return True
        if self._kv.remaining:
            self._kv.step(max_entries, max_bytes)
            return False
        self._tail = msgpack.packb(self._table, use_bin_type=True) + msgpack.packb(
            self._uuid, use_bin_type=True
        )
        self._table = []
        return True

    def take_kv_parts(self) -> list[bytes]:
        """The KV bytes encoded since the last call, in order; no longer kept here."""
        return self._kv.take_parts()

    @staticmethod
    def stream_head(kv_len: int) -> bytes:
        """The first bytes of a streamed snapshot whose KV blob is ``kv_len`` bytes."""
        return b"\x93\xc6" + kv_len.to_bytes(4, "big")  # fixarray of 3, bin 32

    def tail(self) -> bytes:
        """The bytes after the KV blob (the dedup table and the cluster UUID)."""
        if self._tail is None:
            raise ValueError("snapshot not fully encoded")
        return self._tail

    def pieces(self) -> list[bytes]:
        """The encoded bytes in order (their concatenation is :meth:`result`)."""
        if self._pieces is None:
            parts = self._kv.parts()
            head = b"\x93" + _bin_header(sum(map(len, parts)))  # fixarray of 3, then bin
            self._pieces = [head, *parts, self.tail()]
            self._kv = None  # type: ignore[assignment]
        return self._pieces

    def result(self) -> bytes:
        pieces = self.pieces()
        if len(pieces) != 1:
            self._pieces = pieces = [b"".join(pieces)]
        return pieces[0]
