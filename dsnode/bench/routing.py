"""Client-side request routing for the load generator: which node gets each request.

Routes (``--route``):

* ``spread``: connections are spread round-robin over ``--endpoints`` (the bench's
  original behaviour); each node takes whatever it is sent and forwards as needed.
* ``one-node``: every connection goes to the first endpoint.
* ``ring``: the partition map comes from the ``ring`` op; each request goes straight
  to the leader of its key's partition (``partition_of(key, P)``), and the map is
  fetched again (at most once per :data:`RING_REFRESH_MIN_S`) when an answer says
  the node had to forward it (``"forwarded": true``).
* ``auto``: ``ring`` when the first endpoint answers the ``ring`` op, else ``spread``.

This module is the pure part: parsing and validating a ``ring`` answer, the routing
choice, and the refresh rate limit (it is told the time, it never reads a clock).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from dsnode.core.ring.hashing import partition_of

ROUTES: tuple[str, ...] = ("auto", "ring", "one-node", "spread")

#: Fewest seconds between two fetches of the ring map caused by forwarded answers.
RING_REFRESH_MIN_S = 1.0


class RingMapError(ValueError):
    """A ``ring`` answer that does not have the documented shape."""


def split_addr(addr: str) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` of a member address; ValueError if malformed."""
    host, sep, port_s = addr.rpartition(":")
    port = int(port_s) if sep and port_s.isdigit() else 0
    if not host or not 0 < port < 65536:
        raise ValueError(f"bad member address {addr!r} (expected host:port)")
    return host.removeprefix("[").removesuffix("]"), port


@dataclass(frozen=True)
class RingMap:
    """A partition map as the ``ring`` op returns it.

    ``leaders[p]`` is the node id leading partition ``p`` (``None``: no leader known);
    ``addrs`` maps node ids to ``host:port``.
    """

    partitions: int
    replication: int
    epoch: int
    addrs: dict[str, str]
    leaders: tuple[str | None, ...]

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> RingMap:
        """Parse a ``ring`` answer; :class:`RingMapError` names what is wrong."""
        p = reply.get("partitions")
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise RingMapError(f"ring: 'partitions' must be an int >= 1, got {p!r}")
        r = reply.get("replication")
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise RingMapError(f"ring: 'replication' must be an int >= 1, got {r!r}")
        epoch = reply.get("epoch", 0)
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            raise RingMapError(f"ring: 'epoch' must be an int, got {epoch!r}")
        members = reply.get("members")
        if not isinstance(members, list) or not members:
            raise RingMapError("ring: 'members' must be a non-empty list")
        addrs: dict[str, str] = {}
        for m in members:
            if not isinstance(m, dict) or not isinstance(m.get("node_id"), str) or not isinstance(
                m.get("addr"), str
            ):
                raise RingMapError(f"ring: a member needs 'node_id' and 'addr' strings: {m!r}")
            try:
                split_addr(m["addr"])
            except ValueError as exc:
                raise RingMapError(f"ring: {exc}") from None
            addrs[m["node_id"]] = m["addr"]
        entries = reply.get("map")
        if not isinstance(entries, list):
            raise RingMapError("ring: 'map' must be a list")
        leaders: list[str | None] = [None] * p
        for e in entries:
            pid = e.get("id") if isinstance(e, dict) else None
            if not isinstance(pid, int) or isinstance(pid, bool) or not 0 <= pid < p:
                raise RingMapError(f"ring: map entry needs an 'id' in [0, {p}): {e!r}")
            leader = e.get("leader")
            if leader is not None and leader not in addrs:
                raise RingMapError(f"ring: partition {pid} is led by {leader!r}, not a member")
            leaders[pid] = leader
        return cls(p, r, epoch, addrs, tuple(leaders))

    def partition(self, key: bytes) -> int:
        return partition_of(key, self.partitions)

    def leader_of(self, key: bytes) -> str | None:
        """The node id leading ``key``'s partition, or ``None`` when the map knows none."""
        return self.leaders[partition_of(key, self.partitions)]

    def describe(self) -> str:
        led = sum(1 for x in self.leaders if x is not None)
        return (
            f"P={self.partitions} R={self.replication} epoch {self.epoch}, "
            f"{len(self.addrs)} members, {led} partitions with a leader"
        )


class RefreshLimiter:
    """At most one map fetch per ``min_interval_s`` and never two at once."""

    def __init__(self, min_interval_s: float = RING_REFRESH_MIN_S) -> None:
        if not min_interval_s >= 0:
            raise ValueError("min_interval_s must be >= 0")
        self.min_interval_s = min_interval_s
        self.last_start = -math.inf
        self.in_flight = False

    def try_start(self, now: float) -> bool:
        """True (and the fetch counts as started at ``now``) when one may start now."""
        if self.in_flight or now - self.last_start < self.min_interval_s:
            return False
        self.in_flight = True
        self.last_start = now
        return True

    def finished(self) -> None:
        self.in_flight = False


@dataclass
class RouteCounts:
    """Answers to load requests and how many of them said ``forwarded: true``."""

    answers: int = 0
    forwarded: int = 0
    ring_refreshes: int = 0
    ring_refresh_errors: int = 0

    def share(self) -> float | None:
        return self.forwarded / self.answers if self.answers else None


def route_summary(route: str, note: str | None, counts: RouteCounts) -> dict[str, Any]:
    """The ``routing`` part of the report (JSON-ready)."""
    share = counts.share()
    return {
        "route": route,
        "note": note,
        "answers": counts.answers,
        "forwarded": counts.forwarded,
        "forwarded_share": None if share is None else round(share, 4),
        "ring_refreshes": counts.ring_refreshes,
        "ring_refresh_errors": counts.ring_refresh_errors,
    }


def render_routing(summary: dict[str, Any]) -> list[str]:
    """Text lines for the ``routing`` part of the report."""
    share = summary["forwarded_share"]
    fwd = (
        "no answers recorded"
        if share is None
        else f"forwarded {summary['forwarded']:,} of {summary['answers']:,} answers "
        f"({share * 100:.1f}%)"
    )
    line = f"route: {summary['route']}; {fwd}"
    if summary["route"] == "ring":
        line += f"; map fetched again {summary['ring_refreshes']} time(s)"
        if summary["ring_refresh_errors"]:
            line += f" ({summary['ring_refresh_errors']} failed)"
    lines = [line]
    if summary["note"]:
        lines.append(f"note: {summary['note']}")
    return lines
