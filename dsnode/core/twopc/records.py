"""The commands of a cross-partition transaction, chosen in the partitions' own Paxos logs.

A transaction ``txid`` touching partitions H, P1..Pn, H its home (the partition
of its first written key, or of its first key when it writes none):

- ``TxPrepare`` in each Pi (not in H): lock the keys of Pi it touches
  (exclusive for a key written in either branch, shared for the others), read
  its compared versions and gets, reserve the revision its writes will carry;
  or refuse (a lock held by another transaction: ``wait`` or ``die``, see
  ``participant``), changing nothing.
- ``TxCommit`` in H, once every Pi prepared: H's own part and the decision in
  one record (H is the "last agent"): unless a decision was chosen already (a
  participant that waited too long proposes abort there: ``TxDecide``), or H's
  keys are locked by another transaction (``wait``/``die``, nothing decided),
  it reads H's keys, evaluates the compares over all partitions (the others'
  versions come with it), applies H's writes of the chosen branch, and chooses
  commit, keeping the client's answer with the decision. The first decision
  chosen for a ``txid`` wins; any later ``TxCommit``/``TxDecide`` answers with it.
- ``TxDecide`` in H: a participant's (or a retry's) question; abort unless
  decided.
- ``TxResolve`` in each Pi: apply the chosen branch's writes (commit) or not
  (abort), release the locks.
- ``TxForget`` in H: every participant resolved; the decision may go.

Each is idempotent by ``txid``; the coordinator proposes ``TxCommit`` with the
client's request id (the home's deduplication table then answers a retry of
the request with the first attempt's decision and answer). Encoded like the
client commands (``commands.encode``), with tags X, V, Y, Z and W.
"""

from __future__ import annotations

from dataclasses import dataclass

# commands imports this module last of all, so what it defines is there already
from dsnode.core.commands import SubDelete, SubPut, Txn
from dsnode.core.commands import decode as decode_command
from dsnode.core.commands import decode_checked as decode_command_checked
from dsnode.core.commands import encode as encode_command
from dsnode.core.commands import size_of as size_of_command

Write = SubPut | SubDelete


@dataclass(frozen=True, slots=True)
class TxPrepare:
    txid: bytes
    ts: int  # priority: (ts, txid) smaller is older; milliseconds of the coordinator's clock
    pid: int  # the partition it is for (routing)
    home: int  # the partition holding the decision
    compares: tuple[tuple[bytes, int], ...]  # this partition's compares: their versions are read
    reads: tuple[bytes, ...]  # this partition's gets (either branch)
    then: tuple[Write, ...]  # this partition's writes if the compares hold ...
    otherwise: tuple[Write, ...]  # ... and if not

    def exclusive(self) -> tuple[bytes, ...]:
        """The keys it writes in either branch (locked exclusively)."""
        then, other = self.then, self.otherwise
        if not other and len(then) == 1:
            return (then[0].key,)  # the common case, without the dict
        return tuple(dict.fromkeys([w.key for w in then + other]))

    def locks(self) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """(exclusive, shared): the keys it writes, and those it only compares or reads."""
        ex = self.exclusive()
        compares, reads = self.compares, self.reads
        if not compares and len(reads) <= 1:  # the common cases, without the dict
            return ex, (reads if not reads or reads[0] not in ex else ())
        keys = dict.fromkeys([k for k, _ in compares] + list(reads))
        for k in ex:
            keys.pop(k, None)
        return ex, tuple(keys)

    def shared(self) -> tuple[bytes, ...]:
        return self.locks()[1]


@dataclass(frozen=True, slots=True)
class TxCommit:
    """The home's part and the decision (see the module docstring). ``part`` is the
    home's share, as a prepare would carry it; ``known`` what the other participants'
    prepares read: ``versions`` [[key, version]], ``reads`` [[key, value, version]],
    ``existed`` [[key, bool]] and ``revisions`` [[key, revision]] (the revision each
    key written elsewhere will carry), from which, with ``txn``, the home computes the
    client's answer. ``txn`` is the client's transaction without its puts' values
    (``shape``): the home needs only its compares and each operation's kind and key;
    the values it writes come in ``part``, the others' in their prepares."""

    part: TxPrepare
    txn: Txn
    known: dict
    participants: tuple[int, ...]  # the other partitions, to resolve
    forget: tuple[bytes, ...] = ()

    @property
    def txid(self) -> bytes:
        return self.part.txid

    @property
    def home(self) -> int:
        return self.part.pid


def shape(txn: Txn) -> Txn:
    """``txn`` with every put's value left out (``b""``): what ``TxCommit`` carries."""
    ops = txn.then + txn.otherwise
    if not any(type(s) is SubPut and s.value for s in ops):
        return txn

    def strip(branch: tuple) -> tuple:
        return tuple(SubPut(s.key, b"") if type(s) is SubPut else s for s in branch)

    return Txn(txn.compares, strip(txn.then), strip(txn.otherwise))


@dataclass(frozen=True, slots=True)
class TxDecide:
    txid: bytes
    ts: int
    home: int
    commit: bool  # what the proposer asks for; the answer says what was chosen
    holds: bool  # with commit: which branch (the compares held)
    participants: tuple[int, ...]  # every partition to resolve (the home's recovery uses it)
    forget: tuple[bytes, ...] = ()  # decisions of this home whose participants all resolved


@dataclass(frozen=True, slots=True)
class TxResolve:
    txid: bytes
    pid: int
    commit: bool
    holds: bool


@dataclass(frozen=True, slots=True)
class TxForget:
    home: int
    txids: tuple[bytes, ...]


TxCommand = TxPrepare | TxCommit | TxDecide | TxResolve | TxForget
TYPES = frozenset((TxPrepare, TxCommit, TxDecide, TxResolve, TxForget))


def partition_of(cmd: TxCommand) -> int:
    """The partition whose log the command goes into."""
    t = type(cmd)
    if t is TxPrepare or t is TxResolve:
        return cmd.pid  # type: ignore[union-attr]
    return cmd.home  # type: ignore[union-attr]  # TxCommit, TxDecide, TxForget


# ---------------------------------------------------------------- encoding

def _enc_w(w: Write) -> list:
    return ["p", w.key, w.value] if type(w) is SubPut else ["d", w.key]


def _dec_w(x: list) -> Write:
    if x[0] == "p":
        return SubPut(x[1], x[2])
    if x[0] == "d":
        return SubDelete(x[1])
    raise ValueError(f"unknown write tag {x[0]!r}")


def encode(cmd: TxCommand) -> list:
    t = type(cmd)
    if t is TxPrepare:
        return ["X", cmd.txid, cmd.ts, cmd.pid, cmd.home, [[k, v] for k, v in cmd.compares],
                list(cmd.reads), [_enc_w(w) for w in cmd.then],
                [_enc_w(w) for w in cmd.otherwise]]
    if t is TxCommit:
        return ["V", encode(cmd.part), encode_command(cmd.txn), cmd.known, list(cmd.participants),
                list(cmd.forget)]
    if t is TxDecide:
        return ["Y", cmd.txid, cmd.ts, cmd.home, cmd.commit, cmd.holds, list(cmd.participants),
                list(cmd.forget)]
    if t is TxResolve:
        return ["Z", cmd.txid, cmd.pid, cmd.commit, cmd.holds]
    if t is TxForget:
        return ["W", cmd.home, list(cmd.txids)]
    raise TypeError(f"not a transaction command: {cmd!r}")


TAGS = frozenset("XVYZW")


def decode(x: list) -> TxCommand:
    tag = x[0]
    if tag == "X":
        c, t, o = x[5], x[7], x[8]
        return TxPrepare(x[1], x[2], x[3], x[4], tuple([(k, v) for k, v in c]) if c else (),
                         tuple(x[6]), tuple([_dec_w(w) for w in t]) if t else (),
                         tuple([_dec_w(w) for w in o]) if o else ())
    if tag == "V":
        part = decode(x[1])
        txn = decode_command(x[2])
        if type(part) is not TxPrepare or type(txn) is not Txn:
            raise ValueError("a commit carries a prepare and a txn")
        return TxCommit(part, txn, x[3], tuple(x[4]), tuple(x[5]))
    if tag == "Y":
        return TxDecide(x[1], x[2], x[3], x[4], x[5], tuple(x[6]), tuple(x[7]))
    if tag == "Z":
        return TxResolve(x[1], x[2], x[3], x[4])
    if tag == "W":
        return TxForget(x[1], tuple(x[2]))
    raise ValueError(f"unknown transaction command tag {tag!r}")


def decode_checked(x: list) -> TxCommand:
    """``decode`` for commands off the network (a peer's forward): every field checked,
    so a malformed one is a ValueError here, never a poison pill in a replicated log."""
    want = {"X": 9, "V": 6, "Y": 8, "Z": 5, "W": 3}.get(x[0])
    if want is None or len(x) != want:
        raise ValueError(f"bad transaction command tag or length: {x[0]!r}")
    tag = x[0]
    if tag == "X":
        _txid(x[1]), _uint(x[2]), _uint(x[3]), _uint(x[4])
        for part in (x[5], x[6], x[7], x[8]):
            if not isinstance(part, list):
                raise ValueError("prepare parts must be arrays")
        for c in x[5]:
            if not isinstance(c, list) or len(c) != 2:
                raise ValueError("bad compare")
            _key(c[0]), _uint(c[1])
        for k in x[6]:
            _key(k)
        for w in (*x[7], *x[8]):
            if not isinstance(w, list) or not w or w[0] not in ("p", "d"):
                raise ValueError("bad write")
            if len(w) != (3 if w[0] == "p" else 2):
                raise ValueError("bad write length")
            _key(w[1])
            if w[0] == "p" and type(w[2]) is not bytes:
                raise ValueError("a value is bin")
    elif tag == "V":
        if not isinstance(x[1], list) or not x[1] or x[1][0] != "X":
            raise ValueError("a commit's part is a prepare")
        decode_checked(x[1])
        if not isinstance(x[2], list) or not x[2] or x[2][0] != "T":
            raise ValueError("a commit's txn is a txn")
        decode_command_checked(x[2])
        _known(x[3])
        _pids_and_txids(x[4], x[5])
    elif tag == "Y":
        _txid(x[1]), _uint(x[2]), _uint(x[3]), _bool(x[4]), _bool(x[5])
        _pids_and_txids(x[6], x[7])
    elif tag == "Z":
        _txid(x[1]), _uint(x[2]), _bool(x[3]), _bool(x[4])
    else:
        _uint(x[1])
        if not isinstance(x[2], list):
            raise ValueError("bad forget list")
        for t in x[2]:
            _txid(t)
    return decode(x)


def _pids_and_txids(pids: object, txids: object) -> None:
    if not isinstance(pids, list) or not isinstance(txids, list):
        raise ValueError("bad participants or forget list")
    for p in pids:
        _uint(p)
    for t in txids:
        _txid(t)


def _known(v: object) -> None:
    """The other participants' reads in a commit: every entry's shape checked."""
    shapes = {"versions": 2, "reads": 3, "existed": 2, "revisions": 2}
    if not isinstance(v, dict) or set(v) != set(shapes):
        raise ValueError("bad commit knowledge")
    for name, n in shapes.items():
        rows = v[name]
        if not isinstance(rows, list):
            raise ValueError(f"bad commit {name}")
        for row in rows:
            if not isinstance(row, list) or len(row) != n:
                raise ValueError(f"bad commit {name} entry")
            _key(row[0])
            if name == "reads":
                if row[1] is not None and type(row[1]) is not bytes:
                    raise ValueError("a read value is bin or nil")
                _uint(row[2])
            elif name == "existed":
                _bool(row[1])
            else:
                _uint(row[1])


def _txid(v: object) -> None:
    if type(v) is not bytes or not 0 < len(v) <= 64:
        raise ValueError("a txid is 1-64 bytes of bin")


def _key(v: object) -> None:
    if type(v) is not bytes or not v:
        raise ValueError("a key is non-empty bin")


def _uint(v: object) -> None:
    if type(v) is not int or v < 0:
        raise ValueError("expected an int >= 0")


def _bool(v: object) -> None:
    if type(v) is not bool:
        raise ValueError("expected a bool")


def size_of(cmd: TxCommand) -> int:
    """Approximate payload bytes (``commands.size_of`` for batching limits)."""
    if type(cmd) is TxPrepare:
        n = sum(len(k) + 8 for k, _ in cmd.compares) + sum(len(k) + 4 for k in cmd.reads)
        for w in (*cmd.then, *cmd.otherwise):
            n += len(w.key) + (len(w.value) if type(w) is SubPut else 0) + 8
        return n + len(cmd.txid) + 32
    if type(cmd) is TxCommit:
        reads = sum(len(r[1] or b"") + len(r[0]) for r in cmd.known["reads"])
        return size_of(cmd.part) + size_of_command(cmd.txn) + reads + 64
    if type(cmd) is TxDecide:
        return len(cmd.txid) + 8 * len(cmd.participants) + sum(map(len, cmd.forget)) + 32
    if type(cmd) is TxForget:
        return sum(len(t) + 4 for t in cmd.txids) + 16
    return len(cmd.txid) + 24
