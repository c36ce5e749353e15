"""``CheckpointWriter``: a node's checkpoint captured at once, encoded in steps.

``PaxosNode.checkpoint_writer()`` captures, per group, what a checkpoint says
(which snapshot file is current, the promise, the accepted values above the
snapshot, the chosen values the acceptor does not hold, the proven commit
prefix) as shallow copies: O(window) dict copies, no encoding. The shell then
calls ``step(max_records, max_bytes)`` once per event-loop turn until it
returns True and takes ``result()``: the bytes ``PaxosNode.checkpoint()`` would
have returned at capture time (``checkpoint()`` is this writer run to the end).
Everything captured is immutable (bytes, ballot tuples) or a private copy, so
the node may go on changing while the writer encodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import msgpack

from dsnode.core.paxos import records as rec
from dsnode.core.paxos.messages import ZERO_BALLOT


class GroupCapture:
    """One group's part of a checkpoint, as of the capture."""

    __slots__ = ("gid", "head", "accepted", "chosen", "snap_index", "through", "recorded")

    def __init__(self, g: Any, hosted: Any = None) -> None:
        """``hosted``: the configuration the node created ``g`` with when it started
        hosting it as a learner (a ``host`` record says so first), else None."""
        log, a = g.log, g.acceptor
        self.gid = g.group
        self.head: list[bytes] = []
        if hosted is not None:
            self.head.append(rec.host(g.group, hosted.voters, hosted.learners, hosted.epoch,
                                      hosted.slot))
        if log.snap_index > 0:
            self.head.append(rec.snapfile(g.group, log.snap_index, len(log.snap_blob),
                                          log.snap_crc))
        if a.promised != ZERO_BALLOT:
            self.head.append(rec.promise(g.group, a.promised))
        self.accepted: dict[int, tuple] = dict(a.accepted)
        self.chosen: dict[int, bytes] = dict(log.chosen)
        self.snap_index = log.snap_index
        # the prefix the commit records so far prove: a slot learned from the
        # leader's commit since the last tick has no commit record yet
        self.through = min(g.commit_persisted, log.chosen_through)
        # chosen records above it: kept even where the acceptor holds the same value
        self.recorded = frozenset(s for s in g.chosen_recorded if s > self.through)

    def records(self) -> Iterator[bytes | None]:
        """The records in order; None for a chosen slot the acceptor holds (no
        record), so that a step's budget counts the slots it looked at."""
        gid, accepted = self.gid, self.accepted
        yield from self.head
        for slot in sorted(accepted):
            ballot, value = accepted[slot]
            yield rec.accept(gid, slot, ballot, value)
        # every chosen value the log holds, above a gap too (catch-up may teach
        # slot n+2 before n+1), as the chosen records so far hold them: one the
        # acceptor holds needs no record of its own unless it lies above the commit
        # record below (then its chosen record is all that says it was chosen)
        recorded = self.recorded
        for slot in sorted(s for s in self.chosen if s > self.snap_index):
            value = self.chosen[slot]
            held = accepted.get(slot)
            if held is None or held[1] != value or slot in recorded:
                yield rec.chosen(gid, slot, value)
            else:
                yield None
        if self.through > self.snap_index:
            yield rec.commit(gid, self.through)


class DropCapture:
    """The groups a node stopped hosting (``drop`` records), so that a node built with
    them again (its start-up groups) forgets them on recovery."""

    __slots__ = ("gids",)

    def __init__(self, gids: list) -> None:
        self.gids = gids

    def records(self) -> Iterator[bytes | None]:
        for gid in self.gids:
            yield rec.drop(gid)


_END = object()  # the end of the records


class CheckpointWriter:
    """Encodes captured groups into ``msgpack.packb([record, ...])`` bytes, a
    bounded number of records (and about a bounded number of bytes) per step."""

    __slots__ = ("_records", "_parts", "_count", "_done", "_pack")

    def __init__(self, groups: list[GroupCapture | DropCapture]) -> None:
        self._records: Iterator[bytes | None] = (r for g in groups for r in g.records())
        self._parts: list[bytes] = []
        self._count = 0
        self._done = False
        self._pack = msgpack.Packer(use_bin_type=True).pack

    def step(self, max_records: int, max_bytes: int | None = None) -> bool:
        """Encode up to ``max_records`` more records (slots looked at), stopping
        early once about ``max_bytes`` are encoded; True once all are."""
        if max_records < 1:
            raise ValueError("max_records must be >= 1")
        if self._done:
            return True
        pack, parts, got, end = self._pack, self._parts, 0, _END
        for _ in range(max_records):
            r = next(self._records, end)
            if r is None:
                continue
            if r is end:
                self._done = True
                return True
            piece = pack(r)
            parts.append(piece)
            self._count += 1
            got += len(piece)
            if max_bytes is not None and got >= max_bytes:
                break
        return False

    def result(self) -> bytes:
        if not self._done:
            raise ValueError("checkpoint not fully encoded")
        pk = msgpack.Packer(use_bin_type=True)
        return pk.pack_array_header(self._count) + b"".join(self._parts)
