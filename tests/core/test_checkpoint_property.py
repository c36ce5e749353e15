"""Checkpoint and recovery agree (issue 7.4), over generated histories.

Histories come from the simulator's in-memory clusters: random proposals,
elections (pre-vote and forced campaigns), snapshots, catch-up, partitions,
crashes and restarts. Each node is checkpointed (``PaxosNode.checkpoint``) at
random drains; every restart and, at the end, every node compares recovering
from its last checkpoint plus the records after it with recovering from all of
its records (``dsnode.sim.checkpoints.disagreement``).
"""

from __future__ import annotations

import dataclasses
import random
from unittest import mock

import msgpack
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsnode.core.commands import Put
from dsnode.core.paxos import PaxosConfig, PaxosNode
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.messages import Accept, Learn
from dsnode.core.paxos.statemachine import pack_batch
from dsnode.sim.checkpoints import disagreement
from dsnode.sim.world import SimConfig, SimWorld


def _checked_run(seed: int, ticks: int, chance: float, nodes: int) -> int:
    """Run ``ticks`` faulty ticks, then compare every node's checkpoint with its
    records appended so far; returns how many comparisons there were."""
    cfg = SimConfig(nodes=nodes, fault_ticks=ticks, checkpoint_chance=chance)
    w = SimWorld(seed, cfg)
    compared = 0
    real = w._check_checkpoint

    def counting(node, records, snaps):
        nonlocal compared
        compared += w.ckpt[node] is not None
        real(node, records, snaps)

    w._check_checkpoint = counting
    rng = random.Random(seed)
    real_tick = PaxosNode.tick

    def tick_after_checkpoint(core, n=1):
        """Between ticks, as the runtime driver may: the checkpoint must recover
        what the records appended so far (and those the core still holds) do."""
        nonlocal compared
        if rng.random() < chance:
            disk = w.disks[core.node_id]
            records = disk.durable + disk.unsynced + list(core.out.persist)
            blob = core.checkpoint()
            if blob is not None:  # None: an installed snapshot is not in its file yet
                why = disagreement(core.node_id, w.groups_of(core.node_id), w.cfg.paxos,
                                   records, blob, [], disk.newest_snapshots())
                assert why is None, why
                compared += 1
        real_tick(core, n)

    with mock.patch.object(PaxosNode, "tick", tick_after_checkpoint):
        for _ in range(ticks):
            w.run_tick(faulty=True)  # a disagreement at a restart raises SafetyViolation
    for n in w.node_ids:
        disk = w.disks[n]
        ck = w.ckpt_pending[n] or w.ckpt[n]
        if w.cores[n] is None or ck is None:
            continue
        records = disk.durable + disk.unsynced  # everything appended: the WAL as written
        blob, mark = ck
        why = disagreement(n, w.groups_of(n), w.cfg.paxos, records, blob, records[mark:],
                           disk.newest_snapshots())
        assert why is None, why
        compared += 1
    return compared


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    seed=st.integers(0, 2**32 - 1),
    ticks=st.integers(20, 250),
    chance=st.sampled_from([0.02, 0.1, 0.5, 1.0]),
    nodes=st.sampled_from([2, 3, 5]),
)
def test_checkpoint_plus_later_records_recover_what_all_records_do(seed, ticks, chance, nodes):
    _checked_run(seed, ticks, chance, nodes)


def test_the_property_compares_something():
    """The generated runs do take and compare checkpoints (a test that cannot fail
    would prove nothing)."""
    assert sum(_checked_run(s, 200, 0.2, 3) for s in range(3)) >= 3


def test_a_checkpoint_that_drops_the_commit_record_is_caught(monkeypatch):
    """Without its commit record a checkpoint forgets the chosen prefix that only
    the node's own accept records hold: the comparison reports it."""
    real = PaxosNode.checkpoint

    def lossy(self):
        out = [r for r in msgpack.unpackb(real(self)) if rec.decode(r)[0] != rec.COMMIT]
        return msgpack.packb(out, use_bin_type=True)

    monkeypatch.setattr(PaxosNode, "checkpoint", lossy)
    cfg = dataclasses.replace(SimConfig(), checkpoint_chance=0.2)
    caught = 0
    for seed in range(3):
        w = SimWorld(seed, cfg)
        res = w.run()
        caught += "checkpoint and recovery disagree" in res.error
    assert caught


def _follower():
    groups = {0: ("n1", "n2", "n3")}
    return PaxosNode("n1", groups, random.Random(1), PaxosConfig()), groups


def _drained(core, records: list[bytes]) -> None:
    records.extend(core.ready().persist)


def test_a_checkpoint_between_ticks_claims_no_more_than_the_records_prove():
    """A follower learns that its accepted slot 1 is chosen from the leader's
    next Accept (``commit``); the commit record for it only comes with the next
    tick. A checkpoint taken in between (the runtime driver flushes between
    ticks) must not recover a longer chosen prefix than the records do."""

    core, groups = _follower()
    records: list[bytes] = []
    b = (1, "n2")
    v = pack_batch([(None, Put(b"k", b"v"))])
    core.step("n2", Accept(0, b, ((1, v),), 0))
    _drained(core, records)
    core.step("n2", Accept(0, b, (), 1))  # slot 1 is chosen: learned from our own accept
    _drained(core, records)
    assert core.groups[0].log.chosen_through == 1
    why = disagreement("n1", groups, PaxosConfig(), records, core.checkpoint(), [])
    assert why is None, why


def _learned_slots_1_and_3():
    """A follower taught slots 1 and 3 by catch-up (slot 2 unknown), then ticked."""
    core, groups = _follower()
    records: list[bytes] = []
    v1 = pack_batch([(None, Put(b"a", b"1"))])
    v3 = pack_batch([(None, Put(b"c", b"3"))])
    core.step("n2", Learn(0, ((1, v1), (3, v3))))
    _drained(core, records)
    core.tick()
    _drained(core, records)
    return core, groups, records, v3


def test_a_checkpoint_keeps_chosen_values_learned_above_a_gap():
    """Catch-up may teach slot 3 while slot 2 is still unknown: the chosen record
    for slot 3 is in the log, so the checkpoint must carry it too."""

    core, groups, records, v3 = _learned_slots_1_and_3()
    blob = core.checkpoint()
    v2 = pack_batch([(None, Put(b"b", b"2"))])
    core.step("n2", Learn(0, ((2, v2),)))
    _drained(core, records)
    mark = len(records) - 1
    assert disagreement("n1", groups, PaxosConfig(), records, blob, records[mark:]) is None


def test_a_chosen_value_above_a_gap_stays_chosen_once_the_acceptor_accepts_it_again():
    """Sim seed 411: slot 3 is learned chosen above a gap (a chosen record), then a
    new leader's Accept carries the same value for it, so the acceptor holds it too.
    No commit record covers slot 3 (slot 2 is unknown), so the checkpoint must keep
    its chosen record; eliding it (the acceptor holds the value) lost it."""

    core, groups, records, v3 = _learned_slots_1_and_3()
    core.step("n2", Accept(0, (5, "n2"), ((3, v3),), 1))  # re-proposed by a new leader
    _drained(core, records)
    core.tick()
    _drained(core, records)
    assert core.groups[0].acceptor.accepted[3][1] == v3 and 3 in core.groups[0].log.chosen
    why = disagreement("n1", groups, PaxosConfig(), records, core.checkpoint(), [])
    assert why is None, why
