"""The metadata group's state machine (issue 8 part 2): the cluster's member
list, P, R and the ring epoch, agreed by Paxos like everything else.

It is a ``DedupKV`` whose store no client reaches (clients' requests go to
partition groups only) and which keeps the ring under :data:`RING_KEY`, so
snapshots, restores and catch-up need nothing of their own. A new cluster's
first metadata value holds ``Form`` and ``SetRing(epoch=1)``
(``PaxosGroup.become_leader``); each later ``SetRing`` must carry the next
epoch and the same number of partitions, else it changes nothing and its
result says why.
"""

from __future__ import annotations

import msgpack

from dsnode.core.commands import Command, Put, SetRing
from dsnode.core.kv.store import ERROR_KEY, SHARDS
from dsnode.core.paxos.statemachine import DedupKV
from dsnode.core.ring import Ring

RING_KEY = b"\x00ring"  # where the ring lives in the metadata group's store
REFUSED = "ring_refused"


class MetaSM(DedupKV):
    __slots__ = ("_ring",)

    def __init__(self, limits=None, shards: int = SHARDS) -> None:
        super().__init__(limits, shards)
        self._ring: tuple[int, Ring | None] = (0, None)  # (store version it was read at, ring)

    @property
    def ring(self) -> Ring | None:
        """The current ring (None before the cluster's first value is applied)."""
        blob, version = self.kv.get(RING_KEY)
        if version != self._ring[0]:
            ring = None
            if blob is not None:
                members, partitions, replication, epoch = msgpack.unpackb(blob, raw=False)
                ring = Ring(members, partitions, replication, epoch)
            self._ring = (version, ring)
        return self._ring[1]

    @property
    def ring_epoch(self) -> int:
        """The ring's epoch, 0 before there is one; cheap (no decoding)."""
        ring = self.ring
        return 0 if ring is None else ring.epoch

    def apply(self, rid: list | None, cmd: Command, index: int) -> dict:
        if type(cmd) is SetRing:
            return self._set_ring(cmd)
        return super().apply(rid, cmd, index)

    def _set_ring(self, cmd: SetRing) -> dict:
        current = self.ring
        why = _refusal(current, cmd)
        if why is not None:
            return {ERROR_KEY: [REFUSED, why, False]}
        blob = msgpack.packb([sorted(cmd.members), cmd.partitions, cmd.replication, cmd.epoch],
                             use_bin_type=True)
        self.kv.apply(Put(RING_KEY, blob))
        return {"epoch": cmd.epoch}


def _refusal(current: Ring | None, cmd: SetRing) -> str | None:
    """Why ``cmd`` may not replace ``current`` (None: it may). Every replica
    decides the same from the same state, so a refused change is refused
    everywhere."""
    try:
        Ring(cmd.members, cmd.partitions, cmd.replication, cmd.epoch)
    except (ValueError, TypeError) as e:
        return f"not a valid ring: {e}"
    if current is None:
        return None if cmd.epoch == 1 else f"the first ring has epoch 1, not {cmd.epoch}"
    if cmd.epoch != current.epoch + 1:
        return f"ring epoch {cmd.epoch} does not follow the current epoch {current.epoch}"
    if cmd.partitions != current.partitions:
        return (f"the number of partitions is fixed ({current.partitions}); "
                f"{cmd.partitions} asked")
    return None
