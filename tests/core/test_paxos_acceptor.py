"""Acceptor rules, one test per rule (etcd raft_paper_test.go style).

PMS = Paxos Made Simple (Lamport 2001); PMMC = Paxos Made Moderately Complex
(van Renesse and Altinbuken 2015).
"""

from __future__ import annotations

import pytest

from dsnode.core.errors import PeerMisbehaved
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.acceptor import Acceptor
from dsnode.core.paxos.messages import ZERO_BALLOT, Accept, Prepare

G = 7
B1, B2, B3 = (1, "a"), (2, "a"), (2, "b")


def acc_with(promised=ZERO_BALLOT, accepted=None) -> Acceptor:
    a = Acceptor(G)
    a.promised = promised
    a.accepted = dict(accepted or {})
    return a


@pytest.mark.parametrize(
    "promised, ballot, ok",
    [
        (ZERO_BALLOT, B1, True),
        (B1, B1, True),  # the same proposer asking again gets the same answer
        (B1, B2, True),
        (B2, B1, False),
        (B2, B3, True),  # same round, higher node id
        (B3, B2, False),
    ],
)
def test_acceptor_promises_only_ballots_at_least_its_promise(promised, ballot, ok):
    """PMS 2.2 (P1a): an acceptor may respond to a prepare only if it has not
    promised a higher-numbered one; a refusal carries the higher promise."""
    a = acc_with(promised)
    out: list[bytes] = []
    reply = a.on_prepare(Prepare(G, ballot, 1), out)
    assert reply.ok is ok
    assert reply.promised == max(promised, ballot)
    assert a.promised == max(promised, ballot)


def test_acceptor_persists_a_new_promise_before_answering():
    """PMS 2.3 (stable storage): an acceptor records its promise before it
    replies; the record is in the same Ready as the reply."""
    a = acc_with(B1)
    out: list[bytes] = []
    a.on_prepare(Prepare(G, B2, 1), out)
    assert [rec.decode(r) for r in out] == [["promise", G, B2]]
    out.clear()
    a.on_prepare(Prepare(G, B2, 1), out)  # nothing new to remember
    assert out == []


def test_acceptor_reports_accepted_values_from_the_asked_slot_on():
    """PMS 3 / PMMC 3: phase 1 covers all open slots at once; the promise
    reports every value accepted at or above ``from_slot`` with its ballot."""
    a = acc_with(B1, {1: (B1, b"x"), 2: (B1, b"y"), 5: (B1, b"z")})
    reply = a.on_prepare(Prepare(G, B2, 2), [])
    assert reply.accepted == ((2, B1, b"y"), (5, B1, b"z"))


@pytest.mark.parametrize(
    "promised, ballot, ok",
    [(ZERO_BALLOT, B1, True), (B1, B1, True), (B1, B2, True), (B2, B1, False), (B3, B2, False)],
)
def test_acceptor_accepts_unless_it_promised_higher(promised, ballot, ok):
    """PMS 2.2 (P1a) and PMMC 3: accept a proposal numbered n unless a
    prepare with a number greater than n was promised."""
    a = acc_with(promised)
    reply = a.on_accept(Accept(G, ballot, ((1, b"v"),), 0), [])
    assert reply.ok is ok
    assert (1 in a.accepted) is ok
    if not ok:
        assert reply.promised == promised


def test_acceptor_persists_each_accepted_value():
    """PMS 2.3: accepted values are recorded on stable storage before the
    acceptor answers phase 2."""
    a = acc_with(B1)
    out: list[bytes] = []
    a.on_accept(Accept(G, B2, ((3, b"v"), (4, b"w")), 0), out)
    assert [rec.decode(r) for r in out] == [
        ["accept", G, 3, B2, b"v"],
        ["accept", G, 4, B2, b"w"],
    ]
    out.clear()
    a.on_accept(Accept(G, B2, ((3, b"v"),), 0), out)  # duplicate delivery
    assert out == []


def test_acceptor_heartbeat_with_higher_ballot_persists_the_promise():
    """An accept (even an empty one) raises the promise; a raised promise is
    recorded, so a crash cannot make the acceptor accept a lower ballot again."""
    a = acc_with(B1)
    out: list[bytes] = []
    a.on_accept(Accept(G, B2, (), 0), out)
    assert a.promised == B2
    assert [rec.decode(r) for r in out] == [["promise", G, B2]]


def test_acceptor_later_ballot_overwrites_accepted_value():
    """PMMC 3: an acceptor keeps, per slot, the value of the highest ballot it accepted."""
    a = acc_with(B1, {1: (B1, b"old")})
    a.on_accept(Accept(G, B2, ((1, b"new"),), 0), [])
    assert a.accepted[1] == (B2, b"new")


def test_acceptor_rejects_two_values_for_one_slot_in_one_ballot():
    """PMS 2.2: a proposer issues at most one value per slot per ballot; a
    message that breaks this is a misbehaving peer, dropped whole."""
    a = acc_with(B1, {1: (B2, b"v")})
    with pytest.raises(PeerMisbehaved):
        a.on_accept(Accept(G, B2, ((1, b"w"),), 0), [])
    assert a.accepted[1] == (B2, b"v")


def test_acceptor_recovers_promise_and_values_from_records():
    """PMS 2.3: after a restart the acceptor is exactly as durable state says."""
    a = Acceptor(G)
    a.recover_promise(B1)
    a.recover_accept(2, B2, b"v")
    a.recover_promise(B1)  # older record later in the log does not lower it
    assert a.promised == B2
    assert a.accepted == {2: (B2, b"v")}


def test_acceptor_compaction_drops_chosen_slots_and_reports_them_chosen():
    """Slots in a snapshot are chosen; the promise says so via chosen_through
    instead of listing their values."""
    a = acc_with(B1, {1: (B1, b"x"), 2: (B1, b"y"), 3: (B1, b"z")})
    a.compact(2)
    reply = a.on_prepare(Prepare(G, B2, 1), [])
    assert reply.chosen_through == 2
    assert reply.accepted == ((3, B1, b"z"),)
