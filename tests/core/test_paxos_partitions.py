"""Partitions from the metadata group (issue 8 part 2): the metadata group's first
value names the cluster and its ring; every node creates the partitions the ring
places on it, on start and on recovery (metadata first), and nothing else."""

from __future__ import annotations

import dataclasses
import random

import pytest

from dsnode.core.commands import Put, SetRing
from dsnode.core.kv.store import ERROR_KEY
from dsnode.core.paxos import PaxosConfig, PaxosNode
from dsnode.core.paxos.metadata import REFUSED, MetaSM
from dsnode.core.ring import Ring
from tests.core.test_paxos_node import Cluster

NODES = ("a", "b", "c", "d", "e")
META = "meta"
P, R = 8, 3


def _cfg(**kw) -> PaxosConfig:
    return PaxosConfig(election_timeout_ticks=10, heartbeat_interval_ticks=2,
                       formation_group=META, formation_ring=(NODES, P, R), **kw)


class Net(Cluster):
    """Five nodes that start with only the metadata group (test_paxos_node's harness)."""

    def __init__(self, cfg: PaxosConfig) -> None:
        super().__init__(cfg, {META: NODES}, NODES)
        for node in self.nodes.values():
            node.recover([])

    def _make(self, n: str) -> PaxosNode:
        return PaxosNode(n, {META: NODES}, random.Random(n), self.cfg, metadata=META)


def _formed() -> Net:
    net = Net(_cfg())
    net.nodes["a"].campaign(META)
    net.settle()
    net.tick(30)
    return net


def test_the_first_metadata_value_holds_the_ring_and_every_node_hosts_its_partitions():
    net = _formed()
    ring = Ring(NODES, P, R, epoch=1)
    for n, node in net.nodes.items():
        assert node.ring is not None and node.ring.placement() == ring.placement()
        assert node.ring.epoch == 1
        hosted = sorted(g for g in node.groups if g != META)
        assert hosted == list(ring.partitions_of(n))
        for pid in hosted:
            assert node.groups[pid].preferred == ring.replicas(pid)
        assert node.state_machine(META).cluster_uuid is not None


def test_preferred_replicas_lead_their_new_partitions_at_once():
    net = _formed()
    ring = Ring(NODES, P, R, epoch=1)
    for pid in range(P):
        first = ring.replicas(pid)[0]
        assert net.nodes[first].is_leader(pid), pid
    # a write to a partition goes through its own group
    leader = ring.replicas(3)[0]
    net.nodes[leader].propose(3, "t", Put(b"k", b"v"))
    net.settle()
    assert [r.result for r in net.replies[leader]] == [{"succeeded": True, "version": 1}]


def test_recovery_rebuilds_the_metadata_group_first_then_the_partitions():
    net = _formed()
    ring = Ring(NODES, P, R, epoch=1)
    pid = ring.partitions_of("b")[0]
    leader = ring.replicas(pid)[0]
    net.nodes[leader].propose(pid, "t", Put(b"k", b"v"))
    net.settle()
    net.tick(5)
    fresh = net._make("b")
    fresh.recover(net.disk["b"])
    assert sorted(g for g in fresh.groups if g != META) == list(ring.partitions_of("b"))
    assert fresh.state_machine(pid).kv.get(b"k") == (b"v", 1)
    assert fresh.checkpoint() is not None  # nothing set aside is left pending


def test_records_of_partitions_the_ring_does_not_place_here_are_forgotten():
    net = _formed()
    ring = Ring(NODES, P, R, epoch=1)
    elsewhere = next(p for p in range(P) if "b" not in ring.replicas(p))
    from dsnode.core.paxos import records as rec
    fresh = net._make("b")
    fresh.recover([*net.disk["b"], rec.commit(elsewhere, 0)])
    assert elsewhere not in fresh.groups
    assert fresh.checkpoint() is not None


def test_without_a_ring_yet_recovered_partition_records_wait():
    """A node that has partition records but has not (re)learned the ring keeps them
    until the metadata group tells it where they belong."""
    from dsnode.core.paxos import records as rec
    node = PaxosNode("b", {META: NODES}, random.Random(1), _cfg(), metadata=META)
    node.recover([rec.commit(2, 0)])
    assert node.ring is None and 2 not in node.groups
    assert node.checkpoint() is None  # the set-aside records are not lost


def test_the_metadata_group_refuses_rings_out_of_order():
    sm = MetaSM()
    first = SetRing(NODES, P, R, 1)
    assert sm.apply(None, SetRing(NODES, P, R, 2), 1)[ERROR_KEY][0] == REFUSED
    assert sm.apply(None, first, 2) == {"epoch": 1}
    assert sm.ring_epoch == 1
    again = sm.apply(None, first, 3)
    assert again[ERROR_KEY][0] == REFUSED and "epoch 1" in again[ERROR_KEY][1]
    other_p = sm.apply(None, SetRing(NODES, P * 2, R, 2), 4)
    assert other_p[ERROR_KEY][0] == REFUSED and "fixed" in other_p[ERROR_KEY][1]
    assert sm.apply(None, SetRing(("a",), P, 0, 2), 5)[ERROR_KEY][0] == REFUSED
    assert sm.apply(None, SetRing(NODES[:4], P, R, 2), 6) == {"epoch": 2}
    restored = MetaSM.restore(sm.snapshot())
    assert restored.ring is not None and restored.ring.members == NODES[:4]
    assert restored.ring.epoch == 2


def test_a_data_directory_formed_before_the_metadata_group_keeps_its_uuid():
    net = Net(dataclasses.replace(_cfg(), formation_uuid="f" * 32))
    net.nodes["c"].campaign(META)
    net.settle()
    net.tick(5)
    assert all(n.state_machine(META).cluster_uuid == "f" * 32 for n in net.nodes.values())


def test_the_metadata_group_must_be_one_of_the_groups():
    with pytest.raises(ValueError, match="metadata group"):
        PaxosNode("a", {0: NODES}, random.Random(1), _cfg(), metadata=META)
