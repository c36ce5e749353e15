"""PaxosNode scenarios on an in-memory, instant, lossless network.

PMS = Paxos Made Simple; PMMC = Paxos Made Moderately Complex.
"""

from __future__ import annotations

import dataclasses
import random
import zlib

import msgpack
import pytest

from dsnode.core.commands import STALE, Get, Put
from dsnode.core.effects import Ready
from dsnode.core.errors import PeerMisbehaved, StateLost
from dsnode.core.paxos import Applied, PaxosConfig, PaxosNode, Role, SnapshotInstalled
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.messages import (
    Accept,
    CatchupReq,
    NodeHeartbeat,
    Prepare,
    PreVote,
    PreVoteReply,
    from_wire,
    to_wire,
)
from dsnode.core.paxos.node import RESOLVE_RIDE_TICKS
from dsnode.core.paxos.statemachine import DedupKV
from dsnode.core.twopc.records import TxForget, TxResolve
from dsnode.sim.shell import drain, step_snapshot

NODES = ("a", "b", "c")
CFG = PaxosConfig(
    election_timeout_ticks=10,
    heartbeat_interval_ticks=2,
    snapshot_interval_slots=1000,
    leader_stickiness=False,
    formation_group=None,  # slot numbers in these tests start with the clients' commands
)


class Cluster:
    def __init__(self, cfg: PaxosConfig = CFG, groups=None, names=NODES) -> None:
        self.cfg = cfg
        self.names = names
        self.groups = groups or {0: names}
        self.disk = {n: [] for n in names}
        self.nodes = {n: self._make(n) for n in names}
        self.queue: list[tuple[str, str, object]] = []
        self.replies: dict[str, list] = {n: [] for n in names}
        self.applied: dict[str, list] = {n: [] for n in names}
        self.cut: set[str] = set()  # isolated nodes
        # Requested snapshots (Ready.snapshots): encoded at once by default, like a
        # shell with unlimited time; when held, they wait here for the test.
        self.hold_snapshots = False
        self.snap_jobs: dict[str, list] = {n: [] for n in names}
        # Peers' snapshots to decode (Ready.restores): decoded at once by default; when
        # held, they wait here for the test.
        self.hold_restores = False
        self.restore_jobs: dict[str, list] = {n: [] for n in names}
        # the shell's snapshot files: node -> group -> newest StoredSnapshot
        self.files: dict[str, dict] = {n: {} for n in names}

    def _make(self, n: str) -> PaxosNode:
        return PaxosNode(n, self.groups, random.Random(n), self.cfg)

    def drain(self, n: str) -> Ready:
        """The shared shell (dsnode/sim/shell.py); instant, always-durable disk."""

        def out(sends: list, replies: list) -> None:
            for dst, msg in sends:
                if n not in self.cut and dst not in self.cut:
                    self.queue.append((n, dst, to_wire(msg)))  # through the wire form
            self.replies[n].extend(replies)

        r = drain(self.nodes[n], persist=self.disk[n].extend, out=out,
                  applied=self.applied[n].extend, restores=self.restore_jobs[n].extend,
                  snapshots=self.snap_jobs[n].extend)
        if not self.hold_restores and self.restore_jobs[n]:
            self.finish_restores(n)
            self.drain(n)
        if not self.hold_snapshots and self.snap_jobs[n]:
            self.finish_snapshots(n)
            self.drain(n)
        return r

    def finish_restores(self, n: str) -> None:
        jobs, self.restore_jobs[n] = self.restore_jobs[n], []
        for job in jobs:
            self.nodes[n].snapshot_restored(job.group, job.index, job.restore(job.blob))

    def finish_snapshots(self, n: str) -> None:
        jobs, self.snap_jobs[n] = self.snap_jobs[n], []
        for job in jobs:
            while (snap := step_snapshot(job, 3)) is None:  # a few entries per step
                pass
            self.files[n][job.group] = snap
            self.nodes[n].snapshot_ready(job.group, job.index, snap.blob)

    def settle(self, rounds: int = 50) -> None:
        for _ in range(rounds):
            for n in self.names:
                if n in self.nodes:
                    self.drain(n)
            if not self.queue:
                return
            q, self.queue = self.queue, []
            for src, dst, wire in q:
                if dst in self.nodes:
                    self.nodes[dst].step(src, from_wire(wire))

    def tick(self, n_ticks: int = 1) -> None:
        for _ in range(n_ticks):
            for node in self.nodes.values():
                node.tick()
            self.settle()

    def elect(self, n: str, group=0) -> None:
        self.nodes[n].groups[group].become_candidate()
        self.settle()
        assert self.nodes[n].is_leader(group)

    def crash_restart(self, n: str) -> None:
        self.nodes[n] = self._make(n)
        self.nodes[n].recover(self.disk[n], self.files[n])


def results(replies):
    return [r.result for r in replies]


def test_single_leader_commits_and_replies_after_quorum():
    """PMS 3: the leader runs phase 2 for a client command; the reply comes
    once the command is chosen and applied, on every replica in slot order."""
    c = Cluster()
    c.elect("a")
    c.nodes["a"].propose(0, "t1", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    assert results(c.replies["a"]) == [{"succeeded": True, "version": 1}]
    c.tick(3)  # the heartbeat carries the commit index to followers
    for n in NODES:
        assert c.nodes[n].state_machine(0).kv.get(b"k") == (b"v", 1)


def test_commands_are_batched_into_one_slot_and_pipelined():
    """Issue 3: many commands per slot (batching) in one flush."""
    c = Cluster()
    c.elect("a")
    for i in range(10):
        c.nodes["a"].propose(0, i, Put(b"k%d" % i, b"v"), request_id=("cl", i + 1))
    c.settle()
    assert len(c.replies["a"]) == 10
    slots = [x.slot for x in c.applied["a"] if isinstance(x, Applied) and x.value]
    assert len(slots) == 1


def test_commands_queued_beyond_the_inflight_window_go_out_as_slots_are_chosen():
    """A leader with more commands queued than its in-flight window proposes the
    rest as slots are chosen, without waiting for another proposal to the group
    (the 2PC simulator found the last resolves of a quiet partition stuck)."""
    c = Cluster(dataclasses.replace(CFG, inflight_slots_max=1, batch_commands_max=1))
    c.elect("a")
    for i in range(4):
        c.nodes["a"].propose(0, i, Put(b"k%d" % i, b"v"), request_id=("cl", i + 1))
    c.settle()
    assert [r.token for r in c.replies["a"]] == [0, 1, 2, 3]


def test_large_values_are_split_across_slots_and_messages_by_bytes():
    """Batching is bounded by bytes as well as count, so no slot and no Accept
    grows past what a peer frame can carry (a 1 MiB value times 64 would)."""
    cfg = PaxosConfig(election_timeout_ticks=10, heartbeat_interval_ticks=2,
                      snapshot_interval_slots=1000, leader_stickiness=False,
                      batch_bytes_max=100_000, message_bytes_max=250_000)
    c = Cluster(cfg)
    c.elect("a")
    sent: list = []
    for i in range(10):
        c.nodes["a"].propose(0, i, Put(b"k%d" % i, b"x" * 60_000))
    r = c.nodes["a"].ready()
    c.disk["a"].extend(r.persist)
    sent = [m for _dst, m in r.send if isinstance(m, Accept)]
    for dst, msg in r.send:
        c.queue.append(("a", dst, to_wire(msg)))
    c.replies["a"].extend(r.reply)
    c.settle()
    assert sorted(x.token for x in c.replies["a"]) == list(range(10))
    assert sent and all(sum(len(v) for _s, v in m.entries) <= 250_000 for m in sent)
    slots = {s for m in sent for s, _v in m.entries}
    assert len(slots) >= 5  # at most one 60 kB command fits in a 100 kB slot with another


def test_follower_rejects_client_write_with_leader_hint():
    """A follower answers a write definitely (no effect) with a leader hint."""
    c = Cluster()
    c.elect("a")
    c.tick(1)
    c.nodes["b"].propose(0, "t", Put(b"k", b"v"))
    c.settle()
    (reply,) = c.replies["b"]
    assert reply.error == ("unavailable", "not leader; leader=a", False)
    assert c.nodes["b"].leader_of(0) == "a"


def test_duplicate_client_command_is_applied_once():
    """Commands carry (client_id, seq); the state machine applies a retry once
    and answers it with the first result."""
    c = Cluster()
    c.elect("a")
    for t in ("t1", "t2"):
        c.nodes["a"].propose(0, t, Put(b"k", b"v"), request_id=("cl", 1))
        c.settle()
    assert results(c.replies["a"]) == [{"succeeded": True, "version": 1}] * 2
    assert c.nodes["a"].state_machine(0).kv.revision == 1


def test_new_leader_reproposes_accepted_value_after_leader_crash():
    """PMS 3 / PMMC 3: a value accepted by a majority survives the leader; the
    next leader learns it in phase 1 and re-proposes it."""
    c = Cluster()
    c.elect("a")
    c.nodes["a"].propose(0, "t", Put(b"k", b"v"), request_id=("cl", 1))
    c.drain("a")
    # deliver the accepts to b only, and drop everything else: a dies now
    c.queue = [(s, d, m) for s, d, m in c.queue if d == "b"]
    del c.nodes["a"]
    c.settle()
    c.elect("b")
    c.tick(3)
    assert c.nodes["b"].state_machine(0).kv.get(b"k") == (b"v", 1)


def test_leader_loss_makes_pending_writes_indeterminate():
    """A proposal in flight when leadership is lost may still be chosen:
    its reply is unavailable with indeterminate=True."""
    c = Cluster()
    c.elect("a")
    c.cut = {"a"}
    c.nodes["a"].propose(0, "t", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    c.cut = set()
    c.elect("b")  # b's accepts reach a, which steps down
    c.tick(3)
    (reply,) = c.replies["a"]
    assert reply.error[0] == "unavailable" and reply.error[2] is True


def test_linearizable_read_waits_for_quorum_confirmation():
    """Read index: the leader serves a read only after a quorum confirms it is
    still leader in a round started after the read arrived."""
    c = Cluster()
    c.elect("a")
    c.nodes["a"].propose(0, "w", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    c.cut = {"a"}
    c.nodes["a"].read(0, "r", Get(b"k"))
    c.settle()
    assert [r.token for r in c.replies["a"]] == ["w"]  # no quorum: no answer
    c.cut = set()
    c.tick(2)  # the next heartbeat round reaches the quorum
    assert c.replies["a"][-1].result == {"value": b"v", "version": 1}


def test_deposed_leader_does_not_serve_linearizable_reads():
    """A leader that a newer ballot replaced cannot confirm a read round: its
    pending reads fail (definitely) instead of returning stale data."""
    c = Cluster()
    c.elect("a")
    c.cut = {"a"}
    c.nodes["a"].read(0, "r", Get(b"k"))
    c.settle()
    c.cut = set()
    c.elect("b")
    c.tick(3)
    (reply,) = c.replies["a"]
    code, _message, indeterminate = reply.error
    assert (code, indeterminate) == ("unavailable", False)


def test_stale_read_is_served_locally_by_any_replica():
    c = Cluster()
    c.nodes["c"].read(0, "r", Get(b"k", STALE))
    c.settle()
    assert c.replies["c"][0].result == {"value": None, "version": 0}


def test_recovery_restores_promise_so_a_lower_ballot_is_refused():
    """PMS 2.3: a promise survives a crash (one recovery path, STYLE contract 4)."""
    c = Cluster()
    c.elect("b")  # ballot (1, b) promised by everyone
    c.crash_restart("c")
    g = c.nodes["c"].groups[0]
    assert g.acceptor.promised == (1, "b")
    reply = g.acceptor.on_prepare(Prepare(0, (1, "a"), 1), [])
    assert reply.ok is False


def test_follower_of_a_live_leader_ignores_other_prepares_when_sticky():
    """Leader stickiness (liveness only; ignoring a prepare is always safe):
    a node cut off from a live leader cannot depose it."""
    c = Cluster(PaxosConfig(leader_stickiness=True))
    c.elect("a")
    c.nodes["b"].groups[0].become_candidate()
    c.settle()
    assert c.nodes["a"].is_leader(0) and not c.nodes["b"].is_leader(0)
    assert c.nodes["c"].dropped["prepare_while_leader_live"] == 1


def test_election_timeout_elects_exactly_one_leader():
    """Randomized, seeded timeouts: with no leader, ticking elects one."""
    c = Cluster()
    c.tick(60)
    leaders = [n for n in NODES if c.nodes[n].is_leader(0)]
    assert len(leaders) == 1


def _cluster_with_c_behind_compaction() -> Cluster:
    """12 writes chosen (and snapshotted every 4 slots) while c was cut off."""
    cfg = PaxosConfig(snapshot_interval_slots=4, snapshot_chunk_bytes=64, leader_stickiness=False)
    c = Cluster(cfg)
    c.elect("a")
    c.cut = {"c"}
    for i in range(12):
        c.nodes["a"].propose(0, i, Put(b"k%d" % i, b"x" * 20), request_id=("cl", i + 1))
        c.settle()
    return c


def test_a_peers_snapshot_is_installed_only_once_the_shell_decoded_it():
    """Decoding a peer's snapshot is the shell's (issue 7.5: off the event loop's
    turn): the core hands out ``SnapshotRestore`` and keeps its state, asks no peer
    for more meanwhile, and installs the decoded state machine on
    ``snapshot_restored``."""
    c = _cluster_with_c_behind_compaction()
    c.hold_restores = True
    c.cut = set()
    c.tick(20)
    g = c.nodes["c"].groups[0]
    [job] = c.restore_jobs["c"]
    assert g.snap_restoring == job.index > c.nodes["c"].applied_index(0)
    assert not any(isinstance(x, SnapshotInstalled) for x in c.applied["c"])
    sent: list = []
    real_drain = c.drain

    def drain(n: str) -> Ready:
        r = real_drain(n)
        sent.extend(m for _, m in r.send if n == "c")
        return r

    c.drain = drain
    c.tick(30)  # catch-up retries fall due: none goes out while decoding
    assert not any(isinstance(m, CatchupReq) for m in sent)
    assert c.nodes["c"].applied_index(0) < job.index
    c.hold_restores = False
    c.finish_restores("c")
    c.settle()
    c.tick(10)
    assert any(isinstance(x, SnapshotInstalled) for x in c.applied["c"])
    assert g.snap_restoring is None
    a_kv, c_kv = c.nodes["a"].state_machine(0).kv, c.nodes["c"].state_machine(0).kv
    assert sorted(c_kv.items()) == sorted(a_kv.items())
    assert c.nodes["c"].applied_index(0) == c.nodes["a"].applied_index(0)


@pytest.mark.parametrize(
    ("index_delta", "decoded", "counter"),
    [(1, True, "snap_restore_unexpected"), (0, False, "snap_restore_failed")],
)
def test_a_restore_that_is_unexpected_or_failed_changes_nothing(index_delta, decoded, counter):
    """A restore for another index than the one handed out, or one the shell could
    not decode (None), is dropped and counted; the state stays, and for a failed
    one catch-up asks again and installs the snapshot in the end."""
    c = _cluster_with_c_behind_compaction()
    c.hold_restores = True
    c.cut = set()
    c.tick(20)
    [job] = c.restore_jobs["c"]
    c.restore_jobs["c"] = []
    node = c.nodes["c"]
    before = node.applied_index(0)
    sm = job.restore(job.blob) if decoded else None
    node.snapshot_restored(0, job.index + index_delta, sm)
    assert node.dropped[counter] == 1
    assert node.applied_index(0) == before < job.index
    c.hold_restores = False
    if index_delta:
        node.snapshot_restored(0, job.index, sm)
    c.tick(30)
    assert node.applied_index(0) == c.nodes["a"].applied_index(0)


def test_lagging_replica_catches_up_by_snapshot_after_compaction():
    """A replica behind the leader's compaction point gets the snapshot in
    checksummed chunks, then the rest from the log."""
    c = _cluster_with_c_behind_compaction()
    assert c.nodes["c"].applied_index(0) == 0
    c.cut = set()
    c.tick(20)
    assert any(isinstance(x, SnapshotInstalled) for x in c.applied["c"])
    a_kv, c_kv = c.nodes["a"].state_machine(0).kv, c.nodes["c"].state_machine(0).kv
    assert sorted(c_kv.items()) == sorted(a_kv.items())
    assert c.nodes["c"].applied_index(0) == c.nodes["a"].applied_index(0)
    snaps = [rec.decode(r) for r in c.disk["c"] if rec.decode(r)[0] == rec.SNAPFILE]
    assert snaps, "an installed snapshot is stored in a file and the WAL names it"
    assert c.files["c"][0].index == snaps[-1][2]


def test_groups_are_independent_on_one_node():
    """One node hosts many groups; messages are routed by group id."""
    c = Cluster(groups={0: NODES, "meta": NODES})
    c.elect("a", 0)
    c.elect("b", "meta")
    c.nodes["b"].propose("meta", "m", Put(b"ring", b"1"))
    c.nodes["a"].propose(0, "p", Put(b"k", b"v"))
    c.settle()
    assert results(c.replies["a"]) == [{"succeeded": True, "version": 1}]
    assert results(c.replies["b"]) == [{"succeeded": True, "version": 1}]


def test_message_from_unknown_group_or_non_member_is_dropped_and_counted():
    c = Cluster()
    n = c.nodes["a"]
    n.step("b", Accept(99, (1, "b"), (), 0))
    n.step("zz", Accept(0, (1, "zz"), (), 0))
    assert n.dropped["unknown_group"] == 1 and n.dropped["not_member"] == 1


@pytest.mark.parametrize(
    "wire",
    [
        ["px.accept", 0, [1, "b"], [[1, "not-bytes"]], 0, 0],
        ["px.prepare", 0, [1], 1],
        ["px.nope", 0],
        ["px.accept", 0, [1, "b"], [], -1, 0],
        ["px.prevote", 0, [1, "b"], -1],
        ["px.prevote", 0, [1, "b"]],
        ["px.prevote_reply", 0, [1, "b"], "yes"],
        ["px.prevote_reply", 0, "b", True],
        "garbage",
    ],
)
def test_malformed_wire_message_is_rejected_as_peer_misbehaviour(wire):
    with pytest.raises(PeerMisbehaved):
        from_wire(wire)


@pytest.mark.parametrize(
    "m",
    [
        Accept(3, (2, "a"), ((5, b"v"),), 4, 7),
        PreVote("meta", (4, "b"), 17),
        PreVoteReply(3, (4, "b"), False),
    ],
)
def test_messages_round_trip_through_msgpack(m):
    assert from_wire(msgpack.unpackb(msgpack.packb(to_wire(m)), raw=False)) == m


# ---------------------------------------------------------------- pre-vote
# Raft thesis 9.6 (pre-vote), as in etcd raft's MsgPreVote: a node first asks
# whether a quorum would elect it, changing no state, and runs phase 1 only then.

# the defaults: pre_vote and leader_stickiness on
STICKY = PaxosConfig(
    election_timeout_ticks=10, heartbeat_interval_ticks=2, snapshot_interval_slots=1000
)


def ballot_state(c: Cluster, n: str, group=0):
    g = c.nodes[n].groups[group]
    return g.max_round, g.acceptor.promised, len(c.disk[n])


def test_isolated_node_does_not_raise_its_ballot_while_it_cannot_reach_a_quorum():
    """A node cut off from every peer keeps asking for pre-votes, but since a
    pre-vote raises no round, promises nothing and persists nothing, its
    max_round, its promise and its disk stay exactly as they were."""
    c = Cluster(STICKY)
    c.elect("a")
    c.tick(5)
    c.cut = {"c"}
    before = ballot_state(c, "c")
    sent: list = []
    for _ in range(300):
        c.nodes["c"].tick()
        r = c.drain("c")
        sent.extend(type(m) for _dst, m in r.send)
        assert c.nodes["c"].groups[0].role in (Role.FOLLOWER, Role.PRECANDIDATE)
    assert ballot_state(c, "c") == before
    assert PreVote in sent and Prepare not in sent


def test_without_pre_vote_an_isolated_node_keeps_raising_its_ballot():
    """The old behaviour (pre_vote=False), kept for comparison: every election
    timeout raises max_round and persists a promise of the new ballot."""
    c = Cluster(PaxosConfig(pre_vote=False))
    c.elect("a")
    c.cut = {"c"}
    round0, promised0, disk0 = ballot_state(c, "c")
    c.tick(300)
    round1, promised1, disk1 = ballot_state(c, "c")
    assert round1 > round0 + 5 and promised1 > promised0 and disk1 > disk0


@pytest.mark.parametrize("pre_vote, deposed", [(True, False), (False, True)])
def test_after_heal_the_existing_leader_keeps_leading(pre_vote, deposed):
    """With pre-vote, a node that rejoins after a long partition holds no
    promise above the leader's ballot, so it accepts the leader's next Accept:
    no nack, no step-down, no new ballot. Without pre-vote its inflated promise
    nacks the leader, which steps down (the problem pre-vote fixes)."""
    c = Cluster(dataclasses.replace(STICKY, pre_vote=pre_vote))
    c.elect("a")
    ballot = c.nodes["a"].groups[0].ballot
    c.cut = {"c"}
    c.tick(300)
    assert c.nodes["a"].is_leader(0)
    c.cut = set()
    still_leading = True
    for _ in range(60):
        c.tick()
        still_leading &= c.nodes["a"].is_leader(0) and c.nodes["a"].groups[0].ballot == ballot
    assert still_leading is not deposed
    if not deposed:
        assert [c.nodes[n].leader_of(0) for n in NODES] == ["a", "a", "a"]
        c.nodes["a"].propose(0, "t", Put(b"k", b"v"), request_id=("cl", 1))
        c.tick(3)
        assert c.nodes["c"].state_machine(0).kv.get(b"k") == (b"v", 1)


def test_prevote_is_refused_while_the_voter_hears_a_live_leader():
    """A member that heard a live leader within the election timeout refuses
    the pre-vote (so does the leader), and answering changes none of its
    state. The pre-candidate, short of a quorum, never starts phase 1."""
    c = Cluster(STICKY)
    c.elect("a")
    c.tick(3)
    voter = c.nodes["c"]
    before = ballot_state(c, "c")
    voter.step("b", PreVote(0, (99, "b"), 0))
    r = c.drain("c")
    assert r.send == [("b", PreVoteReply(0, (99, "b"), False))]
    assert not r.persist and ballot_state(c, "c") == before
    assert voter.groups[0].max_round < 99  # a pre-vote's ballot is not a round seen
    c.nodes["b"].groups[0].become_precandidate()
    c.settle()
    assert c.nodes["b"].groups[0].role is Role.PRECANDIDATE
    assert c.nodes["a"].is_leader(0)
    assert c.nodes["a"].dropped["prevote_while_leader_live"] == 1
    assert c.nodes["c"].dropped["prevote_while_leader_live"] == 2


def test_prevote_is_granted_once_the_leader_is_silent_for_an_election_timeout():
    c = Cluster(STICKY)
    c.elect("a")
    c.tick(3)
    del c.nodes["a"]  # the leader dies
    voter = c.nodes["c"]
    for _ in range(STICKY.election_timeout_ticks):
        voter.tick()
    voter.step("b", PreVote(0, (2, "b"), 0))
    sent = [(dst, m) for dst, m in c.drain("c").send if type(m) is not NodeHeartbeat]
    assert sent == [("b", PreVoteReply(0, (2, "b"), True))]


def test_prevote_quorum_leads_to_a_real_election():
    """Grants from a quorum (the pre-candidate's own included) turn it into a
    candidate that runs phase 1 with the ballot it asked about."""
    c = Cluster(STICKY)
    g = c.nodes["b"].groups[0]
    g.become_precandidate()
    asked = g.prevote_ballot
    assert ballot_state(c, "b") == (0, (0, ""), 0)  # nothing raised, nothing persisted
    c.settle()
    assert c.nodes["b"].is_leader(0) and g.ballot == asked
    assert [c.nodes[n].leader_of(0) for n in NODES] == ["b", "b", "b"]


def test_followers_elect_a_new_leader_through_prevote_after_the_leader_dies():
    """Liveness: once the leader is silent, timers fire, pre-votes are granted
    and exactly one follower wins phase 1."""
    c = Cluster(STICKY)
    c.elect("a")
    c.tick(3)
    del c.nodes["a"]
    c.tick(100)
    assert [n for n in ("b", "c") if c.nodes[n].is_leader(0)] in (["b"], ["c"])


def test_candidate_cut_off_after_its_prevote_does_not_keep_raising_its_ballot():
    """A candidate whose phase 1 stalls goes back through pre-vote, not straight
    to a higher ballot: one raise for the election it was granted, no more."""
    c = Cluster(STICKY)
    g = c.nodes["b"].groups[0]
    c.cut = {"b"}
    g.become_candidate()
    c.tick()  # handles its own prepare: one promise, persisted
    after_one = ballot_state(c, "b")
    assert after_one[1] == g.ballot
    c.tick(300)
    assert ballot_state(c, "b") == after_one
    assert not c.nodes["b"].is_leader(0)


def test_single_member_group_elects_itself_on_its_first_timeout():
    """A group of one is its own quorum: its own pre-vote grant suffices, so
    it is leader on the tick its election timer first fires."""
    node = PaxosNode("a", {0: ("a",)}, random.Random(1), PaxosConfig())
    g = node.groups[0]
    for _ in range(g.timeout):
        assert not node.is_leader(0)
        node.tick()
    assert node.is_leader(0)
    node.propose(0, "t", Put(b"k", b"v"), request_id=("cl", 1))
    assert node.ready().reply[0].result == {"succeeded": True, "version": 1}


def _snap_cluster(interval: int = 4) -> Cluster:
    c = Cluster(dataclasses.replace(CFG, snapshot_interval_slots=interval))
    c.hold_snapshots = True
    c.elect("a")
    return c


def _put(c: Cluster, i: int) -> None:
    c.nodes["a"].propose(0, i, Put(b"k%d" % i, b"v%d" % i), request_id=("cl", i + 1))
    c.settle()


def _snapshot_records(c: Cluster, n: str) -> list[list]:
    return [r for r in map(rec.decode, c.disk[n]) if r[0] == rec.SNAPFILE]


def test_group_does_not_compact_until_the_shell_returns_the_snapshot():
    """The core only captures the state and hands out the encoding
    (``Ready.snapshots``); persisting the record and compacting the log and
    the acceptor wait for ``snapshot_ready``, and until then the previous
    (index, blob) pair stays what catch-up and checkpoints see."""
    c = _snap_cluster(interval=4)
    for i in range(4):
        _put(c, i)
    g = c.nodes["a"].groups[0]
    (job,) = c.snap_jobs["a"]
    assert job.index == g.log.applied == 4 and g.snap_pending == 4
    assert g.log.snap_index == 0 and g.log.snap_blob is None
    assert all(s in g.log.chosen for s in range(1, 5)) and 1 in g.acceptor.accepted
    assert not _snapshot_records(c, "a")
    _put(c, 4)  # applying goes on while the snapshot is encoded
    assert g.log.applied == 5
    c.finish_snapshots("a")
    c.drain("a")
    assert g.snap_pending is None
    assert (g.log.snap_index, g.acceptor.snap_index) == (4, 4)
    assert all(s not in g.log.chosen for s in range(1, 5)) and 5 in g.log.chosen
    assert 4 not in g.acceptor.accepted
    (snap,) = _snapshot_records(c, "a")
    blob = g.log.snap_blob
    assert snap[2:] == [4, len(blob), zlib.crc32(blob)] and c.files["a"][0].blob == blob
    restored = DedupKV.restore(blob)
    assert restored.kv.get(b"k3") == (b"v3", 4) and restored.kv.get(b"k4") == (None, 0)


def test_no_second_snapshot_starts_while_one_is_pending():
    """At most one snapshot per group is in the shell's hands; the next one is
    taken on the first apply after the pending one came back."""
    c = _snap_cluster(interval=2)
    for i in range(7):
        _put(c, i)
    g = c.nodes["a"].groups[0]
    assert [j.index for j in c.snap_jobs["a"]] == [2]
    c.finish_snapshots("a")
    c.drain("a")
    assert g.log.snap_index == 2 and not c.snap_jobs["a"]
    _put(c, 7)
    assert [j.index for j in c.snap_jobs["a"]] == [8]


def test_snapshot_result_that_is_not_pending_is_dropped():
    """A result the group did not ask for (an earlier incarnation's, or one
    overtaken by an installed snapshot) neither persists nor compacts."""
    c = _snap_cluster(interval=4)
    for i in range(4):
        _put(c, i)
    (job,) = c.snap_jobs["a"]
    g = c.nodes["a"].groups[0]
    c.nodes["a"].snapshot_ready(0, 3, b"junk")
    c.drain("a")
    assert g.log.snap_index == 0 and g.snap_pending == 4 and not _snapshot_records(c, "a")
    assert c.nodes["a"].dropped["snapshot_not_pending"] == 1
    c.finish_snapshots("a")
    c.nodes["a"].snapshot_ready(0, 4, b"again")  # a duplicate of one already taken
    c.drain("a")
    assert len(_snapshot_records(c, "a")) == 1 and g.log.snap_blob != b"again"


def test_restart_drops_a_pending_snapshot_and_recovers_from_the_last_persisted():
    """A crash while a snapshot is being encoded loses only the compaction:
    recovery rebuilds the same state from the accept records."""
    c = _snap_cluster(interval=4)
    for i in range(5):
        _put(c, i)
    assert c.snap_jobs["a"]
    c.snap_jobs["a"] = []  # the shell died with it
    fresh = PaxosNode("a", c.groups, random.Random(1), c.cfg)
    fresh.recover(c.disk["a"])
    g = fresh.groups[0]
    assert g.snap_pending is None and g.log.snap_index == 0
    assert 4 in g.acceptor.accepted


def test_first_leader_of_a_new_cluster_chooses_its_uuid_in_slot_1():
    """Issue 15: the cluster UUID is agreed through Paxos: the first leader of
    the formation group, finding nothing accepted anywhere, proposes a Form
    command into slot 1; every replica applies the same UUID, it survives
    snapshots and restarts, and a later leader does not form again."""
    c = Cluster(dataclasses.replace(CFG, formation_group=0, snapshot_interval_slots=3))
    c.elect("a")
    c.tick(3)
    uuids = {c.nodes[n].state_machine(0).cluster_uuid for n in NODES}
    assert len(uuids) == 1 and None not in uuids
    (uuid,) = uuids
    for i in range(5):
        c.nodes["a"].propose(0, i, Put(b"k%d" % i, b"v"), request_id=("cl", i + 1))
        c.settle()
    c.tick(3)
    assert c.nodes["b"].groups[0].log.snap_index >= 3  # the UUID is in the snapshot now
    c.crash_restart("b")
    assert c.nodes["b"].state_machine(0).cluster_uuid == uuid
    c.elect("c")
    c.tick(3)
    assert {c.nodes[n].state_machine(0).cluster_uuid for n in NODES} == {uuid}
    assert DedupKV.restore(c.nodes["b"].groups[0].log.snap_blob).cluster_uuid == uuid


def test_reply_belongs_to_the_value_chosen_not_to_the_slot():
    """Issue 7: leader a batched a put into slot 1, but only a itself accepted
    it; a newer leader chose another value there, and a learns that by
    catch-up while it still thinks it leads. a must not answer its client
    with the other value's result: the put failed definitely (its batch can
    never be chosen: a value lives in one slot only), and a steps down."""
    from dsnode.core.paxos.messages import Learn
    from dsnode.core.paxos.statemachine import pack_batch

    c = Cluster()
    c.elect("a")
    c.tick(3)
    c.nodes["a"].propose(0, "mine", Put(b"k", b"from-a"), request_id=("ca", 1))
    r = c.nodes["a"].ready()  # a's accepts never leave: a is cut off from now on
    c.disk["a"].extend(r.persist)
    slot = max(c.nodes["a"].groups[0].proposer.proposals)
    other = pack_batch([(("cb", 1), Put(b"k", b"from-b"))])
    c.nodes["a"].step("c", Learn(0, ((slot, other),)))
    r = c.nodes["a"].ready()
    (reply,) = [x for x in r.reply if x.token == "mine"]
    assert reply.result is None
    code, message, indeterminate = reply.error
    assert code == "unavailable" and indeterminate is False, reply
    assert not c.nodes["a"].is_leader(0)
    assert c.nodes["a"].state_machine(0).kv.get(b"k") == (b"from-b", 1)


def test_broken_variant_answers_with_the_other_value():
    """The same interleaving with the old behaviour (sim/broken.py): the client
    of a's put is told it succeeded although b's value was chosen."""
    from dsnode.core.paxos.messages import Learn
    from dsnode.core.paxos.statemachine import pack_batch
    from dsnode.sim.broken import AnswersAnyValueGroup

    node = PaxosNode("a", {0: NODES}, random.Random(1), CFG, group_cls=AnswersAnyValueGroup)
    from dsnode.core.paxos.messages import Promise

    node.campaign(0)
    node.ready()
    ballot = node.groups[0].ballot
    node.step("b", Promise(0, ballot, True, ballot, 0))
    assert node.is_leader(0)
    node.propose(0, "mine", Put(b"k", b"from-a"), request_id=("ca", 1))
    node.ready()
    slot = max(node.groups[0].proposer.proposals)
    node.step("c", Learn(0, ((slot, pack_batch([(("cb", 1), Put(b"k", b"from-b"))])),)))
    (reply,) = [x for x in node.ready().reply if x.token == "mine"]
    assert reply.result == {"succeeded": True, "version": 1}  # the lie the fix removes


def test_catch_up_moves_on_from_a_peer_that_never_answers():
    """A leader told by phase 1 that b holds chosen slots it lacks asks b; b is gone
    (cut off, retired): after three fruitless retries it asks c, which has them."""
    c = Cluster()
    c.elect("b")
    c.cut = {"a"}
    for i in range(3):  # one slot each, chosen by b and c
        c.nodes["b"].propose(0, f"w{i}", Put(b"k", b"%d" % i), request_id=("cl", i + 1))
        c.settle()
    c.tick(2)  # c learns the commit
    assert c.nodes["c"].groups[0].log.chosen_through == 3
    assert c.nodes["a"].groups[0].log.chosen_through == 0
    c.cut = {"b"}
    g = c.nodes["a"].groups[0]
    g._want_catchup("b", 3)
    c.settle()
    for _ in range(4 * (CFG.catchup_retry_ticks + 1)):
        g.tick()
        c.settle()
        if g.log.chosen_through >= 3:
            break
    assert g.log.chosen_through >= 3 and g.catchup_peer in (None, "c")
    assert c.nodes["a"].dropped["catchup_peer_stalled"] == 1


def test_recovery_names_a_lost_snapshot_file_instead_of_starting_without_it():
    """Once the WAL holds only what follows a ``snapfile`` record (a checkpoint
    dropped the rest), the file is the only copy of that state: recovering
    without it raises ``StateLost``; with it, the state comes back."""
    c = _snap_cluster(interval=4)
    for i in range(6):
        _put(c, i)
    c.finish_snapshots("a")
    c.tick(1)
    disk = c.disk["a"]
    at = max(i for i, r in enumerate(disk) if rec.decode(r)[0] == rec.SNAPFILE)
    tail = [rec.promise(0, c.nodes["a"].groups[0].acceptor.promised), *disk[at:]]
    with pytest.raises(StateLost, match="names snapshot file 4"):
        PaxosNode("a", c.groups, random.Random(1), c.cfg).recover(tail)
    fresh = PaxosNode("a", c.groups, random.Random(1), c.cfg)
    fresh.recover(tail, c.files["a"])
    assert fresh.groups[0].log.snap_index == 4
    assert fresh.state_machine(0).kv.get(b"k3") == (b"v3", 4)


def test_checkpoint_waits_until_an_installed_snapshot_is_in_its_file():
    """A snapshot installed from a peer replaces the state before the shell has
    stored it: until ``snapshot_ready``, the records before it are the only
    durable copy, so ``checkpoint()`` (which would let them go) says None."""
    c = _cluster_with_c_behind_compaction()
    c.hold_snapshots = True
    c.cut = set()
    c.tick(20)
    g = c.nodes["c"].groups[0]
    assert g.log.snap_index > 0 and g.snap_file_index < g.log.snap_index
    assert c.nodes["c"].checkpoint() is None
    c.finish_snapshots("c")
    c.drain("c")
    assert g.snap_file_index == g.log.snap_index and c.nodes["c"].checkpoint() is not None


# --------------------------------------------------------------------------- resolves ride

def _resolve(i: int) -> TxResolve:
    return TxResolve(b"tx%d" % i, 0, False, False)


def _value_slots(c: Cluster, n: str) -> list[int]:
    return [x.slot for x in c.applied[n] if isinstance(x, Applied) and x.value]


@pytest.mark.parametrize(("rider", "answer"), [
    (_resolve(1), {"resolved": "unknown"}),
    (TxForget(0, (b"tx1",)), {"forgotten": 1}),
])
def test_a_resolve_rides_in_the_slot_of_the_next_command_to_its_group(rider, answer):
    """A transaction's resolve (or a home's forget) is held back and goes into the next
    command's slot, ahead of it: one slot for both, each answered."""
    c = Cluster()
    c.elect("a")
    c.nodes["a"].propose(0, "r", rider)
    c.settle()
    assert c.replies["a"] == [] and _value_slots(c, "a") == []
    c.nodes["a"].propose(0, "p", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    assert [r.token for r in c.replies["a"]] == ["r", "p"]  # in the slot, the rider first
    assert c.replies["a"][0].result == answer
    assert len(_value_slots(c, "a")) == 1
    assert c.nodes["a"].resolves == {"rode": 1, "alone": 0}


@pytest.mark.parametrize("ride", [1, 2, 3])
def test_a_held_resolve_goes_alone_after_its_ride_ticks(ride):
    """Nothing else proposed to its group: the held resolves go out together, in one
    slot, once the first waited ``resolve_ride_ticks`` ticks; the node's ticker
    stays awake meanwhile."""
    c = Cluster()
    c.elect("a")
    a = c.nodes["a"]
    a.resolve_ride_ticks = ride
    a.propose(0, "r1", _resolve(1))
    a.propose(0, "r2", _resolve(2))
    for _ in range(ride - 1):
        assert a.idle_ticks() == 1
        c.tick()
        assert c.replies["a"] == []
    c.tick()
    assert [r.token for r in c.replies["a"]] == ["r1", "r2"]
    assert len(_value_slots(c, "a")) == 1


def test_resolves_ride_only_with_their_own_group():
    groups = {0: NODES, 1: NODES}
    c = Cluster(groups=groups)
    c.elect("a", 0)
    c.elect("a", 1)
    a = c.nodes["a"]
    a.propose(0, "r", _resolve(1))
    a.propose(1, "p", Put(b"k", b"v"), request_id=("cl", 1))
    c.settle()
    assert [r.token for r in c.replies["a"]] == ["p"]
    c.tick(RESOLVE_RIDE_TICKS)
    assert [r.token for r in c.replies["a"]] == ["p", "r"]


def test_without_riding_a_resolve_is_proposed_at_once():
    c = Cluster()
    c.elect("a")
    c.nodes["a"].resolve_ride_ticks = 0
    c.nodes["a"].propose(0, "r", _resolve(1))
    c.settle()
    assert [r.token for r in c.replies["a"]] == ["r"]


def test_a_held_resolve_on_a_follower_is_refused_when_it_goes_out():
    """Held on a node that does not lead the group (it lost leadership meanwhile, or
    never had it): when it goes out it gets the usual definite not-leader answer."""
    c = Cluster()
    c.elect("a")
    c.nodes["b"].propose(0, "r", _resolve(1))
    c.settle()
    assert c.replies["b"] == []
    c.tick(RESOLVE_RIDE_TICKS)
    [r] = c.replies["b"]
    assert r.token == "r" and r.error is not None and r.error[0] == "unavailable"
    assert r.error[2] is False


def test_a_linearizable_read_sends_the_held_resolves_and_waits_for_them():
    """A read of a key a held resolve would unlock must not wait out the ride: the
    read proposes them, and is answered once they are applied (a stale read does
    neither)."""
    c = Cluster()
    c.elect("a")
    a = c.nodes["a"]
    a.read(0, "s", Get(b"k", STALE))
    a.propose(0, "r", _resolve(1))
    a.read(0, "s2", Get(b"k", STALE))
    c.settle()
    assert [r.token for r in c.replies["a"]] == ["s", "s2"]
    a.read(0, "g", Get(b"k"))
    c.settle()
    assert [r.token for r in c.replies["a"]] == ["s", "s2", "r", "g"]
    assert a.resolves == {"rode": 1, "alone": 0}


def test_log_bytes_follow_the_chosen_values_held_above_each_snapshot():
    """Issue 14: ``Log.bytes`` (values plus a slot's overhead) grows as slots are
    chosen and drops back as a snapshot compacts them, on every replica."""
    from dsnode.core.paxos.log import SLOT_OVERHEAD_BYTES

    c = Cluster(groups={0: NODES, 1: NODES})
    c.elect("a", 0)
    c.elect("a", 1)
    for i in range(6):
        c.nodes["a"].propose(0, ("t", i), Put(b"k%d" % i, b"x" * 200))
        c.settle()
    c.nodes["a"].propose(1, ("t", 9), Put(b"j", b"y" * 50))
    c.settle()
    c.tick(3)  # commits reach the followers
    for n in NODES:
        node = c.nodes[n]
        held = {g: sum(len(v) + SLOT_OVERHEAD_BYTES for v in node.groups[g].log.chosen.values())
                for g in (0, 1)}
        assert node.groups[0].log.bytes == held[0] > node.groups[1].log.bytes == held[1] > 0
        assert node.log_bytes() == held[0] + held[1]
    # the group holding the most log is the one snapshotted; then the other
    assert c.nodes["b"].request_largest_snapshot() == 0
    c.settle()
    b = c.nodes["b"]
    assert b.groups[0].log.bytes == 0 and b.groups[0].log.snap_index == 6
    assert b.request_largest_snapshot() == 1
    c.settle()
    assert b.log_bytes() == 0
    assert b.request_largest_snapshot() is None  # nothing applied since either snapshot


def test_a_member_that_promises_a_candidate_gives_it_a_full_election_timeout():
    """Without pre-votes, a follower whose timer was nearly due when it promised a
    candidate must not campaign a tick later and depose the leader it just helped
    elect before that leader is heard (seen in the simulator: two survivors of a
    group of three deposing each other's fresh leadership for 300 ticks and more)."""
    cfg = dataclasses.replace(CFG, pre_vote=False)
    c = Cluster(cfg)
    for n in NODES:
        g = c.nodes[n].groups[0]
        g.timeout = 10
        g.elapsed = 9 if n != "a" else 0
    c.nodes["a"].groups[0].become_candidate()
    for _ in range(2):  # the prepares out, the promises back: no more
        for n in NODES:
            c.drain(n)
        q, c.queue = c.queue, []
        for src, dst, wire in q:
            c.nodes[dst].step(src, from_wire(wire))
    assert c.nodes["a"].is_leader(0)
    c.cut.add("a")  # its first accepts are lost: nothing from it reaches b or c yet
    c.settle()
    c.tick(1)
    c.cut.discard("a")
    c.settle()
    for n in ("b", "c"):
        assert c.nodes[n].groups[0].role is Role.FOLLOWER, n
    assert c.nodes["a"].is_leader(0)
