"""Client commands as the cores see them: frozen, slotted, already validated.

The wire layer (``dsnode.wire.requests``) turns request maps into these; the
KV state machine applies them; ``encode``/``decode`` give the compact form that
goes into the write-ahead log and, later, into Paxos accept messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsnode.core.membership import members as _members

LINEARIZABLE = "linearizable"
STALE = "stale"


@dataclass(frozen=True, slots=True)
class Get:
    key: bytes
    consistency: str = LINEARIZABLE


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes
    if_version: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    if_version: int | None = None


@dataclass(frozen=True, slots=True)
class SubGet:
    key: bytes


@dataclass(frozen=True, slots=True)
class SubPut:
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class SubDelete:
    key: bytes


SubOp = SubGet | SubPut | SubDelete


@dataclass(frozen=True, slots=True)
class Txn:
    compares: tuple[tuple[bytes, int], ...] = ()
    then: tuple[SubOp, ...] = ()
    otherwise: tuple[SubOp, ...] = ()

    @property
    def is_read_only(self) -> bool:
        return not any(
            not isinstance(s, SubGet) for s in (*self.then, *self.otherwise)
        )


@dataclass(frozen=True, slots=True)
class Form:
    """Not a client command: the first value a new cluster chooses, naming it.

    A group's first leader that finds nothing accepted anywhere proposes it
    into slot 1 (``PaxosGroup.become_leader``), so the cluster's UUID is
    agreed by Paxos; the state machine keeps the first one it applies."""

    cluster_uuid: str


@dataclass(frozen=True, slots=True)
class SetRing:
    """Not a client command: the ring the metadata group holds (issue 8).

    Proposed with ``Form`` in slot 1 of a new cluster's metadata group (the
    members it was started with, P and R), later by membership changes, each
    with the next epoch. ``members`` is sorted; placement is a function of
    (members, partitions, replication) alone (``dsnode.core.ring``)."""

    members: tuple[str, ...]
    partitions: int
    replication: int
    epoch: int


@dataclass(frozen=True, slots=True)
class ConfChange:
    """Not a client command: a Paxos group's next configuration (issue 10 part 2).

    Chosen in the group's own log and applied by the group itself
    (``dsnode.core.paxos.reconfig``): from the slot after the one holding it, the
    group's acceptors are ``voters`` (in preference order, the first the preferred
    leader) and ``learners`` receive the log without voting. ``epoch`` must be the
    group's current configuration epoch plus one, else the change is refused."""

    voters: tuple[str, ...]
    learners: tuple[str, ...]
    epoch: int


Command = Get | Put | Delete | Txn


def is_write(cmd: Command) -> bool:
    """True for commands that may change state (and so go through the log)."""
    return not isinstance(cmd, Get)


def keys_of(cmd: Command) -> tuple[bytes, ...]:
    if isinstance(cmd, Txn):
        seen = dict.fromkeys(k for k, _ in cmd.compares)
        for s in (*cmd.then, *cmd.otherwise):
            seen.setdefault(s.key, None)
        return tuple(seen)
    return (cmd.key,)


def size_of(cmd: Command) -> int:
    """Approximate payload bytes of a command (keys and values), for batching limits."""
    if type(cmd) in _tx.TYPES:
        return _tx.size_of(cmd)
    if isinstance(cmd, ConfChange):
        return sum(len(m) + 8 for m in (*cmd.voters, *cmd.learners)) + 16
    if type(cmd) in _members.TYPES:
        return 256
    if isinstance(cmd, Put):
        return len(cmd.key) + len(cmd.value) + 16
    if isinstance(cmd, Txn):
        n = sum(len(k) + 8 for k, _ in cmd.compares)
        for sub in (*cmd.then, *cmd.otherwise):
            n += len(sub.key) + (len(sub.value) if isinstance(sub, SubPut) else 0) + 8
        return n + 16
    return len(cmd.key) + 16


# ---------------------------------------------------------------- encoding
# Compact msgpack-friendly lists; the first element is a one-letter tag.

def _enc_sub(s: SubOp) -> list:
    if isinstance(s, SubGet):
        return ["g", s.key]
    if isinstance(s, SubPut):
        return ["p", s.key, s.value]
    return ["d", s.key]


def _dec_sub(x: list) -> SubOp:
    tag = x[0]
    if tag == "g":
        return SubGet(x[1])
    if tag == "p":
        return SubPut(x[1], x[2])
    if tag == "d":
        return SubDelete(x[1])
    raise ValueError(f"unknown sub-op tag {tag!r}")


def encode(cmd: Command) -> list:
    if isinstance(cmd, Put):
        return ["P", cmd.key, cmd.value, cmd.if_version]
    if type(cmd) in _tx.TYPES:
        return _tx.encode(cmd)  # type: ignore[arg-type]
    if isinstance(cmd, Delete):
        return ["D", cmd.key, cmd.if_version]
    if isinstance(cmd, Txn):
        return [
            "T",
            [[k, v] for k, v in cmd.compares],
            [_enc_sub(s) for s in cmd.then],
            [_enc_sub(s) for s in cmd.otherwise],
        ]
    if isinstance(cmd, Get):
        return ["G", cmd.key, cmd.consistency]
    if isinstance(cmd, Form):
        return ["F", cmd.cluster_uuid]
    if isinstance(cmd, SetRing):
        return ["R", list(cmd.members), cmd.partitions, cmd.replication, cmd.epoch]
    if isinstance(cmd, ConfChange):
        return ["C", list(cmd.voters), list(cmd.learners), cmd.epoch]
    if type(cmd) in _members.TYPES:
        return _members.encode(cmd)
    return _tx.encode(cmd)  # a transaction's own command, or TypeError


def decode(x: list) -> Command:
    tag = x[0]
    if tag == "P":
        return Put(x[1], x[2], x[3])
    if tag in _tx.TAGS:
        return _tx.decode(x)
    if tag == "D":
        return Delete(x[1], x[2])
    if tag == "T":
        c, then, other = x[1], x[2], x[3]
        return Txn(
            tuple([(k, v) for k, v in c]) if c else (),
            tuple([_dec_sub(s) for s in then]),
            tuple([_dec_sub(s) for s in other]) if other else (),
        )
    if tag == "G":
        return Get(x[1], x[2])
    if tag == "F":
        return Form(x[1])
    if tag == "R":
        return SetRing(tuple(x[1]), x[2], x[3], x[4])
    if tag == "C":
        return ConfChange(tuple(x[1]), tuple(x[2]), x[3])
    if tag in _members.TAGS:
        return _members.decode(x)
    raise ValueError(f"unknown command tag {tag!r}")


def decode_checked(x: object) -> Command:
    """``decode`` for commands from the network (a peer's forward): every field is checked,
    so a malformed command is a ValueError here, never a poison pill in the replicated log."""
    if not isinstance(x, list) or not x:
        raise ValueError("a command is a non-empty array")
    tag = x[0]
    if isinstance(tag, str) and tag in _tx.TAGS:
        return _tx.decode_checked(x)
    if isinstance(tag, str) and tag in _members.TAGS:
        return _members.decode_checked(x)
    want = {"P": 4, "D": 3, "T": 4, "G": 3}.get(tag) if isinstance(tag, str) else None
    if want is None or len(x) != want:
        raise ValueError(f"bad command tag or length: {tag!r}")
    if tag == "P":
        return Put(_ck_key(x[1]), _ck_bytes(x[2]), _ck_version(x[3], True))
    if tag == "D":
        return Delete(_ck_key(x[1]), _ck_version(x[2], True))
    if tag == "G":
        if x[2] not in (LINEARIZABLE, STALE) or not isinstance(x[2], str):
            raise ValueError("bad consistency")
        return Get(_ck_key(x[1]), x[2])
    compares, then, otherwise = x[1], x[2], x[3]
    if not all(isinstance(p, list) for p in (compares, then, otherwise)):
        raise ValueError("txn parts must be arrays")
    pairs = []
    for c in compares:
        if not isinstance(c, list) or len(c) != 2:
            raise ValueError("bad txn compare")
        pairs.append((_ck_key(c[0]), _ck_version(c[1], False)))
    return Txn(tuple(pairs), tuple(_ck_sub(s) for s in then), tuple(_ck_sub(s) for s in otherwise))


def _ck_sub(s: object) -> SubOp:
    if not isinstance(s, list) or not s or not isinstance(s[0], str):
        raise ValueError("bad txn sub-op")
    n = {"g": 2, "p": 3, "d": 2}.get(s[0])
    if n is None or len(s) != n:
        raise ValueError("bad txn sub-op tag or length")
    if s[0] == "p":
        return SubPut(_ck_key(s[1]), _ck_bytes(s[2]))
    return SubGet(_ck_key(s[1])) if s[0] == "g" else SubDelete(_ck_key(s[1]))


def _ck_bytes(v: object) -> bytes:
    if type(v) is not bytes:
        raise ValueError("expected bin")
    return v


def _ck_key(v: object) -> bytes:
    if type(v) is not bytes or not v:
        raise ValueError("a key is non-empty bin")
    return v


def _ck_version(v: object, optional: bool) -> int | None:
    if v is None and optional:
        return None
    if type(v) is not int or v < 0:
        raise ValueError("a version is an int >= 0")
    return v


# The two-phase-commit commands (``core.twopc.records``) travel and are logged like the
# client commands; imported last, as that module builds on the sub-ops above.
from dsnode.core.twopc import records as _tx  # noqa: E402
