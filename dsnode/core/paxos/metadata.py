"""The metadata group's state machine (issue 8 part 2): the cluster's member
list, P, R and the ring epoch, agreed by Paxos like everything else.

It is a ``DedupKV`` whose store no client reaches (clients' requests go to
partition groups only) and which keeps the ring under :data:`RING_KEY`, so
snapshots, restores and catch-up need nothing of their own. A new cluster's
first metadata value holds ``Form`` and ``SetRing(epoch=1)``
(``PaxosGroup.become_leader``); each later ``SetRing`` must carry the next
epoch and the same number of partitions, else it changes nothing and its
result says why.

The member list (``core.membership.members``: who is joining, active, leaving,
left or removed, with their addresses and data directories) lives under
:data:`MEMBERS_KEY`; until a membership command is applied it is the formation
ring's members, all active. A membership command that changes who is on the ring
writes the ring of the next epoch with it (same P and R), in the same apply. The
mover (``core.membership.mover``) carries a new
ring's replica moves out through each partition's own log (issue 10, part 2) and
reports each group's arrival (``GroupMoved``); a node creates from the ring only
the partitions the *first* ring placed on it (a formation member), every later
replica is added through its partition's log.
"""

from __future__ import annotations

import msgpack

from dsnode.core.commands import Command, Put, SetRing
from dsnode.core.kv.store import ERROR_KEY, SHARDS
from dsnode.core.membership import members as mem
from dsnode.core.paxos.statemachine import DedupKV
from dsnode.core.ring import Ring

RING_KEY = b"\x00ring"  # where the ring lives in the metadata group's store
FIRST_RING_KEY = b"\x00ring1"  # and the cluster's first ring (epoch 1), kept for good
MEMBERS_KEY = b"\x00members"  # and the member list (once a membership command changed it)
REFUSED = "refused"  # the wire's error code (PROTOCOL.md): a definite refusal


class MetaSM(DedupKV):
    __slots__ = ("_ring", "_members")

    def __init__(self, limits=None, shards: int = SHARDS) -> None:
        super().__init__(limits, shards)
        self._ring: tuple[int, Ring | None] = (0, None)  # (store version it was read at, ring)
        self._members: tuple[int, mem.MemberTable | None] = (0, None)  # likewise

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

    @property
    def members(self) -> mem.MemberTable:
        """The member list (a copy: change it only through membership commands)."""
        blob, version = self.kv.get(MEMBERS_KEY)
        if blob is None:
            ring = self.ring
            return mem.MemberTable.formed(ring.members if ring else (), ring.epoch if ring else 0)
        if version != self._members[0]:
            self._members = (version, mem.MemberTable.decode(msgpack.unpackb(blob, raw=False)))
        table = self._members[1]
        assert table is not None
        return mem.MemberTable(table.members, table.settled, table.reached)

    @property
    def first_ring(self) -> Ring | None:
        """The ring the cluster was formed with (epoch 1): the partitions a formation
        member hosts from the start. Later rings are targets the replica moves
        reach through each partition's own log. (A cluster formed before the first
        ring was kept separately never changed its ring: the current one.)"""
        blob, _ = self.kv.get(FIRST_RING_KEY)
        if blob is None:
            ring = self.ring
            return ring if ring is not None and ring.epoch == 1 else None
        members, partitions, replication, epoch = msgpack.unpackb(blob, raw=False)
        return Ring(members, partitions, replication, epoch)

    def changes_pending(self) -> bool:
        """The ring's newest epoch has moves not reported done (cheap: no copy)."""
        ring = self.ring
        if ring is None or ring.epoch == 1:
            return False
        blob, version = self.kv.get(MEMBERS_KEY)
        if blob is None:
            return False
        if version != self._members[0]:
            self._members = (version, mem.MemberTable.decode(msgpack.unpackb(blob, raw=False)))
        return self._members[1].settled < ring.epoch

    def apply(self, rid: list | None, cmd: Command, index: int) -> dict:
        if type(cmd) is SetRing:
            return self._set_ring(cmd)
        if type(cmd) in mem.TYPES:
            return self._change_members(cmd)  # type: ignore[arg-type]
        return super().apply(rid, cmd, index)

    def _change_members(self, cmd: mem.MemberCommand) -> dict:
        """A membership command: the member list changes, and when who is on the ring
        changed, the ring of the next epoch is written with it."""
        blob, _ = self.kv.get(RING_KEY)
        ring = self.ring
        if blob is None or ring is None:
            return {ERROR_KEY: [REFUSED, "the cluster has no ring yet", False]}
        _, partitions, replication, epoch = msgpack.unpackb(blob, raw=False)
        table = self.members
        groups = (*map(str, range(partitions)), mem.META_LABEL)
        try:
            moved = table.apply(cmd, epoch, groups)
        except mem.Refused as e:
            return {ERROR_KEY: [REFUSED, str(e), False]}
        if moved:
            ring_cmd = SetRing(table.on_ring(), partitions, replication, epoch + 1)
            why = _refusal(ring, ring_cmd)  # e.g. an id the ring does not take
            if why is not None:
                return {ERROR_KEY: [REFUSED, why, False]}
        self.kv.apply(Put(MEMBERS_KEY, msgpack.packb(table.encode(), use_bin_type=True)))
        if moved:
            self._set_ring(ring_cmd)
            epoch += 1
        node = getattr(cmd, "node_id", None)
        return {"epoch": epoch, "state": table.state_of(node) if node else None}

    def _set_ring(self, cmd: SetRing) -> dict:
        current = self.ring
        why = _refusal(current, cmd)
        if why is not None:
            return {ERROR_KEY: [REFUSED, why, False]}
        blob = msgpack.packb([sorted(cmd.members), cmd.partitions, cmd.replication, cmd.epoch],
                             use_bin_type=True)
        self.kv.apply(Put(RING_KEY, blob))
        if cmd.epoch == 1:
            self.kv.apply(Put(FIRST_RING_KEY, blob))
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
