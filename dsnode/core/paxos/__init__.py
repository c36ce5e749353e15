"""Pure Multi-Paxos core: many groups per node, driven by step/tick/ready."""

from dsnode.core.paxos.config import PaxosConfig
from dsnode.core.paxos.group import PaxosGroup
from dsnode.core.paxos.node import PaxosNode
from dsnode.core.paxos.outputs import Applied, SnapshotInstalled, SnapshotWanted
from dsnode.core.paxos.roles import Role

__all__ = [
    "Applied",
    "PaxosConfig",
    "PaxosGroup",
    "PaxosNode",
    "Role",
    "SnapshotInstalled",
    "SnapshotWanted",
]
