"""Pins of each member's incarnation and accepted watermark (issue 15)."""

from __future__ import annotations

import pytest

from dsnode.core.membership.incarnations import REFUSAL_PREFIX, Incarnations, Pin


def test_a_member_met_for_the_first_time_is_pinned_and_then_admitted():
    inc = Incarnations()
    assert inc.check("n2", "aaa", 0) is None
    assert inc.admit("n2", "aaa") is True
    assert inc.admit("n2", "aaa") is False
    assert inc.check("n2", "aaa", 0) is None


def test_a_new_incarnation_under_a_pinned_id_is_refused_naming_the_fix():
    """A wiped data directory comes back with a new incarnation: it must never vote."""
    inc = Incarnations({"n2": Pin("aaa")})
    why = inc.check("n2", "bbb", 100)
    assert why is not None and why.startswith(REFUSAL_PREFIX)
    assert "'bbb'" in why and "'aaa'" in why and "docs/OPERATIONS.md" in why


def test_a_log_ending_below_what_the_member_accepted_is_refused():
    """A restored old backup keeps the incarnation but forgot accepted slots."""
    inc = Incarnations({"n2": Pin("aaa")})
    assert inc.saw_accepted("n2", 50) is True
    assert inc.saw_accepted("n2", 40) is False  # watermarks only rise
    assert inc.check("n2", "aaa", 50) is None
    why = inc.check("n2", "aaa", 49)
    assert why is not None and "slot 49" in why and "slot 50" in why


def test_pins_round_trip_and_bad_encodings_are_errors():
    inc = Incarnations({"n2": Pin("aaa", 7)})
    assert Incarnations.decode(inc.encode()).pins == inc.pins
    for bad in ([], {"n2": "aaa"}, {"n2": ["aaa"]}, {"n2": ["aaa", "7"]}, {1: ["a", 1]}):
        with pytest.raises(ValueError):
            Incarnations.decode(bad)
