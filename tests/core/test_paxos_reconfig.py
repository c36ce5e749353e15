"""Replica-set changes chosen through the group's own log (issue 10 part 2;
rules R1-R4 in ``dsnode.core.paxos.reconfig``)."""

from __future__ import annotations

import dataclasses
import random

import pytest
from test_paxos_node import CFG, Cluster

from dsnode.core.commands import ConfChange, Get, Put
from dsnode.core.paxos import PaxosNode
from dsnode.core.paxos.messages import Accept, Host
from dsnode.core.paxos.reconfig import GroupConf, refusal

RCFG = dataclasses.replace(CFG, reconfig=True, snapshot_interval_slots=4,
                           snapshot_chunk_bytes=64)


class RCluster(Cluster):
    """Nodes a, b, c host group 0; d and e host nothing until they become learners."""

    def __init__(self, cfg=RCFG) -> None:
        super().__init__(cfg, {0: ("a", "b", "c")}, names=("a", "b", "c", "d", "e"))

    def _make(self, n: str) -> PaxosNode:
        mine = {g: m for g, m in self.groups.items() if n in m}
        return PaxosNode(n, mine, random.Random(n), self.cfg)

    def answer(self, node: str, token):
        return next(r for r in self.replies[node] if r.token == token)

    def change(self, leader: str, token, op: str, who: str):
        getattr(self.nodes[leader], op)(0, token, who)
        self.settle()
        self.tick(self.cfg.heartbeat_interval_ticks)  # the followers learn the commit
        return self.answer(leader, token)

    def write(self, leader: str, i: int) -> None:
        self.nodes[leader].propose(0, f"w{i}", Put(b"k%d" % i, b"v%d" % i), request_id=("cl", i))
        self.settle()
        assert self.answer(leader, f"w{i}").error is None

    def host(self, leader: str, node: str) -> None:
        self.nodes[node].host_learner(0, self.nodes[leader].group_conf(0))
        self.tick(4 * self.cfg.heartbeat_interval_ticks)


def _learner_d(c: RCluster, writes: int) -> RCluster:
    """a leads; ``writes`` writes (snapshots every 4 slots); d added as a learner and
    hosting the group."""
    c.elect("a")
    for i in range(1, writes + 1):
        c.write("a", i)
    assert c.change("a", "add", "add_learner", "d").result == {"epoch": 1}
    c.host("a", "d")
    return c


def _moved(c: RCluster) -> RCluster:
    """a leads; 10 writes; d added as a learner and caught up by snapshot, promoted,
    then c removed: voters a, b, d."""
    _learner_d(c, 10)
    assert c.change("a", "pro", "promote_learner", "d").result == {"epoch": 2}
    assert c.change("a", "rm", "remove_replica", "c").result == {"epoch": 3}
    return c


def test_a_learner_catches_up_by_snapshot_then_is_promoted_and_the_old_voter_retires():
    c = _moved(RCluster())
    d = c.nodes["d"]
    assert any(type(x).__name__ == "SnapshotInstalled" for x in c.applied["d"])
    assert list(d.state_machine(0).kv.items()) == list(c.nodes["a"].state_machine(0).kv.items())
    want = GroupConf(("a", "b", "d"), (), 3)
    for n in ("a", "b", "d"):
        assert c.nodes[n].group_conf(0) == want
    assert c.nodes["c"].retired_groups() == [0]
    c.nodes["c"].remove_group(0, drop=True)
    c.cut = {"b"}  # a and d are a majority of the new voters
    c.write("a", 11)
    c.tick(c.cfg.heartbeat_interval_ticks)
    assert d.applied_index(0) == c.nodes["a"].applied_index(0)


def test_a_learner_acceptance_never_counts_toward_a_quorum():
    """Voters a, b, c and learner d: with b and c cut off, d accepting a's value
    does not choose it (Paxos quorum over voters only)."""
    c = RCluster()
    c.elect("a")
    assert c.change("a", "add", "add_learner", "d").result == {"epoch": 1}
    c.host("a", "d")
    c.cut = {"b", "c"}
    c.nodes["a"].propose(0, "w", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    assert not any(r.token == "w" for r in c.replies["a"])
    assert c.nodes["a"].applied_index(0) == 1
    c.cut = set()
    c.tick(c.cfg.heartbeat_interval_ticks)
    assert c.answer("a", "w").error is None


def test_a_learner_never_campaigns():
    c = RCluster()
    c.elect("a")
    c.change("a", "add", "add_learner", "d")
    c.host("a", "d")
    c.cut = {"a"}
    c.tick(5 * c.cfg.election_timeout_ticks)
    assert not c.nodes["d"].is_leader(0)
    assert c.nodes["d"].groups[0].max_round == c.nodes["d"].groups[0].acceptor.promised[0]


@pytest.mark.parametrize(
    ("op", "who", "conf", "why"),
    [
        (None, None, GroupConf(("a", "d", "e"), (), 1), "one voter at a time"),
        (None, None, GroupConf((), ("a", "b", "c"), 1), "at least one voter"),
        ("promote_learner", "e", None, "not a learner"),
        ("remove_replica", "e", None, "changes no member"),
        (None, None, GroupConf(("a", "b", "c"), ("d",), 7), "does not follow"),
        (None, None, GroupConf(("a", "b", "c"), ("a",), 1), "both a voter and a learner"),
    ],
)
def test_an_invalid_change_is_refused_the_same_on_every_replica(op, who, conf, why):
    c = RCluster()
    c.elect("a")
    if op is None:
        c.nodes["a"].change_config(0, "x", conf)
        c.settle()
        c.tick(c.cfg.heartbeat_interval_ticks)  # the followers learn the commit
        r = c.answer("a", "x")
    else:
        r = c.change("a", "x", op, who)
    assert r.error[0] == "conf_refused" and why in r.error[1] and r.error[2] is False
    for n in ("a", "b", "c"):
        assert c.nodes[n].group_conf(0) == GroupConf(("a", "b", "c"))
        assert c.nodes[n].state_machine(0).conf == GroupConf(("a", "b", "c"))


def test_a_second_change_is_refused_while_the_first_is_pending():
    c = RCluster()
    c.elect("a")
    a = c.nodes["a"]
    a.add_learner(0, "one", "d")
    a.add_learner(0, "two", "e")
    c.settle()
    assert c.answer("a", "one").result == {"epoch": 1}
    assert c.answer("a", "two").error[0] == "conf_pending"


def test_a_learner_is_promoted_only_once_caught_up():
    c = RCluster()
    c.elect("a")
    for i in range(1, 6):
        c.write("a", i)
    c.change("a", "add", "add_learner", "d")  # d does not host it yet: it lags
    assert c.nodes["a"].caught_up_learners(0) == []
    r = c.change("a", "pro", "promote_learner", "d")
    assert r.error[0] == "conf_pending" and "not caught up" in r.error[1]
    c.host("a", "d")
    assert c.nodes["a"].caught_up_learners(0) == ["d"] and c.nodes["b"].caught_up_learners(0) == []
    assert c.change("a", "pro2", "promote_learner", "d").result == {"epoch": 2}


def test_the_leader_does_not_propose_past_a_change_until_it_is_applied():
    """Rule R2: commands queued behind a change wait; the change is alone in its slot."""
    c = RCluster()
    c.elect("a")
    a = c.nodes["a"]
    c.cut = {"b", "c"}
    a.add_learner(0, "add", "d")
    a.propose(0, "w", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    p = a.groups[0].proposer
    assert p.fence == 1 and sorted(p.proposals) == [1] and len(p.queue) == 1
    c.cut = set()
    c.tick(c.cfg.heartbeat_interval_ticks)
    assert c.answer("a", "add").result == {"epoch": 1}
    assert c.answer("a", "w").error is None
    assert a.state_machine(0).kv.get(b"k")[0] == b"v"


def test_a_leader_that_removes_itself_hands_over_to_a_caught_up_voter():
    c = RCluster()
    c.elect("a")
    c.write("a", 1)
    assert c.change("a", "rm", "remove_replica", "a").result == {"epoch": 1}
    leaders = [n for n in ("b", "c") if c.nodes[n].is_leader(0)]
    assert leaders and not c.nodes["a"].is_leader(0)
    assert c.nodes["a"].retired_groups() == [0]
    c.write(leaders[0], 2)


def test_a_stale_candidate_learns_the_newer_configuration_before_proposing():
    """Rule R3: c missed the changes (voters become a, b, d, then a, d, ... ); it
    campaigns with its old configuration, sees a longer chosen prefix, proposes
    nothing, catches up and runs phase 1 again with the configuration it learned."""
    c = RCluster()
    c.elect("a")
    c.write("a", 1)
    c.cut = {"c"}
    c.change("a", "add", "add_learner", "d")
    c.host("a", "d")
    c.change("a", "pro", "promote_learner", "d")
    c.write("a", 2)
    c.cut = {"a"}  # the leader goes; c comes back
    sent = []
    orig = c.nodes["c"].groups[0]._send
    c.nodes["c"].groups[0]._send = lambda to, m: (sent.append((to, m)), orig(to, m))[1]
    c.nodes["c"].campaign(0)
    c.settle()
    c.tick(3 * c.cfg.catchup_retry_ticks)
    g = c.nodes["c"].groups[0]
    assert g.conf == GroupConf(("a", "b", "c", "d"), (), 2)
    # every accept c sent with entries came after it applied the configuration of epoch 2
    assert all(not m.entries or m.ballot[0] > 1 + 1 for _to, m in sent if type(m) is Accept)
    leader = [n for n in ("b", "c", "d") if c.nodes[n].is_leader(0)]
    assert leader
    c.write(leader[0], 3)


def test_the_configuration_survives_restarts_and_checkpoints():
    c = _moved(RCluster())
    c.nodes["c"].remove_group(0, drop=True)
    c.tick(1)  # commit records written
    for n in ("a", "d", "c"):
        blob = c.nodes[n].checkpoint()
        c.crash_restart(n)
        assert c.nodes[n].checkpoint() == blob, n
    assert c.nodes["d"].group_conf(0) == GroupConf(("a", "b", "d"), (), 3)
    assert c.nodes["a"].group_conf(0) == GroupConf(("a", "b", "d"), (), 3)
    assert 0 not in c.nodes["c"].groups  # dropped for good, though c starts with it
    c.tick(3 * c.cfg.election_timeout_ticks)
    leader = [n for n in ("a", "b", "d") if c.nodes[n].is_leader(0)]
    assert leader
    c.write(leader[0], 20)
    c.nodes[leader[0]].read(0, "r", Get(b"k3"))
    c.settle()
    assert c.answer(leader[0], "r").result["value"] == b"v3"


def test_refusal_is_a_function_of_the_two_configurations_only():
    cur = GroupConf(("a", "b", "c"), ("d",), 4)
    assert refusal(cur, ConfChange(("a", "b", "c", "d"), (), 5)) is None
    assert refusal(cur, ConfChange(("a", "b"), ("d",), 5)) is None
    assert "one voter" in refusal(cur, ConfChange(("a", "d"), (), 5))


def test_reconfiguration_off_refuses_every_change():
    c = RCluster(CFG)
    c.elect("a")
    r = c.change("a", "x", "add_learner", "d")
    assert r.error[0] == "conf_refused" and "off" in r.error[1]


@pytest.mark.parametrize("conf", [None, GroupConf(("a", "b"), ("c",), 3)])
def test_a_snapshot_carries_the_configuration_in_every_encoding(conf):
    """Whole, stepped and streamed snapshots hold the configuration (a sixth item);
    without one they keep the five-item format older nodes wrote, which restores as
    'unchanged since the group's creation'."""
    from dsnode.core.paxos.statemachine import DedupKV, _split_snapshot

    sm = DedupKV()
    sm.conf = conf
    for i in range(20):
        sm.apply(["cl", i + 1], Put(b"k%d" % i, b"v"), i + 1)
    whole = sm.snapshot()
    w = sm.snapshot_writer()
    parts: list[bytes] = []
    while not w.step(3):
        parts += w.take_kv_parts()
    parts += w.take_kv_parts()
    streamed = w.stream_head(sum(map(len, parts))) + b"".join(parts) + w.tail()
    stepped = sm.snapshot_writer()
    while not stepped.step(3):
        pass
    assert stepped.result() == whole
    for blob in (whole, streamed):
        assert len(_split_snapshot(blob)) == (5 if conf is None else 6)
        back = DedupKV.restore(blob)
        assert back.conf == conf and list(back.kv.items()) == list(sm.kv.items())


def test_host_and_drop_records_round_trip():
    from dsnode.core.paxos import records as rec

    raw = rec.host(0, ("a", "b"), ("d",), 2, 17)
    assert rec.decode(raw) == ["host", 0, ["a", "b"], ["d"], 2, 17]
    assert rec.decode(rec.drop("g")) == ["drop", "g"]


def test_a_learner_restored_from_a_snapshot_takes_the_configuration_from_it():
    """d hosted as a learner, caught up by snapshot, restarted with only its host
    record, snapshot file and what followed: it recovers the group's configuration."""
    c = RCluster()
    c.elect("a")
    for i in range(1, 11):
        c.write("a", i)
    c.change("a", "add", "add_learner", "d")
    c.host("a", "d")
    c.change("a", "pro", "promote_learner", "d")
    c.tick(1)
    assert c.files["d"]  # d keeps the snapshot it installed in its own file
    c.crash_restart("d")
    assert c.nodes["d"].group_conf(0) == GroupConf(("a", "b", "c", "d"), (), 2)
    assert c.nodes["d"].groups[0].voter


def test_node_heartbeats_follow_the_configuration():
    """A node added as a learner becomes a peer of the group's nodes (node heartbeats,
    liveness), and a removed one stops being one once nothing else links them."""
    c = RCluster()
    c.elect("a")
    c.change("a", "add", "add_learner", "d")
    assert "d" in c.nodes["a"].peers and "d" in c.nodes["b"].peers
    c.host("a", "d")
    c.change("a", "rm", "remove_replica", "d")
    c.tick(c.cfg.heartbeat_interval_ticks)
    assert "d" not in c.nodes["a"].peers


def test_a_leader_waiting_for_a_prefix_nobody_left_holds_runs_phase_1_again():
    """Rule R3's catch-up is bounded: the node that reported the longer chosen prefix
    goes away before serving it; after two election timeouts without progress the
    leader runs phase 1 again among those left, which re-proposes what they accepted."""
    c = RCluster()
    c.elect("a")
    c.cut = {"c"}
    c.nodes["a"].propose(0, "w", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()  # chosen at a (b accepted it but has not heard the commit)
    assert c.nodes["a"].applied_index(0) == 1 and c.nodes["b"].applied_index(0) == 0
    c.cut = {"b"}
    c.nodes["c"].campaign(0)
    c.settle(rounds=2)  # a's promise (chosen through 1) makes c a leader that must catch up
    g = c.nodes["c"].groups[0]
    assert c.nodes["c"].is_leader(0) and g.proposer.catchup_to == 1
    c.cut = {"a"}  # gone before it served anything
    c.tick(3 * c.cfg.election_timeout_ticks)
    leader = [n for n in ("b", "c") if c.nodes[n].is_leader(0)]
    assert leader and c.nodes[leader[0]].state_machine(0).kv.get(b"k")[0] == b"v"
    c.write(leader[0], 2)


def _applied_values(c: RCluster, n: str) -> dict[int, bytes]:
    return {x.slot: x.value for x in c.applied[n] if type(x).__name__ == "Applied"}


def test_a_replica_added_again_answers_nothing_before_it_has_caught_up():
    """b is removed (its data dropped) and added again as a fresh learner while c,
    cut off all along, still holds the first configuration {a, b, c}. c campaigns with
    a and d unreachable: b's empty acceptor must not promise or accept under its old
    identity (c would then choose its own value in slots already chosen), until it
    has applied the change that added it."""
    c = RCluster()
    c.elect("a")
    c.cut = {"c"}
    c.change("a", "add", "add_learner", "d")
    c.host("a", "d")
    assert c.change("a", "pro", "promote_learner", "d").result == {"epoch": 2}
    assert c.change("a", "rm", "remove_replica", "b").result == {"epoch": 3}
    c.tick(c.cfg.heartbeat_interval_ticks)
    assert c.nodes["b"].retired_groups() == [0]
    c.nodes["b"].remove_group(0, drop=True)
    assert c.change("a", "re", "add_learner", "b").result == {"epoch": 4}
    c.nodes["b"].host_learner(0, c.nodes["a"].group_conf(0))
    c.cut = {"a", "d"}
    c.nodes["c"].campaign(0)
    c.settle()
    assert not c.nodes["c"].is_leader(0)
    assert c.nodes["b"].groups[0].joining and c.nodes["b"].dropped["joining"] >= 1
    c.cut = set()
    c.tick(6 * c.cfg.election_timeout_ticks)
    assert not c.nodes["b"].groups[0].joining
    mine = _applied_values(c, "a")
    for n in ("b", "c", "d"):
        theirs = _applied_values(c, n)
        assert all(mine[s] == v for s, v in theirs.items() if s in mine), n


def test_a_leader_invites_a_replica_it_removed_when_it_is_added_back():
    """A leader forgets what it knew of a replica's progress when a configuration adds
    the replica (back): b, removed (the change that made a run phase 1 again, rule R4,
    so b kept acknowledging a's commits as a removed replica) and dropped, is added
    back as a learner; a must invite it (``Host``) and feed it from nothing, not take
    b's acknowledgements from before its data was dropped for its progress (then it
    never invites b, and never promotes it). Regression: found by the simulator's
    membership mode (issue 10 part 4), where a node that a ring change moved off a
    partition and the next moved back never hosted it, so the moves never finished."""
    c = _learner_d(RCluster(), 3)
    assert c.change("a", "rm", "remove_replica", "b").result == {"epoch": 2}
    c.tick(c.cfg.heartbeat_interval_ticks)
    assert c.nodes["b"].retired_groups() == [0]
    c.nodes["b"].remove_group(0, drop=True)
    c.nodes["b"].set_contacts(("a", "c"))  # it heartbeats them: a sees it alive
    invites: list[Host] = []
    c.nodes["b"]._invited = invites.append  # (no ring here: the test hosts it)
    assert c.change("a", "re", "add_learner", "b").result == {"epoch": 3}
    c.tick(2 * c.cfg.heartbeat_interval_ticks)
    assert invites, "a never invited b"
    m = invites[0]
    c.nodes["b"].host_learner(0, GroupConf(m.voters, m.learners, m.epoch, m.slot))
    c.tick(6 * c.cfg.heartbeat_interval_ticks)
    assert "b" in c.nodes["a"].caught_up_learners(0)
    assert c.change("a", "pro", "promote_learner", "b").result == {"epoch": 4}
    c.write("a", 4)
    c.tick(c.cfg.heartbeat_interval_ticks)
    assert list(c.nodes["b"].state_machine(0).kv.items()) == list(
        c.nodes["a"].state_machine(0).kv.items())


def test_a_quiesced_leader_sees_a_learner_that_caught_up_behind_its_back():
    """A leader quiesced while its learner d was cut off (it was no live member to
    wait for), then d came back and caught up: d's acknowledgement of the quiesce
    heartbeat came before d had the last slot, and a quiet group acknowledges nothing
    more, so the leader kept d behind for good and never let it be promoted
    (``caught_up_learners``). A quiesced leader with a live learner behind wakes up
    until the learner's acks show it caught up. Regression: found by the simulator's
    membership mode (issue 10 part 4): a ring's moves stuck on a learner never
    promoted."""
    c = _learner_d(RCluster(dataclasses.replace(RCFG, quiesce=True)), 3)
    c.cut = {"d"}
    c.tick(3 * c.cfg.election_timeout_ticks)
    c.write("a", 4)
    c.tick(3 * c.cfg.election_timeout_ticks)
    g = c.nodes["a"].groups[0]
    assert g.quiesced and c.nodes["a"].caught_up_learners(0) == []
    c.cut = set()
    c.tick(6 * c.cfg.election_timeout_ticks)
    assert c.nodes["d"].applied_index(0) == g.log.chosen_through
    assert c.nodes["a"].caught_up_learners(0) == ["d"]
    assert c.change("a", "pro", "promote_learner", "d").result == {"epoch": 2}
    c.tick(6 * c.cfg.election_timeout_ticks)
    assert g.quiesced  # and quiet again once it has nothing to wait for


def test_a_stale_candidate_learns_the_newer_configuration_from_a_promise():
    """Rule R3 before winning: c, cut off while b was removed (voters a, b, c, d become
    a, c, d), campaigns with its old configuration, in which it cannot win (a is gone,
    b dropped the group); d's promise shows a longer chosen prefix, so c catches up
    from d, learns the configuration in which c and d are a majority, and a leader is
    elected. Regression: found by the simulator's membership mode (issue 10 part 4),
    where the stale candidate's elections kept resetting the up-to-date voter's timer
    (it promised each one), so that nobody led the partition for hundreds of ticks."""
    c = _learner_d(RCluster(dataclasses.replace(RCFG, leader_stickiness=False, lease_ticks=0)), 2)
    assert c.change("a", "pro", "promote_learner", "d").result == {"epoch": 2}
    c.cut = {"c"}
    assert c.change("a", "rm", "remove_replica", "b").result == {"epoch": 3}
    c.tick(c.cfg.heartbeat_interval_ticks)
    c.nodes["b"].remove_group(0, drop=True)
    c.cut = {"a"}
    g = c.nodes["c"].groups[0]
    assert g.conf.epoch == 2
    c.nodes["c"].campaign(0)
    c.settle()
    assert g.conf == GroupConf(("a", "c", "d"), (), 3, g.conf.slot)
    c.tick(4 * c.cfg.election_timeout_ticks)
    assert [n for n in "cd" if c.nodes[n].is_leader(0)]


def test_a_leader_invites_again_a_learner_behind_and_silent():
    """A leader re-invites a learner whose acknowledgements stopped below the chosen
    prefix (``Host``). The acknowledgements may have come from an old copy of the
    group on the learner's node, lagging from before a change removed it: that copy
    then applies its removal and drops the group, although a later change added the
    node back. Regression: found by the simulator's membership mode (issue 10 part 4);
    the leader took the old copy's acknowledgement for the learner's own progress and
    never invited it."""
    c = _learner_d(RCluster(), 2)
    c.nodes["d"].remove_group(0, drop=True)  # (d's copy goes, after it acknowledged)
    c.nodes["d"].set_contacts(("a", "b", "c"))
    p = c.nodes["a"].groups[0].proposer
    assert 0 < p.match["d"]
    c.write("a", 3)  # the chosen prefix moves on, d's acknowledgements do not
    invites: list[Host] = []
    c.nodes["d"]._invited = invites.append
    c.tick(2 * c.cfg.leader_quorum_timeout_ticks)
    assert invites, "a never invited d again"
