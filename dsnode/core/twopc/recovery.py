"""Finishing what a coordinator left: run by the leader of each partition, pure.

A coordinator may crash, or lose its node's connection, at any step. Two duties,
on the node that leads a partition (the shell calls ``scan`` with the
transaction tables of the partitions this node leads, and carries out the
``Submit``s it takes, answering ``on_result`` with the same handle):

- **Participant**: a transaction prepared here for longer than
  ``prepare_timeout_ticks`` (as this leader has seen it) is asked about at its
  home: ``TxDecide(abort)``. The home chooses abort unless a decision was chosen
  already (the coordinator's commit, which then wins); either way the answer is
  the one decision, and ``TxResolve`` with it goes into this partition's log.
- **Home**: a decision not forgotten within ``decision_timeout_ticks`` (its
  coordinator is gone, or lost the forget) is re-driven: ``TxResolve`` with it
  to every participant it names, then ``TxForget`` here.

Both are idempotent (``participant``), so a duty done twice, by two leaders in
turn or beside a coordinator that is slow rather than dead, changes nothing.
A failed submission is retried at the next scan that finds the entry still
there. After faults heal, every prepared transaction is thus resolved and every
decision forgotten.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from dsnode.core.twopc import participant as part
from dsnode.core.twopc.coordinator import Submit, TwoPCConfig
from dsnode.core.twopc.participant import TxnTable
from dsnode.core.twopc.records import TxDecide, TxForget, TxResolve


class Recovery:
    def __init__(self, config: TwoPCConfig | None = None) -> None:
        self.cfg = config or TwoPCConfig()
        self.now = 0
        # (role, pid, txid) -> the tick this node first saw it while leading pid
        self._seen: dict[tuple[str, int, bytes], int] = {}
        # (role, pid, txid) -> participants still to resolve (home), or () (participant)
        self._busy: dict[tuple[str, int, bytes], set[int]] = {}
        self.submits: list[Submit] = []
        self.counters: dict[str, int] = {}

    def scan(self, now: int, led: Mapping[int, TxnTable]) -> None:
        """Look at the tables of the partitions this node leads now."""
        self.now = now
        cfg = self.cfg
        seen = self._seen
        live: set[tuple[str, int, bytes]] = set()
        for pid, table in led.items():
            if not table:
                continue
            for txid, p in table.prepared.items():
                key = ("participant", pid, txid)
                live.add(key)
                since = seen.setdefault(key, now)
                if now - since >= cfg.prepare_timeout_ticks and key not in self._busy:
                    self._busy[key] = set()
                    self._count("participant_asked")
                    self._submit(key, p.home, TxDecide(txid, p.ts, p.home, False, False, (pid,)))
            for txid, d in table.decisions.items():
                key = ("home", pid, txid)
                live.add(key)
                since = seen.setdefault(key, now)
                if now - since >= cfg.decision_timeout_ticks and key not in self._busy:
                    self._busy[key] = set(d.participants)
                    self._count("home_redriven")
                    for q in d.participants:
                        self._submit((*key, q), q, TxResolve(txid, q, d.commit, d.holds))
        for key in [k for k in seen if k not in live]:
            del seen[key]
        for key in [k for k in self._busy if k not in live]:
            del self._busy[key]

    def on_result(self, handle: Any, result: dict | None, error: tuple | None) -> None:
        role, pid, txid, *rest = handle
        key = (role, pid, txid)
        busy = self._busy.get(key)
        if busy is None:
            return
        if error is not None:
            self._count(f"{role}_failed")
            del self._busy[key]  # tried again at a later scan
            return
        assert result is not None
        if role == "participant" and not rest:
            decision = result.get("decision")
            if decision not in (part.COMMIT, part.ABORT):
                del self._busy[key]
                return
            self._count(f"participant_{decision}")
            commit = decision == part.COMMIT
            self._submit((*key, "resolve"), pid,
                         TxResolve(txid, pid, commit, bool(result.get("holds"))))
            if not commit:
                # an abort may go at once: the home remembers it among its forgotten ones,
                # and any other participant that asks gets abort again
                home = result.get("home")
                if type(home) is int:
                    self._submit((*key, "forget"), home, TxForget(home, (txid,)))
        elif role == "participant" and rest[0] == "forget":
            pass
        elif role == "participant":
            del self._busy[key]  # resolved: the next scan no longer finds it prepared
        elif rest and rest[0] == "forget":
            del self._busy[key]
        else:
            busy.discard(rest[0])
            if not busy:
                self._submit((*key, "forget"), pid, TxForget(pid, (txid,)))

    def take(self) -> list[Submit]:
        out, self.submits = self.submits, []
        return out

    def pending(self) -> int:
        """Transactions this node is resolving on behalf of their coordinators."""
        return len(self._busy)

    def _submit(self, handle: tuple, pid: int, cmd: Any) -> None:
        self.submits.append(Submit(handle, pid, cmd, self.now + self.cfg.submit_timeout_ticks))

    def _count(self, name: str) -> None:
        self.counters[name] = self.counters.get(name, 0) + 1
