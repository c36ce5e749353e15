"""Leaders of partitions a node does not host, from their leaders' reports."""

from __future__ import annotations

import pytest

from dsnode.core.router.leaders import LeaderHints, decode_led, encode_led


def test_a_report_names_exactly_what_its_sender_leads():
    h = LeaderHints()
    h.report("a", [(1, (3, "a")), (2, (3, "a"))])
    assert (h.leader(1), h.leader(2), h.leader(3)) == ("a", "a", None)
    h.report("a", [(2, (3, "a"))])  # no longer leads 1
    assert (h.leader(1), h.leader(2)) == (None, "a")


def test_the_higher_ballot_wins_and_a_stale_claim_does_not_return():
    h = LeaderHints()
    h.report("a", [(1, (3, "a"))])
    h.report("b", [(1, (5, "b"))])
    assert h.leader(1) == "b"
    h.report("a", [(1, (3, "a"))])  # a has not heard yet: its older ballot loses
    assert h.leader(1) == "b"
    h.report("b", [])  # b stepped down: nobody is known until the next report
    assert h.leader(1) is None


def test_forget_and_lost_drop_claims():
    h = LeaderHints()
    h.report("a", [(1, (3, "a")), (4, (3, "a"))])
    h.forget(1, "b")  # not b's claim: nothing happens
    assert h.leader(1) == "a"
    h.forget(1, "a")
    assert h.leader(1) is None and h.leader(4) == "a"
    h.lost("a")
    assert h.leader(4) is None


def test_reports_round_trip_and_malformed_ones_are_refused():
    led = [(0, (1, "a")), (63, (7, "b"))]
    assert decode_led(encode_led(led), 64) == led
    for bad in (None, [[0, 1]], [[64, 1, "a"]], [["0", 1, "a"]], [[0, 1, 2]], [[0, True, "a"]]):
        with pytest.raises(ValueError):
            decode_led(bad, 64)
