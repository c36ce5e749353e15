"""The consistent-hash ring, pure (issue 8 part 1)."""

from dsnode.core.ring.datadir import check_partitions
from dsnode.core.ring.hashing import key_hash, partition_of
from dsnode.core.ring.placement import load_bounds
from dsnode.core.ring.ring import (
    PARTITIONS_DEFAULT,
    PARTITIONS_MAX,
    REPLICATION_DEFAULT,
    REPLICATION_MAX,
    Move,
    Ring,
    moved_replicas,
    moves,
)

__all__ = [
    "PARTITIONS_DEFAULT",
    "PARTITIONS_MAX",
    "REPLICATION_DEFAULT",
    "REPLICATION_MAX",
    "Move",
    "Ring",
    "check_partitions",
    "key_hash",
    "load_bounds",
    "moved_replicas",
    "moves",
    "partition_of",
]
