"""Acceptors never forget: which incarnation of each member may vote.

Paxos assumes an acceptor keeps every promise and accepted value for ever. A
node whose data directory was wiped (a replaced disk) or rolled back (an old
backup restored) breaks that silently: it would vote again with none of what
it had promised. Each data directory therefore gets an *incarnation* id when
it is created, and every node pins, per peer: the incarnation it first met,
and per group the highest slot that peer was seen to accept and the highest
ballot it was seen to promise (from its answers, which leave it only after
its log is durable, so a healthy node's recovered state never falls below
them).

A peer that presents another incarnation than the pinned one, or per group a
log that ends below its accepted watermark or a promise below its promised
watermark, is refused at its hello: it never gets a link, so no promise or
accept of it is ever counted. A member met for the first time (cluster
formation, a node that never ran before) is pinned. Pins spread: hellos and a
periodic peer message carry the sender's table, merged with ``merge``, so a
node that never met the wiped one still knows it.

Pure: the runtime asks at every peer hello and persists ``encode()`` (before
the link carries anything) when ``admit``, ``saw`` or ``merge`` changed it;
the simulator drives the same class.
"""

from __future__ import annotations

from dataclasses import dataclass, field

REFUSAL_PREFIX = "stale identity"
# how a member that left the cluster or was removed from it is refused at its hello
GONE_REFUSAL = "is no member of the cluster any more"
RECOVERY_HINT = (
    "its data directory is new or older than what the cluster saw it accept, and an "
    "acceptor that lost state must not vote again; keep the old data directory, or "
    "give the node a new id (docs/OPERATIONS.md, 'Replacing a node's disk')"
)

Ballot = tuple[int, str]
NO_BALLOT: Ballot = (0, "")


@dataclass(slots=True)
class Pin:
    incarnation: str
    accepted: dict[str, int] = field(default_factory=dict)  # group -> slot
    promised: dict[str, Ballot] = field(default_factory=dict)  # group -> ballot
    # group -> the configuration epoch that removed the peer from it (``dropped``)
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Presented:
    """What a peer says about its durable state at hello: per group (ids as
    strings) the highest slot its log holds and the ballot it promised."""

    incarnation: str
    log_end: dict[str, int] = field(default_factory=dict)
    promised: dict[str, Ballot] = field(default_factory=dict)
    # per group, the epoch of the configuration it has applied (``PaxosNode.conf_epochs``)
    conf_epoch: dict[str, int] = field(default_factory=dict)
    # groups it dropped for good (``PaxosNode.dropped_groups``): removed from them
    dropped: tuple[str, ...] = ()


class Incarnations:
    def __init__(self, pins: dict[str, Pin] | None = None) -> None:
        self.pins: dict[str, Pin] = dict(pins or {})

    def check(self, peer: str, p: Presented) -> str | None:
        """Why ``peer`` presenting ``p`` may not take part, or None if it may."""
        pin = self.pins.get(peer)
        if pin is None:
            return None
        if p.incarnation != pin.incarnation:
            return (
                f"{REFUSAL_PREFIX}: node {peer!r} presents data directory incarnation "
                f"{p.incarnation!r}, the cluster knows it as {pin.incarnation!r}: {RECOVERY_HINT}"
            )
        for g, slot in sorted(pin.accepted.items()):
            have = p.log_end.get(g, 0)
            if have < slot:
                return (
                    f"{REFUSAL_PREFIX}: node {peer!r} has a log ending at slot {have} in group "
                    f"{g}, but it accepted slot {slot} before: {RECOVERY_HINT}"
                )
        for g, epoch in sorted(pin.dropped.items()):
            if g in p.log_end and p.conf_epoch.get(g, 0) <= epoch:
                return (
                    f"{REFUSAL_PREFIX}: node {peer!r} hosts group {g} with configuration "
                    f"epoch {p.conf_epoch.get(g, 0)}, but it was removed from the group by "
                    f"epoch {epoch} and dropped its data: {RECOVERY_HINT}"
                )
        for g, ballot in sorted(pin.promised.items()):
            have_b = p.promised.get(g, NO_BALLOT)
            if have_b < ballot:
                return (
                    f"{REFUSAL_PREFIX}: node {peer!r} promised ballot {list(have_b)} in group "
                    f"{g}, but it promised {list(ballot)} before: {RECOVERY_HINT}"
                )
        return None

    def note_drops(self, peer: str, p: Presented, removed_at) -> bool:
        """``peer`` says it dropped the groups ``p.dropped``: for each one whose
        configuration, as this node knows it, no longer lists the peer
        (``removed_at(group)`` gives that configuration's epoch, None while it still
        lists it), its watermarks there go (``dropped``). A claim this node cannot
        confirm yet changes nothing (the check may then refuse the peer until this node
        catches up). True if the pins changed."""
        pin = self.pins.get(peer)
        if pin is None or pin.incarnation != p.incarnation:
            return False
        changed = False
        for g in p.dropped:
            epoch = removed_at(g)
            if epoch is not None:
                changed |= self.dropped(peer, g, epoch)
        return changed

    def rebind(self, peer: str, incarnation: str) -> bool:
        """The cluster's member list (the metadata group) says ``peer`` is now the data
        directory ``incarnation``: it was removed and added again with a fresh directory
        (``members.MemberTable``). Its old pin goes: every replica of the old directory
        was removed from its groups, and the new one joins them afresh as a learner
        (``core.paxos.reconfig``, R5). True if the pins changed."""
        pin = self.pins.get(peer)
        if pin is None or pin.incarnation == incarnation or not incarnation:
            return False
        self.pins[peer] = Pin(incarnation)
        return True

    def admit(self, peer: str, incarnation: str) -> bool:
        """Pin a peer met for the first time; True if the pins changed."""
        if peer in self.pins:
            return False
        self.pins[peer] = Pin(incarnation)
        return True

    def saw(
        self, peer: str, group: str, accepted: int = 0, promised: Ballot = NO_BALLOT
    ) -> bool:
        """``peer`` answered with durable state: it accepted ``accepted`` and promised
        ``promised`` in ``group``. True if a watermark rose."""
        pin = self.pins.get(peer)
        if pin is None:
            return False
        changed = False
        if accepted > pin.accepted.get(group, 0):
            pin.accepted[group] = accepted
            changed = True
        if promised > pin.promised.get(group, NO_BALLOT):
            pin.promised[group] = promised
            changed = True
        return changed

    def dropped(self, peer: str, group: str, epoch: int) -> bool:
        """``peer`` left ``group`` for good: it applied the group's configuration of
        ``epoch``, which removed it, and dropped the group's data
        (``PaxosNode.remove_group(..., drop=True)``). Its votes there are no longer
        needed (every slot it voted on is chosen: ``core.paxos.reconfig``), so its
        watermarks in the group go; from now on it may host the group only afresh,
        with a later configuration (a learner added again), never with the state it
        had (an old copy of its data directory). True if anything changed. (Pins
        held elsewhere learn it by ``merge``.)"""
        pin = self.pins.get(peer)
        if pin is None or pin.dropped.get(group, -1) >= epoch:
            return False
        pin.accepted.pop(group, None)
        pin.promised.pop(group, None)
        pin.dropped[group] = epoch
        return True

    def merge(self, other: Incarnations, me: str) -> bool:
        """Take what another node pinned: unknown members, and higher watermarks
        of the same incarnation. Our own entry and conflicting incarnations are
        left alone. True if anything changed."""
        changed = False
        for peer, theirs in other.pins.items():
            if peer == me:
                continue
            mine = self.pins.get(peer)
            if mine is None:
                self.pins[peer] = Pin(theirs.incarnation, dict(theirs.accepted),
                                      dict(theirs.promised), dict(theirs.dropped))
                changed = True
            elif mine.incarnation == theirs.incarnation:
                for g, epoch in theirs.dropped.items():
                    changed |= self.dropped(peer, g, epoch)
                # watermarks of a table that does not know of a drop we know of are from
                # before it (the group's old replica): they no longer bind the peer
                stale = {g for g, e in mine.dropped.items() if theirs.dropped.get(g, -1) < e}
                for g, slot in theirs.accepted.items():
                    if g not in stale:
                        changed |= self.saw(peer, g, accepted=slot)
                for g, ballot in theirs.promised.items():
                    if g not in stale:
                        changed |= self.saw(peer, g, promised=ballot)
        return changed

    # ------------------------------------------------------------ persistence
    def encode(self) -> dict:
        return {
            p: [pin.incarnation, dict(pin.accepted), {g: list(b) for g, b in pin.promised.items()}]
            + ([dict(pin.dropped)] if pin.dropped else [])
            for p, pin in sorted(self.pins.items())
        }

    @classmethod
    def decode(cls, obj: object) -> Incarnations:
        if not isinstance(obj, dict):
            raise ValueError("member pins: expected a map")
        pins = {}
        for peer, v in obj.items():
            try:
                inc, acc, prom, *rest = v
                if not isinstance(peer, str) or not isinstance(inc, str) or len(rest) > 1:
                    raise TypeError
                accepted = {_str(g): _int(s) for g, s in acc.items()}
                promised = {_str(g): _ballot(b) for g, b in prom.items()}
                dropped = {_str(g): _int(e) for g, e in (rest[0] if rest else {}).items()}
            except (TypeError, ValueError, AttributeError):
                raise ValueError(f"member pins: bad entry for {peer!r}") from None
            pins[peer] = Pin(inc, accepted, promised, dropped)
        return cls(pins)


def _str(x: object) -> str:
    if not isinstance(x, str):
        raise TypeError
    return x


def _int(x: object) -> int:
    if type(x) is not int or x < 0:
        raise TypeError
    return x


def _ballot(x: object) -> Ballot:
    if not isinstance(x, list | tuple) or len(x) != 2 or type(x[0]) is not int:
        raise TypeError
    if not isinstance(x[1], str):
        raise TypeError
    return (x[0], x[1])


def check_cluster(peer: str, mine: str | None, theirs: object) -> str | None:
    """Why ``peer``, whose data directory belongs to cluster UUID ``theirs``, may not
    join ours (``mine``), or None. Either side may not know its UUID yet (a cluster
    still forming, a node that has not caught up): then there is nothing to compare."""
    if theirs is None or mine is None:
        return None
    if not isinstance(theirs, str):
        return f"{REFUSAL_PREFIX}: malformed cluster_uuid from {peer!r}"
    if theirs != mine:
        return (
            f"{REFUSAL_PREFIX}: node {peer!r} holds data of cluster {theirs}, this is cluster "
            f"{mine} (same cluster_id, another formation): {RECOVERY_HINT}"
        )
    return None


def presented_from_wire(hello: dict) -> Presented | None:
    """The identity part of a peer hello (or its answer); None if it has none (a node
    from before incarnations). ``ValueError`` if it is malformed."""
    inc = hello.get("incarnation")
    if inc is None:
        return None
    try:
        log_end = {_str(g): _int(s) for g, s in hello.get("log_end", {}).items()}
        promised = {_str(g): _ballot(b) for g, b in hello.get("promised", {}).items()}
        conf_epoch = {_str(g): _int(e) for g, e in hello.get("conf_epoch", {}).items()}
        dropped = tuple(_str(g) for g in hello.get("dropped", ()))
        return Presented(_str(inc), log_end, promised, conf_epoch, dropped)
    except (TypeError, ValueError, AttributeError):
        raise ValueError("malformed identity in peer hello") from None
