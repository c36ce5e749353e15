"""Proposer and learner rules: the phase-1 merge and vote counting.

PMS = Paxos Made Simple; PMMC = Paxos Made Moderately Complex.
"""

from __future__ import annotations

import pytest

from dsnode.core.errors import InvariantBroken
from dsnode.core.paxos.learner import Learner
from dsnode.core.paxos.log import Log
from dsnode.core.paxos.messages import NOOP, Promise
from dsnode.core.paxos.proposer import merge_promises

B = (9, "c")


def promise(node_accepted, snap=0):
    return Promise(0, B, True, B, snap, tuple(node_accepted))


@pytest.mark.parametrize(
    "promises, chosen_through, proposals, recovery_end",
    [
        # nobody accepted anything: nothing to re-propose
        ({"a": promise([]), "b": promise([])}, 0, {}, 0),
        # PMS 2.2 (P2c): the value of the highest ballot wins
        (
            {"a": promise([(1, (1, "a"), b"x")]), "b": promise([(1, (2, "b"), b"y")])},
            0,
            {1: b"y"},
            1,
        ),
        # PMS 3: gaps below the highest reported slot are filled with no-ops
        (
            {"a": promise([(3, (1, "a"), b"z")]), "b": promise([])},
            0,
            {1: NOOP, 2: NOOP, 3: b"z"},
            3,
        ),
        # slots already chosen here are not re-proposed
        ({"a": promise([(2, (1, "a"), b"q"), (3, (1, "a"), b"z")])}, 2, {3: b"z"}, 3),
        # a compacted acceptor: slots up to its snapshot are chosen, never proposed into
        (
            {"a": promise([(5, (1, "a"), b"w")], snap=4), "b": promise([(3, (1, "b"), b"n")])},
            0,
            {5: b"w"},
            5,
        ),
    ],
)
def test_new_leader_reproposes_highest_ballot_values_and_fills_gaps(
    promises, chosen_through, proposals, recovery_end
):
    """PMS 2.2 (P2c) and 3; PMMC 3 ("Leaders", pmax): a new leader proposes,
    per slot, the value with the highest ballot reported by its phase-1
    quorum, and a no-op in the gaps."""
    res = merge_promises(promises, chosen_through + 1, chosen_through)
    assert res.proposals == proposals
    assert res.recovery_end == recovery_end


def test_leader_learns_snapshot_from_the_most_compacted_peer():
    res = merge_promises({"a": promise([], snap=4), "b": promise([], snap=9)}, 1, 0)
    assert (res.snap_index, res.snap_peer) == (9, "b")


def test_learner_declares_chosen_at_quorum_exactly_once():
    """PMS 2.3: a value is chosen when a majority of acceptors accepted it in one ballot."""
    ln = Learner(quorum=2)
    ln.track(1)
    assert ln.vote(1, "a") is False
    assert ln.vote(1, "a") is False  # a duplicate vote does not count twice
    assert ln.vote(1, "b") is True
    assert ln.vote(1, "c") is False  # already released


def test_log_releases_chosen_slots_strictly_in_order():
    """PMS 3: commands are executed in slot order; a gap holds back later slots."""
    log = Log()
    log.learn(2, b"b")
    log.advance()
    assert log.to_apply() == []
    log.learn(1, b"a")
    log.advance()
    assert log.to_apply() == [(1, b"a"), (2, b"b")]


def test_log_refuses_a_second_value_for_a_chosen_slot():
    """PMS 2.1 (safety): only a single value is chosen; learning another is our bug."""
    log = Log()
    log.learn(1, b"a")
    with pytest.raises(InvariantBroken):
        log.learn(1, b"b")
