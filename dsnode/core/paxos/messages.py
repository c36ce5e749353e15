"""Peer messages of the Multi-Paxos core: frozen, slotted dataclasses.

Every message carries ``group`` (many groups share one connection per peer).
A ballot is a ``(round, node_id)`` tuple; tuples order by round, then node id
(Paxos Made Simple, section 2.2: proposal numbers from disjoint sets). An
entry value is opaque ``bytes``: ``b""`` is a no-op, anything else a
msgpack-packed batch of ``[request_id, encoded_command]`` pairs.

``to_wire``/``from_wire`` give a msgpack-friendly list form with a kind tag
for the wire codec; ``from_wire`` raises ``PeerMisbehaved`` on anything
malformed.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from dsnode.core.errors import PeerMisbehaved

Ballot = tuple[int, str]
ZERO_BALLOT: Ballot = (0, "")
NOOP = b""


@dataclass(frozen=True, slots=True)
class Prepare:
    """Phase 1a for every slot >= ``from_slot`` at once.

    ``transfer_from``: the ballot of the leader that handed its leadership over
    to the sender (``TimeoutNow``); an acceptor whose promise is exactly that
    ballot, and which follows that leader, promises at once instead of waiting
    out its silence (and its lease, which it gave up by stepping down). A stale
    hand-over (that leader has led again since, in a newer ballot) frees nobody.
    ``ZERO_BALLOT`` otherwise; absent on the wire from older nodes."""

    group: Any
    ballot: Ballot
    from_slot: int
    transfer_from: Ballot = (0, "")


@dataclass(frozen=True, slots=True)
class Promise:
    """Phase 1b. ``ok`` false is a nack carrying the higher ``promised``.

    ``chosen_through``: every slot up to it is chosen at this node (in its
    log or its snapshot); the new leader learns those by catch-up from it and
    never proposes into them. ``accepted`` lists ``(slot, ballot, value)``
    for slots above both ``from_slot`` and ``chosen_through``, in slot order
    and bounded by the byte budget: when it was cut short, ``more_from`` is
    the next slot to ask for (the candidate sends ``Prepare`` again, same
    ballot, from there); 0 means the report is complete.
    """

    group: Any
    ballot: Ballot
    ok: bool
    promised: Ballot
    chosen_through: int
    accepted: tuple[tuple[int, Ballot, bytes], ...] = ()
    more_from: int = 0


@dataclass(frozen=True, slots=True)
class Accept:
    """Phase 2a for many slots; with no entries it is the leader heartbeat.

    ``commit``: every slot up to it is chosen. ``read_seq``: the read-index
    round this message confirms leadership for. ``quiesce``: the group is idle
    and every live member has everything; the leader sends no more heartbeats
    for it until it has work, and followers keep quiet as long as the leader's
    node heartbeats (``NodeHeartbeat``) keep coming. Absent on the wire from
    nodes that predate quiescence.
    """

    group: Any
    ballot: Ballot
    entries: tuple[tuple[int, bytes], ...]
    commit: int
    read_seq: int = 0
    quiesce: bool = False


@dataclass(frozen=True, slots=True)
class Accepted:
    """Phase 2b for ``slots`` (and the heartbeat ack). ``ok`` false is a nack.
    ``chosen_through``: the sender's chosen prefix (how far behind it is; 0 from
    nodes that predate it, which never look caught up for a leadership transfer)."""

    group: Any
    ballot: Ballot
    ok: bool
    promised: Ballot
    slots: tuple[int, ...] = ()
    read_seq: int = 0
    chosen_through: int = 0


@dataclass(frozen=True, slots=True)
class CatchupReq:
    """Ask a peer for chosen values from ``from_slot`` on, or for the next
    chunk (at ``offset``) of its snapshot ``snap_index``."""

    group: Any
    from_slot: int
    snap_index: int = 0
    offset: int = 0


@dataclass(frozen=True, slots=True)
class Learn:
    """Chosen values, contiguous from the requested slot."""

    group: Any
    entries: tuple[tuple[int, bytes], ...]


@dataclass(frozen=True, slots=True)
class SnapChunk:
    """One chunk of the state-machine snapshot at ``index``.

    ``crc`` is the CRC-32 of the whole snapshot, checked after reassembly.
    """

    group: Any
    index: int
    total: int
    offset: int
    data: bytes
    crc: int


@dataclass(frozen=True, slots=True)
class PreVote:
    """Pre-vote (Raft thesis 9.6; etcd ``MsgPreVote``): "would you promise
    ``ballot`` if I asked?". Asking and answering change no state: the asker
    has not raised its round, nobody promises, nothing is persisted.

    ``chosen_through`` is the asker's log position, for traces only: it is not
    a grant condition, since in Paxos any node may lead safely (phase 1
    recovers every chosen value), so a log test could only cost liveness.
    """

    group: Any
    ballot: Ballot
    chosen_through: int


@dataclass(frozen=True, slots=True)
class PreVoteReply:
    """Answer to the ``PreVote`` for ``ballot``: ``granted`` unless the voter
    heard from a live leader within the election timeout."""

    group: Any
    ballot: Ballot
    granted: bool


@dataclass(frozen=True, slots=True)
class NodeHeartbeat:
    """One per node pair per heartbeat interval, whatever the number of groups:
    the sender is alive. Quiesced groups rely on it instead of their own
    heartbeats. ``group`` is always "" (no group)."""

    group: Any = ""


@dataclass(frozen=True, slots=True)
class TimeoutNow:
    """Leadership transfer: the leader of ``ballot`` tells the receiver to run
    phase 1 at once (no pre-vote). The sender has already stepped down and
    serves nothing from its lease any more."""

    group: Any
    ballot: Ballot


@dataclass(frozen=True, slots=True)
class Host:
    """A group's leader to a learner it has not heard from: the group's configuration
    (``core.paxos.reconfig.GroupConf``) lists you as a learner since slot ``slot``;
    a node that does not host the group starts to (``PaxosNode.host_learner``).
    How a replica added on another node (a new member, a move) comes to exist."""

    group: Any
    voters: tuple[str, ...]
    learners: tuple[str, ...]
    epoch: int
    slot: int


@dataclass(frozen=True, slots=True)
class Dropped:
    """The answer of a node to a leader's accept for a group it no longer hosts: it
    applied a configuration that removed it and dropped the group's data (so the
    leader stops telling it about its removal: ``Proposer.gone``)."""

    group: Any


Message = (
    Prepare | Promise | Accept | Accepted | CatchupReq | Learn | SnapChunk | PreVote
    | PreVoteReply | TimeoutNow | NodeHeartbeat | Host | Dropped
)

_KINDS: dict[str, type] = {
    "px.prepare": Prepare,
    "px.promise": Promise,
    "px.accept": Accept,
    "px.accepted": Accepted,
    "px.catchup": CatchupReq,
    "px.learn": Learn,
    "px.snap": SnapChunk,
    "px.prevote": PreVote,
    "px.prevote_reply": PreVoteReply,
    "px.timeout_now": TimeoutNow,
    "px.node_hb": NodeHeartbeat,
    "px.host": Host,
    "px.dropped": Dropped,
}
_TAGS = {cls: tag for tag, cls in _KINDS.items()}
_FIELDS = {cls: tuple(f.name for f in fields(cls)) for cls in _KINDS.values()}


# Bytes a message costs on the wire beyond its values: tag, group, ballots,
# counters (generous: a ballot's node id is at most 63 bytes).
MESSAGE_OVERHEAD_BYTES = 256
ENTRY_OVERHEAD_BYTES = 96  # per (slot, [ballot,] value) entry


def wire_size(msg: Message) -> int:
    """An upper bound on ``msg``'s encoded size, cheap enough for every send."""
    t = type(msg)
    if t is Accept or t is Learn:
        entries = msg.entries
        return MESSAGE_OVERHEAD_BYTES + sum(len(v) for _s, v in entries) + (
            ENTRY_OVERHEAD_BYTES * len(entries)
        )
    if t is Promise:
        acc = msg.accepted
        return MESSAGE_OVERHEAD_BYTES + sum(len(v) for _s, _b, v in acc) + (
            ENTRY_OVERHEAD_BYTES * len(acc)
        )
    if t is SnapChunk:
        return MESSAGE_OVERHEAD_BYTES + len(msg.data)
    if t is Accepted:
        return MESSAGE_OVERHEAD_BYTES + 10 * len(msg.slots)
    return MESSAGE_OVERHEAD_BYTES


def to_wire(msg: Message) -> list:
    """``[tag, field...]``; tuples become lists in msgpack, that is fine."""
    cls = type(msg)
    return [_TAGS[cls], *(getattr(msg, name) for name in _FIELDS[cls])]


def _ballot(x: Any) -> Ballot:
    if (
        isinstance(x, list | tuple)
        and len(x) == 2
        and isinstance(x[0], int)
        and isinstance(x[1], str)
        and x[0] >= 0
    ):
        return (x[0], x[1])
    raise PeerMisbehaved(f"bad ballot {x!r}")


def _int(x: Any) -> int:
    if isinstance(x, int) and not isinstance(x, bool) and x >= 0:
        return x
    raise PeerMisbehaved(f"bad non-negative int {x!r}")


def _bytes(x: Any) -> bytes:
    if isinstance(x, bytes):
        return x
    raise PeerMisbehaved(f"bad bytes {x!r}")


def _bool(x: Any) -> bool:
    if isinstance(x, bool):
        return x
    raise PeerMisbehaved(f"bad bool {x!r}")


def _ids(x: Any) -> tuple[str, ...]:
    if (isinstance(x, list | tuple) and len(x) <= 64
            and all(isinstance(n, str) and 0 < len(n) <= 64 for n in x)):
        return tuple(x)
    raise PeerMisbehaved(f"bad node ids {x!r}")


def _entries(x: Any) -> tuple[tuple[int, bytes], ...]:
    try:
        return tuple((_int(s), _bytes(v)) for s, v in x)
    except (TypeError, ValueError) as e:
        raise PeerMisbehaved(f"bad entries: {e}") from None


def from_wire(x: Any) -> Message:
    """Validate and rebuild a message; ``PeerMisbehaved`` if malformed."""
    if not isinstance(x, list | tuple) or not x or not isinstance(x[0], str) or x[0] not in _KINDS:
        raise PeerMisbehaved("not a paxos message")
    cls = _KINDS[x[0]]
    args = x[1:]
    if cls is Promise and len(args) == len(_FIELDS[cls]) - 1:
        args = [*args, 0]  # from a node that predates chunked promises: complete
    if cls is Prepare and len(args) == len(_FIELDS[cls]) - 1:
        args = [*args, ZERO_BALLOT]  # from a node that predates leadership transfer
    if cls is Accepted and len(args) == len(_FIELDS[cls]) - 1:
        args = [*args, 0]  # likewise
    if cls is Accept and len(args) == len(_FIELDS[cls]) - 1:
        args = [*args, False]  # from a node that predates quiescence
    if len(args) != len(_FIELDS[cls]):
        raise PeerMisbehaved(f"{x[0]}: wrong field count")
    g = args[0]
    if not isinstance(g, int | str) or isinstance(g, bool):
        raise PeerMisbehaved(f"bad group {g!r}")
    try:
        if cls is Prepare:
            return Prepare(g, _ballot(args[1]), _int(args[2]), _ballot(args[3]))
        if cls is TimeoutNow:
            return TimeoutNow(g, _ballot(args[1]))
        if cls is Dropped:
            return Dropped(g)
        if cls is Host:
            return Host(g, _ids(args[1]), _ids(args[2]), _int(args[3]), _int(args[4]))
        if cls is NodeHeartbeat:
            if g != "":
                raise PeerMisbehaved("a node heartbeat belongs to no group")
            return NodeHeartbeat()
        if cls is Promise:
            acc = tuple((_int(s), _ballot(b), _bytes(v)) for s, b, v in args[5])
            return Promise(
                g, _ballot(args[1]), _bool(args[2]), _ballot(args[3]), _int(args[4]), acc,
                _int(args[6]),
            )
        if cls is Accept:
            return Accept(
                g, _ballot(args[1]), _entries(args[2]), _int(args[3]), _int(args[4]),
                _bool(args[5]),
            )
        if cls is Accepted:
            slots = tuple(_int(s) for s in args[4])
            return Accepted(
                g, _ballot(args[1]), bool(args[2]), _ballot(args[3]), slots, _int(args[5]),
                _int(args[6]),
            )
        if cls is CatchupReq:
            return CatchupReq(g, _int(args[1]), _int(args[2]), _int(args[3]))
        if cls is Learn:
            return Learn(g, _entries(args[1]))
        if cls is PreVote:
            return PreVote(g, _ballot(args[1]), _int(args[2]))
        if cls is PreVoteReply:
            return PreVoteReply(g, _ballot(args[1]), _bool(args[2]))
        return SnapChunk(
            g, _int(args[1]), _int(args[2]), _int(args[3]), _bytes(args[4]), _int(args[5])
        )
    except (TypeError, ValueError) as e:
        raise PeerMisbehaved(f"{x[0]}: {e}") from None
