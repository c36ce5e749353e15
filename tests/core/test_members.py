"""The member list the metadata group keeps (issue 10, part 1: core.membership.members)."""

from __future__ import annotations

import msgpack
import pytest

from dsnode.core import commands
from dsnode.core.commands import SetRing
from dsnode.core.kv.store import ERROR_KEY
from dsnode.core.membership.members import (
    ACTIVE,
    JOINING,
    LEAVING,
    LEFT,
    REMOVED,
    MemberAdd,
    MemberLeave,
    MemberRemove,
    MemberTable,
    MovesDone,
    Refused,
)
from dsnode.core.paxos.metadata import REFUSED, MetaSM

FORMED = ("n1", "n2", "n3")


def _table() -> MemberTable:
    return MemberTable.formed(FORMED, 1, {n: f"10.0.0.{i}:7000" for i, n in enumerate(FORMED)})


def test_a_join_goes_on_the_ring_and_is_active_once_its_moves_are_done():
    t = _table()
    assert t.apply(MemberAdd("n4", "h4:7000", "inc4"), 1) is True
    assert t.state_of("n4") == JOINING and t.on_ring() == ("n1", "n2", "n3", "n4")
    assert t.pending()
    t.apply(MovesDone(1), 2)  # an older ring's moves: nothing
    assert t.state_of("n4") == JOINING
    t.apply(MovesDone(2), 2)
    assert t.state_of("n4") == ACTIVE and not t.pending() and t.settled == 2


def test_one_change_at_a_time_but_a_dead_node_can_always_be_removed():
    t = _table()
    t.apply(MemberAdd("n4", "h4:7000", "inc4"), 1)
    with pytest.raises(Refused, match="one membership change at a time"):
        t.apply(MemberAdd("n5", "h5:7000", "inc5"), 2)
    with pytest.raises(Refused, match="one membership change at a time"):
        t.apply(MemberLeave("n1"), 2)
    assert t.apply(MemberRemove("n2"), 2) is True  # died while n4 joined
    assert t.state_of("n2") == REMOVED and t.on_ring() == ("n1", "n3", "n4")
    t.apply(MovesDone(3), 3)
    assert (t.state_of("n4"), t.settled) == (ACTIVE, 3)
    assert t.apply(MemberAdd("n5", "h5:7000", "inc5"), 3) is True


def test_a_leave_moves_replicas_away_first_then_the_member_has_left():
    t = _table()
    assert t.apply(MemberLeave("n3"), 1) is True
    assert t.state_of("n3") == LEAVING and t.on_ring() == ("n1", "n2")
    assert t.apply(MemberLeave("n3"), 2) is False  # asked again: nothing new
    t.apply(MovesDone(2), 2)
    assert t.state_of("n3") == LEFT
    with pytest.raises(Refused, match="only an active member"):
        t.apply(MemberLeave("n3"), 2)
    assert t.apply(MemberRemove("n3"), 2) is False  # gone already


def test_identity_a_data_directory_stays_bound_and_a_removed_one_cannot_return():
    t = _table()
    t.apply(MemberAdd("n4", "h4:7000", "inc4"), 1)
    assert t.apply(MemberAdd("n4", "h4:7000", "inc4"), 2) is False  # a retried join
    with pytest.raises(Refused, match="another member's data directory"):
        t.apply(MemberAdd("n4", "h4:7000", "other"), 2)
    t.apply(MovesDone(2), 2)
    t.apply(MemberRemove("n4"), 2)
    t.apply(MovesDone(3), 3)
    with pytest.raises(Refused, match="fresh data directory"):
        t.apply(MemberAdd("n4", "h4:7000", "inc4"), 3)
    assert t.apply(MemberAdd("n4", "h4:7000", "fresh"), 3) is True  # a new directory
    assert t.members["n4"].incarnation == "fresh"


def test_refusals_name_their_reason():
    t = _table()
    with pytest.raises(Refused, match="no member"):
        t.apply(MemberLeave("n9"), 1)
    with pytest.raises(Refused, match="address 10.0.0.0:7000"):
        t.apply(MemberAdd("n9", "10.0.0.0:7000", "x"), 1)
    one = MemberTable.formed(("n1",), 1)
    with pytest.raises(Refused, match="last member"):
        one.apply(MemberLeave("n1"), 1)
    with pytest.raises(Refused, match="last member"):
        one.apply(MemberRemove("n1"), 1)


def test_the_table_round_trips_through_its_encoding():
    t = _table()
    t.apply(MemberAdd("n4", "h4:7000", "inc4"), 1)
    back = MemberTable.decode(msgpack.unpackb(msgpack.packb(t.encode())))
    assert back.members == t.members and back.settled == t.settled


@pytest.mark.parametrize("cmd", [MemberAdd("n4", "h:1", "i"), MemberLeave("n1"),
                                 MemberRemove("n2"), MovesDone(3)])
def test_membership_commands_travel_like_client_commands(cmd):
    wire = msgpack.unpackb(msgpack.packb(commands.encode(cmd)), raw=False)
    assert commands.decode(wire) == cmd == commands.decode_checked(wire)


@pytest.mark.parametrize("bad", [["J", "n4", "h:1"], ["J", "", "h:1", "i"], ["J", "n4", 7, "i"],
                                 ["L", b"n1"], ["K", "x" * 65], ["M", 0], ["M", "2"]])
def test_malformed_membership_commands_from_a_peer_are_refused(bad):
    with pytest.raises(ValueError):
        commands.decode_checked(bad)


def _meta() -> MetaSM:
    sm = MetaSM()
    assert sm.apply(None, SetRing(FORMED, 8, 3, 1), 1) == {"epoch": 1}
    return sm


def test_the_metadata_group_writes_the_next_ring_with_each_change():
    sm = _meta()
    assert sm.members.on_ring() == FORMED and sm.members.settled == 1
    r = sm.apply(None, MemberAdd("n4", "h4:7000", "inc4"), 2)
    assert r == {"epoch": 2, "state": JOINING}
    ring = sm.ring
    assert (ring.members, ring.epoch, ring.partitions, ring.replication) == (
        ("n1", "n2", "n3", "n4"), 2, 8, 3)
    assert ring.partitions_of("n4")  # it is placed replicas to receive
    r = sm.apply(None, MemberAdd("n5", "h5:7000", "inc5"), 3)
    assert r[ERROR_KEY][0] == REFUSED and "one membership change" in r[ERROR_KEY][1]
    assert sm.ring.epoch == 2
    sm.apply(None, MovesDone(2), 4)
    assert sm.members.state_of("n4") == ACTIVE
    restored = MetaSM.restore(sm.snapshot())  # the list and the ring travel in snapshots
    assert restored.members.members == sm.members.members
    assert restored.ring.members == ring.members


def test_replication_asked_at_formation_comes_back_when_the_ring_grows_again():
    sm = MetaSM()
    sm.apply(None, SetRing(("n1", "n2"), 8, 3, 1), 1)
    assert sm.ring.replication == 2  # capped by two members
    sm.apply(None, MemberAdd("n3", "h3:7000", "inc3"), 2)
    assert sm.ring.replication == 3


def test_a_node_id_the_ring_does_not_take_changes_nothing():
    sm = _meta()
    before = (sm.ring.epoch, sm.members.members)
    r = sm.apply(None, MemberAdd("bad id!", "h:1", "i"), 2)
    assert r[ERROR_KEY][0] == REFUSED
    assert (sm.ring.epoch, sm.members.members) == before
