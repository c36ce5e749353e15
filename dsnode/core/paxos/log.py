"""The replicated log of one group: chosen values, watermarks, compaction.

Invariants (checked; a violation is our bug, ``InvariantBroken``):
``snap_index <= applied <= chosen_through``; every slot in
``(snap_index, chosen_through]`` has a chosen value; a slot's chosen value
never changes.
"""

from __future__ import annotations

from dsnode.core.errors import InvariantBroken

# What a chosen slot costs in memory besides its value's bytes: its entries in the log's
# and the acceptor's maps, the acceptor's (ballot, value) pair and the value's header.
SLOT_OVERHEAD_BYTES = 160


class Log:
    __slots__ = ("chosen", "chosen_through", "applied", "snap_index", "snap_blob", "snap_crc",
                 "bytes")

    def __init__(self) -> None:
        self.chosen: dict[int, bytes] = {}
        # about the memory the values in ``chosen`` hold (a snapshot at applied frees it)
        self.bytes = 0
        self.chosen_through = 0
        self.applied = 0
        self.snap_index = 0
        # the snapshot at snap_index (bytes, or a bytes-like view of the shell's file:
        # len() and slicing) and its CRC-32, for catch-up
        self.snap_blob: bytes | None = None
        self.snap_crc = 0

    def learn(self, slot: int, value: bytes) -> None:
        if slot <= self.snap_index:
            return
        cur = self.chosen.get(slot)
        if cur is None:
            self.chosen[slot] = value
            self.bytes += len(value) + SLOT_OVERHEAD_BYTES
        elif cur != value:
            raise InvariantBroken(f"slot {slot} chosen twice with different values")

    def advance(self) -> None:
        nxt = self.chosen_through + 1
        while nxt in self.chosen:
            nxt += 1
        self.chosen_through = nxt - 1

    def to_apply(self) -> list[tuple[int, bytes]]:
        """Chosen slots not yet applied, in slot order; marks them applied."""
        out = [(s, self.chosen[s]) for s in range(self.applied + 1, self.chosen_through + 1)]
        self.applied = self.chosen_through
        return out

    def entries(self, from_slot: int, limit: int) -> tuple[tuple[int, bytes], ...]:
        end = min(self.chosen_through, from_slot + limit - 1)
        return tuple(
            (s, self.chosen[s]) for s in range(max(from_slot, self.snap_index + 1), end + 1)
        )

    def compact(self, index: int, blob: bytes, crc: int) -> None:
        """Drop chosen values up to ``index`` (applied, and in ``blob``)."""
        if index > self.applied:
            raise InvariantBroken(f"compact past applied {index} > {self.applied}")
        self.snap_index = index
        self.snap_blob = blob
        self.snap_crc = crc
        self._drop_through(index)

    def _drop_through(self, index: int) -> None:
        chosen = self.chosen
        for s in [s for s in chosen if s <= index]:
            self.bytes -= len(chosen.pop(s)) + SLOT_OVERHEAD_BYTES

    def install(self, index: int, blob: bytes, crc: int) -> None:
        """A snapshot from elsewhere (or from recovery) at ``index``."""
        self.snap_index = index
        self.snap_blob = blob
        self.snap_crc = crc
        self._drop_through(index)
        self.applied = index
        self.chosen_through = max(self.chosen_through, index)
        self.advance()
