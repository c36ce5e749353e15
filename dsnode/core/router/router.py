"""The router's decisions for one node (issue 8 part 5), pure.

For a request (token, key, kind) the router answers one of:

- ``Local``: this node serves it (it leads the partition, or, for a stale
  read, its own replica is the least busy one);
- ``Forward(node)``: send it over the peer connection to ``node``;
- ``Park``: no leader of the partition is known; hold it until
  ``on_leader_change`` lists it (the driver fails it at its deadline);
- ``Overloaded``: ``inflight_max`` requests are already in flight from this
  node; answer ``overloaded`` instead of queueing.

Writes and linearizable reads go to the partition's leader; stale reads to
any replica (this node's own included), least connections first. Every
request routed (Local, Forward or Park) stays counted until ``finish``, or
until ``on_leader_change`` hands it back for re-sending (safe: requests
carry request ids, so a write that did arrive is not applied twice).
"""

from __future__ import annotations

import enum
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from dsnode.core.router.least_conn import InFlight, pick


class OpKind(enum.Enum):
    WRITE = "write"
    READ = "read"  # linearizable
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class Local:
    partition: int


@dataclass(frozen=True, slots=True)
class Forward:
    partition: int
    node: str


@dataclass(frozen=True, slots=True)
class Park:
    partition: int


@dataclass(frozen=True, slots=True)
class Overloaded:
    inflight: int


Decision = Local | Forward | Park | Overloaded


class Placement(Protocol):
    """What the router needs of a ring (``dsnode.core.ring.Ring``)."""

    @property
    def partitions(self) -> int: ...

    def partition_of(self, key: bytes) -> int: ...

    def replicas(self, pid: int) -> tuple[str, ...]: ...


@dataclass(slots=True)
class _Routed:
    partition: int
    kind: OpKind
    target: str | None  # None: parked


class Router:
    def __init__(
        self,
        node_id: str,
        ring: Placement,
        rng: random.Random,
        inflight_max: int,
        leaders: Mapping[int, str | None] | None = None,
    ) -> None:
        if inflight_max < 1:
            raise ValueError(f"inflight_max must be at least 1, got {inflight_max}")
        self.node_id = node_id
        self.ring = ring
        self.rng = rng
        self.inflight_max = inflight_max
        self.inflight = InFlight()
        self._leaders: dict[int, str] = {}
        self._routed: dict[object, _Routed] = {}
        self._parked = 0
        # nodes the failure detector suspects (or holds dead): not chosen for a stale read
        # or as a coordinator while another candidate is not
        self.suspects: frozenset[str] = frozenset()
        for pid, leader in (leaders or {}).items():
            self._set_leader(pid, leader)

    # ------------------------------------------------------------ queries
    def leader(self, pid: int) -> str | None:
        return self._leaders.get(pid)

    @property
    def in_flight(self) -> int:
        """Requests routed and not yet finished, parked ones included."""
        return self.inflight.total + self._parked

    def pending(self) -> list[object]:
        """Tokens routed and not finished, oldest first."""
        return list(self._routed)

    def least_busy(self, candidates: Iterable[str]) -> str:
        """Among equally eligible nodes (an up-to-date replica as a catch-up or
        snapshot source, any member as a transaction coordinator), the one with
        the fewest requests in flight from this node; seeded tie-break."""
        return pick(candidates, self.inflight, self.rng)

    def coordinator(self, reachable: Iterable[str]) -> str:
        """Who coordinates a cross-partition transaction sent to this node: this node
        while it has fewer than half its limit of requests in flight, else the least
        busy (fewest requests in flight from this node) of itself and ``reachable``."""
        if self.in_flight < self.inflight_max // 2:
            return self.node_id
        return self.least_busy([self.node_id, *(n for n in reachable if n not in self.suspects)])

    # ------------------------------------------------------------ inputs
    def route(self, token: object, key: bytes, kind: OpKind) -> Decision:
        """Decide where the request ``token`` goes and count it as in flight."""
        return self.route_partition(token, self.ring.partition_of(key), kind)

    def route_partition(self, token: object, pid: int, kind: OpKind) -> Decision:
        """``route`` for a request whose partition the caller already knows."""
        if token in self._routed:
            raise ValueError(f"request {token!r} is already in flight")
        if self.in_flight >= self.inflight_max:
            return Overloaded(self.in_flight)
        if kind is OpKind.STALE:
            replicas = self.ring.replicas(pid)
            healthy = [r for r in replicas if r not in self.suspects] or replicas
            target: str | None = pick(healthy, self.inflight, self.rng)
        else:
            target = self._leaders.get(pid)
        self._routed[token] = _Routed(pid, kind, target)
        if target is None:
            self._parked += 1
            return Park(pid)
        self.inflight.start(target)
        return Local(pid) if target == self.node_id else Forward(pid, target)

    def finish(self, token: object) -> bool:
        """The request ended (answered, failed or timed out). False if unknown:
        already finished, or handed back by ``on_leader_change``."""
        r = self._routed.pop(token, None)
        if r is None:
            return False
        self._release(r)
        return True

    def on_leader_change(
        self, pid: int, leader: str | None, movable: Callable[[object], bool] | None = None
    ) -> list[object]:
        """Record ``pid``'s new leader (None: unknown) and hand back, oldest
        first, the leader-bound requests of ``pid`` that were parked or sent to
        another node than the new leader, and that ``movable`` accepts (default
        all; a write without a request id that may have reached the old leader
        cannot be sent again, so it stays counted where it went). Those handed
        back are no longer counted: the driver re-sends each with ``route``
        (same token) within its deadline. Stale reads are not affected."""
        self._set_leader(pid, leader)
        if leader is None:
            return []
        resend = [
            t for t, r in self._routed.items()
            if r.partition == pid and r.kind is not OpKind.STALE and r.target != leader
            and (movable is None or movable(t))
        ]
        for t in resend:
            self._release(self._routed.pop(t))
        return resend

    # ------------------------------------------------------------ internals
    def _set_leader(self, pid: int, leader: str | None) -> None:
        if not 0 <= pid < self.ring.partitions:
            raise ValueError(f"partition {pid} is not in [0, {self.ring.partitions})")
        if leader is None:
            self._leaders.pop(pid, None)
        else:
            self._leaders[pid] = leader

    def _release(self, r: _Routed) -> None:
        if r.target is None:
            self._parked -= 1
        else:
            self.inflight.finish(r.target)
