"""Pins of each member's incarnation and watermarks (issue 15)."""

from __future__ import annotations

import pytest

from dsnode.core.membership.incarnations import (
    REFUSAL_PREFIX,
    Incarnations,
    Pin,
    Presented,
    presented_from_wire,
)


def test_a_member_met_for_the_first_time_is_pinned_and_then_admitted():
    inc = Incarnations()
    assert inc.check("n2", Presented("aaa")) is None
    assert inc.admit("n2", "aaa") is True
    assert inc.admit("n2", "aaa") is False
    assert inc.check("n2", Presented("aaa")) is None


def test_a_new_incarnation_under_a_pinned_id_is_refused_naming_the_fix():
    """A wiped data directory comes back with a new incarnation: it must never vote."""
    inc = Incarnations({"n2": Pin("aaa")})
    why = inc.check("n2", Presented("bbb", {"0": 100}))
    assert why is not None and why.startswith(REFUSAL_PREFIX)
    assert "'bbb'" in why and "'aaa'" in why and "docs/OPERATIONS.md" in why


def test_a_log_ending_below_what_the_member_accepted_is_refused():
    """A restored old backup keeps the incarnation but forgot accepted slots."""
    inc = Incarnations({"n2": Pin("aaa")})
    assert inc.saw("n2", "0", accepted=50) is True
    assert inc.saw("n2", "0", accepted=40) is False  # watermarks only rise
    assert inc.check("n2", Presented("aaa", {"0": 50})) is None
    why = inc.check("n2", Presented("aaa", {"0": 49}))
    assert why is not None and "slot 49" in why and "slot 50" in why
    assert inc.check("n2", Presented("aaa", {})) is not None  # no log at all for the group


def test_a_promise_below_what_the_member_promised_is_refused():
    """An old backup may also have lost a promise (no accept after it)."""
    inc = Incarnations({"n2": Pin("aaa")})
    inc.saw("n2", "0", promised=(5, "n1"))
    assert inc.check("n2", Presented("aaa", {}, {"0": (5, "n1")})) is None
    assert inc.check("n2", Presented("aaa", {}, {"0": (6, "n3")})) is None
    why = inc.check("n2", Presented("aaa", {}, {"0": (4, "n3")}))
    assert why is not None and "promised" in why


def test_pins_spread_by_merge_without_overriding_a_conflict_or_our_own_entry():
    mine = Incarnations({"n2": Pin("aaa", {"0": 3})})
    theirs = Incarnations({"n2": Pin("aaa", {"0": 9}), "n3": Pin("ccc"), "n1": Pin("zzz"),
                           "n4": Pin("ddd")})
    mine.pins["n4"] = Pin("other")
    assert mine.merge(theirs, me="n1") is True
    assert mine.pins["n2"].accepted == {"0": 9}
    assert mine.pins["n3"].incarnation == "ccc"
    assert "n1" not in mine.pins
    assert mine.pins["n4"].incarnation == "other"
    assert mine.merge(theirs, me="n1") is False


def test_pins_round_trip_and_bad_encodings_are_errors():
    inc = Incarnations({"n2": Pin("aaa", {"0": 7}, {"0": (2, "n1")})})
    assert Incarnations.decode(inc.encode()).pins == inc.pins
    for bad in ([], {"n2": "aaa"}, {"n2": ["aaa"]}, {"n2": ["aaa", {"0": "7"}, {}]},
                {1: ["a", {}, {}]}, {"n2": ["a", {}, {"0": [1]}]}):
        with pytest.raises(ValueError):
            Incarnations.decode(bad)


def test_hello_identity_parsing():
    assert presented_from_wire({}) is None
    p = presented_from_wire({"incarnation": "x", "log_end": {"0": 4}, "promised": {"0": [1, "a"]}})
    assert p == Presented("x", {"0": 4}, {"0": (1, "a")})
    for bad in ({"incarnation": 5}, {"incarnation": "x", "log_end": {"0": -1}},
                {"incarnation": "x", "promised": {"0": "b"}}, {"incarnation": "x", "log_end": []}):
        with pytest.raises(ValueError):
            presented_from_wire(bad)


def test_cluster_uuid_mismatch_is_refused_and_unknown_uuids_are_not_compared():
    from dsnode.core.membership.incarnations import check_cluster

    assert check_cluster("n2", None, "abc") is None  # we have not formed (or caught up) yet
    assert check_cluster("n2", "abc", None) is None  # neither has the peer
    assert check_cluster("n2", "abc", "abc") is None
    why = check_cluster("n2", "abc", "def")
    assert why is not None and why.startswith(REFUSAL_PREFIX) and "def" in why
    assert check_cluster("n2", "abc", 7) is not None


def test_a_peer_that_dropped_a_group_comes_back_to_it_only_afresh():
    """Issue 10: a node removed from a group (by configuration epoch 4) drops its data
    there; its old watermarks go, and from then on it may host the group only with a
    later configuration (added again as a learner), never from an old copy of its
    data directory that still holds the group as it was."""
    inc = Incarnations()
    inc.admit("n2", "aaa")
    inc.saw("n2", "0", accepted=100, promised=(7, "n1"))
    assert inc.dropped("n2", "0", 4) and not inc.dropped("n2", "0", 4)
    assert inc.check("n2", Presented("aaa")) is None  # it hosts nothing of it: fine
    fresh = Presented("aaa", {"0": 3}, {"0": (0, "")}, {"0": 6})
    assert inc.check("n2", fresh) is None
    old = Presented("aaa", {"0": 100}, {"0": (7, "n1")}, {"0": 3})
    assert "removed from the group by epoch 4" in inc.check("n2", old)
    back = Incarnations.decode(inc.encode())
    assert back.pins["n2"].dropped == {"0": 4} and back.check("n2", old) is not None
    other = Incarnations({"n2": Pin("aaa")})
    assert other.merge(inc, "n1") and other.check("n2", old) is not None


def test_watermarks_from_before_a_drop_do_not_come_back_with_a_merge():
    """A table that has not heard of the drop still holds the old replica's
    watermarks: merged into one that has, they are ignored (the re-added learner's
    fresh log would fall below them); a table that knows the drop adds its own."""
    inc = Incarnations({"n2": Pin("aaa")})
    inc.dropped("n2", "0", 4)
    stale = Incarnations({"n2": Pin("aaa", {"0": 100}, {"0": (7, "n1")})})
    assert not inc.merge(stale, "n1")
    assert inc.check("n2", Presented("aaa", {"0": 3}, {}, {"0": 6})) is None
    knows = Incarnations({"n2": Pin("aaa", {"0": 5}, {}, {"0": 4})})
    assert inc.merge(knows, "n1") and inc.pins["n2"].accepted == {"0": 5}


def test_a_peer_that_dropped_a_group_it_was_removed_from_is_not_held_to_its_watermarks():
    pins = Incarnations()
    pins.admit("n2", "inc2")
    pins.saw("n2", "0", accepted=3)
    gone = Presented("inc2", {}, {}, {}, ("0",))
    assert "slot 3" in pins.check("n2", gone)
    # a claim this node cannot confirm yet (its configuration still lists n2): no change
    assert not pins.note_drops("n2", gone, lambda g: None)
    assert pins.check("n2", gone) is not None
    assert pins.note_drops("n2", gone, lambda g: 4)
    assert pins.check("n2", gone) is None
    # hosting the group again needs a later configuration than the one that removed it
    back = Presented("inc2", {"0": 1}, {}, {"0": 4})
    assert "removed from the group by epoch 4" in pins.check("n2", back)
    assert pins.check("n2", Presented("inc2", {"0": 1}, {}, {"0": 6})) is None


def test_a_member_added_again_with_a_fresh_directory_is_pinned_anew():
    pins = Incarnations()
    pins.admit("n3", "old")
    pins.saw("n3", "5", accepted=9)
    assert pins.check("n3", Presented("new")) is not None
    assert not pins.rebind("n3", "old") and not pins.rebind("n3", "")
    assert pins.rebind("n3", "new")
    assert pins.check("n3", Presented("new")) is None and pins.pins["n3"].accepted == {}
