"""Leader-role state: phase-1 merge, the phase-2 pipeline, read-index rounds.

Rules (Paxos Made Simple, sections 2.2 and 3; Paxos Made Moderately Complex,
section 3, "Leaders", "Scouts" and "Commanders"):

- after phase 1 over all open slots, a new leader re-proposes, for every slot
  some acceptor in its quorum reported, the value with the highest ballot;
  slots below the highest reported one that nobody reported get a no-op;
- slots an acceptor reports as chosen (``Promise.chosen_through``: in its
  log or compacted into its snapshot) are chosen: the leader must learn them
  (catch-up by log or snapshot) and never propose into them;
- new commands go into fresh slots above all of that, many per slot, many
  slots in flight (bounded by ``inflight_slots_max``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsnode.core.paxos.messages import NOOP, Ballot, Promise


@dataclass(slots=True)
class Phase1Result:
    proposals: dict[int, bytes]  # slots to re-propose, in the new ballot
    snap_index: int  # highest chosen_through reported (chosen there, learn by catch-up)
    snap_peer: str | None  # who reported it
    recovery_end: int  # every slot up to here is settled by the recovery


def merge_promises(
    promises: dict[str, Promise], from_slot: int, chosen_through: int
) -> Phase1Result:
    best: dict[int, tuple[Ballot, bytes]] = {}
    snap_index, snap_peer = chosen_through, None
    for node in sorted(promises):
        p = promises[node]
        if p.chosen_through > snap_index:
            snap_index, snap_peer = p.chosen_through, node
        for slot, ballot, value in p.accepted:
            cur = best.get(slot)
            if cur is None or ballot > cur[0]:
                best[slot] = (ballot, value)
    top = max(best, default=0)
    start = max(from_slot, snap_index + 1)
    proposals = {}
    for slot in range(start, top + 1):
        got = best.get(slot)
        proposals[slot] = got[1] if got is not None else NOOP
    return Phase1Result(proposals, snap_index, snap_peer, max(top, snap_index, chosen_through))


@dataclass(slots=True)
class PendingRead:
    token: Any
    cmd: Any
    read_index: int
    seq: int


@dataclass(slots=True)
class Proposer:
    ballot: Ballot
    next_slot: int
    recovery_end: int
    proposals: dict[int, bytes] = field(default_factory=dict)  # in flight, not chosen
    queue: list[tuple[Any, Any, Any]] = field(default_factory=list)  # (token, rid, cmd)
    tokens: dict[tuple[int, int], Any] = field(default_factory=dict)  # (slot, i) -> token
    # slot -> (value, its decoded commands) for slots this leader filled itself, so that
    # applying them needs no decoding; used only while the chosen value is that same value
    batches: dict[int, tuple[bytes, list]] = field(default_factory=dict)
    read_seq: int = 0
    read_wanted: bool = False
    reads: list[PendingRead] = field(default_factory=list)
    acked_seq: dict[str, int] = field(default_factory=dict)
    last_ack: dict[str, int] = field(default_factory=dict)

    def confirmed_seq(self, members: tuple[str, ...], quorum: int) -> int:
        """Highest read round acknowledged by a quorum in this ballot."""
        acks = sorted((self.acked_seq.get(m, 0) for m in members), reverse=True)
        return acks[quorum - 1]
