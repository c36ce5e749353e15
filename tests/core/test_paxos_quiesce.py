"""Quiescence: idle groups stop their heartbeats; node heartbeats keep them quiet
(issue 8.3: a node's idle cost does not grow with the number of groups)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from test_paxos_node import CFG, NODES, Cluster

from dsnode.core.commands import Get, Put
from dsnode.core.errors import PeerMisbehaved
from dsnode.core.paxos.messages import Accept, NodeHeartbeat, from_wire, to_wire

Q = dataclasses.replace(CFG, quiesce=True, leader_stickiness=True)
E = Q.election_timeout_ticks


class Counting(Cluster):
    """Counts what each node sends, by message type."""

    def __init__(self, cfg=Q, groups=None) -> None:
        super().__init__(cfg, groups)
        self.sent: list[tuple[str, object]] = []

    def drain(self, n):
        r = super().drain(n)
        self.sent.extend((n, m) for _dst, m in r.send)
        return r


def _quiet_cluster(groups=None) -> Counting:
    c = Counting(groups=groups)
    for g in c.groups:
        c.elect("a", g)
        c.nodes["a"].propose(g, f"w{g}", Put(b"k", b"v"), request_id=("cl", g + 1))
    c.tick(4 * Q.heartbeat_interval_ticks)  # acks report everything chosen: quiesce
    for g in c.groups:
        assert c.nodes["a"].groups[g].quiesced and c.nodes["b"].groups[g].quiesced
    c.sent.clear()
    return c


def test_a_quiet_group_sends_only_node_heartbeats_and_keeps_its_leader():
    c = _quiet_cluster()
    c.tick(10 * E)
    assert {type(m) for _n, m in c.sent} == {NodeHeartbeat}
    assert [n for n in NODES if c.nodes[n].is_leader(0)] == ["a"]


def test_idle_cost_does_not_grow_with_the_number_of_groups():
    groups = {g: NODES for g in range(40)}
    c = _quiet_cluster(groups)
    ticks = 5 * E
    c.tick(ticks)
    per_node = len(c.sent) / len(NODES)
    # one heartbeat to each of the two peers per heartbeat interval, for all 40 groups
    assert per_node <= 2 * (ticks // Q.heartbeat_interval_ticks + 1)


def test_work_wakes_the_group_and_it_goes_quiet_again():
    c = _quiet_cluster()
    c.tick(3 * Q.leader_quorum_timeout_ticks)  # no acks all this time: nothing to ack
    a = c.nodes["a"]
    a.propose(0, "w2", Put(b"k", b"v2"), request_id=("cl", 9))
    held = a.ready()  # woken: accepts out, but a ticks before any answer comes back
    a.tick()
    assert a.is_leader(0), "the leader counted its quiet members as deserters"
    c.queue.extend((("a", dst, to_wire(m)) for dst, m in held.send))
    c.disk["a"].extend(held.persist)
    c.settle()
    assert c.replies["a"][-1].result == {"succeeded": True, "version": 2}
    assert not c.nodes["a"].groups[0].quiesced
    c.nodes["a"].read(0, "r", Get(b"k"))
    c.settle()
    assert c.replies["a"][-1].result == {"value": b"v2", "version": 2}
    c.tick(4 * Q.heartbeat_interval_ticks)
    assert c.nodes["a"].groups[0].quiesced


def test_followers_elect_a_new_leader_when_the_leaders_node_goes_silent():
    c = _quiet_cluster()
    del c.nodes["a"]  # no more node heartbeats from a
    for _ in range(6 * E):
        c.tick()
        if any(c.nodes[n].is_leader(0) for n in ("b", "c")):
            break
    assert any(c.nodes[n].is_leader(0) for n in ("b", "c"))


def test_a_member_that_missed_the_quiet_wakes_the_leader_and_follows_it():
    c = _quiet_cluster()
    c.crash_restart("c")  # comes back knowing nothing, its election timer running
    for _ in range(6 * E):
        c.tick()
        if c.nodes["c"].leader_of(0) == "a":
            break
    assert c.nodes["c"].leader_of(0) == "a"
    assert [n for n in NODES if c.nodes[n].is_leader(0)] == ["a"]
    c.tick(6 * Q.heartbeat_interval_ticks)
    assert c.nodes["a"].groups[0].quiesced


def test_a_quiet_leader_steps_down_when_a_quorum_of_nodes_goes_silent():
    c = _quiet_cluster()
    c.cut = {"a"}
    c.tick(Q.leader_quorum_timeout_ticks + E + 1)
    assert not c.nodes["a"].is_leader(0)


def test_wire_forms_of_quiescence():
    m = Accept(0, (1, "a"), (), 3, 1, True)
    assert from_wire(msgpack.unpackb(msgpack.packb(to_wire(m)))) == m
    assert from_wire(["px.accept", 0, [1, "a"], [], 3, 1]).quiesce is False  # older peer
    assert from_wire(to_wire(NodeHeartbeat())) == NodeHeartbeat()
    with pytest.raises(PeerMisbehaved):
        from_wire(["px.node_hb", 5])
    with pytest.raises(PeerMisbehaved):
        from_wire(["px.accept", 0, [1, "a"], [], 3, 1, "yes"])


def test_a_member_campaigning_without_pre_vote_wakes_a_quiet_leader_and_all_converge():
    """c runs phase 1 straight away (no pre-vote) while the group is quiet: its
    prepares are refused by the sticky members, but the leader wakes, so c hears a
    leader (or is heard) and the group ends with one leader that everyone names."""
    c = _quiet_cluster()
    c.nodes["c"].groups[0].become_candidate()
    c.settle()
    assert not c.nodes["a"].groups[0].quiesced
    for _ in range(20 * E):
        c.tick()
        leaders = [n for n in NODES if c.nodes[n].is_leader(0)]
        if len(leaders) == 1 and all(c.nodes[n].leader_of(0) == leaders[0] for n in NODES):
            break
    leaders = [n for n in NODES if c.nodes[n].is_leader(0)]
    assert len(leaders) == 1 and all(c.nodes[n].leader_of(0) == leaders[0] for n in NODES)


def test_quiet_groups_are_not_ticked_until_input_or_a_liveness_change_wakes_them():
    groups = {g: NODES for g in range(40)}
    c = _quiet_cluster(groups)
    c.tick(2)
    a = c.nodes["a"]
    assert a._quiet == set(groups)  # every group quiet: a tick touches none of them
    before = {g: grp.now for g, grp in a.groups.items()}
    c.tick(50)
    assert all(a.groups[g].now == before[g] for g in groups)
    # an input wakes its group with its clock caught up first
    a.propose(3, "w", Put(b"k", b"v2"), request_id=("cl", 99))
    assert a.groups[3].now == a.now and 3 not in a._quiet
    c.settle()
    assert c.replies["a"][-1].result == {"succeeded": True, "version": 2}
    # a peer going silent wakes the groups it is in, so they can react
    died_at = a.now
    del c.nodes["c"]
    c.tick(Q.election_timeout_ticks + 1)
    assert not a.peer_alive("c")
    assert all(a.groups[g].now >= died_at + Q.election_timeout_ticks for g in groups)


def test_groups_woken_by_a_liveness_change_are_not_ticked_past_the_node():
    """The tick that sees a peer go silent wakes the quiet groups it is in, their
    clocks caught up to the node's; they must not then be ticked once more in the
    same call (a follower's clock ahead of its node stops honouring a lease early)."""
    groups = {g: NODES for g in range(8)}
    c = _quiet_cluster(groups)
    c.tick(3)
    a = c.nodes["a"]
    assert a._quiet == set(groups)
    del c.nodes["c"]
    for _ in range(3 * Q.election_timeout_ticks):
        a.tick(2)  # two ticks at once, as after a short pause of the loop
        if not a.peer_alive("c"):
            break
    assert not a.peer_alive("c")
    assert [a.groups[g].now for g in groups] == [a.now] * len(groups)
