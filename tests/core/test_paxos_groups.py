"""Groups created and removed at run time, and recovery that sets aside the
records of groups not created yet (issue 8.2: metadata first, then partitions)."""

from __future__ import annotations

import random

import pytest
from test_paxos_node import CFG, NODES, Cluster

from dsnode.core.commands import Get, Put
from dsnode.core.paxos import PaxosNode
from dsnode.core.paxos.messages import Prepare
from dsnode.core.paxos.statemachine import DedupKV

GROUPS = {0: NODES, 1: NODES}


def _two_groups_written() -> Cluster:
    c = Cluster(groups=GROUPS)
    for g in GROUPS:
        c.elect("a", g)
        for i in range(3):
            c.nodes["a"].propose(g, f"w{g}{i}", Put(b"k%d" % i, b"g%d" % g),
                                 request_id=(f"cl{g}", i + 1))
            c.settle()
    c.tick(3)
    return c


def test_recovery_sets_aside_unknown_groups_and_add_group_replays_them():
    c = _two_groups_written()
    node = PaxosNode("b", {0: NODES}, random.Random(1), CFG)  # the metadata group only
    node.recover(c.disk["b"])
    assert set(node.groups) == {0}
    assert node.checkpoint() is None  # group 1's records would be lost
    node.add_group(1, NODES)
    for g in GROUPS:  # the same state as the node that never restarted
        assert node.state_machine(g).kv.get(b"k2") == (b"g%d" % g, 3)
        assert node.applied_index(g) == c.nodes["b"].applied_index(g)
    assert node.checkpoint() is not None
    assert node.drop_orphans() == []


def test_orphans_of_a_group_removed_for_good_are_dropped():
    c = _two_groups_written()
    node = PaxosNode("b", {0: NODES}, random.Random(1), CFG)
    node.recover(c.disk["b"])
    assert node.drop_orphans() == [1]
    assert node.checkpoint() is not None


def test_add_group_refuses_an_existing_group_or_a_non_member():
    node = PaxosNode("a", {0: NODES}, random.Random(1), CFG)
    with pytest.raises(ValueError, match="exists"):
        node.add_group(0, NODES)
    with pytest.raises(ValueError, match="no member"):
        node.add_group(5, ("b", "c"))


def test_a_group_added_later_elects_and_serves_with_its_own_state_machine():
    class Tagged(DedupKV):
        __slots__ = ()

    c = Cluster(groups={0: NODES})
    for n in NODES:
        c.nodes[n].add_group(7, ("c", "a", "b"), Tagged)
        assert isinstance(c.nodes[n].state_machine(7), Tagged)
        assert c.nodes[n].peers == sorted(set(NODES) - {n})
    c.elect("c", 7)
    c.nodes["c"].propose(7, "w", Put(b"x", b"1"), request_id=("cl", 1))
    c.settle()
    c.nodes["c"].read(7, "r", Get(b"x"))
    c.settle()
    assert c.replies["c"][-1].result == {"value": b"1", "version": 1}


def test_remove_group_fails_what_it_had_pending_and_drops_its_messages():
    c = Cluster(groups=GROUPS)
    c.elect("a", 1)
    c.cut = {"b", "c"}
    c.nodes["a"].propose(1, "w", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    c.nodes["a"].remove_group(1)
    c.settle()
    (reply,) = [r for r in c.replies["a"] if r.token == "w"]
    assert reply.error[0] == "unavailable"
    c.nodes["a"].step("b", Prepare(1, (9, "b"), 1))
    assert c.nodes["a"].dropped["unknown_group"] == 1
    assert set(c.nodes["a"].groups) == {0}
