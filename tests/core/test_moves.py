"""Replica moves toward the ring, one voter change at a time (core.membership.moves)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsnode.core.membership.moves import (
    ADD_LEARNER,
    PROMOTE,
    REMOVE,
    TRANSFER,
    Config,
    Step,
    matches,
    minimum_moves,
    next_step,
    schedule,
    settled,
)
from dsnode.core.ring import Ring


def _carry_out(step: Step, cfg: Config, leader: str) -> tuple[Config, str]:
    voters, learners = list(cfg.voters), list(cfg.learners)
    if step.action == ADD_LEARNER:
        learners.append(step.node)
    elif step.action == PROMOTE:
        learners.remove(step.node)
        voters.append(step.node)
    elif step.action == REMOVE:
        assert step.node != leader, "a leader never removes itself"
        (learners if step.node in learners else voters).remove(step.node)
    else:
        assert step.action == TRANSFER and step.node in voters
        leader = step.node
    return Config(tuple(voters), tuple(learners)), leader


def _drive(pid: int, target: tuple[str, ...], cfg: Config, leader: str, lag: int = 0):
    """Apply next_step until it has nothing more; learners catch up ``lag`` steps
    after they are added. Returns the configurations passed through."""
    seen = [cfg]
    added: dict[str, int] = {}
    for i in range(100):
        ready = [n for n in cfg.learners if i - added.get(n, -10**6) >= lag]
        step = next_step(pid, target, cfg, ready, leader)
        if step is None:
            if cfg.learners:
                continue  # waiting for a learner to catch up
            return seen, leader
        if step.action == ADD_LEARNER:
            added[step.node] = i
        cfg, leader = _carry_out(step, cfg, leader)
        seen.append(cfg)
    raise AssertionError(f"no end: {seen[-3:]}")


def test_one_replica_moves_through_a_learner_and_one_extra_voter():
    seen, leader = _drive(0, ("a", "b", "d"), Config(("a", "b", "c")), "a", lag=2)
    assert [(set(c.voters), set(c.learners)) for c in seen] == [
        ({"a", "b", "c"}, set()),
        ({"a", "b", "c"}, {"d"}),
        ({"a", "b", "c", "d"}, set()),
        ({"a", "b", "d"}, set()),
    ]
    assert leader == "a"


def test_a_leader_that_the_ring_moves_away_hands_over_before_it_goes():
    cfg = Config(("a", "b", "c"))
    seen, leader = _drive(0, ("b", "d", "a"), cfg, "c")
    assert leader == "b" and matches(("b", "d", "a"), seen[-1])


@settings(max_examples=300, deadline=None)
@given(
    now=st.sets(st.sampled_from("abcdefg"), min_size=1, max_size=5),
    want=st.lists(st.sampled_from("abcdefg"), min_size=1, max_size=5, unique=True),
    lag=st.integers(0, 3),
    data=st.data(),
)
def test_every_voting_set_meets_the_next_and_the_target_is_reached(now, want, lag, data):
    voters = tuple(sorted(now))
    leader = data.draw(st.sampled_from(voters))
    target = tuple(want)
    seen, leader = _drive(7, target, Config(voters), leader, lag)
    assert matches(target, seen[-1]) and leader in target
    for a, b in zip(seen, seen[1:], strict=False):
        va, vb = set(a.voters), set(b.voters)
        assert len(va ^ vb) <= 1  # one voter in or out per step: majorities intersect
        assert len(vb) <= max(len(voters), len(target)) + 1


def test_stale_learners_go_and_a_matching_partition_does_nothing():
    assert next_step(3, ("a", "b"), Config(("a", "b"), ("z",)), ["z"], "a") == Step(3, REMOVE, "z")
    assert next_step(3, ("a", "b"), Config(("b", "a")), [], "a") is None


def test_schedule_keeps_moving_partitions_and_admits_new_ones_up_to_the_limit():
    targets = {p: ("a", "b", "d") for p in range(6)}
    configs = {p: Config(("a", "b", "c")) for p in range(6)}
    configs[1] = Config(("a", "b", "d"))  # done
    assert schedule(targets, configs, running=[5], moves_max=2) == [5, 0]
    assert schedule(targets, configs, running=[], moves_max=3) == [0, 2, 3]
    assert schedule(targets, configs, running=[1], moves_max=1) == [0]
    with pytest.raises(ValueError):
        schedule(targets, configs, running=[], moves_max=0)
    assert not settled(targets, configs)
    assert settled({1: ("a", "b", "d")}, configs)


@pytest.mark.parametrize("n", [3, 5, 10])
def test_adding_a_node_moves_only_what_the_ring_moves(n):
    """Driving every partition from ring N to ring N+1 copies exactly the replicas
    the ring places anew (the minimum), and nothing settles otherwise than the ring."""
    before = Ring([f"n{i}" for i in range(n)], 64, 3, 1)
    after = Ring([f"n{i}" for i in range(n + 1)], 64, 3, 2)
    old = {p: before.replicas(p) for p in range(64)}
    new = {p: after.replicas(p) for p in range(64)}
    added = 0
    configs = {}
    for p in range(64):
        seen, _ = _drive(p, new[p], Config(old[p]), old[p][0], lag=1)
        added += sum(len(set(b.learners) - set(a.learners)) for a, b in zip(seen, seen[1:],
                                                                             strict=False))
        configs[p] = seen[-1]
    assert settled(new, configs)
    assert added == minimum_moves(old, new) > 0
    assert minimum_moves(old, new) <= 1.5 * (3 * 64 / (n + 1)) + 3


def test_a_shrinking_partition_removes_a_dead_voter_before_a_live_one():
    """Voters a, c (dead, removed from the cluster) and b (leaving) and a learner d not
    yet caught up, toward a ring of a and d only: the voters shrink before d is
    promoted; removing b first would leave {a, c}, half of it dead (no majority until
    c's removal), so c goes first. Regression: found by the simulator's membership
    mode (issue 10 part 4), where partitions stayed leaderless after such a step."""
    cfg = Config(("a", "b", "c"), ("d",))
    assert next_step(1, ("a", "d"), cfg, [], "a") == Step(1, REMOVE, "b")  # (by name)
    assert next_step(1, ("a", "d"), cfg, [], "a", dead=["c"]) == Step(1, REMOVE, "c")
