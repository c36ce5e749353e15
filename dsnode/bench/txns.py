"""Transaction workloads of ``dsnode bench`` (dsnode only).

``--txn-partitions N``: the keys of each txn fall in exactly ``N`` distinct
partitions of the cluster's ring (1: all in one partition, a plain Paxos round;
2 or more: two-phase commit across partitions, PROTOCOL.md "Transactions across
partitions"). :class:`PartitionSpread` knows which keys of the keyspace live in
which partition (``partition_of(key, P)``, ``P`` from the ``ring`` op) and draws
the keys.

``--hot-keys H``: each txn is a bank transfer among ``H`` hot accounts
(:class:`Transfer`): linearizable gets of ``--txn-ops`` distinct accounts, then one
txn that compares every account's version with the one read and puts the new
balances (the first account pays each of the others, so the total never changes).
A transfer ends committed, with :data:`COMPARE_FAILED` (another transfer changed an
account in between), or with the error code of its get or txn (``conflict`` when it
lost to a concurrent transaction). :func:`bank_summary` turns the counts into
goodput and conflict rate.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from dsnode.bench.targets import Reply
from dsnode.core.ring.hashing import partition_of

#: The code a transfer ends with when its txn ran but a version compare failed.
COMPARE_FAILED = "compare_failed"


class SpreadError(ValueError):
    """The keyspace or the cluster cannot give keys in that many partitions."""


class PartitionSpread:
    """Keys of the keyspace grouped by partition, to draw txn keys in exactly
    ``partitions`` distinct partitions."""

    def __init__(
        self, key_fmt: bytes, keyspace: int, ring_partitions: int, partitions: int, keys: int
    ) -> None:
        if partitions > ring_partitions:
            raise SpreadError(
                f"--txn-partitions {partitions}: the cluster has only {ring_partitions} "
                "partitions"
            )
        by_partition: list[list[int]] = [[] for _ in range(ring_partitions)]
        for i in range(keyspace):
            by_partition[partition_of(key_fmt % i, ring_partitions)].append(i)
        #: distinct keys each chosen partition must give
        self.per_partition = math.ceil(keys / partitions)
        self.by_partition = by_partition
        self.usable = [p for p, ks in enumerate(by_partition) if len(ks) >= self.per_partition]
        if len(self.usable) < partitions:
            raise SpreadError(
                f"--keyspace {keyspace} too small: fewer than {partitions} of the "
                f"{ring_partitions} partitions hold {self.per_partition} keys"
            )
        self.partitions = partitions
        self.keys = keys

    def draw(self, rng: random.Random) -> list[int]:
        """``keys`` distinct key indexes in exactly ``partitions`` distinct partitions
        (round robin over partitions drawn at random)."""
        parts = rng.sample(self.usable, self.partitions)
        seen: set[int] = set()
        idxs: list[int] = []
        for j in range(self.keys):
            pool = self.by_partition[parts[j % self.partitions]]
            k = pool[int(rng.random() * len(pool))]
            while k in seen:
                k = pool[int(rng.random() * len(pool))]
            seen.add(k)
            idxs.append(k)
        return idxs


class CallTarget(Protocol):
    """What a transfer needs of a connection (DsnodeTarget, RingTarget)."""

    def start_call(self, key: bytes, msg: dict[str, Any], reply: Reply) -> None: ...


def balance_of(value: Any) -> int:
    """An account's balance from its stored value: absent or not a number counts as 0."""
    if not isinstance(value, bytes | bytearray):
        return 0
    try:
        return int(value)
    except ValueError:
        return 0


class Transfer:
    """One bank transfer: reads every account, then a compare-and-put txn.

    ``finish(code, forwarded)`` is called exactly once, never from :meth:`start`
    (every step completes from an answer): ``code`` is ``None`` when the transfer
    committed; ``forwarded`` tells whether any of its answers came back forwarded.
    ``take_forwarded`` reads and clears the load's forwarded flag, set by the target
    just before each answer it marks forwarded.
    """

    __slots__ = ("accounts", "amount", "consistency", "finish", "forwarded", "left",
                 "replies", "take_forwarded", "target")  # fmt: skip

    def __init__(
        self,
        target: CallTarget,
        accounts: Sequence[bytes],
        amount: int,
        consistency: str,
        take_forwarded: Callable[[], bool],
        finish: Callable[[str | None, bool], None],
    ) -> None:
        self.target = target
        self.accounts = list(accounts)
        self.amount = amount
        self.consistency = consistency
        self.take_forwarded = take_forwarded
        self.finish = finish
        self.replies: list[dict[str, Any] | None] = [None] * len(self.accounts)
        self.left = len(self.accounts)
        self.forwarded = False

    def start(self) -> None:
        for i, key in enumerate(self.accounts):
            msg = {"op": "get", "key": key, "consistency": self.consistency}
            self.target.start_call(key, msg, self._reply_to(i))

    def _reply_to(self, i: int) -> Reply:
        def got(msg: dict[str, Any] | None, code: str | None) -> None:
            self._got(i, msg, code)

        return got

    def _got(self, i: int, msg: dict[str, Any] | None, code: str | None) -> None:
        self.forwarded |= self.take_forwarded()
        if self.left <= 0:  # already failed: a later answer changes nothing
            return
        if code is not None:
            self.left = 0
            self.finish(code, self.forwarded)
            return
        self.replies[i] = msg
        self.left -= 1
        if self.left == 0:
            self._commit()

    def txn_msg(self) -> dict[str, Any]:
        """The compare-and-put txn for the balances read."""
        got = [r or {} for r in self.replies]
        balances = [balance_of(r.get("value")) for r in got]
        balances[0] -= self.amount * (len(balances) - 1)
        for j in range(1, len(balances)):
            balances[j] += self.amount
        return {
            "op": "txn",
            "if": [
                {"key": k, "version": int(r.get("version", 0))}
                for k, r in zip(self.accounts, got, strict=True)
            ],
            "then": [
                {"op": "put", "key": k, "value": b"%d" % b}
                for k, b in zip(self.accounts, balances, strict=True)
            ],
        }

    def _commit(self) -> None:
        self.target.start_call(self.accounts[0], self.txn_msg(), self._txn_done)

    def _txn_done(self, msg: dict[str, Any] | None, code: str | None) -> None:
        self.forwarded |= self.take_forwarded()
        if code is None and msg is not None and msg.get("succeeded") is not True:
            code = COMPARE_FAILED
        self.finish(code, self.forwarded)


def bank_summary(
    ok: int, errors: dict[str, int], goodput: float, hot_keys: int, accounts: int
) -> dict[str, Any]:
    """Goodput (committed transfers/s, as measured) and conflict rate ((conflict
    answers + failed compares) / attempts) of a ``--hot-keys`` run, JSON-ready."""
    attempts = ok + sum(errors.values())
    conflicts = errors.get("conflict", 0)
    failed = errors.get(COMPARE_FAILED, 0)
    return {
        "hot_keys": hot_keys,
        "accounts_per_transfer": accounts,
        "attempts": attempts,
        "committed": ok,
        "conflicts": conflicts,
        "failed_compares": failed,
        "other_errors": attempts - ok - conflicts - failed,
        "goodput": round(goodput, 1),
        "conflict_rate": round((conflicts + failed) / attempts, 4) if attempts else None,
    }


def render_bank(summary: dict[str, Any]) -> list[str]:
    """Text lines for the ``bank`` part of the report."""
    rate = summary["conflict_rate"]
    return [
        f"bank: {summary['hot_keys']} hot accounts, {summary['accounts_per_transfer']} per "
        f"transfer (gets, then a txn with version compares and puts): "
        f"{summary['attempts']:,} attempts, {summary['committed']:,} committed -> goodput "
        f"{summary['goodput']:,.1f} txn/s",
        f"bank: {summary['conflicts']:,} conflict answers + {summary['failed_compares']:,} "
        f"failed compares -> conflict rate "
        + ("n/a" if rate is None else f"{rate * 100:.1f}%")
        + (f"; {summary['other_errors']:,} other errors" if summary["other_errors"] else ""),
    ]
