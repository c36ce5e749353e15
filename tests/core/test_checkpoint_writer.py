"""``PaxosNode.checkpoint_writer``: a checkpoint captured at once and encoded in
bounded steps gives the bytes ``checkpoint()`` gave at capture time, whatever
the node does meanwhile (issue 7.5: no checkpoint encodes the log window in one
event-loop turn)."""

from __future__ import annotations

import random

import msgpack
import pytest

from dsnode.core.commands import Put
from dsnode.core.paxos import PaxosConfig, PaxosNode
from dsnode.core.paxos import records as rec


def _solo_leader(slots: int) -> PaxosNode:
    """A one-member group that chose ``slots`` batches (no snapshot: all in the window)."""
    core = PaxosNode("n1", {0: ("n1",)}, random.Random(3),
                     PaxosConfig(snapshot_interval_slots=10**9))  # fmt: skip
    core.campaign(0)
    core.ready()
    assert core.is_leader(0)
    _propose(core, slots, b"a")
    return core


def _propose(core: PaxosNode, n: int, tag: bytes) -> None:
    for i in range(n):
        core.propose(0, ("t", tag, i), Put(b"k%d" % i, tag * 50))
        core.ready()
    core.tick()
    core.ready()


def test_stepped_checkpoint_equals_the_one_taken_at_capture_time():
    """Steps of a few records each rebuild exactly ``checkpoint()``'s bytes as of the
    capture, although the node accepts and chooses more slots in between."""
    core = _solo_leader(60)
    expected = core.checkpoint()
    g = core.groups[0]
    looked_at = len(g.acceptor.accepted) + len(g.log.chosen)  # chosen slots cost too
    w = core.checkpoint_writer()
    assert w is not None
    steps = 0
    while not w.step(7):
        steps += 1
        _propose(core, 1, b"b")  # the node goes on while the writer encodes
    assert w.result() == expected
    assert steps >= looked_at // 7 - 1 and looked_at >= 120
    assert core.checkpoint() != expected  # the node did change meanwhile


def test_checkpoint_is_a_msgpack_array_of_records():
    core = _solo_leader(20)
    blob = core.checkpoint()
    out = msgpack.unpackb(blob)
    assert msgpack.packb(out, use_bin_type=True) == blob
    tags = [rec.decode(r)[0] for r in out]
    assert tags.count(rec.ACCEPT) >= 20 and tags[-1] == rec.COMMIT


def test_a_step_stops_once_its_byte_budget_is_spent():
    """Large values: a step encodes about ``max_bytes``, one record past it at most."""
    core = _solo_leader(30)
    w = core.checkpoint_writer()
    assert w is not None
    record_max = max(len(r) for r in msgpack.unpackb(core.checkpoint()))
    sizes = []
    before = 0
    while True:
        done = w.step(10_000, 500)
        size = sum(map(len, w._parts))
        sizes.append(size - before)
        before = size
        if done:
            break
    assert len(sizes) > 3
    assert max(sizes) <= 500 + record_max + 5  # + a bin header


def test_writer_rejects_bad_use():
    core = _solo_leader(3)
    w = core.checkpoint_writer()
    assert w is not None
    with pytest.raises(ValueError, match="max_records"):
        w.step(0)
    with pytest.raises(ValueError, match="not fully encoded"):
        w.result()
    while not w.step(1):
        continue
    assert w.step(1) and msgpack.unpackb(w.result())
