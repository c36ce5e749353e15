"""Leadership transfer and preferred leaders (issue 8.4, in the core)."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from test_paxos_lease import LEASE_CFG
from test_paxos_node import CFG, Cluster

from dsnode.core.commands import Get, Put
from dsnode.core.errors import PeerMisbehaved
from dsnode.core.paxos.messages import Accepted, Prepare, TimeoutNow, from_wire, to_wire

STICKY = dataclasses.replace(LEASE_CFG, leader_stickiness=True)


def _leader(c: Cluster, group=0) -> list[str]:
    return [n for n in c.nodes if c.nodes[n].is_leader(group)]


@pytest.mark.parametrize("cfg", [CFG, STICKY], ids=["plain", "sticky-with-leases"])
def test_transfer_moves_leadership_at_once_even_past_stickiness_and_leases(cfg):
    c = Cluster(cfg)
    c.tick(cfg.election_timeout_ticks)
    c.elect("a")
    c.nodes["a"].propose(0, "w", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    c.tick(cfg.heartbeat_interval_ticks)
    assert c.nodes["a"].transfer_leadership(0, "b")
    c.settle()  # no tick: no election timeout plays any part
    assert _leader(c) == ["b"]
    assert c.nodes["a"].leader_of(0) == "b" and not c.nodes["a"].lease_held(0)
    c.nodes["b"].read(0, "r", Get(b"k"))
    c.settle()
    assert c.replies["b"][-1].result == {"value": b"v", "version": 1}


def test_transfer_finishes_what_is_in_flight_and_refuses_new_commands():
    c = Cluster()
    c.elect("a")
    a = c.nodes["a"]
    a.propose(0, "before", Put(b"k", b"1"), request_id=("cl", 1))
    a.transfer_leadership(0, "b")
    a.propose(0, "during", Put(b"k", b"2"), request_id=("cl", 2))
    c.settle()
    by = {r.token: r for r in c.replies["a"]}
    assert by["before"].result == {"succeeded": True, "version": 1}
    code, message, indeterminate = by["during"].error
    assert (code, indeterminate) == ("unavailable", False) and "moving to b" in message
    assert _leader(c) == ["b"]


def test_a_transfer_to_an_unreachable_member_costs_one_election_timeout():
    c = Cluster()
    c.elect("a")
    a = c.nodes["a"]
    a.propose(0, "w", Put(b"k", b"1"), request_id=("cl", 1))  # in flight while b is cut
    c.cut = {"b"}
    c.drain("a")
    # the put's accepts to b are lost; c's acceptance chooses it, then a sends TimeoutNow
    # into the void; nobody campaigns, and a steps back... as a follower with hint b
    a.transfer_leadership(0, "b")
    c.settle()
    assert a.dropped["leadership_transferred"] == 1
    c.tick(3 * CFG.election_timeout_ticks)
    assert len(_leader(c)) == 1  # someone leads again after the timeouts


def test_transfer_abandoned_while_commands_stay_in_flight():
    """The target is fine but a quorum is not: nothing in flight gets chosen, so the
    TimeoutNow never goes and the leader gives the transfer up after the timeout."""
    c = Cluster(dataclasses.replace(CFG, leader_quorum_timeout_ticks=100))
    c.elect("a")
    a = c.nodes["a"]
    c.cut = {"b", "c"}
    a.propose(0, "w", Put(b"k", b"1"), request_id=("cl", 1))
    a.transfer_leadership(0, "b")
    c.settle()
    assert a.groups[0].transfer is not None
    c.tick(CFG.election_timeout_ticks)
    assert a.groups[0].transfer is None and a.is_leader(0)
    assert a.dropped["leadership_transfer_abandoned"] == 1
    a.propose(0, "w2", Put(b"k", b"2"), request_id=("cl", 2))  # taken again, not refused
    c.settle()
    assert "w2" not in {r.token for r in c.replies["a"]}
    assert 2 in a.groups[0].proposer.proposals


def test_only_the_leader_transfers_and_only_to_another_member():
    c = Cluster()
    c.elect("a")
    assert not c.nodes["b"].transfer_leadership(0, "c")
    assert not c.nodes["a"].transfer_leadership(0, "a")
    assert not c.nodes["a"].transfer_leadership(0, "zz")
    assert not c.nodes["a"].transfer_leadership(7, "b")


def test_a_stale_timeout_now_is_ignored():
    c = Cluster()
    c.elect("a")
    c.elect("b")
    c.nodes["c"].step("a", TimeoutNow(0, (1, "a")))  # a's old ballot, below c's promise
    c.settle()
    assert _leader(c) == ["b"] and c.nodes["c"].dropped["stale_timeout_now"] == 1


def test_preferred_leader_takes_over_once_caught_up_and_alive():
    """Preference order b, c, a: a wins the first election, then hands over to b after
    three election timeouts; with b cut off it goes to c instead."""
    cfg = dataclasses.replace(CFG, prefer_leader=True)
    c = Cluster(cfg, groups={0: ("b", "c", "a")})
    c.elect("a")
    c.nodes["a"].propose(0, "w", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    c.tick(3 * cfg.election_timeout_ticks + cfg.heartbeat_interval_ticks)
    assert _leader(c) == ["b"]
    c.cut = {"b"}
    for _ in range(10 * cfg.election_timeout_ticks):
        c.tick()
        if _leader(c) == ["c"]:
            break
    assert "c" in _leader(c)


def test_wire_forms_and_older_peers():
    for m in (TimeoutNow(3, (2, "a")), Prepare(0, (1, "a"), 5, (4, "b")),
              Accepted(0, (1, "a"), True, (1, "a"), (4, 5), 2, 9)):
        assert from_wire(msgpack.unpackb(msgpack.packb(to_wire(m)))) == m
    # peers that predate the trailing fields
    assert from_wire(["px.prepare", 0, [1, "a"], 5]) == Prepare(0, (1, "a"), 5, (0, ""))
    assert from_wire(["px.accepted", 0, [1, "a"], True, [1, "a"], [4], 2]).chosen_through == 0
    for bad in (["px.timeout_now", 0, [1]], ["px.prepare", 0, [1, "a"], 5, 7],
                ["px.prepare", 0, [1, "a"], 5, "b"]):
        with pytest.raises(PeerMisbehaved):
            from_wire(bad)


def test_a_stale_hand_over_frees_no_acceptor_from_a_newer_leader():
    """a handed over in ballot (1, a) long ago and has led again since, in (2, a), with
    a lease: a prepare citing the old hand-over must not be promised (it would elect b
    while a serves reads from its lease); one citing a's current ballot is."""
    c = Cluster(STICKY)
    c.tick(STICKY.election_timeout_ticks)
    c.elect("a")
    c.elect("a")  # led again, in a newer ballot
    c.tick(STICKY.heartbeat_interval_ticks)
    gc = c.nodes["c"].groups[0]
    current = gc.acceptor.promised
    assert current[1] == "a" and current[0] >= 2 and c.nodes["a"].lease_held(0)
    stale = (current[0] - 1, "a")
    c.nodes["c"].step("b", Prepare(0, (current[0] + 5, "b"), 1, stale))
    assert gc.acceptor.promised == current
    assert c.nodes["c"].dropped["prepare_while_leader_live"] == 1
    c.nodes["c"].step("b", Prepare(0, (current[0] + 5, "b"), 1, current))
    assert gc.acceptor.promised == (current[0] + 5, "b")
