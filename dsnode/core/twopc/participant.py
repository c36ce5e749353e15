"""A partition's part in cross-partition transactions: ``TxnTable``, inside its state machine.

Every replica of a partition applies the same ``TxPrepare``/``TxDecide``/
``TxResolve``/``TxForget`` commands (``records``) in log order, so this table,
like the key-value map beside it, is the same on every replica; nothing here
reads a clock (a transaction's ``ts`` is data, set by its coordinator).

The participant, per transaction (``prepared``, ``resolved``):

| state    | command                  | condition                     | next     | answer |
|----------|--------------------------|-------------------------------|----------|--------|
| none     | TxPrepare                | ts <= floor                   | none     | refused: too_old (and the floor) |
| none     | TxPrepare                | a lock conflicts, we're older | none     | refused: wait (the holder) |
| none     | TxPrepare                | a lock conflicts, we're younger | none   | refused: die (the holder) |
| none     | TxPrepare                | no conflict                   | PREPARED | prepared: versions, reads, revision |
| PREPARED | TxPrepare                |                               | PREPARED | the same prepared answer again |
| PREPARED | TxResolve(commit)        |                               | RESOLVED | the branch's writes applied at the reserved revision, locks released |
| PREPARED | TxResolve(abort)         |                               | RESOLVED | locks released, nothing written |
| none     | TxResolve                |                               | RESOLVED | unknown (a later prepare of it is refused) |
| RESOLVED | TxPrepare                |                               | RESOLVED | refused: resolved |
| RESOLVED | TxResolve                |                               | RESOLVED | unknown |

The home partition, per transaction (``decisions``, ``forgotten``):

| state     | command            | condition          | next      | answer |
|-----------|--------------------|--------------------|-----------|--------|
| none      | TxCommit           | a lock conflicts   | none      | refused: wait or die (as a prepare) |
| none      | TxCommit           | a part is missing  | none      | refused: bad_request |
| none      | TxCommit           | ts > forget floor  | DECIDED commit | the home's writes applied at a new revision; the client's answer |
| none      | TxCommit           | ts <= forget floor | none      | unknown |
| none      | TxDecide(x)        | ts > forget floor  | DECIDED x | x |
| none      | TxDecide(commit)   | ts <= forget floor | none      | unknown (it may have been decided and forgotten) |
| none      | TxDecide(abort)    | ts <= forget floor | none      | abort (nothing of it can still be prepared) |
| DECIDED x | TxDecide, TxCommit |                    | DECIDED x | x: the first decision chosen wins |
| DECIDED x | TxForget           |                    | FORGOTTEN | |
| FORGOTTEN | TxDecide, TxCommit |                    | FORGOTTEN | x, remembered (the answer is gone) |

Locks (wait-die, on the transactions' ``(ts, txid)``): a prepare that meets a
key held by another prepared transaction in a mode that conflicts (exclusive
against anything, shared against exclusive) locks nothing; if it is older than
every conflicting holder it is told to ``wait`` (its coordinator asks again
shortly), else to ``die`` (its coordinator aborts it and starts it again with
the same ``ts``). Waits only go from older to younger, so no cycle of waits (no
deadlock) can form, and the oldest transaction never dies (no starvation).
Single-key commands and one-partition transactions that touch a key a
conflicting lock holds are not applied (``blocked``): the shell answers them
``locked`` and sends them again later, until their deadline.

Tombstones. A transaction resolved here (``resolved``) or forgotten here as
home (``forgotten``) is remembered so that a late copy of its prepare or its
decision (a value Paxos chose late, a retry) cannot prepare it again or decide
it anew. They are dropped oldest first once their ``ts`` is more than
``HORIZON_MS`` behind the newest ``ts`` applied here, or past
``TOMBSTONES_MAX``; dropping one raises its table's floor to its ``ts``, and a
prepare (decision) at or below the floor is refused (answered as above). A
coordinator refused as ``too_old`` starts again with a ``ts`` above the floor.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from dsnode.core.commands import SubDelete, SubGet, SubPut, Txn
from dsnode.core.kv.store import ERROR_KEY, TXN_RESULT_BYTES_MAX, KVStore
from dsnode.core.twopc import records as rec
from dsnode.core.twopc.records import TxCommit, TxDecide, TxPrepare, TxResolve

HORIZON_MS = 30_000
TOMBSTONES_MAX = 16_384  # per table and partition: about 2.5 MB at most

COMMIT, ABORT, UNKNOWN = "commit", "abort", "unknown"
# refusals of a prepare
WAIT, DIE, RESOLVED, TOO_OLD = "wait", "die", "resolved", "too_old"


@dataclass(slots=True)
class Prepared:
    ts: int
    home: int
    exclusive: tuple[bytes, ...]
    shared: tuple[bytes, ...]
    then: tuple[rec.Write, ...]
    otherwise: tuple[rec.Write, ...]
    revision: int  # reserved for its writes here (0: it writes nothing here)
    result: dict  # the prepared answer, given again to a repeated prepare


@dataclass(slots=True)
class Decision:
    ts: int
    commit: bool
    holds: bool
    participants: tuple[int, ...]
    result: dict | None = None  # with commit: the client's answer

class _Tombstones:
    """Transactions done with, oldest first, and the floor below which any is refused."""

    __slots__ = ("done", "floor")

    def __init__(self) -> None:
        self.done: OrderedDict[bytes, tuple[int, bool]] = OrderedDict()  # txid -> (ts, commit)
        self.floor = 0

    def add(self, txid: bytes, ts: int, commit: bool, newest: int) -> None:
        self.done[txid] = (ts, commit)
        done = self.done
        cutoff = newest - HORIZON_MS
        while done:
            first_ts = next(iter(done.values()))[0]
            if first_ts >= cutoff and len(done) <= TOMBSTONES_MAX:
                return
            _, (ts0, _c) = done.popitem(last=False)
            if ts0 > self.floor:
                self.floor = ts0

    def rows(self) -> list:
        """``[(txid, (ts, commit)), ...]`` oldest first: copied in C (a snapshot capture
        runs on the event loop, and there may be tens of thousands)."""
        return list(self.done.items())


class TxnTable:
    __slots__ = ("prepared", "xlocks", "slocks", "decisions", "resolved", "forgotten", "newest")

    def __init__(self) -> None:
        self.prepared: dict[bytes, Prepared] = {}
        self.xlocks: dict[bytes, bytes] = {}  # key -> the txid holding it exclusively
        self.slocks: dict[bytes, set[bytes]] = {}  # key -> the txids sharing it
        self.decisions: dict[bytes, Decision] = {}
        self.resolved = _Tombstones()  # as a participant
        self.forgotten = _Tombstones()  # as the home
        self.newest = 0  # the highest ts applied here

    def __bool__(self) -> bool:
        return bool(self.prepared or self.decisions)

    # ------------------------------------------------------------ apply
    def apply(self, cmd: rec.TxCommand, kv: KVStore) -> dict:
        t = type(cmd)
        if t is TxPrepare:
            return self._prepare(cmd, kv)  # type: ignore[arg-type]
        if t is TxResolve:
            return self._resolve(cmd, kv)  # type: ignore[arg-type]
        if t is TxDecide:
            return self._decide(cmd)  # type: ignore[arg-type]
        if t is TxCommit:
            return self._commit(cmd, kv)  # type: ignore[arg-type]
        self._forget(cmd.txids)  # type: ignore[union-attr]
        return {"forgotten": len(cmd.txids)}  # type: ignore[union-attr]

    def _prepare(self, cmd: TxPrepare, kv: KVStore) -> dict:
        txid = cmd.txid
        seen = self.prepared.get(txid)
        if seen is not None:
            return seen.result
        if txid in self.resolved.done:
            return {"prepared": False, "conflict": RESOLVED}
        if cmd.ts <= self.resolved.floor:
            return {"prepared": False, "conflict": TOO_OLD, "floor": self.resolved.floor}
        exclusive, shared = cmd.locks()
        refusal = self._conflict(txid, cmd.ts, exclusive, shared)
        if refusal is not None:
            return refusal
        reads = []
        size = 0
        for k in cmd.reads:
            value, version = kv.get(k)
            reads.append([k, value, version])
            size += len(value) if value is not None else 0
        if size > TXN_RESULT_BYTES_MAX:
            return _too_large(size)
        existed = [[w.key, w.key in kv] for w in (*cmd.then, *cmd.otherwise)
                   if type(w) is SubDelete]
        revision = 0
        if exclusive:
            kv.revision += 1  # reserved: the keys it writes stay locked until it resolves
            revision = kv.revision
        result = {"prepared": True, "versions": [[k, kv.version(k)] for k, _ in cmd.compares],
                  "reads": reads, "existed": existed, "revision": revision}
        self._lock(txid, exclusive, shared)
        self.prepared[txid] = Prepared(cmd.ts, cmd.home, exclusive, shared, cmd.then,
                                       cmd.otherwise, revision, result)
        if cmd.ts > self.newest:
            self.newest = cmd.ts
        return result

    def _conflict(self, txid: bytes, ts: int, exclusive: tuple, shared: tuple) -> dict | None:
        holders: set[bytes] = set()
        xlocks, slocks = self.xlocks, self.slocks
        for k in exclusive:
            h = xlocks.get(k)
            if h is not None:
                holders.add(h)
            holders.update(slocks.get(k, ()))
        for k in shared:
            h = xlocks.get(k)
            if h is not None:
                holders.add(h)
        holders.discard(txid)
        if not holders:
            return None
        me = (ts, txid)
        prepared = self.prepared
        # the youngest holder named, for the answer; die if any holder is older than us
        older = [h for h in holders if (prepared[h].ts, h) < me]
        if older:
            return {"prepared": False, "conflict": DIE, "holder": min(
                older, key=lambda h: (prepared[h].ts, h))}
        return {"prepared": False, "conflict": WAIT, "holder": min(
            holders, key=lambda h: (prepared[h].ts, h))}

    def _lock(self, txid: bytes, exclusive: tuple, shared: tuple) -> None:
        for k in exclusive:
            self.xlocks[k] = txid
        for k in shared:
            self.slocks.setdefault(k, set()).add(txid)

    def _unlock(self, txid: bytes, p: Prepared) -> None:
        xlocks, slocks = self.xlocks, self.slocks
        for k in p.exclusive:
            if xlocks.get(k) == txid:
                del xlocks[k]
        for k in p.shared:
            holders = slocks.get(k)
            if holders is not None:
                holders.discard(txid)
                if not holders:
                    del slocks[k]

    def _resolve(self, cmd: TxResolve, kv: KVStore) -> dict:
        txid = cmd.txid
        p = self.prepared.pop(txid, None)
        if p is None:
            if txid not in self.resolved.done:
                self.resolved.add(txid, self.newest, cmd.commit, self.newest)
            return {"resolved": UNKNOWN}
        self._unlock(txid, p)
        if cmd.commit:
            writes = p.then if cmd.holds else p.otherwise
            if writes:
                kv.apply_txn_writes(writes, p.revision)
        self.resolved.add(txid, p.ts, cmd.commit, self.newest)
        return {"resolved": COMMIT if cmd.commit else ABORT}

    def _commit(self, cmd: TxCommit, kv: KVStore) -> dict:
        """The home's part and the decision in one (see ``records.TxCommit``)."""
        part_ = cmd.part
        txid, ts = part_.txid, part_.ts
        if ts > self.newest:
            self.newest = ts
        if cmd.forget:
            self._forget(cmd.forget)
        known = self._known(txid, ts, True)
        if known is not None:
            known["home"] = cmd.home
            return known
        exclusive, shared = part_.locks()
        refusal = self._conflict(txid, ts, exclusive, shared)
        if refusal is not None:
            return refusal
        k = cmd.known
        versions = dict(k["versions"])  # [[key, version], ...]
        values = {key: (val, ver) for key, val, ver in k["reads"]}
        existed = dict(k["existed"])
        revisions = dict(k["revisions"])
        for key, _v in part_.compares:
            versions[key] = kv.version(key)
        for key in part_.reads:
            values[key] = kv.get(key)
        for w in (*part_.then, *part_.otherwise):
            if type(w) is SubDelete:
                existed[w.key] = w.key in kv
        size = sum(len(v[0]) for v in values.values() if v[0] is not None)
        if size > TXN_RESULT_BYTES_MAX:
            return _too_large(size)
        # A commit must carry every other participant's part (a coordinator asks for it
        # once every prepare was chosen): else it is refused here, deciding nothing.
        lacking = [key for key, _v in cmd.txn.compares if key not in versions]
        holds = not lacking and all(versions[key] == v for key, v in cmd.txn.compares)
        writes = part_.then if holds else part_.otherwise
        if writes:
            for w in writes:
                revisions[w.key] = kv.revision + 1
        try:
            results = answer(cmd.txn, holds, values, existed, revisions)
        except KeyError as e:
            lacking.append(e.args[0])
        if lacking:
            return {ERROR_KEY: ["bad_request", "a commit lacks what the participants read of "
                                               f"{lacking[0]!r}: nothing done"]}
        if writes:
            kv.revision += 1
            kv.apply_txn_writes(writes, kv.revision)
        result = {"succeeded": holds, "results": results}
        d = self.decisions[txid] = Decision(ts, True, holds, cmd.participants, result)
        return self._decision(txid, d, cmd.home)

    def _known(self, txid: bytes, ts: int, commit: bool) -> dict | None:
        """The answer to a decision asked for ``txid`` that is decided (or forgotten, or
        below the floor) already; None while it is open."""
        d = self.decisions.get(txid)
        if d is not None:
            return self._decision(txid, d, None)
        done = self.forgotten.done.get(txid)
        if done is not None:
            return {"decision": COMMIT if done[1] else ABORT, "txid": txid, "result": None}
        if ts <= self.forgotten.floor:
            return {"decision": UNKNOWN if commit else ABORT, "txid": txid, "result": None}
        return None

    @staticmethod
    def _decision(txid: bytes, d: Decision, home: int | None) -> dict:
        return {"decision": COMMIT if d.commit else ABORT, "holds": d.holds,
                "participants": list(d.participants), "txid": txid, "result": d.result,
                "home": home}

    def _decide(self, cmd: TxDecide) -> dict:
        if cmd.ts > self.newest:
            self.newest = cmd.ts
        if cmd.forget:
            self._forget(cmd.forget)
        known = self._known(cmd.txid, cmd.ts, cmd.commit)
        if known is not None:
            known["home"] = cmd.home
            return known
        d = self.decisions[cmd.txid] = Decision(cmd.ts, cmd.commit, cmd.holds, cmd.participants)
        return self._decision(cmd.txid, d, cmd.home)

    def _forget(self, txids: tuple[bytes, ...]) -> None:
        for txid in txids:
            d = self.decisions.pop(txid, None)
            if d is not None:
                self.forgotten.add(txid, d.ts, d.commit, self.newest)

    # ------------------------------------------------------------ locks seen by other commands
    def write_blocked(self, key: bytes) -> bytes | None:
        """The transaction whose lock keeps ``key`` from being written now, if any."""
        h = self.xlocks.get(key)
        if h is not None:
            return h
        holders = self.slocks.get(key)
        return next(iter(sorted(holders))) if holders else None

    def read_blocked(self, key: bytes) -> bytes | None:
        """The transaction whose pending write keeps ``key`` from being read now, if any."""
        return self.xlocks.get(key)

    # ------------------------------------------------------------ queries
    def state(self) -> tuple:
        """The table as one comparable value (replicas must agree on it)."""
        return (sorted(self.prepared), sorted(self.xlocks.items()),
                sorted((k, sorted(v)) for k, v in self.slocks.items()),
                sorted((t, d.commit, d.holds) for t, d in self.decisions.items()),
                self.resolved.floor, self.forgotten.floor, self.newest)

    def locks_held(self) -> int:
        return len(self.xlocks) + sum(len(v) for v in self.slocks.values())

    # ------------------------------------------------------------ snapshots
    def to_snapshot(self) -> list:
        """The table as plain msgpack-able values (``from_snapshot`` reads them)."""
        return [
            [[t, p.ts, p.home, list(p.exclusive), list(p.shared),
              [rec._enc_w(w) for w in p.then], [rec._enc_w(w) for w in p.otherwise],
              p.revision, p.result] for t, p in self.prepared.items()],
            [[t, d.ts, d.commit, d.holds, list(d.participants), d.result]
             for t, d in self.decisions.items()],
            self.resolved.rows(), self.resolved.floor,
            self.forgotten.rows(), self.forgotten.floor,
            self.newest,
        ]

    @classmethod
    def from_snapshot(cls, parts: list) -> TxnTable:
        table = cls()
        prepared, decisions, resolved, rfloor, forgotten, ffloor, newest = parts
        for t, ts, home, ex, sh, then, other, revision, result in prepared:
            p = Prepared(ts, home, tuple(ex), tuple(sh), tuple(rec._dec_w(w) for w in then),
                         tuple(rec._dec_w(w) for w in other), revision, result)
            table.prepared[t] = p
            table._lock(t, p.exclusive, p.shared)
        for t, ts, commit, holds, parts_, result in decisions:
            table.decisions[t] = Decision(ts, commit, holds, tuple(parts_), result)
        table.resolved.done.update((t, tuple(v)) for t, v in resolved)
        table.forgotten.done.update((t, tuple(v)) for t, v in forgotten)
        table.resolved.floor, table.forgotten.floor, table.newest = rfloor, ffloor, newest
        return table


def _too_large(size: int) -> dict:
    return {ERROR_KEY: ["too_large", f"the transaction's gets would return {size} bytes, more "
                                     f"than {TXN_RESULT_BYTES_MAX}: nothing done"]}


def answer(txn: Txn, holds: bool, values: dict, existed: dict, revisions: dict) -> list[dict]:
    """The results of ``txn``'s chosen branch (``holds``: ``then``), from what every
    partition read before the transaction (``values`` key -> (value, version), deletes'
    ``existed``) and the revision each written key carries (``revisions``)."""
    out: list[dict] = []
    for sub in txn.then if holds else txn.otherwise:
        t = type(sub)
        if t is SubGet:
            value, version = values[sub.key]
            out.append({"value": value, "version": version})
        elif t is SubPut:
            out.append({"version": revisions[sub.key]})
        else:
            out.append({"existed": existed[sub.key]})
    return out
