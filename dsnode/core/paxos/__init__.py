"""Pure Multi-Paxos core: many groups per node, driven by step/tick/ready."""

from dsnode.core.paxos.config import PaxosConfig
from dsnode.core.paxos.group import Applied, PaxosGroup, Role, SnapshotInstalled, SnapshotWanted
from dsnode.core.paxos.node import PaxosNode

__all__ = [
    "Applied",
    "PaxosConfig",
    "PaxosGroup",
    "PaxosNode",
    "Role",
    "SnapshotInstalled",
    "SnapshotWanted",
]
