"""The acceptor: the only code that answers phases 1 and 2.

Rules (Paxos Made Simple, section 2.2; Paxos Made Moderately Complex,
section 3, "Acceptors"):

- P1b: promise a ballot >= the current promise, and report every value
  accepted in the asked-for slots that this node does not already know to be
  chosen; a lower ballot gets a nack. The report is cut into pieces of at
  most ``budget`` bytes of values (at least one entry each): the candidate
  asks again, same ballot, from ``more_from``. Answering the same ballot
  again changes nothing, and a higher promise in between turns the next ask
  into a nack, so the pieces together are as good as one report.
- P2b: accept a value for a slot unless a higher ballot was promised.
- Durability: a promise or an accept is recorded (``records``) before the
  reply leaves the node; the shell keeps that order (``effects.Ready``).
"""

from __future__ import annotations

from typing import Any

from dsnode.core.errors import PeerMisbehaved
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.config import MESSAGE_BYTES_MAX
from dsnode.core.paxos.messages import (
    ENTRY_OVERHEAD_BYTES,
    ZERO_BALLOT,
    Accept,
    Accepted,
    Ballot,
    Prepare,
    Promise,
)


class Acceptor:
    __slots__ = ("group", "promised", "accepted", "snap_index")

    def __init__(self, group: Any) -> None:
        self.group = group
        self.promised: Ballot = ZERO_BALLOT
        # slot -> (ballot, value), only for slots above snap_index
        self.accepted: dict[int, tuple[Ballot, bytes]] = {}
        self.snap_index = 0

    # ------------------------------------------------------------ phase 1
    def on_prepare(
        self,
        m: Prepare,
        records: list[bytes],
        chosen_through: int = 0,
        budget: int = MESSAGE_BYTES_MAX,
    ) -> Promise:
        """``chosen_through``: this node's log knows every slot up to it as
        chosen; ``budget``: bytes of values in one reply."""
        known = max(self.snap_index, chosen_through)
        if m.ballot < self.promised:
            return Promise(self.group, m.ballot, False, self.promised, known)
        if m.ballot > self.promised:
            self.promised = m.ballot
            self._record_promise(m.ballot, records)
        start = max(m.from_slot, known + 1)
        acc, more_from = self._report(start, budget)
        return Promise(self.group, m.ballot, True, self.promised, known, acc, more_from)

    def _report(self, start: int, budget: int) -> tuple[tuple, int]:
        """Accepted slots from ``start`` in order, cut before ``budget`` bytes
        (values plus per-entry overhead; always at least one entry)."""
        out = []
        size = 0
        accepted = self.accepted
        for s in sorted(s for s in accepted if s >= start):
            b, v = accepted[s]
            cost = len(v) + ENTRY_OVERHEAD_BYTES
            if out and size + cost > budget:
                return tuple(out), s
            out.append((s, b, v))
            size += cost
        return tuple(out), 0

    def _record_promise(self, ballot: Ballot, records: list[bytes]) -> None:
        records.append(rec.promise(self.group, ballot))

    # ------------------------------------------------------------ phase 2
    def on_accept(self, m: Accept, records: list[bytes], chosen_through: int = 0) -> Accepted:
        if m.ballot < self.promised:
            return Accepted(self.group, m.ballot, False, self.promised)
        for slot, value in m.entries:
            cur = self.accepted.get(slot)
            if cur is not None and cur[0] == m.ballot and cur[1] != value:
                raise PeerMisbehaved(f"two values for slot {slot} in ballot {m.ballot}")
        if m.ballot > self.promised:
            self.promised = m.ballot
            if not m.entries:
                self._record_promise(m.ballot, records)
        slots = []
        for slot, value in m.entries:
            slots.append(slot)
            if slot <= self.snap_index:
                continue  # chosen and compacted here already
            if self.accepted.get(slot) != (m.ballot, value):
                self.accepted[slot] = (m.ballot, value)
                records.append(rec.accept(self.group, slot, m.ballot, value))
        return Accepted(
            self.group, m.ballot, True, self.promised, tuple(slots), m.read_seq, chosen_through
        )

    # ------------------------------------------------------------ compaction
    def compact(self, index: int) -> None:
        """Slots up to ``index`` are chosen and in a durable snapshot."""
        if index <= self.snap_index:
            return
        self.snap_index = index
        for s in [s for s in self.accepted if s <= index]:
            del self.accepted[s]

    # ------------------------------------------------------------ recovery
    def recover_promise(self, ballot: Ballot) -> None:
        self.promised = max(self.promised, ballot)

    def recover_accept(self, slot: int, ballot: Ballot, value: bytes) -> None:
        self.promised = max(self.promised, ballot)
        if slot > self.snap_index:
            self.accepted[slot] = (ballot, value)
