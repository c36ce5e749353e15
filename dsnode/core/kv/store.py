"""The replicated state machine: a versioned key-value map.

Deterministic: the same commands applied in the same order give the same
state and the same results on every replica. Versions come from one store-wide
revision counter that advances once per command that changes anything, so a
key's version strictly increases with every change and is never reused, even
after a delete and re-create (PROTOCOL.md, "Keys, values, versions").
"""

from __future__ import annotations

import itertools
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import msgpack

from dsnode.core.commands import (
    Command,
    Delete,
    Get,
    Put,
    SubDelete,
    SubGet,
    SubOp,
    SubPut,
    Txn,
)

# 2: [2, revision, {key: [value, version]}] in one msgpack object;
# 3: [3, revision, count, shards], then [shard, {key: packed entry}] pairs in
# sequence whose maps add up to count entries: each writer step packs its maps
# in C, and restore takes a shard's first map as the shard itself and merges
# the next ones into it in C (dict.update).
SNAPSHOT_FORMAT = 3
# A transaction's gets may return at most this many bytes of values in all; a
# larger one fails with no effect (``ERROR_KEY``), the same on every replica, so
# no answer ever outgrows a frame (the default max_frame_bytes is twice this).
TXN_RESULT_BYTES_MAX = 4 * 1024 * 1024
# A result holding this key is a definite failure: [code, message] (no effect).
ERROR_KEY = "_error"
_crc32 = zlib.crc32

# The map is split into ``shards`` dicts (a power of two, SHARDS by default) by
# CRC-32 of the key: a snapshot captures the list of shards (a pointer each), and a
# write copies a shard the capture still shares before changing it (copy on write),
# so neither the capture nor any single write costs O(keys / shards) more than once.
SHARDS = 1024
# A node hosting P partitions keeps about SHARDS shards over all of them (at least
# SHARDS_MIN each): many small dicts cost more memory per key (each dict's header and
# free slots, and tables of 500 bytes to a few KB scattered through the heap among
# short-lived buffers, which fragments it) than a few large ones (issue 14).
SHARDS_MIN = 16


def shards_for(partitions: int) -> int:
    """The shard count of each partition's store on a node of ``partitions`` partitions:
    a power of two, SHARDS / partitions rounded down, at least SHARDS_MIN."""
    want = max(SHARDS_MIN, SHARDS // max(1, partitions))
    return 1 << (want.bit_length() - 1)


def check_shards(shards: object) -> int:
    if type(shards) is not int or shards < 1 or shards & (shards - 1):
        raise ValueError(f"a store's shard count must be a power of two >= 1, not {shards!r}")
    return shards
_VERSION = struct.Struct("<Q")
_VERSION_BYTES = _VERSION.size


def pack_entry(value: bytes, version: int) -> bytes:
    """A key's entry as stored: 8-byte little-endian version, then the value. One
    bytes object per key (no tuple, no int) keeps a key near 250 bytes of memory."""
    return _VERSION.pack(version) + value


def unpack_entry(entry: bytes) -> tuple[bytes, int]:
    return entry[_VERSION_BYTES:], _VERSION.unpack_from(entry)[0]


class _Capture:
    """Shared by a store and the snapshot writer of its shards: while ``live``,
    a shard the store has not copied since the capture is still the writer's,
    unless ``owned`` (the store's list) says the writer is done with it."""

    __slots__ = ("live", "owned")

    def __init__(self, owned: list[bool]) -> None:
        self.live = True
        self.owned = owned


class KVStore:
    __slots__ = ("_shards", "_mask", "_owned", "_capture", "_len", "revision")

    def __init__(self, shards: int = SHARDS) -> None:
        # key -> pack_entry(value, version), in shard crc32(key) & _mask
        self._mask = check_shards(shards) - 1
        self._shards: list[dict[bytes, bytes]] = [{} for _ in range(shards)]
        self._owned = [True] * shards  # False: shared with a live capture, copy first
        self._capture: _Capture | None = None
        self._len = 0
        self.revision = 0

    def __len__(self) -> int:
        return self._len

    # ------------------------------------------------------------ reads
    def get(self, key: bytes) -> tuple[bytes | None, int]:
        entry = self._shards[_crc32(key) & self._mask].get(key)
        if entry is None:
            return None, 0
        return entry[_VERSION_BYTES:], _VERSION.unpack_from(entry)[0]

    def version(self, key: bytes) -> int:
        entry = self._shards[_crc32(key) & self._mask].get(key)
        return 0 if entry is None else _VERSION.unpack_from(entry)[0]

    def __contains__(self, key: bytes) -> bool:
        return key in self._shards[_crc32(key) & self._mask]

    # ------------------------------------------------------------ writes (the only ones)
    def _writable(self, key: bytes) -> dict[bytes, bytes]:
        i = _crc32(key) & self._mask
        if not self._owned[i]:
            capture = self._capture
            if capture is not None and capture.live:
                self._shards[i] = self._shards[i].copy()  # the writer keeps the original
                self._owned[i] = True
            else:  # the capture is finished: nothing shares the shards any more
                self._capture = None
                self._owned = [True] * len(self._shards)
        return self._shards[i]

    def _set(self, key: bytes, value: bytes, version: int) -> None:
        shard = self._writable(key)
        n = len(shard)
        shard[key] = _VERSION.pack(version) + value
        self._len += len(shard) - n

    def _remove(self, key: bytes) -> None:
        shard = self._writable(key)
        if shard.pop(key, None) is not None:
            self._len -= 1

    # ------------------------------------------------------------ apply
    def apply(self, cmd: Command) -> dict:
        """Apply ``cmd`` and return the wire result fields (without id/ok)."""
        if isinstance(cmd, Put):
            return self._put(cmd)
        if isinstance(cmd, Get):
            value, version = self.get(cmd.key)
            return {"value": value, "version": version}
        if isinstance(cmd, Delete):
            return self._delete(cmd)
        if isinstance(cmd, Txn):
            return self._txn(cmd)
        raise TypeError(f"not a command: {cmd!r}")

    def _put(self, cmd: Put) -> dict:
        # _set inlined, the shard found once: the hottest path of the log replay at restart
        key = cmd.key
        i = _crc32(key) & self._mask
        if cmd.if_version is not None:
            entry = self._shards[i].get(key)
            current = 0 if entry is None else _VERSION.unpack_from(entry)[0]
            if cmd.if_version != current:
                return {"succeeded": False, "version": current}
        self.revision = rev = self.revision + 1
        shard = self._shards[i] if self._owned[i] else self._writable(key)
        n = len(shard)
        shard[key] = _VERSION.pack(rev) + cmd.value
        self._len += len(shard) - n
        return {"succeeded": True, "version": rev}

    def _delete(self, cmd: Delete) -> dict:
        current = self.version(cmd.key)
        if cmd.if_version is not None and cmd.if_version != current:
            return {"succeeded": False, "existed": current != 0, "version": current}
        if current == 0:
            return {"succeeded": True, "existed": False, "version": 0}
        self.revision += 1
        self._remove(cmd.key)
        return {"succeeded": True, "existed": True, "version": current}

    def _txn(self, cmd: Txn) -> dict:
        holds = all(self.version(k) == v for k, v in cmd.compares)
        branch: tuple[SubOp, ...] = cmd.then if holds else cmd.otherwise
        # Gets see the state before the transaction's own writes, so answer
        # every get first, then perform the writes under one new revision.
        results: list[dict] = []
        writes = False
        got = 0
        for s in branch:
            if isinstance(s, SubGet):
                value, version = self.get(s.key)
                results.append({"value": value, "version": version})
                got += len(value) if value is not None else 0
            elif isinstance(s, SubDelete):
                existed = s.key in self
                results.append({"existed": existed})
                writes = writes or existed
            else:
                results.append({"version": 0})  # filled in below
                writes = True
        if got > TXN_RESULT_BYTES_MAX:
            return {ERROR_KEY: ["too_large", f"the transaction's gets would return {got} bytes, "
                                             f"more than {TXN_RESULT_BYTES_MAX}: nothing done"]}
        if writes:
            self.revision += 1
            rev = self.revision
            for s, r in zip(branch, results, strict=True):
                if isinstance(s, SubPut):
                    self._set(s.key, s.value, rev)
                    r["version"] = rev
                elif isinstance(s, SubDelete):
                    self._remove(s.key)
        return {"succeeded": holds, "results": results}

    def apply_txn_writes(self, writes: tuple[SubOp, ...], revision: int) -> None:
        """A cross-partition transaction's writes here (``core.twopc``), at the revision
        its prepare reserved: its keys stayed locked since, so each key's version still
        strictly increases."""
        for s in writes:
            if isinstance(s, SubPut):
                self._set(s.key, s.value, revision)
            else:
                self._remove(s.key)

    # ------------------------------------------------------------ snapshots
    def snapshot(self) -> bytes:
        """The whole store in one go (tests, small stores); same bytes as the writer's."""
        w = self.snapshot_writer()
        while not w.step(self._len + 1):
            pass
        return w.result()

    def snapshot_writer(self) -> SnapshotWriter:
        """A point-in-time capture now, encoded later in steps by :class:`SnapshotWriter`.

        O(shards), not O(keys): the writer takes the shard dicts themselves and
        the store copies a shard before its first change while the writer is
        live (``_writable``), so applying may go on while it is encoded.
        """
        if self._capture is not None:
            self._capture.live = False  # an older writer: it keeps what it captured
        self._owned = [False] * len(self._shards)
        capture = _Capture(self._owned)
        self._capture = capture
        return SnapshotWriter(self.revision, list(self._shards), self._len, capture)

    @property
    def shard_count(self) -> int:
        return len(self._shards)

    @classmethod
    def restore(cls, blob: bytes, shards: int = SHARDS) -> KVStore:
        """The store ``blob`` holds, in ``shards`` shards (whatever count it was
        written with: a different one places each key anew, once)."""
        objects = _unpack_stream(blob)
        head = next(objects, None)
        if not isinstance(head, list) or len(head) not in (3, 4) or not isinstance(head[1], int):
            raise ValueError("KV snapshot: bad header")
        fmt, revision, body = head[:3]
        store = cls(shards)
        store.revision = revision
        mask = store._mask
        shards = store._shards
        if fmt == 2:  # one map of key -> [value, version]
            if not isinstance(body, dict):
                raise ValueError("KV snapshot: expected a map of keys")
            for k, (v, ver) in body.items():
                shards[_crc32(k) & mask][k] = _VERSION.pack(ver) + v
            store._len = len(body)
            return store
        if fmt != SNAPSHOT_FORMAT or len(head) != 4:
            raise ValueError(f"unknown KV snapshot format {fmt}")
        if type(head[3]) is not int or head[3] < 1:
            raise ValueError("KV snapshot: bad shard count")
        same_shards = head[3] == len(shards)
        count = 0
        for piece in objects:
            if count >= body or not isinstance(piece, list) or len(piece) != 2:
                raise ValueError("KV snapshot: unexpected data after the entries")
            i, chunk = piece
            if not isinstance(chunk, dict) or not isinstance(i, int) or not 0 <= i < head[3]:
                raise ValueError("KV snapshot: bad shard piece")
            if same_shards:
                if shards[i]:
                    shards[i].update(chunk)
                else:  # the unpacker's fresh map becomes the shard: no second insert per key
                    shards[i] = chunk
            else:  # written with another shard count: place each key anew
                for k, entry in chunk.items():
                    shards[_crc32(k) & mask][k] = entry
            count += len(chunk)
        if count != body:
            raise ValueError(f"KV snapshot: {count} entries, the header says {body}")
        store._len = sum(map(len, shards))
        if store._len != count:
            raise ValueError("KV snapshot: a key appears twice")
        return store

    def items(self) -> Iterator[tuple[bytes, tuple[bytes, int]]]:
        """``(key, (value, version))`` for every key (shard order)."""
        for shard in self._shards:
            for k, entry in shard.items():
                yield k, (entry[_VERSION_BYTES:], _VERSION.unpack_from(entry)[0])


def _unpack_stream(blob: bytes) -> Iterator[Any]:
    """The msgpack objects in ``blob`` one after another, fed a megabyte at a
    time (``blob`` may be a mapped file: it is never copied whole)."""
    up = msgpack.Unpacker(raw=False, strict_map_key=True, max_buffer_size=len(blob) + 1)
    view = memoryview(blob)
    step = 1 << 20
    for off in range(0, len(view), step):
        up.feed(view[off : off + step])
        yield from up


class SnapshotWriter:
    """Encodes a captured KV map piecewise in format 3: the header, then per
    ``step`` one ``[shard, map]`` piece per shard it reads from;
    :meth:`KVStore.restore` merges them in sequence.
    The bytes depend on the step sizes, so replicas stepping alike (the
    runtime always steps the same) give identical snapshots.

    Pure: whoever drives it (the shell) decides how many entries go per
    ``step``, so no single step holds the caller for long.
    """

    __slots__ = ("_packer", "_parts", "_shards", "_next", "_it", "_cur", "_left", "_capture")

    def __init__(
        self, revision: int, shards: list[dict[bytes, bytes]], count: int, capture: _Capture
    ) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)
        self._parts: list[bytes] = [
            self._packer.pack([SNAPSHOT_FORMAT, revision, count, len(shards)])
        ]
        self._shards: list[dict[bytes, bytes] | None] = list(shards)
        self._next = 0  # the shard to read after the current one
        self._it: Iterator[tuple[bytes, bytes]] | None = None
        self._cur = -1
        self._left = count
        self._capture = capture
        if not count:
            capture.live = False

    @property
    def remaining(self) -> int:
        return self._left

    def step(self, max_entries: int, max_bytes: int | None = None) -> bool:
        """Encode up to ``max_entries`` more entries, stopping early once about
        ``max_bytes`` are encoded (large values); True once all are encoded.

        A shard is let go once read: one the store copied since the capture is
        freed then, a thousandth of the map at a time."""
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        want = min(max_entries, self._left)
        pk = self._packer
        got = 0
        per_entry = 64  # bytes, a first guess: refined from each piece packed
        while want:
            if self._it is None:
                shard = self._shards[self._next]
                self._shards[self._next] = None
                self._cur = self._next
                self._next += 1
                assert shard is not None
                self._it = iter(shard.items())
            take = want
            if max_bytes is not None:
                take = max(1, min(want, (max_bytes - got) // per_entry))
            pairs = list(itertools.islice(self._it, take))
            if len(pairs) < take:
                self._it = None  # this shard is done: the store may change it in place
                self._capture.owned[self._cur] = True
            if pairs:
                piece = pk.pack_array_header(2) + pk.pack(self._cur) + pk.pack_map_pairs(pairs)
                self._parts.append(piece)
                want -= len(pairs)
                self._left -= len(pairs)
                got += len(piece)
                per_entry = max(1, len(piece) // len(pairs))
                if max_bytes is not None and got >= max_bytes:
                    break
        if not self._left:
            self._capture.live = False  # the store may stop copying shards
            self._it = None
        return self._left == 0

    def take_parts(self) -> list[bytes]:
        """The pieces encoded since the last call (for a caller writing them out as
        they come); afterwards :meth:`parts` holds only what follows."""
        taken, self._parts = self._parts, []
        return taken

    def parts(self) -> list[bytes]:
        """The encoded pieces in order (their concatenation is :meth:`result`)."""
        if self._left:
            raise ValueError(f"snapshot not fully encoded: {self._left} entries left")
        return self._parts

    def result(self) -> bytes:
        return b"".join(self.parts())
