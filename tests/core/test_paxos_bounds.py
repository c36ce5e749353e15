"""Every peer message has a byte bound, and a full restart needs no big one.

Issue 13: after every node restarted at once, each acceptor answered phase 1
with its whole accepted tail in one message, larger than a peer frame; the
transport dropped it and no leader was ever elected. Now promises come in
pieces of at most ``message_bytes_max`` (the candidate asks again, same
ballot, from ``more_from``), every message the core builds is checked
against ``peer_message_bytes_max``, and commit records let a restarted node
know its chosen prefix, so phase 1 only covers the slots still in doubt.
"""

from __future__ import annotations

import dataclasses
import random

import msgpack
import pytest
from test_paxos_node import CFG, NODES, Cluster

from dsnode.core.commands import Put
from dsnode.core.errors import InvariantBroken
from dsnode.core.paxos import PaxosConfig, PaxosNode
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.config import bound_for
from dsnode.core.paxos.messages import (
    Accept,
    Accepted,
    Learn,
    Prepare,
    Promise,
    SnapChunk,
    to_wire,
    wire_size,
)

VALUE = 30_000  # the largest value these tests store
BUDGET = 64_000
BOUNDED = dataclasses.replace(
    CFG,
    batch_bytes_max=40_000,
    message_bytes_max=BUDGET,
    peer_message_bytes_max=bound_for(VALUE + 1_000, BUDGET),
    catchup_entries_max=1_000,
    snapshot_chunk_bytes=50_000,
)


class Recording(Cluster):
    """A cluster that keeps every message sent, to check each one's size."""

    def __init__(self, cfg: PaxosConfig) -> None:
        super().__init__(cfg)
        self.sent: list = []

    def drain(self, n: str):
        r = super().drain(n)
        self.sent.extend(m for _dst, m in r.send)
        return r


def packed_size(msg) -> int:
    return len(msgpack.packb(to_wire(msg), use_bin_type=True))


def assert_all_bounded(msgs, cfg: PaxosConfig) -> None:
    assert msgs
    for m in msgs:
        real = packed_size(m)
        assert real <= wire_size(m), f"wire_size under-estimates {type(m).__name__}"
        assert wire_size(m) <= cfg.peer_message_bytes_max, type(m).__name__


def put_big(c: Cluster, leader: str, i: int, size: int = VALUE) -> None:
    c.nodes[leader].propose(0, i, Put(b"k%d" % i, bytes([i % 256]) * size), request_id=("cl", i))


def leave_tail_unchosen(c: Cluster, count: int) -> None:
    """Leader a sends ``count`` large accepts that b and c accept, but a dies
    before anyone learns they were chosen: b and c hold an accepted tail of
    ``count`` slots that only phase 1 can recover."""
    c.elect("a")
    c.tick(2)
    for i in range(1, count + 1):
        put_big(c, "a", i)
    c.drain("a")
    c.queue = [(s, d, m) for s, d, m in c.queue if s == "a" and d != "a"]
    del c.nodes["a"]
    q, c.queue = c.queue, []
    from dsnode.core.paxos.messages import from_wire

    for src, dst, wire in q:
        c.nodes[dst].step(src, from_wire(wire))
        c.nodes[dst].ready()  # persist the accepts; their answers are lost with a
    for n in ("b", "c"):
        g = c.nodes[n].groups[0]
        assert len(g.acceptor.accepted) >= count and g.log.chosen_through < count


def test_promise_is_cut_by_bytes_and_the_candidate_assembles_the_pieces():
    """The acceptor reports its accepted tail in pieces of at most
    message_bytes_max; the candidate asks again from more_from in the same
    ballot, merges the pieces and re-proposes every reported value (PMS 2.2:
    together the pieces are one promise)."""
    c = Recording(BOUNDED)
    count = 12  # 12 x 30 kB: about six pieces of 64 kB
    leave_tail_unchosen(c, count)
    c.sent.clear()
    c.elect("b")
    promises = [m for m in c.sent if type(m) is Promise and m.ok]
    assert len([p for p in promises if p.more_from]) >= 4
    assert_all_bounded(promises, BOUNDED)
    asks = [m for m in c.sent if type(m) is Prepare]
    assert len({m.ballot for m in asks}) == 1, "the pieces are asked for in one ballot"
    c.tick(5)
    kv = c.nodes["c"].state_machine(0).kv
    for i in range(1, count + 1):
        assert kv.get(b"k%d" % i)[0] == bytes([i % 256]) * VALUE


def test_acceptor_piece_has_at_least_one_entry_even_above_the_budget():
    """A single value larger than the budget still travels (alone), so a
    report always makes progress."""
    from dsnode.core.paxos.acceptor import Acceptor

    a = Acceptor(0)
    a.accepted = {1: ((1, "a"), b"x" * 500), 2: ((1, "a"), b"y" * 500)}
    p = a.on_prepare(Prepare(0, (2, "b"), 1), [], 0, budget=100)
    assert [s for s, _b, _v in p.accepted] == [1] and p.more_from == 2
    p = a.on_prepare(Prepare(0, (2, "b"), 2), [], 0, budget=100)
    assert [s for s, _b, _v in p.accepted] == [2] and p.more_from == 0


def test_promise_omits_slots_the_acceptor_knows_are_chosen():
    """Slots up to the acceptor's chosen_through are reported as chosen, not
    as values: the new leader learns them by (bounded) catch-up."""
    from dsnode.core.paxos.acceptor import Acceptor

    a = Acceptor(0)
    a.accepted = {s: ((1, "a"), b"v%d" % s) for s in range(1, 11)}
    p = a.on_prepare(Prepare(0, (2, "b"), 1), [], chosen_through=7)
    assert p.chosen_through == 7
    assert [s for s, _b, _v in p.accepted] == [8, 9, 10]


def test_every_message_kind_stays_within_the_bound_with_the_largest_values():
    """Accept, Accepted, Promise (pieces), Learn (catch-up) and SnapChunk,
    driven with values at the size limit: each one's encoded size is within
    peer_message_bytes_max, and wire_size never under-estimates it."""
    cfg = dataclasses.replace(BOUNDED, snapshot_interval_slots=8)
    c = Recording(cfg)
    leave_tail_unchosen(c, 6)
    c.elect("b")
    c.cut = {"c"}
    for i in range(20, 40):
        put_big(c, "b", i)
        c.settle()
    c.tick(1)
    c.nodes["a"] = c._make("a")  # a new, empty replica: catch-up by snapshot and log
    c.cut = set()
    c.tick(30)
    kinds = {type(m) for m in c.sent}
    assert {Accept, Accepted, Promise, Learn, SnapChunk} <= kinds, kinds
    assert_all_bounded(c.sent, cfg)
    assert c.nodes["a"].applied_index(0) == c.nodes["b"].applied_index(0)


def test_core_refuses_to_build_a_message_over_the_bound():
    """A message over peer_message_bytes_max is our bug (the transport would
    drop it forever): the core raises instead of sending it."""
    cfg = dataclasses.replace(BOUNDED, peer_message_bytes_max=bound_for(1_000, 2_000),
                              message_bytes_max=2_000, batch_bytes_max=1_000)
    c = Cluster(cfg)
    c.elect("a")
    put_big(c, "a", 1, size=10_000)
    with pytest.raises(InvariantBroken, match="peer_message_bytes_max"):
        c.settle()


def test_full_restart_recovers_the_chosen_prefix_from_commit_records():
    """Every node restarts at once: each knows from its commit records which
    slots are chosen (and their values), applies them without any network
    round, and the next election's phase 1 carries no value at all for them;
    nor does the new leader write them into its log again."""
    c = Recording(BOUNDED)
    c.elect("a")
    for i in range(1, 21):
        put_big(c, "a", i)
        c.settle()
    c.tick(3)  # heartbeats carry the commit index; the next tick writes commit records
    for n in NODES:
        assert any(rec.decode(r)[0] == rec.COMMIT for r in c.disk[n])
    before = {n: c.nodes[n].applied_index(0) for n in NODES}
    assert min(before.values()) >= 20
    for n in NODES:
        c.crash_restart(n)
        assert c.nodes[n].applied_index(0) == before[n]
        assert c.nodes[n].state_machine(0).kv.get(b"k20")[0] == bytes([20]) * VALUE
    c.sent.clear()
    records_before = len(c.disk["b"])
    c.elect("b")
    promised = sum(len(m.accepted) for m in c.sent if type(m) is Promise)
    assert promised <= 1
    rewritten = [r for r in c.disk["b"][records_before:] if rec.decode(r)[0] == rec.ACCEPT]
    assert len(rewritten) <= 1
    c.nodes["b"].propose(0, "after", Put(b"new", b"v"), request_id=("cl", 99))
    c.settle()
    assert c.replies["b"][-1].result["succeeded"] is True


def caught_up_by_log() -> Cluster:
    """c misses five writes while cut off, then learns them by catch-up."""
    c = Cluster(BOUNDED)
    c.elect("a")
    c.cut = {"c"}
    for i in range(1, 6):
        put_big(c, "a", i, size=100)
        c.settle()
    c.cut = set()
    c.tick(10)
    return c


def test_value_learned_by_catch_up_is_recorded_and_survives_a_restart():
    """A value this node learned without accepting it (catch-up) gets a chosen
    record, so a commit record can cover it and a restart keeps it."""
    c = caught_up_by_log()
    assert c.nodes["c"].applied_index(0) >= 5
    tags = [rec.decode(r)[0] for r in c.disk["c"]]
    assert tags.count(rec.CHOSEN) >= 5 and rec.COMMIT in tags
    c.crash_restart("c")
    assert c.nodes["c"].applied_index(0) >= 5


def test_checkpoint_keeps_chosen_values_and_the_commit_point():
    """Recovering from PaxosNode.checkpoint() gives the same chosen prefix and
    state as recovering from the full record stream."""
    c = caught_up_by_log()
    full = PaxosNode("c", c.groups, random.Random(1), BOUNDED)
    full.recover(c.disk["c"])
    cp = PaxosNode("c", c.groups, random.Random(1), BOUNDED)
    cp.recover(msgpack.unpackb(c.nodes["c"].checkpoint()))
    assert cp.applied_index(0) == full.applied_index(0) >= 5
    assert sorted(cp.state_machine(0).kv.items()) == sorted(full.state_machine(0).kv.items())


def test_promise_from_an_older_node_without_more_from_still_decodes():
    """Backward compatible wire form: a promise without the trailing
    more_from field is a complete report."""
    from dsnode.core.paxos.messages import from_wire

    wire = to_wire(Promise(0, (1, "a"), True, (1, "a"), 3, ((4, (1, "a"), b"v"),)))[:-1]
    m = from_wire(wire)
    assert m.more_from == 0 and m.accepted == ((4, (1, "a"), b"v"),)


def test_accepted_and_heartbeat_sizes_do_not_depend_on_values():
    assert wire_size(Accepted(0, (1, "a"), True, (1, "a"), tuple(range(32)), 5)) < 1_000
    assert wire_size(Accept(0, (1, "a"), (), 5, 1)) < 1_000


def test_txn_too_large_to_answer_is_a_definite_error_reply():
    from dsnode.core.commands import SubGet, Txn

    c = Cluster(CFG)
    c.elect("a")
    for i in range(5):
        put_big(c, "a", i, size=1024 * 1024)
        c.settle()
    c.nodes["a"].propose(0, "t", Txn((), tuple(SubGet(b"k%d" % i) for i in range(5))),
                         request_id=("cl", 50))
    c.settle()
    (reply,) = [r for r in c.replies["a"] if r.token == "t"]
    assert reply.result is None and reply.error[0] == "too_large" and reply.error[2] is False
