"""The cluster's member list, kept by the metadata group (issue 10, part 1).

Pure and deterministic: the metadata group's state machine (``paxos.metadata.MetaSM``)
applies these commands in log order on every replica, so every node agrees on who
is a member, in which state, and which ring epoch each change produced.

A member's state here is what the *cluster* decided about it; ``alive``,
``suspect`` and ``dead`` are what one node's failure detector observes, and
``dsnode member list`` shows the detector's word only for members that are
``active`` here.

    joining   added (``MemberAdd``); on the ring: partitions move replicas onto it
    active    on the ring, its moves done
    leaving   asked to go (``MemberLeave``); off the ring: its replicas move away
    left      its replicas moved away: gone for good
    removed   taken out while dead (``MemberRemove``): its replicas are rebuilt elsewhere

Every change of who is on the ring (an add, a leave, a removal of a member on the
ring) produces the next ring epoch; ``MovesDone(epoch)`` (the mover's word that
every partition's voting set matches the ring of that epoch) turns ``joining``
into ``active`` and ``leaving`` into ``left``. Changes go one at a time: an add
or a leave is refused while an earlier change's moves are pending; a removal is
not (a dead node may be what keeps them pending).

Identity: a member is an id bound to one data directory (its ``incarnation``). An
add of an id in use by another directory is refused; an add of a ``left`` or
``removed`` id with the directory it had is refused (that directory's acceptor
state was given up); with a fresh one it is a new member under the old name.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

JOINING, ACTIVE, LEAVING, LEFT, REMOVED = "joining", "active", "leaving", "left", "removed"
STATES = (JOINING, ACTIVE, LEAVING, LEFT, REMOVED)
ON_RING = frozenset((JOINING, ACTIVE))
GONE = frozenset((LEFT, REMOVED))
ID_BYTES_MAX = 64
# what a node id may be (``--node-id``, ``--peers``, certificates, joins)
NODE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
ADDRESS_BYTES_MAX = 256
META_LABEL = "meta"  # how ``GroupMoved`` names the metadata group, whatever its id


@dataclass(frozen=True, slots=True)
class MemberAdd:
    node_id: str
    address: str  # host:port of its peer and client listener
    incarnation: str  # its data directory's


@dataclass(frozen=True, slots=True)
class MemberLeave:
    node_id: str


@dataclass(frozen=True, slots=True)
class MemberRemove:
    node_id: str


@dataclass(frozen=True, slots=True)
class MovesDone:
    epoch: int


@dataclass(frozen=True, slots=True)
class GroupMoved:
    """A group's leader says its replicas match the ring of ``epoch`` (``group``: a
    partition id as a string, or the metadata group's id). Once every group of the
    cluster said so for the current epoch, its moves are done (as ``MovesDone``)."""

    group: str
    epoch: int


MemberCommand = MemberAdd | MemberLeave | MemberRemove | MovesDone | GroupMoved
TYPES = frozenset((MemberAdd, MemberLeave, MemberRemove, MovesDone, GroupMoved))


@dataclass(frozen=True, slots=True)
class Member:
    node_id: str
    address: str
    incarnation: str
    state: str
    epoch: int  # the ring epoch its last change produced (0: formation)

    def encode(self) -> list:
        return [self.node_id, self.address, self.incarnation, self.state, self.epoch]

    @classmethod
    def decode(cls, x: list) -> Member:
        node_id, address, incarnation, state, epoch = x
        if state not in STATES:
            raise ValueError(f"unknown member state {state!r}")
        return cls(node_id, address, incarnation, state, epoch)


class Refused(ValueError):
    """A change the member list does not allow; the same on every replica."""


class MemberTable:
    """Members by id, the ring epoch whose moves are done (``settled``), and the ring
    epoch each group's replicas were last reported to match (``reached``)."""

    __slots__ = ("members", "settled", "reached")

    def __init__(self, members: dict[str, Member] | None = None, settled: int = 0,
                 reached: dict[str, int] | None = None) -> None:
        self.members: dict[str, Member] = dict(members or {})
        self.settled = settled
        self.reached: dict[str, int] = dict(reached or {})

    @classmethod
    def formed(cls, ids: tuple[str, ...] | list[str], epoch: int,
               addresses: dict[str, str] | None = None) -> MemberTable:
        """The members a cluster was formed with (``--peers``): all active, settled at
        the formation ring's epoch; their incarnations are pinned by the peers."""
        addresses = addresses or {}
        return cls({i: Member(i, addresses.get(i, ""), "", ACTIVE, 0) for i in ids}, epoch)

    # ------------------------------------------------------------ views
    def on_ring(self) -> tuple[str, ...]:
        """The ids the ring places replicas on (sorted)."""
        return tuple(sorted(i for i, m in self.members.items() if m.state in ON_RING))

    def pending(self) -> bool:
        """An earlier change's moves are not done."""
        return any(m.state in (JOINING, LEAVING) for m in self.members.values())

    def state_of(self, node_id: str) -> str | None:
        m = self.members.get(node_id)
        return None if m is None else m.state

    # ------------------------------------------------------------ changes
    def apply(self, cmd: MemberCommand, epoch: int, groups: tuple[str, ...] = ()) -> bool:
        """Apply ``cmd`` with the ring at ``epoch``; True if who is on the ring changed
        (the caller then writes the ring of ``epoch + 1``). ``groups``: every group of
        the cluster (for ``GroupMoved``: the moves are done once all reached ``epoch``).
        Raises ``Refused``."""
        if type(cmd) is GroupMoved:
            if cmd.epoch > epoch:
                raise Refused(f"ring epoch {cmd.epoch} is ahead of the current {epoch}")
            if cmd.epoch > self.reached.get(cmd.group, 0):
                self.reached[cmd.group] = cmd.epoch
            if self.settled < epoch and groups and all(
                    self.reached.get(g, 0) >= epoch for g in groups):
                self._moves_done(epoch, epoch)
            return False
        if type(cmd) is MemberAdd:
            return self._add(cmd, epoch)
        if type(cmd) is MemberLeave:
            return self._leave(cmd.node_id, epoch)
        if type(cmd) is MemberRemove:
            return self._remove(cmd.node_id, epoch)
        if type(cmd) is MovesDone:
            self._moves_done(cmd.epoch, epoch)
            return False
        raise TypeError(f"not a membership command: {cmd!r}")

    def _add(self, cmd: MemberAdd, epoch: int) -> bool:
        check_node_id(cmd.node_id, Refused)
        have = self.members.get(cmd.node_id)
        if have is not None and have.state not in GONE:
            if have.incarnation == cmd.incarnation:
                return False  # a retried join: it is a member already
            raise Refused(f"node id {cmd.node_id!r} belongs to another member's data directory")
        if have is not None and have.incarnation == cmd.incarnation:
            raise Refused(f"node {cmd.node_id!r} was {have.state}: it may come back only "
                          "with a fresh data directory")
        self._no_pending(epoch)
        for m in self.members.values():
            if m.state not in GONE and m.address and m.address == cmd.address:
                raise Refused(f"address {cmd.address} is member {m.node_id!r}'s")
        self.members[cmd.node_id] = Member(cmd.node_id, cmd.address, cmd.incarnation, JOINING,
                                           epoch + 1)
        return True

    def _leave(self, node_id: str, epoch: int) -> bool:
        m = self._member(node_id)
        if m.state == LEAVING:
            return False  # asked again
        if m.state != ACTIVE:
            raise Refused(f"node {node_id!r} is {m.state}: only an active member can leave")
        self._no_pending(epoch)
        self._not_last(node_id)
        self.members[node_id] = _with(m, LEAVING, epoch + 1)
        return True

    def _remove(self, node_id: str, epoch: int) -> bool:
        m = self._member(node_id)
        if m.state in GONE:
            return False  # removed or left already
        self._not_last(node_id)
        on_ring = m.state in ON_RING
        self.members[node_id] = _with(m, REMOVED, epoch + 1 if on_ring else m.epoch)
        return on_ring

    def _moves_done(self, done: int, epoch: int) -> None:
        if done != epoch:
            return  # for an older ring: a newer change's moves are still to do
        for i, m in list(self.members.items()):
            if m.state == JOINING:
                self.members[i] = _with(m, ACTIVE, m.epoch)
            elif m.state == LEAVING:
                self.members[i] = _with(m, LEFT, m.epoch)
        self.settled = done

    def _member(self, node_id: str) -> Member:
        m = self.members.get(node_id)
        if m is None:
            raise Refused(f"no member {node_id!r}")
        return m

    def _no_pending(self, epoch: int) -> None:
        if self.pending() or self.settled < epoch:
            raise Refused(f"the change to ring epoch {epoch} is still moving replicas: "
                          "one membership change at a time")

    def _not_last(self, node_id: str) -> None:
        if self.on_ring() == (node_id,):
            raise Refused(f"node {node_id!r} is the last member on the ring")

    # ------------------------------------------------------------ encoding
    def encode(self) -> list:
        return [self.settled, [m.encode() for _, m in sorted(self.members.items())],
                sorted(self.reached.items())]

    @classmethod
    def decode(cls, x: list) -> MemberTable:
        settled, rows = x[0], x[1]
        reached = {g: e for g, e in x[2]} if len(x) > 2 else {}
        members = [Member.decode(r) for r in rows]
        return cls({m.node_id: m for m in members}, settled, reached)


def _with(m: Member, state: str, epoch: int) -> Member:
    return Member(m.node_id, m.address, m.incarnation, state, epoch)


# ---------------------------------------------------------------- commands on the wire
# Encoded like the client commands (``commands.encode``), tags J (join), L, K (kick
# out a dead node), M and A (a group arrived at an epoch).
TAGS = frozenset("JLKMA")


def encode(cmd: MemberCommand) -> list:
    if type(cmd) is MemberAdd:
        return ["J", cmd.node_id, cmd.address, cmd.incarnation]
    if type(cmd) is MemberLeave:
        return ["L", cmd.node_id]
    if type(cmd) is MemberRemove:
        return ["K", cmd.node_id]
    if type(cmd) is MovesDone:
        return ["M", cmd.epoch]
    if type(cmd) is GroupMoved:
        return ["A", cmd.group, cmd.epoch]
    raise TypeError(f"not a command: {cmd!r}")


def decode(x: list) -> MemberCommand:
    tag = x[0]
    if tag == "J":
        return MemberAdd(x[1], x[2], x[3])
    if tag == "L":
        return MemberLeave(x[1])
    if tag == "K":
        return MemberRemove(x[1])
    if tag == "A":
        return GroupMoved(x[1], x[2])
    return MovesDone(x[1])


def decode_checked(x: list) -> MemberCommand:
    """``decode`` for a command from the network: every field checked (ValueError)."""
    tag = x[0]
    want = {"J": 4, "L": 2, "K": 2, "M": 2, "A": 3}[tag]
    if len(x) != want:
        raise ValueError(f"bad membership command length for {tag!r}")
    if tag == "A":
        _ck_text(x[1], "group id", ID_BYTES_MAX)
        if type(x[2]) is not int or x[2] < 1:
            raise ValueError("a ring epoch is an int >= 1")
        return GroupMoved(x[1], x[2])
    if tag == "M":
        if type(x[1]) is not int or x[1] < 1:
            raise ValueError("a ring epoch is an int >= 1")
        return MovesDone(x[1])
    _ck_text(x[1], "node id", ID_BYTES_MAX)
    if tag == "J":
        check_node_id(x[1])
        _ck_text(x[2], "address", ADDRESS_BYTES_MAX)
        _ck_text(x[3], "incarnation", ID_BYTES_MAX)
    return decode(x)


def check_node_id(node_id: object, error: type[ValueError] = ValueError) -> str:
    if not isinstance(node_id, str) or not NODE_ID_RE.match(node_id):
        raise error(f"node id {node_id!r} does not match [a-z0-9][a-z0-9_-]{{0,62}}")
    return node_id


def _ck_text(v: object, what: str, most: int) -> None:
    if type(v) is not str or not v or len(v.encode()) > most:
        raise ValueError(f"a {what} is a non-empty string of at most {most} bytes")
