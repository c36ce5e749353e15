"""The pure router (issue 8 part 5): least connections with a seeded tie-break,
and Local / Forward / Park / Overloaded decisions with re-sends on a leader
change."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from dsnode.core.errors import InvariantBroken
from dsnode.core.ring import Ring
from dsnode.core.router import (
    Forward,
    InFlight,
    Local,
    OpKind,
    Overloaded,
    Park,
    Router,
    pick,
)

MEMBERS = ["n1", "n2", "n3", "n4", "n5"]
RING = Ring(MEMBERS, 16, 3)


def key_in(pid: int, salt: int = 0) -> bytes:
    """A key of partition ``pid`` (the salt gives different keys of it)."""
    i = 0
    found = 0
    while True:
        k = f"k{i}".encode()
        if RING.partition_of(k) == pid:
            if found == salt:
                return k
            found += 1
        i += 1


def router(node="n1", leaders=None, inflight_max=100, seed=1) -> Router:
    return Router(node, RING, random.Random(seed), inflight_max, leaders)


# ---------------------------------------------------------------- InFlight and pick

def test_inflight_counts_start_and_finish_per_target():
    f = InFlight()
    f.start("a")
    f.start("a")
    f.start("b")
    assert (f.count("a"), f.count("b"), f.count("c"), f.total) == (2, 1, 0, 3)
    f.finish("a")
    f.finish("b")
    assert f.snapshot() == {"a": 1} and f.total == 1


def test_inflight_finish_without_start_is_our_bug():
    f = InFlight()
    with pytest.raises(InvariantBroken, match="no request in flight"):
        f.finish("a")


def test_pick_takes_the_target_with_fewest_in_flight():
    f = InFlight()
    for _ in range(3):
        f.start("a")
    f.start("b")
    assert pick(["a", "b", "c"], f, random.Random(0)) == "c"
    f.start("c")
    f.start("c")
    assert pick(["a", "b", "c"], f, random.Random(0)) == "b"


def test_pick_breaks_ties_with_the_seeded_generator_not_the_candidate_order():
    f = InFlight()
    picks = [pick(["a", "b", "c"], f, random.Random(s)) for s in range(60)]
    again = [pick(["c", "a", "b", "a"], f, random.Random(s)) for s in range(60)]
    assert picks == again
    assert set(picks) == {"a", "b", "c"}


def test_pick_without_candidates_is_an_error():
    with pytest.raises(ValueError, match="at least one candidate"):
        pick([], InFlight(), random.Random(0))


def test_busy_target_gets_far_fewer_new_picks():
    """Seeded: one replica holds 50 requests that never finish; of 3,000 picks
    (each finishing after a random 1..3 later picks) it gets almost none while
    the others share the load evenly."""
    rng = random.Random(42)
    f = InFlight()
    for _ in range(50):
        f.start("busy")
    got: Counter[str] = Counter()
    running: list[tuple[int, str]] = []
    for step in range(3000):
        while running and running[0][0] <= step:
            f.finish(running.pop(0)[1])
        target = pick(["busy", "x", "y", "z"], f, rng)
        got[target] += 1
        f.start(target)
        running.append((step + rng.randint(1, 3), target))
        running.sort()
    assert got["busy"] == 0
    assert min(got[t] for t in "xyz") > 900


# ---------------------------------------------------------------- Router

def test_write_to_a_partition_this_node_leads_is_local():
    r = router("n1", leaders={3: "n1"})
    assert r.route("t1", key_in(3), OpKind.WRITE) == Local(3)
    assert r.inflight.count("n1") == 1 and r.in_flight == 1


def test_write_and_linearizable_read_go_to_the_leader_elsewhere():
    r = router("n1", leaders={3: "n2"})
    assert r.route("t1", key_in(3), OpKind.WRITE) == Forward(3, "n2")
    assert r.route("t2", key_in(3, 1), OpKind.READ) == Forward(3, "n2")
    assert r.inflight.count("n2") == 2


def test_request_without_a_known_leader_is_parked_and_counted():
    r = router("n1")
    assert r.route("t1", key_in(5), OpKind.WRITE) == Park(5)
    assert r.in_flight == 1 and r.inflight.total == 0
    assert r.finish("t1") and r.in_flight == 0


def test_stale_read_goes_to_the_least_busy_replica_own_included():
    pid = next(p for p in range(16) if "n1" in RING.replicas(p))
    r = router("n1")
    others = [m for m in RING.replicas(pid) if m != "n1"]
    for m in others:
        r.inflight.start(m)
    assert r.route("s1", key_in(pid), OpKind.STALE) == Local(pid)
    r.inflight.start("n1")
    r.inflight.start("n1")
    d = r.route("s2", key_in(pid, 1), OpKind.STALE)
    assert isinstance(d, Forward) and d.node in others


def test_stale_reads_never_go_to_a_non_replica_and_never_park():
    r = router("n1")
    for i in range(40):
        pid = i % 16
        d = r.route(i, key_in(pid), OpKind.STALE)
        assert isinstance(d, Local | Forward)
        assert (d.node if isinstance(d, Forward) else "n1") in RING.replicas(pid)


def test_past_the_in_flight_limit_requests_are_overloaded_not_queued():
    r = router("n1", leaders={0: "n2"}, inflight_max=2)
    assert isinstance(r.route("a", key_in(0), OpKind.WRITE), Forward)
    assert isinstance(r.route("b", key_in(1), OpKind.WRITE), Park)
    assert r.route("c", key_in(0, 1), OpKind.WRITE) == Overloaded(2)
    assert r.pending() == ["a", "b"]
    r.finish("a")
    assert isinstance(r.route("c", key_in(0, 1), OpKind.WRITE), Forward)


def test_leader_change_hands_back_parked_and_misdirected_requests_in_order():
    r = router("n1", leaders={2: "n2"})
    r.route("w1", key_in(2), OpKind.WRITE)  # to n2
    r.route("p1", key_in(7), OpKind.WRITE)  # parked
    r.route("r1", key_in(2, 1), OpKind.READ)  # to n2
    r.route("s1", key_in(2, 2), OpKind.STALE)  # a replica: unaffected
    r.route("o1", key_in(4), OpKind.WRITE)  # another partition: parked, unaffected
    assert r.on_leader_change(2, "n3") == ["w1", "r1"]
    assert r.on_leader_change(7, "n1") == ["p1"]
    assert r.pending() == ["s1", "o1"]
    assert r.inflight.total == 1 and r.in_flight == 2  # s1 sent, o1 parked
    # the driver re-sends them with the same tokens
    assert r.route("w1", key_in(2), OpKind.WRITE) == Forward(2, "n3")
    assert r.route("p1", key_in(7), OpKind.WRITE) == Local(7)
    # an answer arriving for a handed-back request is ignored
    assert r.finish("r1") is False


def test_leader_change_to_the_same_leader_or_to_unknown_resends_nothing():
    r = router("n1", leaders={2: "n2"})
    r.route("w1", key_in(2), OpKind.WRITE)
    assert r.on_leader_change(2, "n2") == []
    assert r.on_leader_change(2, None) == []
    assert r.leader(2) is None
    assert r.route("w2", key_in(2, 1), OpKind.WRITE) == Park(2)


def test_losing_leadership_hands_back_local_requests():
    r = router("n1", leaders={9: "n1"})
    assert r.route("w", key_in(9), OpKind.WRITE) == Local(9)
    assert r.on_leader_change(9, "n4") == ["w"]
    assert r.inflight.total == 0


def test_finish_releases_the_count_once():
    r = router("n1", leaders={1: "n3"})
    r.route("t", key_in(1), OpKind.WRITE)
    assert r.finish("t") is True
    assert r.finish("t") is False
    assert r.in_flight == 0


@pytest.mark.parametrize(
    "make, error, needle",
    [
        (lambda: router(inflight_max=0), ValueError, "inflight_max must be at least 1"),
        (lambda: router(leaders={16: "n1"}), ValueError, r"partition 16 is not in \[0, 16\)"),
        (lambda: router().on_leader_change(-1, "n1"), ValueError, "partition -1"),
    ],
)
def test_bad_router_input_is_a_clear_error(make, error, needle):
    with pytest.raises(error, match=needle):
        make()


def test_routing_a_token_twice_is_refused():
    r = router(leaders={0: "n2"})
    r.route("t", key_in(0), OpKind.WRITE)
    with pytest.raises(ValueError, match="already in flight"):
        r.route("t", key_in(0), OpKind.WRITE)
    assert r.in_flight == 1


def test_same_seed_same_decisions():
    def run(seed):
        r = router("n2", seed=seed)
        return [r.route(i, f"key{i}".encode(), OpKind.STALE) for i in range(50)]
    assert run(7) == run(7)


def test_least_busy_picks_a_coordinator_or_source_by_in_flight_count():
    r = router("n1", leaders={0: "n2", 1: "n3"})
    r.route("a", key_in(0), OpKind.WRITE)
    r.route("b", key_in(1), OpKind.WRITE)
    assert r.least_busy(["n2", "n3", "n4"]) == "n4"
    with pytest.raises(ValueError, match="at least one candidate"):
        r.least_busy([])


def test_coordinator_is_this_node_until_it_is_loaded_then_the_least_busy():
    r = router("n1", leaders={p: "n1" for p in range(16)})
    r.inflight_max = 8
    for i in range(3):
        r.route(f"t{i}", key_in(i % 16), OpKind.WRITE)
    assert r.coordinator(["n2", "n3"]) == "n1"  # 3 of 8 in flight: not loaded
    r.route("t9", key_in(1, 2), OpKind.WRITE)  # 4 of 8: half, loaded
    assert r.coordinator(["n2", "n3"]) in ("n2", "n3")
    r2 = router("n1", leaders={0: "n1", 1: "n2", 2: "n3"})
    r2.inflight_max = 4
    r2.route("a", key_in(0), OpKind.WRITE)
    r2.route("b", key_in(1), OpKind.WRITE)
    r2.route("c", key_in(1, 1), OpKind.WRITE)
    assert r2.coordinator(["n2", "n3"]) == "n3"  # n1 1, n2 2, n3 0 in flight from here
    assert r2.coordinator([]) == "n1"  # nobody else reachable


def test_suspects_are_not_chosen_for_stale_reads_or_to_coordinate_while_others_are():
    pid = next(p for p in range(16) if "n1" in RING.replicas(p))
    others = [r for r in RING.replicas(pid) if r != "n1"]
    r = router("n1")
    r.suspects = frozenset({"n1", others[0]})
    picks = {r.route(f"s{i}", key_in(pid, i), OpKind.STALE).node for i in range(40)}  # type: ignore[union-attr]
    assert picks == {others[1]}
    r.suspects = frozenset(RING.replicas(pid))  # all suspect: any replica still serves
    d = r.route("all", key_in(pid, 99), OpKind.STALE)
    assert d in (Local(pid), *(Forward(pid, o) for o in others))
    r2 = router("n1", inflight_max=2)
    r2.route("x", key_in(pid), OpKind.STALE)
    r2.suspects = frozenset({"n2"})
    assert r2.coordinator(["n2", "n3"]) in ("n1", "n3")
