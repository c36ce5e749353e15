"""The replicated state machine: a versioned key-value map.

Deterministic: the same commands applied in the same order give the same
state and the same results on every replica. Versions come from one store-wide
revision counter that advances once per command that changes anything, so a
key's version strictly increases with every change and is never reused, even
after a delete and re-create (PROTOCOL.md, "Keys, values, versions").
"""

from __future__ import annotations

import itertools

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

SNAPSHOT_FORMAT = 2
# A transaction's gets may return at most this many bytes of values in all; a
# larger one fails with no effect (``ERROR_KEY``), the same on every replica, so
# no answer ever outgrows a frame (the default max_frame_bytes is twice this).
TXN_RESULT_BYTES_MAX = 4 * 1024 * 1024
# A result holding this key is a definite failure: [code, message] (no effect).
ERROR_KEY = "_error"


class KVStore:
    __slots__ = ("_data", "revision")

    def __init__(self) -> None:
        # key -> (value, version)
        self._data: dict[bytes, tuple[bytes, int]] = {}
        self.revision = 0

    def __len__(self) -> int:
        return len(self._data)

    # ------------------------------------------------------------ reads
    def get(self, key: bytes) -> tuple[bytes | None, int]:
        entry = self._data.get(key)
        if entry is None:
            return None, 0
        return entry

    def version(self, key: bytes) -> int:
        entry = self._data.get(key)
        return 0 if entry is None else entry[1]

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
        current = self.version(cmd.key)
        if cmd.if_version is not None and cmd.if_version != current:
            return {"succeeded": False, "version": current}
        self.revision += 1
        self._data[cmd.key] = (cmd.value, self.revision)
        return {"succeeded": True, "version": self.revision}

    def _delete(self, cmd: Delete) -> dict:
        current = self.version(cmd.key)
        if cmd.if_version is not None and cmd.if_version != current:
            return {"succeeded": False, "existed": current != 0, "version": current}
        if current == 0:
            return {"succeeded": True, "existed": False, "version": 0}
        self.revision += 1
        del self._data[cmd.key]
        return {"succeeded": True, "existed": True, "version": current}

    def _txn(self, cmd: Txn) -> dict:
        data = self._data
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
                existed = s.key in data
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
                    data[s.key] = (s.value, rev)
                    r["version"] = rev
                elif isinstance(s, SubDelete):
                    data.pop(s.key, None)
        return {"succeeded": holds, "results": results}

    # ------------------------------------------------------------ snapshots
    def snapshot(self) -> bytes:
        """The whole store in one go (tests, small stores); same bytes as the writer's."""
        w = self.snapshot_writer()
        while not w.step(len(self._data) + 1):
            pass
        return w.result()

    def snapshot_writer(self) -> SnapshotWriter:
        """A point-in-time capture now, encoded later in steps by :class:`SnapshotWriter`.

        The capture is a shallow ``dict.copy()`` (values are immutable
        ``(value, version)`` tuples), so applying may go on while it is encoded.
        """
        return SnapshotWriter(self.revision, self._data.copy())

    @classmethod
    def restore(cls, blob: bytes) -> KVStore:
        fmt, revision, items = msgpack.unpackb(blob, raw=False, strict_map_key=True)
        if fmt != SNAPSHOT_FORMAT:
            raise ValueError(f"unknown KV snapshot format {fmt}")
        store = cls()
        if not isinstance(items, dict):
            raise ValueError("KV snapshot: expected a map of keys")
        store.revision = revision
        store._data = {k: (v, ver) for k, (v, ver) in items.items()}
        return store

    def items(self):
        return self._data.items()


class SnapshotWriter:
    """Encodes a captured KV map piecewise; the bytes equal one ``packb`` of
    ``[SNAPSHOT_FORMAT, revision, data]`` (msgpack lets a map header be
    followed by its entries packed one by one), so :meth:`KVStore.restore`
    reads them unchanged.

    Pure: whoever drives it (the shell) decides how many entries go per
    ``step``, so no single step holds the caller for long.
    """

    __slots__ = ("_packer", "_parts", "_items", "_left")

    def __init__(self, revision: int, data: dict[bytes, tuple[bytes, int]]) -> None:
        self._packer = msgpack.Packer(use_bin_type=True)
        pk = self._packer
        self._parts: list[bytes] = [
            pk.pack_array_header(3) + pk.pack(SNAPSHOT_FORMAT) + pk.pack(revision)
            + pk.pack_map_header(len(data))
        ]
        self._items = iter(data.items())
        self._left = len(data)

    @property
    def remaining(self) -> int:
        return self._left

    def step(self, max_entries: int) -> bool:
        """Encode up to ``max_entries`` more entries; True once all are encoded."""
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        n = min(max_entries, self._left)
        if n:
            pack = self._packer.pack
            items = self._items
            self._parts.append(
                b"".join([pack(k) + pack(v) for k, v in itertools.islice(items, n)])
            )
            self._left -= n
        return self._left == 0

    def parts(self) -> list[bytes]:
        """The encoded pieces in order (their concatenation is :meth:`result`)."""
        if self._left:
            raise ValueError(f"snapshot not fully encoded: {self._left} entries left")
        return self._parts

    def result(self) -> bytes:
        return b"".join(self.parts())
