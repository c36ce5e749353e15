"""The replicated state machine wrapper: KV store plus client deduplication.

An entry value is ``b""`` (no-op) or a msgpack batch of
``[request_id, encoded_command]`` pairs. ``request_id`` is ``None`` (no
deduplication) or ``[client_id, seq]`` / ``[client_id, seq, retry]``
(PROTOCOL.md, "Client request ids").

The deduplication table keeps, per client, a window of results keyed by
``seq`` (a client may have many writes in flight, applied in any order) and a
``floor``: every ``seq`` at or below it that is not in the window is
forgotten. Age is the log index (slot) at which a result was applied, the same
on every replica; nothing here reads a clock. Bounds (``DedupLimits``): results
older than ``age_slots`` slots, past ``window_max`` per client or
``entries_max`` in all are dropped oldest first, raising their client's floor;
clients idle for ``age_slots`` slots or past ``clients_max`` (least recently
active first) are dropped whole, and ``forgotten`` counts them.

Rules for a command with a request id, at log index ``index``:

1. ``seq`` in the client's window: the remembered result, not applied again.
2. ``seq`` at or below the floor: not applied; the answer is the ``expired``
   error, indeterminate (it may have been applied, the table cannot tell).
3. Unknown client, ``retry`` set and some client was ever dropped: the same
   ``expired`` answer (an earlier attempt may have been applied and then
   forgotten along with its client).
4. Otherwise the command is applied and its result remembered. A new client's
   floor is -1 (none) while no client was ever dropped, else ``seq - 1``, so that a
   re-created record can never re-admit a request its dropped record held.

So a command is never applied twice for one ``(client_id, seq)``.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from dsnode.core.commands import (
    STALE,
    Command,
    ConfChange,
    Delete,
    Form,
    Get,
    Put,
    SubGet,
    Txn,
    decode,
    encode,
)
from dsnode.core.kv.store import ERROR_KEY, SHARDS, KVStore, SnapshotWriter
from dsnode.core.paxos.reconfig import CONF_REFUSED, GroupConf, refusal
from dsnode.core.twopc.participant import TxnTable
from dsnode.core.twopc.records import TYPES as _TX_TYPES

# Wire error code of rule 2/3 (dsnode.wire.errors.EXPIRED names the same string; the core
# imports nothing from the wire package).
EXPIRED = "expired"
EXPIRED_MESSAGE = ("request id no longer in the deduplication table: it may have been "
                   "applied, cannot tell")


@dataclass(frozen=True, slots=True)
class DedupLimits:
    """Bounds of the deduplication table; must be the same on every replica."""

    clients_max: int = 10_000
    window_max: int = 1024  # results per client: at least a client's writes in flight
    entries_max: int = 100_000  # results over all clients
    age_slots: int = 1_000_000  # a result or an idle client older than this many slots goes

    def __post_init__(self) -> None:
        for name in ("clients_max", "window_max", "entries_max", "age_slots"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


# the packer of every batch, its buffer kept (see ``records._pack``); cores run on one thread
_pack = msgpack.Packer(use_bin_type=True).pack


def pack_batch(items: list[tuple[list | None, Command]]) -> bytes:
    return _pack([[rid, encode(cmd)] for rid, cmd in items])


def unpack_batch(value: bytes) -> list[tuple[list | None, Command]]:
    if not value:
        return []
    return [(rid, decode(enc)) for rid, enc in msgpack.unpackb(value, raw=False)]


def _expired() -> dict:
    return {ERROR_KEY: [EXPIRED, EXPIRED_MESSAGE, True]}


# A command that meets a key locked by a prepared cross-partition transaction is not
# applied (and not remembered by the deduplication table): the answer is this error,
# definite, and the shell sends the command again later (it never reaches a client).
LOCKED = "locked"


def _locked(txid: bytes) -> dict:
    return {ERROR_KEY: [LOCKED, f"key locked by transaction {txid.hex()} in progress"]}


class ClientWindow:
    """One client's part of the table."""

    __slots__ = ("floor", "last", "results", "order")

    def __init__(self, floor: int, last: int) -> None:
        self.floor = floor  # every seq <= floor not in results is forgotten
        self.last = last  # log index of this client's latest command
        # seq -> (log index applied at, result), in the order applied (oldest first), and
        # that order again as a queue (a dict is slow to take from at its front)
        self.results: dict[int, tuple[int, dict]] = {}
        self.order: deque[int] = deque()


class DedupKV:
    __slots__ = ("kv", "clients", "entries", "forgotten", "limits", "cluster_uuid",
                 "_expiry_index", "txns", "conf")

    def __init__(self, limits: DedupLimits | None = None, shards: int = SHARDS) -> None:
        self.kv = KVStore(shards)
        self.limits = limits or DedupLimits()
        # client -> its window, least recently active first
        self.clients: OrderedDict[object, ClientWindow] = OrderedDict()
        self.entries = 0  # results held over all clients
        self.forgotten = 0  # clients dropped whole so far (rule 3)
        self._expiry_index = 0  # the log index expiry was last checked at
        self.cluster_uuid: str | None = None  # from the Form command (the metadata group)
        self.txns = TxnTable()  # cross-partition transactions: locks, prepared, decisions
        # the group's configuration once a ConfChange was applied (``core.paxos.reconfig``);
        # None: the one the group was created with (the group sets it: ``set_base_conf``)
        self.conf: GroupConf | None = None

    def apply_value(self, value: bytes, index: int) -> list[dict]:
        """Apply the entry chosen at log ``index``; one result per command in the batch."""
        return self.apply_items(unpack_batch(value), index)

    def apply_items(self, items: list[tuple[list | None, Command]], index: int) -> list[dict]:
        """Apply an entry's already-decoded commands (what ``unpack_batch`` gives)."""
        return [self.apply(rid, cmd, index) for rid, cmd in items]

    def apply(self, rid: list | None, cmd: Command, index: int) -> dict:
        """Apply one command of the entry at log ``index``. Results are fresh dicts, kept
        by the table and never changed afterwards: callers must copy, not mutate."""
        t = type(cmd)
        if t is Form:
            if self.cluster_uuid is None:
                self.cluster_uuid = cmd.cluster_uuid
            return {"cluster_uuid": self.cluster_uuid}
        if t is ConfChange:
            return self._conf_change(cmd, index)  # type: ignore[arg-type]
        if rid is None:
            if t in _TX_TYPES:
                return self.txns.apply(cmd, self.kv)  # type: ignore[arg-type]
            if self.txns.xlocks or self.txns.slocks:
                holder = self._blocked(cmd)
                if holder is not None:
                    return _locked(holder)
            return self.kv.apply(cmd)
        client, seq = rid[0], rid[1]  # client: bytes from the wire (str in the simulator)
        limits = self.limits
        cutoff = index - limits.age_slots  # anything applied before it has expired
        clients = self.clients
        # Expiry moves only with the log index: checked once per entry (and per client).
        if index != self._expiry_index:
            self._expiry_index = index
            if clients and next(iter(clients.values())).last < cutoff:
                self._expire_clients(cutoff)
        w = clients.get(client)
        if w is None:
            if self.forgotten and len(rid) > 2 and rid[2]:
                return _expired()  # rule 3
            w = clients[client] = ClientWindow(seq - 1 if self.forgotten else -1, index)
        elif w.last != index:
            clients.move_to_end(client)  # most recently active last
            w.last = index
            if w.order and w.results[w.order[0]][0] < cutoff:
                self._expire_results(w, cutoff)
        results = w.results
        seen = results.get(seq)
        if seen is not None:
            return seen[1]  # rule 1
        if seq <= w.floor:
            return _expired()  # rule 2
        if t in _TX_TYPES:  # a decision proposed with its client's request id
            result = self.txns.apply(cmd, self.kv)  # type: ignore[arg-type]
            if "conflict" in result:
                return result  # refused by a lock, nothing decided: not remembered
        else:
            if self.txns.xlocks or self.txns.slocks:
                holder = self._blocked(cmd)
                if holder is not None:
                    return _locked(holder)  # not applied, not remembered: sent again later
            result = self.kv.apply(cmd)
        results[seq] = (index, result)
        w.order.append(seq)
        self.entries += 1
        if len(results) > limits.window_max:
            self._drop_oldest(w)
        while self.entries > limits.entries_max:
            self._drop_oldest(next(v for v in clients.values() if v.results))
        while len(clients) > limits.clients_max:
            self._drop_client(next(iter(clients)))
        return result

    def _conf_change(self, cmd: ConfChange, index: int) -> dict:
        """The group's next configuration (``core.paxos.reconfig``): adopted unless
        ``reconfig.refusal`` says why not; the same answer on every replica. A change
        at or below the current epoch (a replica created with a later configuration
        replaying the log before it) changes nothing either."""
        cur = self.conf
        if cur is None:
            return {ERROR_KEY: [CONF_REFUSED, "the group's configuration is unknown here"]}
        why = refusal(cur, cmd)
        if why is not None:
            return {ERROR_KEY: [CONF_REFUSED, why]}
        self.conf = GroupConf(cmd.voters, cmd.learners, cmd.epoch, index)
        return {"epoch": cmd.epoch}

    def _blocked(self, cmd: Command) -> bytes | None:
        """The prepared transaction whose lock keeps ``cmd`` from being applied now."""
        txns = self.txns
        t = type(cmd)
        if t is Put or t is Delete:
            return txns.write_blocked(cmd.key)  # type: ignore[union-attr]
        if t is Txn:
            for k, _v in cmd.compares:  # type: ignore[union-attr]
                h = txns.read_blocked(k)
                if h is not None:
                    return h
            for sub in (*cmd.then, *cmd.otherwise):  # type: ignore[union-attr]
                h = (txns.read_blocked(sub.key) if type(sub) is SubGet
                     else txns.write_blocked(sub.key))
                if h is not None:
                    return h
        return None

    def read(self, cmd: Get) -> dict:
        """A get's answer from this replica's state: a linearizable one waits (``LOCKED``)
        while a prepared transaction may still write the key; a stale one reads the
        last committed value."""
        if cmd.consistency != STALE and self.txns.xlocks:
            h = self.txns.read_blocked(cmd.key)
            if h is not None:
                return _locked(h)
        return self.kv.apply(cmd)

    # ------------------------------------------------------------ bounds
    def _drop_oldest(self, w: ClientWindow) -> None:
        seq = w.order.popleft()
        del w.results[seq]
        self.entries -= 1
        if seq > w.floor:
            w.floor = seq

    def _drop_client(self, client: object) -> None:
        w = self.clients.pop(client)
        self.entries -= len(w.results)
        self.forgotten += 1

    def _expire_results(self, w: ClientWindow, cutoff: int) -> None:
        results, order = w.results, w.order
        while order and results[order[0]][0] < cutoff:
            self._drop_oldest(w)

    def _expire_clients(self, cutoff: int) -> None:
        clients = self.clients
        while clients:
            client, w = next(iter(clients.items()))
            if w.last >= cutoff:
                return
            self._drop_client(client)

    def dedup_state(self) -> tuple:
        """The table as one comparable value (replicas must agree on it)."""
        return (self.forgotten, self._table(), self.txns.state())

    # ------------------------------------------------------------ snapshots
    def snapshot(self) -> bytes:
        """The whole state in one go; same bytes as :meth:`snapshot_writer` gives:
        ``[kv_blob, table, cluster_uuid, forgotten, txns]``, the table as
        ``[[client, floor, last, [[seq, index, result], ...]], ...]`` in table order,
        ``txns`` as ``TxnTable.to_snapshot`` gives it."""
        parts = [self.kv.snapshot(), self._table(), self.cluster_uuid, self.forgotten,
                 self.txns.to_snapshot()]
        if self.conf is not None:
            parts.append(self.conf.to_list())
        return msgpack.packb(parts, use_bin_type=True)

    def snapshot_writer(self) -> DedupSnapshotWriter:
        """Capture the state now (shallow copies); encode it later, step by step."""
        rows = [(c, w.floor, w.last, dict(w.results)) for c, w in self.clients.items()]
        return DedupSnapshotWriter(self.kv.snapshot_writer(), rows, self.cluster_uuid,
                                   self.forgotten, self.txns.to_snapshot(),
                                   None if self.conf is None else self.conf.to_list())

    def _table(self) -> list[list]:
        # Results are fresh dicts per applied command and never changed afterwards.
        return [
            [c, w.floor, w.last, [[s, i, r] for s, (i, r) in w.results.items()]]
            for c, w in self.clients.items()
        ]

    @classmethod
    def restore(cls, blob: bytes, limits: DedupLimits | None = None,
                shards: int = SHARDS) -> DedupKV:
        """Accepts this format and the older ones: ``[kv_blob, table]`` (0.1),
        ``[kv_blob, table, cluster_uuid]``, whose table rows ``[client, seq, result]``
        kept only each client's highest seq (lower ones become the floor), and
        ``[kv_blob, table, cluster_uuid, forgotten]`` (no transaction table)."""
        parts = _split_snapshot(blob)
        sm = cls(limits, shards)
        sm.kv = KVStore.restore(parts[0], shards)
        sm.cluster_uuid = parts[2] if len(parts) > 2 else None
        clients = sm.clients
        if len(parts) > 4:
            sm.txns = TxnTable.from_snapshot(parts[4])
        if len(parts) > 5:
            sm.conf = GroupConf.from_list(parts[5])
        if len(parts) > 3:
            sm.forgotten = parts[3]
            for c, floor, last, results in parts[1]:
                w = ClientWindow(floor, last)
                w.results = {s: (i, r) for s, i, r in results}
                w.order.extend(w.results)
                clients[_client_key(c)] = w
                sm.entries += len(w.results)
        else:
            for c, s, r in parts[1]:
                w = ClientWindow(s - 1, 0)
                w.results[s] = (0, r)
                w.order.append(s)
                clients[_client_key(c)] = w
                sm.entries += 1
        return sm


def _split_snapshot(blob: Any) -> list:
    """The snapshot's top-level array, its first item (the KV blob, nearly all of
    the bytes) as a zero-copy view of ``blob``: unpacking it as ``bytes`` would
    copy it whole in one call, holding the GIL (a shell decodes on a worker
    thread while its event loop goes on) and doubling the memory."""
    view = memoryview(blob).cast("B")
    if len(view) > 6 and 0x92 <= view[0] <= 0x96 and view[1] in _BIN_LEN_BYTES:
        size_len = _BIN_LEN_BYTES[view[1]]
        start = 2 + size_len
        end = start + int.from_bytes(view[2:start], "big")
        if end <= len(view):
            rest = msgpack.Unpacker(raw=False)
            rest.feed(view[end:])
            parts = [view[start:end], *rest]
            if len(parts) == view[0] & 0x0F:
                return parts
    return msgpack.unpackb(blob, raw=False)


_BIN_LEN_BYTES = {0xC4: 1, 0xC5: 2, 0xC6: 4}  # msgpack bin 8/16/32: bytes of the length


def _client_key(c: object) -> object:
    return tuple(c) if isinstance(c, list) else c


def _bin_header(n: int) -> bytes:
    """The msgpack bin header for ``n`` bytes (spec: bin 8/16/32)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    return b"\xc6" + n.to_bytes(4, "big")


class DedupSnapshotWriter:
    """Encodes a captured ``DedupKV`` piecewise into the bytes of
    :meth:`DedupKV.snapshot` at capture time
    (``[kv_blob, table, cluster_uuid, forgotten, txns]``).

    ``step(n, max_bytes)`` encodes up to ``n`` KV entries (fewer once about
    ``max_bytes`` are encoded), and once they are done up to ``n`` results of the
    dedup table per step. The shell calls ``step`` once per event-loop turn until
    it returns True, then writes :meth:`pieces` to the group's snapshot file
    (``result`` joins them).

    Streaming, so the encoded state never sits in memory whole: after each
    step the shell takes the new KV bytes (:meth:`take_kv_parts`) and writes
    them after :data:`STREAM_HEAD_BYTES` reserved bytes; when done it writes
    :meth:`stream_head` there and :meth:`tail` at the end. Those bytes differ
    from :meth:`result` only in using the 4-byte bin length form (which every
    msgpack reader accepts), so ``DedupKV.restore`` reads them the same.
    """

    __slots__ = ("_kv", "_rows", "_uuid", "_forgotten", "_txns", "_conf", "_tail", "_pieces",
                 "_table", "_row", "_left", "_items", "_pack")

    STREAM_HEAD_BYTES = 6

    def __init__(self, kv: SnapshotWriter, rows: list[tuple], uuid: str | None,
                 forgotten: int, txns: list, conf: list | None = None) -> None:
        self._kv = kv
        self._conf = conf  # GroupConf.to_list(), or None (then the older 5-item format)
        self._txns = txns  # TxnTable.to_snapshot(): small (transactions in progress)
        self._rows = rows  # (client, floor, last, {seq: (index, result)}), copies
        self._uuid = uuid
        self._forgotten = forgotten
        self._tail: bytes | None = None
        self._pieces: list[bytes] | None = None
        self._table: list[bytes] | None = None  # the table's encoded pieces so far
        self._row = 0  # next row to encode
        self._left = 0  # results of that row still to encode
        self._items: Iterator | None = None  # over them
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def step(self, max_entries: int, max_bytes: int | None = None) -> bool:
        if self._tail is not None:
            return True
        if self._kv.remaining:
            self._kv.step(max_entries, max_bytes)
            return False
        rows = self._rows
        if self._table is None:
            self._table = [_array_header(len(rows))]
            if rows:
                return False
        if self._row < len(rows):
            self._encode_rows(max_entries)
            return False
        pack = self._pack
        self._tail = (b"".join(self._table) + pack(self._uuid) + pack(self._forgotten)
                      + pack(self._txns) + (b"" if self._conf is None else pack(self._conf)))
        self._rows = []
        self._table = []
        return True

    def _encode_rows(self, budget: int) -> None:
        """Encode up to ``budget`` results (and the rows they belong to)."""
        rows, out, pack = self._rows, self._table, self._pack
        assert out is not None
        while self._row < len(rows) and budget > 0:
            if self._items is None:  # the row's head: [client, floor, last, [...]]
                client, floor, last, results = rows[self._row]
                out.append(b"\x94" + pack(client) + pack(floor) + pack(last)
                           + _array_header(len(results)))
                self._items = iter(results.items())
                self._left = len(results)
            n = min(budget, self._left)
            out.extend([pack([seq, index, result])
                        for seq, (index, result) in itertools.islice(self._items, n)])
            budget -= n
            self._left -= n
            if not self._left:
                self._row += 1
                self._items = None

    def take_kv_parts(self) -> list[bytes]:
        """The KV bytes encoded since the last call, in order; no longer kept here."""
        return self._kv.take_parts()

    def stream_head(self, kv_len: int) -> bytes:
        """The first bytes of a streamed snapshot whose KV blob is ``kv_len`` bytes."""
        return self._array_head() + b"\xc6" + kv_len.to_bytes(4, "big")  # then bin 32

    def _array_head(self) -> bytes:
        """fixarray of 5 items, or 6 with the group's configuration"""
        return b"\x95" if self._conf is None else b"\x96"

    def tail(self) -> bytes:
        """The bytes after the KV blob (the dedup table, cluster UUID, forgotten, txns)."""
        if self._tail is None:
            raise ValueError("snapshot not fully encoded")
        return self._tail

    def pieces(self) -> list[bytes]:
        """The encoded bytes in order (their concatenation is :meth:`result`)."""
        if self._pieces is None:
            parts = self._kv.parts()
            head = self._array_head() + _bin_header(sum(map(len, parts)))
            self._pieces = [head, *parts, self.tail()]
            self._kv = None  # type: ignore[assignment]
        return self._pieces

    def result(self) -> bytes:
        pieces = self.pieces()
        if len(pieces) != 1:
            self._pieces = pieces = [b"".join(pieces)]
        return pieces[0]


def _array_header(n: int) -> bytes:
    """The msgpack array header for ``n`` items (spec: fixarray/array 16/array 32)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 1 << 16:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")
