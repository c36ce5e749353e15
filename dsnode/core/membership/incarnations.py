"""Acceptors never forget: which incarnation of each member may vote.

Paxos assumes an acceptor keeps every promise and accepted value for ever. A
node whose data directory was wiped (a replaced disk) or rolled back (an old
backup restored) breaks that silently: it would vote again with none of what
it had promised. Each data directory therefore gets an *incarnation* id when
it is created, and every node pins, per peer, the incarnation it first met
and the highest slot that peer is known to have accepted (``accepted``: from
its answers to our accepts, which leave it only after its log is durable).

A peer that presents another incarnation than the pinned one, or a log that
ends below what it was seen to accept, is refused at its hello: it never gets
a link, so no promise or accept of it is ever counted. A member met for the
first time (cluster formation, a node that never ran before) is pinned.

Pure: the runtime asks at every peer hello and persists ``encode()`` (before
the link carries anything) when ``admit`` or ``saw_accepted`` changed it;
the simulator drives the same class.
"""

from __future__ import annotations

from dataclasses import dataclass

REFUSAL_PREFIX = "stale identity"
RECOVERY_HINT = (
    "its data directory is new or older than what the cluster saw it accept, and an "
    "acceptor that lost state must not vote again; keep the old data directory, or "
    "give the node a new id (docs/OPERATIONS.md, 'Replacing a node's disk')"
)


@dataclass(slots=True)
class Pin:
    incarnation: str
    accepted: int = 0


class Incarnations:
    def __init__(self, pins: dict[str, Pin] | None = None) -> None:
        self.pins: dict[str, Pin] = dict(pins or {})

    def check(self, peer: str, incarnation: str, log_end: int) -> str | None:
        """Why ``peer`` (presenting ``incarnation`` and a log that ends at
        ``log_end``) may not take part, or None if it may."""
        pin = self.pins.get(peer)
        if pin is None:
            return None
        if incarnation != pin.incarnation:
            return (
                f"{REFUSAL_PREFIX}: node {peer!r} presents data directory incarnation "
                f"{incarnation!r}, the cluster knows it as {pin.incarnation!r}: {RECOVERY_HINT}"
            )
        if log_end < pin.accepted:
            return (
                f"{REFUSAL_PREFIX}: node {peer!r} has a log ending at slot {log_end}, but it "
                f"accepted slot {pin.accepted} before: {RECOVERY_HINT}"
            )
        return None

    def admit(self, peer: str, incarnation: str) -> bool:
        """Pin a peer met for the first time; True if the pins changed."""
        if peer in self.pins:
            return False
        self.pins[peer] = Pin(incarnation)
        return True

    def saw_accepted(self, peer: str, slot: int) -> bool:
        """``peer`` durably accepted ``slot``; True if its watermark rose."""
        pin = self.pins.get(peer)
        if pin is None or slot <= pin.accepted:
            return False
        pin.accepted = slot
        return True

    # ------------------------------------------------------------ persistence
    def encode(self) -> dict:
        return {p: [pin.incarnation, pin.accepted] for p, pin in sorted(self.pins.items())}

    @classmethod
    def decode(cls, obj: object) -> Incarnations:
        if not isinstance(obj, dict):
            raise ValueError("member pins: expected a map")
        pins = {}
        for peer, v in obj.items():
            if (
                not isinstance(peer, str)
                or not isinstance(v, list)
                or len(v) != 2
                or not isinstance(v[0], str)
                or not isinstance(v[1], int)
            ):
                raise ValueError(f"member pins: bad entry for {peer!r}")
            pins[peer] = Pin(v[0], v[1])
        return cls(pins)
