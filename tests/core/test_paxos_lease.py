"""Leader leases (issue 7.6): reads without a round while a quorum honours the lease."""

from __future__ import annotations

import dataclasses

import pytest
from test_paxos_node import CFG, Cluster

from dsnode.core.commands import Get, Put
from dsnode.core.paxos import PaxosConfig
from dsnode.core.paxos.config import lease_ticks_for

E = 20
LEASE_CFG = dataclasses.replace(
    CFG, election_timeout_ticks=E, leader_quorum_timeout_ticks=E,
    lease_ticks=lease_ticks_for(E, 0.1),
)


@pytest.mark.parametrize("e", [2, 3, 10, 50, 500])
@pytest.mark.parametrize("drift", [0.0, 0.01, 0.1, 0.3, 0.9])
def test_lease_bound_fits_inside_the_followers_honour_at_the_worst_clock_rates(e, drift):
    """A lease of L leader ticks at the slowest rate ends before E - 1 follower ticks at
    the fastest: L / (1 - drift) <= (E - 1) / (1 + drift); and it is the largest such L."""
    lease = lease_ticks_for(e, drift)
    assert 0 <= lease < e
    assert lease / (1 - drift) <= (e - 1) / (1 + drift) + 1e-9
    assert (lease + 1) / (1 - drift) > (e - 1) / (1 + drift)


def test_config_refuses_a_lease_as_long_as_the_election_timeout():
    with pytest.raises(ValueError, match="lease_ticks"):
        PaxosConfig(election_timeout_ticks=10, lease_ticks=10)
    with pytest.raises(ValueError, match="drift"):
        lease_ticks_for(10, 1.0)


def _leased_cluster() -> Cluster:
    c = Cluster(LEASE_CFG)
    c.tick(E)  # a fresh node votes for nobody during its first election timeout
    c.elect("a")
    c.nodes["a"].propose(0, "w", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    c.tick(LEASE_CFG.heartbeat_interval_ticks)  # a heartbeat round, acknowledged
    assert c.nodes["a"].lease_held(0)
    return c


def test_leader_with_a_lease_answers_a_read_without_any_message():
    c = _leased_cluster()
    a = c.nodes["a"]
    a.ready()  # nothing pending
    a.read(0, "r", Get(b"k"))
    r = a.ready()
    assert r.send == [] and r.persist == []
    assert [x.result for x in r.reply] == [{"value": b"v", "version": 1}]
    assert a.reads["lease"] == 1


def test_without_leases_the_same_read_takes_a_round():
    c = Cluster()
    c.elect("a")
    c.nodes["a"].read(0, "r", Get(b"k"))
    r = c.drain("a")
    assert r.reply == [] and r.send  # a read-index round goes out first
    c.settle()
    assert c.nodes["a"].reads == {"read_index": 1}
    assert not c.nodes["a"].lease_held(0)


def test_a_cut_off_leader_loses_its_lease_after_lease_ticks_and_falls_back():
    c = _leased_cluster()
    a = c.nodes["a"]
    c.cut = {"a"}
    sent = a.groups[0].proposer.round_sent[a.groups[0].proposer.confirmed_seq(
        a.groups[0].members, a.groups[0].quorum)]
    while a.groups[0].now < sent + LEASE_CFG.lease_ticks - 1:
        c.tick()
        assert a.lease_held(0)
    c.tick()
    assert not a.lease_held(0)
    a.read(0, "r", Get(b"k"))
    c.settle()
    assert [x.token for x in c.replies["a"]] == ["w"]  # no quorum round: no answer


def test_one_tick_call_for_a_long_pause_ends_the_lease_at_once():
    """After a pause the shell passes every elapsed tick in one call: the lease must
    not outlive it (a paused leader that resumes must not serve from an old lease)."""
    c = _leased_cluster()
    a = c.nodes["a"]
    a.tick(LEASE_CFG.lease_ticks)
    assert not a.lease_held(0)
    with pytest.raises(Exception, match="tick"):
        a.tick(0)


def test_followers_honouring_a_lease_neither_campaign_nor_promise_to_others():
    """Stickiness is off in CFG: the lease alone must keep b and c from electing b
    while a may still answer reads from its lease."""
    c = _leased_cluster()
    c.cut = {"a"}
    c.nodes["b"].campaign(0)
    c.settle()
    assert c.nodes["b"].dropped["campaign_during_lease"] == 1
    gb = c.nodes["b"].groups[0]
    gb.become_candidate()  # even a forced phase 1 gets no promise from c
    c.settle()
    assert not c.nodes["b"].is_leader(0)
    assert c.nodes["c"].dropped["prepare_while_leader_live"] >= 1
    # an election timeout after the last round they heard, they are free again
    c.tick(E)
    assert not c.nodes["a"].lease_held(0)
    for _ in range(5 * E):
        if any(c.nodes[n].is_leader(0) for n in ("b", "c")):
            break
        c.tick()
    assert any(c.nodes[n].is_leader(0) for n in ("b", "c"))


def test_a_restarted_acceptor_honours_the_lease_it_may_have_acknowledged():
    """c acknowledged a's lease, crashed and came straight back: it must not promise to
    b during an election timeout, or b and c could elect b under a's lease."""
    c = _leased_cluster()
    c.crash_restart("c")
    c.cut = {"a"}
    c.nodes["b"].groups[0].become_candidate()
    c.settle()
    assert not c.nodes["b"].is_leader(0)
    assert c.nodes["a"].lease_held(0)


def test_pending_read_index_reads_are_answered_by_a_renewed_lease():
    c = _leased_cluster()
    a = c.nodes["a"]
    a.tick(LEASE_CFG.lease_ticks)  # lease gone
    a.read(0, "r", Get(b"k"))
    c.settle()  # the round it started renews the lease and answers the read
    assert c.replies["a"][-1].result == {"value": b"v", "version": 1}
    assert a.lease_held(0)


@pytest.mark.parametrize("leases", [True, False])
def test_a_get_taken_after_a_put_sees_it_with_or_without_a_lease(leases):
    """Session order: a get that reaches the leader after a put (pipelined on one
    connection, or forwarded in order) waits for that put, even under a lease. (It may
    also see a later write that shares the put's slot: both are concurrent with it.)"""
    if leases:
        c = _leased_cluster()
    else:
        c = Cluster()
        c.elect("a")
    a = c.nodes["a"]
    a.propose(0, "w2", Put(b"k", b"v2"), request_id=("cl", 2))
    a.read(0, "r", Get(b"k"))  # the put is still queued: not even in a slot yet
    a.propose(0, "w3", Put(b"k", b"v3"), request_id=("cl", 3))  # after the get
    c.settle()
    by_token = {x.token: x.result for x in c.replies["a"]}
    assert by_token["r"]["value"] in (b"v2", b"v3")
    assert by_token["w3"]["succeeded"]


def test_a_restarted_sole_member_campaigns_at_once_the_only_lease_it_honoured_was_its_own():
    """A group of one: the only lease its acceptor can have acknowledged is its own
    leader's (this node before the crash, gone). Honouring it would only make a
    restarted single-node cluster sit out an election timeout before serving."""
    c = Cluster(LEASE_CFG, names=("a",))
    c.nodes["a"].campaign(0)
    c.settle()
    c.nodes["a"].propose(0, "w", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    assert c.nodes["a"].lease_held(0)
    c.crash_restart("a")
    a = c.nodes["a"]
    a.campaign(0)
    c.settle()
    assert a.is_leader(0)
    assert a.dropped["campaign_during_lease"] == 0
    a.read(0, "r", Get(b"k"))
    c.settle()
    assert [r.result for r in c.replies["a"]][-1] == {"value": b"v", "version": 1}


def test_a_restarted_member_of_a_larger_group_still_sits_out_the_honour_period():
    """With other members, the restarted node may have acknowledged another node's
    lease before it went down: no campaign for an election timeout."""
    c = _leased_cluster()
    c.crash_restart("b")
    c.nodes["b"].campaign(0)
    c.settle()
    assert not c.nodes["b"].is_leader(0)
    assert c.nodes["b"].dropped["campaign_during_lease"] == 1
