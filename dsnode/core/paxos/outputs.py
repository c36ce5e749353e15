"""What a Paxos group hands its shell: notices, work, replies, and their outbox.

Shared by the group and its role modules (``proposer``, ``catchup``); the
shells (runtime driver, simulator) read these types from ``Ready``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from dsnode.core.commands import size_of
from dsnode.core.effects import Ready, Reply


@dataclass(frozen=True, slots=True)
class Applied:
    """Notice in ``Ready.apply``: ``slot``'s chosen ``value`` was applied here."""

    group: Any
    slot: int
    value: bytes


@dataclass(frozen=True, slots=True)
class SnapshotInstalled:
    """Notice in ``Ready.apply``: the state machine jumped to ``index``."""

    group: Any
    index: int


@dataclass(frozen=True, slots=True)
class SnapshotWanted:
    """Work in ``Ready.snapshots``: encode ``writer`` (a capture of the state
    machine at ``index``) step by step, store the bytes durably as the
    group's snapshot file for ``index``, then call ``snapshot_ready(group,
    index, blob, crc)``. Until then the group starts no other snapshot.

    The writer (``DedupSnapshotWriter``, or ``BlobWriter`` for a snapshot
    installed from a peer) has ``step(n, max_bytes=None) -> bool`` (encode up to
    ``n`` more entries and about ``max_bytes``; True when done), then ``pieces()`` (the bytes in order, not
    joined: a shell writes them to its file one by one) and ``result()``
    (joined)."""

    group: Any
    index: int
    writer: Any


@dataclass(frozen=True, slots=True)
class SnapshotRestore:
    """Work in ``Ready.restores``: decode ``blob`` (a peer's snapshot at
    ``index``, CRC-32 ``crc`` checked) with ``restore(blob)`` into a fresh
    state machine, off the event loop's turn, then call
    ``snapshot_restored(group, index, sm)`` (``sm`` None if ``restore`` raised)."""

    group: Any
    index: int
    blob: bytes
    crc: int
    restore: Callable[[bytes], Any]


@dataclass(frozen=True, slots=True)
class StoredSnapshot:
    """A group's snapshot a shell read back from its file for
    ``PaxosNode.recover``: the state at ``index``, ``blob`` (bytes or a
    read-only bytes-like view) and its CRC-32."""

    index: int
    blob: Any
    crc: int


class BlobWriter:
    """The ``SnapshotWanted`` writer of an already encoded snapshot (one
    installed from a peer): nothing left to encode."""

    __slots__ = ("_blob",)

    def __init__(self, blob: bytes) -> None:
        self._blob = blob

    def step(self, max_entries: int, max_bytes: int | None = None) -> bool:
        return True

    def pieces(self) -> list[bytes]:
        return [self._blob]

    def result(self) -> bytes:
        return self._blob


_READY_FIELDS = tuple(f.name for f in fields(Ready))


@dataclass(slots=True)
class Outbox(Ready):
    """What the groups of one node have produced since the last drain, plus the
    running count of what they dropped (which is never drained)."""

    dropped: Counter = field(default_factory=Counter)
    largest_message: int = 0  # wire_size of the largest message built so far
    # linearizable reads answered by a leader, by how it knew it still led: "lease"
    # (no round) or "read_index" (a quorum confirmed a round after the read arrived)
    reads: Counter = field(default_factory=Counter)
    # times a group became leader or stopped leading (never drained): a shell that
    # reports which groups this node leads looks again only when it moved
    role_changes: int = 0
    # times a group switched to a new configuration (never drained): a shell looks for
    # retired groups (``PaxosNode.retired_groups``) only when it moved
    conf_changes: int = 0

    def take(self) -> Ready:
        """Hand over everything produced so far as a ``Ready`` and start afresh."""
        r = Ready(**{name: getattr(self, name) for name in _READY_FIELDS})
        for name in _READY_FIELDS:
            setattr(self, name, [])
        return r


def batch_len(queue: list[tuple[Any, Any, Any]], max_count: int, max_bytes: int) -> int:
    """How many queued commands go into the next slot: bounded by count and bytes, >= 1."""
    size = 0
    n = 0
    for _token, _rid, cmd in queue[:max_count]:
        size += size_of(cmd)
        if n and size > max_bytes:
            break
        n += 1
    return max(n, 1)


def unavailable(token: Any, why: str, indeterminate: bool) -> Reply:
    return Reply(token, error=("unavailable", why, indeterminate))
