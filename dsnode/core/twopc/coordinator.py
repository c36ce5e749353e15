"""The coordinator of cross-partition transactions: one per node, pure.

Inputs: ``begin`` (a client's ``txn`` whose keys span partitions), ``on_result``
(the answer to a command it asked the shell to submit), ``tick``. Outputs, taken
with ``take``: ``Submit`` (put this command into partition ``pid``'s log: route
it to that partition's leader, and hand back its result or error with the same
``handle``) and ``Reply`` (the client's answer). Nothing here reads a clock:
``begin`` gets the node's wall-clock milliseconds for the transaction's
priority and ticks for its deadline.

One attempt of a transaction (``Attempt``) moves through these states; its
transitions are the table ``TRANSITIONS`` (state, event) -> handler, and an
event that has no entry for the attempt's state is stale and ignored:

| state     | event                        | action                                                 | next      |
|-----------|------------------------------|--------------------------------------------------------|-----------|
| PREPARING | PREPARED (not the last)      | keep its versions, reads, revision                     | PREPARING |
| PREPARING | PREPARED (the last)          | submit TxCommit to the home: its own part, the others' | DECIDING  |
|           |                              | reads, the client's request id (the home decides)      |           |
| PREPARING | WAIT, FAILED                 | submit that prepare again after a backoff              | PREPARING |
| PREPARING | DIE, TOO_OLD                 | submit TxResolve(abort) to every participant asked;    | RESOLVING |
|           |                              | begin a new attempt (same ts; above the floor after    |           |
|           |                              | TOO_OLD) after a backoff, up to restarts_max times and |           |
|           |                              | while the deadline allows, else answer conflict        |           |
| PREPARING | REFUSED                      | the same aborts; answer the refusal (e.g. too_large)   | RESOLVING |
| PREPARING | DEADLINE                     | answer timeout (definite: commit was never proposed);  | RESOLVING |
|           |                              | TxResolve(abort) to every participant asked            |           |
| DECIDING  | DECIDED_COMMIT               | answer the results; TxResolve(commit) to all           | RESOLVING |
| DECIDING  | DECIDED_ABORT                | (a participant gave up first) TxResolve(abort) to all; | RESOLVING |
|           |                              | answer conflict (not started again: the abort is kept  |           |
|           |                              | under the client's request id)                         |           |
| DECIDING  | DECIDED_OTHER                | an earlier attempt of the client's request id was      | RESOLVING |
|           |                              | decided: TxResolve(abort) to ours; answer its answer   |           |
|           |                              | (commit) or conflict (abort)                           |           |
| DECIDING  | FAILED, WAIT                 | submit the TxCommit again after a backoff (WAIT: the   | DECIDING  |
|           |                              | home's keys are locked by a younger transaction)       |           |
| DECIDING  | DIE                          | (the home's keys: an older one) as DIE above           | RESOLVING |
| DECIDING  | REFUSED                      | as REFUSED above                                       | RESOLVING |
| DECIDING  | DECIDED_UNKNOWN              | answer timeout, indeterminate                          | DONE      |
| DECIDING  | DEADLINE                     | answer timeout, indeterminate; keep asking the home    | DECIDING  |
|           |                              | until the resolve horizon, to resolve the participants |           |
| RESOLVING | RESOLVED (the last)          | a decided one's decision may go: forget it at home     | DONE      |
| RESOLVING | RESOLVED (not the last)      |                                                        | RESOLVING |
| RESOLVING | FAILED                       | submit that resolve again after a backoff              | RESOLVING |
| RESOLVING, DECIDING | HORIZON            | stop (participants ask the home after their timeout,   | DONE      |
|           |                              | the home's leader re-drives an unforgotten decision)   |           |

Prepares go to every participant but the home; the home's part rides with the
decision (``TxCommit``, the home as "last agent"), so a two-partition
transaction costs three commands: a prepare, the commit, a resolve. Only this
coordinator ever proposes commit for a ``txid``, and only from DECIDING, after
every prepare was chosen; after it submitted an abort for a
``txid`` it never proposes commit for it (a new attempt has a new ``txid``).
So the decision chosen in the home partition (first one wins) is the only
outcome, and the client hears commit only after it was chosen.

Forgets are sent piggybacked on the next TxDecide to the same home, or alone
once they waited ``forget_delay_ticks``.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dsnode.core.commands import SubGet, Txn, keys_of
from dsnode.core.effects import Reply
from dsnode.core.ring import Ring
from dsnode.core.twopc import participant as part
from dsnode.core.twopc.records import (
    TxCommand,
    TxCommit,
    TxForget,
    TxPrepare,
    TxResolve,
    shape,
)

# wire error codes (dsnode.wire.errors names the same strings; the core imports nothing
# from the wire package)
CONFLICT = "conflict"
TIMEOUT = "timeout"
UNAVAILABLE = "unavailable"
LOCKED = "locked"
OVERLOADED = "overloaded"
EXPIRED = "expired"
_TRANSIENT = frozenset((UNAVAILABLE, TIMEOUT, LOCKED, OVERLOADED, CONFLICT))

FORGETS_PER_DECIDE_MAX = 256


class State(enum.Enum):
    PREPARING = "preparing"
    DECIDING = "deciding"
    RESOLVING = "resolving"
    DONE = "done"


class Event(enum.Enum):
    PREPARED = "prepared"
    WAIT = "wait"
    DIE = "die"
    TOO_OLD = "too_old"
    REFUSED = "refused"  # resolved already (a late copy), or an error that changed nothing
    FAILED = "failed"  # no answer known: unavailable, timeout (submit again)
    DECIDED_COMMIT = "decided_commit"
    DECIDED_ABORT = "decided_abort"
    DECIDED_UNKNOWN = "decided_unknown"
    DECIDED_OTHER = "decided_other"
    RESOLVED = "resolved"
    DEADLINE = "deadline"
    HORIZON = "horizon"


@dataclass(frozen=True, slots=True)
class TwoPCConfig:
    retry_ticks: int = 1  # first backoff after `wait` or a failed submit; doubles ...
    retry_ticks_max: int = 8  # ... up to this
    resolve_horizon_ticks: int = 500  # resolving goes on this long past the deadline
    forget_delay_ticks: int = 5  # a forget waits this long for a TxDecide to ride on
    prepare_timeout_ticks: int = 300  # (recovery) a participant asks the home after this
    decision_timeout_ticks: int = 600  # (recovery) a home re-drives a decision after this
    # a submission unanswered this long counts as failed (and is sent again): its answer
    # may be lost with a connection, and every command here is idempotent
    submit_timeout_ticks: int = 100
    restarts_max: int = 3  # new attempts after dying on a lock, before answering conflict
    restart_ticks_max: int = 32  # a restart waits up to this (random, doubling per restart)

    def __post_init__(self) -> None:
        for name in ("retry_ticks", "retry_ticks_max", "resolve_horizon_ticks",
                     "forget_delay_ticks", "prepare_timeout_ticks", "decision_timeout_ticks",
                     "submit_timeout_ticks", "restart_ticks_max"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")


@dataclass(frozen=True, slots=True)
class Submit:
    """Put ``cmd`` into partition ``pid``'s log; answer ``on_result(handle, ...)``."""

    handle: Any
    pid: int
    cmd: TxCommand
    deadline: int  # tick after which the shell gives up on it (answers it failed)
    rid: list | None = None  # the client's request id, proposed with a commit decision


@dataclass(frozen=True, slots=True)
class Plan:
    """A transaction split by partition (what each participant prepares)."""

    home: int
    prepares: dict[int, TxPrepare]


def plan(txn: Txn, ring: Ring, txid: bytes, ts: int) -> Plan:
    """Split ``txn``'s compares, gets and writes by partition; the home is the partition
    of its first written key (of its first key when it writes none)."""
    pid_of = ring.partition_of
    compares: dict[int, list] = {}
    reads: dict[int, list] = {}
    then: dict[int, list] = {}
    other: dict[int, list] = {}
    for k, v in txn.compares:
        compares.setdefault(pid_of(k), []).append((k, v))
    for branch, out in ((txn.then, then), (txn.otherwise, other)):
        for s in branch:
            pid = pid_of(s.key)
            if type(s) is SubGet:
                lst = reads.setdefault(pid, [])
                if s.key not in lst:
                    lst.append(s.key)
            else:
                out.setdefault(pid, []).append(s)
    written = [s.key for s in (*txn.then, *txn.otherwise) if type(s) is not SubGet]
    first = written[0] if written else keys_of(txn)[0]
    home = pid_of(first)
    pids = sorted({*compares, *reads, *then, *other})
    prepares = {
        pid: TxPrepare(txid, ts, pid, home, tuple(compares.get(pid, ())),
                       tuple(reads.get(pid, ())), tuple(then.get(pid, ())),
                       tuple(other.get(pid, ())))
        for pid in pids
    }
    return Plan(home, prepares)


@dataclass(slots=True)
class Attempt:
    txid: bytes
    ts: int
    txn: Txn
    plan: Plan
    ring: Ring  # the ring it was planned on (its partitions' ids)
    token: Any  # the client's, None once answered (or handed to a newer attempt)
    deadline: int
    state: State = State.PREPARING
    prepared: dict[int, dict] = field(default_factory=dict)  # pid -> its prepared answer
    asked: set[int] = field(default_factory=set)  # participants a prepare was submitted to
    unresolved: set[int] = field(default_factory=set)
    commit: bool = False
    holds: bool = False
    decided: bool = False  # a decision was chosen at the home (it must be forgotten)
    backoff: dict[Any, int] = field(default_factory=dict)  # step -> its next backoff
    gen: dict[Any, int] = field(default_factory=dict)  # step -> its submission count
    horizon: int = 0
    restarts: int = 0  # attempts of this transaction before this one
    rid: list | None = None  # the client's request id (applied at most once)


class Coordinator:
    """Every cross-partition transaction this node coordinates."""

    def __init__(self, node_id: str, rng: random.Random, config: TwoPCConfig | None = None,
                 ring: Callable[[], Ring | None] | None = None) -> None:
        self.node_id = node_id
        self.rng = rng
        self.cfg = config or TwoPCConfig()
        self.ring = ring or (lambda: None)
        self.now = 0
        self.clock_ms = 0  # the highest ts given out (or floor learned): ts only grow
        self.attempts: dict[bytes, Attempt] = {}
        self.submits: list[Submit] = []
        self.replies: list[Reply] = []
        self._later: list[tuple[int, Submit]] = []  # submissions waiting for their backoff
        self._forgets: dict[int, list[tuple[bytes, int]]] = {}  # home -> [(txid, since)]
        self._seq = 0
        self._nonce = rng.getrandbits(32)  # txids stay unique across this node's restarts
        self.counters: dict[str, int] = {}

    # ------------------------------------------------------------ inputs
    def begin(self, token: Any, txn: Txn, now_ms: int, deadline: int,
              rid: list | None = None) -> None:
        """Coordinate ``txn`` (its keys span partitions) for the client's ``token``;
        ``rid``, the client's request id if it sent one, makes it apply at most once
        (a retry is told the decision an earlier attempt of it got)."""
        ring = self.ring()
        if ring is None:
            self.replies.append(Reply(token, error=(UNAVAILABLE, "the ring is not known yet",
                                                    False)))
            return
        ts = max(now_ms, self.clock_ms + 1)
        self.clock_ms = ts
        self._start(token, txn, ts, deadline, ring, rid=rid)

    def on_result(self, handle: Any, result: dict | None,
                  error: tuple[str, str, bool] | None) -> None:
        """The answer to a ``Submit``: its state machine's result, or an error (no answer
        known: ``unavailable``/``timeout``, or a definite refusal)."""
        txid, step, gen = handle
        a = self.attempts.get(txid)
        if a is None or a.gen.get(step) != gen:
            return  # an answer to a superseded submission
        kind, pid = step
        event = _classify(kind, result, error)
        if event is Event.DECIDED_COMMIT or event is Event.DECIDED_ABORT:
            if result is not None and result.get("txid", txid) != txid:
                event = Event.DECIDED_OTHER  # the request id's earlier attempt was decided
        self._count(f"{kind}_{event.value}")
        self._fire(a, event, pid, result if error is None else {"error": error})

    def tick(self, now: int) -> None:
        self.now = now
        if self._later:
            due = [s for t, s in self._later if t <= now]
            if due:
                self._later = [(t, s) for t, s in self._later if t > now]
                for s in due:
                    txid, step, gen = s.handle
                    a = self.attempts.get(txid)
                    if a is not None and a.gen.get(step) == gen:
                        self.submits.append(s)
        for a in list(self.attempts.values()):
            if a.token is not None and now >= a.deadline:
                self._fire(a, Event.DEADLINE, None, None)
            elif a.state is not State.PREPARING and a.horizon and now >= a.horizon:
                self._fire(a, Event.HORIZON, None, None)
        for home, items in list(self._forgets.items()):
            if items and now - items[0][1] >= self.cfg.forget_delay_ticks:
                self._flush_forgets(home)

    def take(self) -> tuple[list[Submit], list[Reply]]:
        submits, replies = self.submits, self.replies
        self.submits, self.replies = [], []
        return submits, replies

    # ------------------------------------------------------------ queries
    def in_progress(self) -> list[dict]:
        """The attempts not done, for ``status``."""
        return [{"txid": a.txid.hex(), "state": a.state.value, "home": a.plan.home,
                 "participants": sorted(a.plan.prepares), "answered": a.token is None}
                for a in self.attempts.values()]

    def idle(self) -> bool:
        return not self.attempts and not any(self._forgets.values())

    # ------------------------------------------------------------ the table
    def _fire(self, a: Attempt, event: Event, pid: int | None, result: dict | None) -> None:
        name = TRANSITIONS.get((a.state, event))
        if name is None:
            self._count(f"stale_{a.state.value}_{event.value}")
            return
        getattr(self, name)(a, pid, result)

    def _on_prepared(self, a: Attempt, pid: int, result: dict) -> None:
        a.prepared[pid] = result
        if len(a.prepared) < len(a.asked):
            return
        a.state = State.DECIDING
        self._decide(a)

    def _prepare_again(self, a: Attempt, pid: int, _result: dict | None) -> None:
        self._submit(a, ("prepare", pid), pid, a.plan.prepares[pid], later=True)

    def _decide_again(self, a: Attempt, _pid: Any, _result: dict | None) -> None:
        self._decide(a, later=True)

    def _resolve_again(self, a: Attempt, pid: int, _result: dict | None) -> None:
        self._submit(a, ("resolve", pid), pid, TxResolve(a.txid, pid, a.commit, a.holds),
                     later=True)

    def _abort(self, a: Attempt, _pid: Any, result: dict | None) -> None:
        """Give this attempt up: resolve (abort) whatever may have prepared; a new attempt
        (new txid, same ts, or one above the floor a participant named) takes its place,
        after a growing random backoff, at most ``restarts_max`` times and while the
        deadline allows; then the client hears ``conflict`` (under contention a txn whose
        compares read the keys another one is changing would mostly fail them anyway: the
        client had better read again)."""
        floor = result.get("floor") if result is not None else None
        token, a.token = a.token, None
        self._resolve_all(a, commit=False)
        if token is None:
            return
        too_old = type(floor) is int and floor >= a.ts
        if self.now < a.deadline and (a.restarts < self.cfg.restarts_max or too_old):
            ts = a.ts
            if type(floor) is int and floor >= ts:
                ts = max(floor + 1, self.clock_ms + 1)
                self.clock_ms = ts
            ring = self.ring()
            if ring is not None:
                self._count("restarted")
                self._start(token, a.txn, ts, a.deadline, ring, restarts=a.restarts + 1,
                            rid=a.rid)
                return
        self.replies.append(Reply(token, error=(
            CONFLICT, "the transaction met another one holding its keys and was aborted; "
                      "nothing was applied, retry", False)))

    def _refused(self, a: Attempt, _pid: Any, result: dict | None) -> None:
        """A participant refused for good (an error that changed nothing, e.g. its gets
        would not fit an answer): abort, and answer that error."""
        token, a.token = a.token, None
        self._resolve_all(a, commit=False)
        err = (result or {}).get("error")
        if token is not None:
            code, message = (err[0], err[1]) if err else (
                CONFLICT, "the transaction was resolved before it prepared; retry")
            self.replies.append(Reply(token, error=(code, message, False)))

    def _expire_preparing(self, a: Attempt, _pid: Any, _result: dict | None) -> None:
        token, a.token = a.token, None
        self.replies.append(Reply(token, error=(
            TIMEOUT, "the transaction's participants did not all prepare before the deadline; "
                     "nothing was applied", False)))
        self._resolve_all(a, commit=False)

    def _committed(self, a: Attempt, _pid: Any, result: dict) -> None:
        a.decided = True
        a.holds = bool(result.get("holds", a.holds))
        if a.token is not None:
            answer = result.get("result")
            if isinstance(answer, dict):
                self.replies.append(Reply(a.token, result=dict(answer)))
            else:  # decided and forgotten meanwhile: its answer is gone
                self.replies.append(Reply(a.token, error=(
                    TIMEOUT, "the transaction committed but its results are no longer "
                             "known", True)))
            a.token = None
        self._resolve_all(a, commit=True)

    def _decided_abort(self, a: Attempt, _pid: Any, _result: dict) -> None:
        """A participant gave up on it first. Not started again: the abort is kept under
        the client's request id, so a new attempt of it would be told the same."""
        a.decided = True
        token, a.token = a.token, None
        self._resolve_all(a, commit=False)
        if token is not None:
            self.replies.append(Reply(token, error=(
                CONFLICT, "the transaction was aborted (a participant gave up waiting for "
                          "its decision); nothing was applied, retry", False)))

    def _decided_other(self, a: Attempt, _pid: Any, result: dict) -> None:
        """Its request id was decided for an earlier attempt (a client's retry): this one
        goes; the client gets that attempt's answer."""
        token, a.token = a.token, None
        self._resolve_all(a, commit=False)
        if token is None:
            return
        if result.get("decision") == part.COMMIT and isinstance(result.get("result"), dict):
            self.replies.append(Reply(token, result=dict(result["result"])))
        else:
            self.replies.append(Reply(token, error=(
                CONFLICT, "an earlier attempt of this request was aborted; nothing was "
                          "applied", False)))

    def _unknown(self, a: Attempt, _pid: Any, result: dict | None) -> None:
        err = (result or {}).get("error")
        if a.token is not None:
            if err is not None:
                self.replies.append(Reply(a.token, error=(err[0], err[1], True)))
            else:
                self.replies.append(Reply(a.token, error=(
                    TIMEOUT, "the transaction's decision is not known (it may have committed)",
                    True)))
            a.token = None
        self._finish(a)

    def _expire_deciding(self, a: Attempt, _pid: Any, _result: dict | None) -> None:
        token, a.token = a.token, None
        self.replies.append(Reply(token, error=(
            TIMEOUT, "the deadline passed while the transaction's decision was being chosen; "
                     "it may have committed", True)))
        a.horizon = self.now + self.cfg.resolve_horizon_ticks

    def _on_resolved(self, a: Attempt, pid: int, _result: dict | None) -> None:
        a.unresolved.discard(pid)
        if not a.unresolved:
            if a.decided:
                self._forgets.setdefault(a.plan.home, []).append((a.txid, self.now))
            self._finish(a)

    def _give_up(self, a: Attempt, _pid: Any, _result: dict | None) -> None:
        self._count("gave_up")
        self._finish(a)

    # ------------------------------------------------------------ helpers
    def _start(self, token: Any, txn: Txn, ts: int, deadline: int, ring: Ring,
               restarts: int = 0, rid: list | None = None) -> None:
        self._seq += 1
        txid = b"%s:%08x:%d" % (self.node_id.encode()[:40], self._nonce, self._seq)
        p = plan(txn, ring, txid, ts)
        a = Attempt(txid, ts, txn, p, ring, token, deadline, restarts=restarts, rid=rid)
        self.attempts[txid] = a
        self._count("begun")
        # a restarted attempt waits first (all its prepares together), a random time up
        # to a bound that doubles with each restart
        delay = 0
        if restarts:
            bound = min(2 * self.cfg.retry_ticks << min(restarts, 16), self.cfg.restart_ticks_max)
            delay = self.rng.randint(1, bound)
        for pid, prep in p.prepares.items():
            if pid == p.home:
                continue  # the home's part goes with the decision (TxCommit)
            a.asked.add(pid)
            self._submit(a, ("prepare", pid), pid, prep, delay=delay)

    def _decide(self, a: Attempt, later: bool = False) -> None:
        home = a.plan.home
        forgets = self._forgets.pop(home, [])
        take, keep = forgets[:FORGETS_PER_DECIDE_MAX], forgets[FORGETS_PER_DECIDE_MAX:]
        if keep:
            self._forgets[home] = keep
        known: dict = {"versions": [], "reads": [], "existed": [], "revisions": []}
        for pid, r in a.prepared.items():
            known["versions"].extend(r["versions"])
            known["reads"].extend(r["reads"])
            known["existed"].extend(r["existed"])
            if r["revision"]:
                known["revisions"].extend(
                    [k, r["revision"]] for k in a.plan.prepares[pid].exclusive())
        cmd = TxCommit(a.plan.prepares[home], shape(a.txn), known, tuple(sorted(a.asked)),
                       tuple(t for t, _ in take))
        self._submit(a, ("decide", home), home, cmd, later=later, rid=a.rid)

    def _resolve_all(self, a: Attempt, commit: bool) -> None:
        a.state = State.RESOLVING
        a.commit = commit
        a.unresolved = set(a.asked)
        a.horizon = max(a.deadline, self.now) + self.cfg.resolve_horizon_ticks
        if not a.unresolved:
            self._finish(a)
            return
        for pid in sorted(a.unresolved):
            self._submit(a, ("resolve", pid), pid, TxResolve(a.txid, pid, commit, a.holds))

    def _finish(self, a: Attempt) -> None:
        a.state = State.DONE
        self.attempts.pop(a.txid, None)

    def _submit(self, a: Attempt, step: tuple, pid: int, cmd: TxCommand,
                later: bool = False, rid: list | None = None, delay: int = 0) -> None:
        gen = a.gen.get(step, 0) + 1
        a.gen[step] = gen
        deadline = min(max(a.deadline, a.horizon or 0), self.now + self.cfg.submit_timeout_ticks)
        if rid is not None and gen > 1 and len(rid) == 2:
            rid = [*rid, True]  # sent again: a retry (the deduplication table's rule 3)
        s = Submit((a.txid, step, gen), pid, cmd, deadline, rid)
        if delay:
            self._later.append((self.now + delay, s))
            return
        if not later:
            self.submits.append(s)
            return
        wait = a.backoff.get(step, self.cfg.retry_ticks)
        a.backoff[step] = min(wait * 2, self.cfg.retry_ticks_max)
        self._later.append((self.now + self.rng.randint(1, wait), s))

    def _flush_forgets(self, home: int) -> None:
        items = self._forgets.pop(home, [])
        for i in range(0, len(items), FORGETS_PER_DECIDE_MAX):
            chunk = tuple(t for t, _ in items[i:i + FORGETS_PER_DECIDE_MAX])
            self.submits.append(Submit((b"", ("forget", home), 0), home, TxForget(home, chunk),
                                       self.now + self.cfg.resolve_horizon_ticks))

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1


_REFUSALS = {part.WAIT: Event.WAIT, part.DIE: Event.DIE, part.TOO_OLD: Event.TOO_OLD}


def _classify(kind: str, result: dict | None, error: tuple | None) -> Event:
    """What an answer to a submitted command means for its attempt."""
    if error is not None:
        code, _message, indeterminate = error
        if code == EXPIRED and kind == "decide":
            return Event.DECIDED_UNKNOWN  # a retry whose request id the home forgot
        if kind in ("prepare", "decide") and not indeterminate and code not in _TRANSIENT:
            return Event.REFUSED  # e.g. too_large: definitely nothing prepared
        return Event.FAILED
    assert result is not None
    if kind == "prepare" and result.get("prepared"):
        return Event.PREPARED
    conflict = result.get("conflict")  # a prepare's, or a commit's on the home's keys
    if conflict is not None:
        return _REFUSALS.get(conflict, Event.REFUSED)
    if kind == "prepare":
        return Event.REFUSED
    if kind == "decide":
        d = result.get("decision")
        if d == part.COMMIT:
            return Event.DECIDED_COMMIT
        if d == part.ABORT:
            return Event.DECIDED_ABORT
        return Event.DECIDED_UNKNOWN
    return Event.RESOLVED


# (state, event) -> the name of the Coordinator method handling it (looked up on the
# instance, so a subclass, e.g. a simulator's broken variant, can replace one)
TRANSITIONS: dict[tuple[State, Event], str] = {
    (State.PREPARING, Event.PREPARED): "_on_prepared",
    (State.PREPARING, Event.WAIT): "_prepare_again",
    (State.PREPARING, Event.FAILED): "_prepare_again",
    (State.PREPARING, Event.DIE): "_abort",
    (State.PREPARING, Event.TOO_OLD): "_abort",
    (State.PREPARING, Event.REFUSED): "_refused",
    (State.PREPARING, Event.DEADLINE): "_expire_preparing",
    (State.DECIDING, Event.DECIDED_COMMIT): "_committed",
    (State.DECIDING, Event.DECIDED_ABORT): "_decided_abort",
    (State.DECIDING, Event.DECIDED_OTHER): "_decided_other",
    (State.DECIDING, Event.DECIDED_UNKNOWN): "_unknown",
    (State.DECIDING, Event.FAILED): "_decide_again",
    (State.DECIDING, Event.WAIT): "_decide_again",
    (State.DECIDING, Event.DIE): "_abort",
    (State.DECIDING, Event.REFUSED): "_refused",
    (State.DECIDING, Event.DEADLINE): "_expire_deciding",
    (State.DECIDING, Event.HORIZON): "_give_up",
    (State.RESOLVING, Event.RESOLVED): "_on_resolved",
    (State.RESOLVING, Event.FAILED): "_resolve_again",
    (State.RESOLVING, Event.HORIZON): "_give_up",
}
