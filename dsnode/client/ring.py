"""The partition map as a client sees it: the answer of the ``ring`` op, checked.

PROTOCOL.md, "ring": ``{"partitions": P, "replication": R, "epoch": E,
"members": [{"node_id", "addr"}], "map": [{"id", "replicas", "leader"}]}``. A key belongs
to partition ``partition_of(key, P)`` (the ring's own stable hash, never ``hash()``); its
requests go to the partition's leader, stale reads to any of its replicas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dsnode.client.endpoints import fmt_endpoint, parse_endpoints
from dsnode.core.ring.hashing import partition_of

__all__ = ["RingMap", "PartitionInfo"]


@dataclass(frozen=True, slots=True)
class PartitionInfo:
    """One partition: its replicas in ring order (first = preferred leader) and the
    leader the node knew of (None: none known)."""

    id: int
    replicas: tuple[str, ...]
    leader: str | None


Endpoint = tuple[str, int]


@dataclass(frozen=True, slots=True)
class RingMap:
    """A checked ``ring`` answer. ``addrs`` maps node ids to ``(host, port)``; a member
    whose ``addr`` does not parse has no entry (requests for it take the usual route).

    Per partition id, for the client's hot path: ``leader_addrs`` the leader's endpoint
    (None: no leader known, or no address for it) and ``replica_addrs`` the replicas'
    endpoints by their ``host:port`` names."""

    partitions: int
    replication: int
    epoch: int
    parts: tuple[PartitionInfo, ...]  # indexed by partition id
    addrs: dict[str, Endpoint]
    leader_addrs: tuple[Endpoint | None, ...] = ()
    replica_addrs: tuple[dict[str, Endpoint], ...] = ()

    def __post_init__(self) -> None:
        addrs = self.addrs
        leaders = tuple(None if p.leader is None else addrs.get(p.leader) for p in self.parts)
        replicas = tuple(
            {fmt_endpoint(*addrs[n]): addrs[n] for n in p.replicas if n in addrs}
            for p in self.parts
        )
        object.__setattr__(self, "leader_addrs", leaders)
        object.__setattr__(self, "replica_addrs", replicas)

    @classmethod
    def from_wire(cls, resp: dict[str, Any]) -> RingMap:
        """Check a ``ring`` answer; ValueError naming the first problem."""
        p = _int(resp.get("partitions"), "partitions", 1)
        r = _int(resp.get("replication"), "replication", 1)
        epoch = _int(resp.get("epoch"), "epoch", 0)
        members = resp.get("members")
        if not isinstance(members, list):
            raise ValueError("'members' must be a list")
        addrs: dict[str, Endpoint] = {}
        for i, m in enumerate(members):
            if not isinstance(m, dict) or not isinstance(m.get("node_id"), str):
                raise ValueError(f"members[{i}] must be a map with a str 'node_id'")
            addr = m.get("addr")
            if isinstance(addr, str):
                try:
                    (addrs[m["node_id"]],) = parse_endpoints(addr)
                except ValueError:
                    pass
        raw = resp.get("map")
        if not isinstance(raw, list) or len(raw) != p:
            raise ValueError(f"'map' must be a list of {p} partitions")
        parts = []
        for i, entry in enumerate(raw):
            if not isinstance(entry, dict) or entry.get("id") != i:
                raise ValueError(f"map[{i}] must be a map with 'id' {i} (ordered by id)")
            replicas = entry.get("replicas")
            if not isinstance(replicas, list) or not all(isinstance(n, str) for n in replicas):
                raise ValueError(f"map[{i}].replicas must be a list of node ids")
            leader = entry.get("leader")
            if leader is not None and not isinstance(leader, str):
                raise ValueError(f"map[{i}].leader must be a node id or nil")
            parts.append(PartitionInfo(i, tuple(replicas), leader))
        return cls(p, r, epoch, tuple(parts), addrs)

    def partition_of(self, key: bytes) -> int:
        return partition_of(key, self.partitions)

    def part_of(self, key: bytes) -> PartitionInfo:
        return self.parts[partition_of(key, self.partitions)]


def _int(v: object, name: str, least: int) -> int:
    if type(v) is not int or v < least:
        raise ValueError(f"{name!r} must be an int >= {least}, got {v!r:.40}")
    return v
