"""The consistent-hash ring (issue 8 part 1): P partitions fixed at cluster
creation, a stable key hash picks the partition, and each partition's R
replicas (R capped by the cluster size) are placed by ``placement.place``.

The placement depends only on (sorted members, P, R): every node computes the
same ring from the same membership, in every run. ``epoch`` is carried for the
membership protocol (each change makes a new epoch) and takes no part in
placement.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from functools import lru_cache

from dsnode.core.ring import hashing
from dsnode.core.ring.placement import place

PARTITIONS_DEFAULT = 64
PARTITIONS_MAX = 4096
REPLICATION_DEFAULT = 3
REPLICATION_MAX = 16


def check_partitions_value(partitions: object) -> int:
    if not isinstance(partitions, int) or isinstance(partitions, bool):
        raise ValueError(f"partitions must be an integer, got {partitions!r}")
    if not 1 <= partitions <= PARTITIONS_MAX:
        raise ValueError(f"partitions must be in 1..{PARTITIONS_MAX}, got {partitions}")
    return partitions


def check_replication_value(replication: object) -> int:
    if not isinstance(replication, int) or isinstance(replication, bool):
        raise ValueError(f"replication must be an integer, got {replication!r}")
    if not 1 <= replication <= REPLICATION_MAX:
        raise ValueError(f"replication must be in 1..{REPLICATION_MAX}, got {replication}")
    return replication


def _check_members(members: Iterable[str]) -> tuple[str, ...]:
    if isinstance(members, str | bytes):
        raise ValueError("members must be a collection of node ids, not one string")
    ids = list(members)
    if not ids:
        raise ValueError("a ring needs at least one member")
    for m in ids:
        if not isinstance(m, str) or not m:
            raise ValueError(f"member ids must be non-empty strings, got {m!r}")
    seen: set[str] = set()
    for m in ids:
        if m in seen:
            raise ValueError(f"member id {m!r} appears twice")
        seen.add(m)
    return tuple(sorted(ids))


@lru_cache(maxsize=16)
def _placement(members: tuple[str, ...], partitions: int, replication: int):
    return place(members, partitions, replication)


@dataclass(frozen=True, slots=True)
class Move:
    """How one partition's replica set changes between two rings."""

    added: tuple[str, ...]
    removed: tuple[str, ...]


class Ring:
    __slots__ = ("members", "partitions", "replication", "epoch", "_replicas", "_of_node")

    def __init__(
        self,
        members: Iterable[str],
        partitions: int = PARTITIONS_DEFAULT,
        replication: int = REPLICATION_DEFAULT,
        epoch: int = 0,
    ) -> None:
        self.members = _check_members(members)
        self.partitions = check_partitions_value(partitions)
        check_replication_value(replication)
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative integer, got {epoch!r}")
        self.replication = min(replication, len(self.members))  # capped by the cluster size
        self.epoch = epoch
        self._replicas = _placement(self.members, self.partitions, self.replication)
        of_node: dict[str, list[int]] = {m: [] for m in self.members}
        for pid, replicas in enumerate(self._replicas):
            for m in replicas:
                of_node[m].append(pid)
        self._of_node = {m: tuple(pids) for m, pids in of_node.items()}

    def __repr__(self) -> str:
        return (f"Ring(members={list(self.members)!r}, partitions={self.partitions}, "
                f"replication={self.replication}, epoch={self.epoch})")

    def partition_of(self, key: bytes) -> int:
        return hashing.partition_of(key, self.partitions)

    def replicas(self, pid: int) -> tuple[str, ...]:
        """The partition's replicas; the first is its preferred leader."""
        return self._replicas[self._check_pid(pid)]

    def preferred_leader(self, pid: int, healthy: Collection[str] | None = None) -> str | None:
        """The first replica of ``pid`` in ``healthy`` (all members if None);
        None when no replica is healthy."""
        for m in self.replicas(pid):
            if healthy is None or m in healthy:
                return m
        return None

    def partitions_of(self, node: str) -> tuple[int, ...]:
        """Partitions with a replica on ``node``, ascending."""
        try:
            return self._of_node[node]
        except KeyError:
            raise ValueError(f"{node!r} is not a member of {self!r}") from None

    def led_by(self, node: str) -> tuple[int, ...]:
        """Partitions whose preferred leader is ``node``, ascending."""
        return tuple(p for p in self.partitions_of(node) if self._replicas[p][0] == node)

    def placement(self) -> tuple[tuple[str, ...], ...]:
        """Every partition's replica list, by partition id."""
        return self._replicas

    def _check_pid(self, pid: int) -> int:
        if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < self.partitions:
            raise ValueError(f"partition {pid!r} is not in [0, {self.partitions})")
        return pid


def moves(old: Ring, new: Ring) -> dict[int, Move]:
    """Per partition whose replica set changes from ``old`` to ``new``: the
    members added and removed (each sorted). Order changes (a new preferred
    leader) are not moves. Both rings must have the same number of partitions."""
    if old.partitions != new.partitions:
        raise ValueError(
            f"rings with {old.partitions} and {new.partitions} partitions cannot be compared: "
            "the number of partitions is fixed for the cluster's life"
        )
    out: dict[int, Move] = {}
    for pid in range(old.partitions):
        before, after = set(old.replicas(pid)), set(new.replicas(pid))
        if before != after:
            out[pid] = Move(tuple(sorted(after - before)), tuple(sorted(before - after)))
    return out


def moved_replicas(old: Ring, new: Ring) -> int:
    """Replicas that must be created somewhere new going from ``old`` to ``new``."""
    return sum(len(m.added) for m in moves(old, new).values())
