"""The phi-accrual failure detector (core.membership.detector), on ticks of 10 ms:
heartbeats every 5 ticks, a 1 s acceptable pause, suspect at phi 8, dead after 10 s."""

from __future__ import annotations

import random

import pytest

from dsnode.core.membership.detector import (
    ALIVE,
    DEAD,
    SUSPECT,
    DetectorConfig,
    FailureDetector,
)

CFG = DetectorConfig(suspect_phi=8.0, acceptable_pause_ticks=100, min_std_ticks=5.0,
                     dead_after_ticks=1000)


def beating(d: FailureDetector, peer: str, start: int, end: int, every: int = 5,
            jitter: int = 0, rng: random.Random | None = None) -> int:
    t = start
    while t < end:
        d.heard(peer, t)
        t += every + (rng.randint(-jitter, jitter) if jitter else 0)
    return t


def first_tick_in(d: FailureDetector, peer: str, state: str, start: int, limit: int) -> int:
    for t in range(start, start + limit):
        if d.state(peer, t) == state:
            return t
    raise AssertionError(f"{peer} never {state}")


def test_a_silent_peer_is_suspect_after_about_a_second_and_dead_after_ten():
    d = FailureDetector(CFG)
    last = beating(d, "p", 0, 3000) - 5
    assert d.state("p", last + 50) == ALIVE
    suspect_at = first_tick_in(d, "p", SUSPECT, last, 500) - last
    assert 100 <= suspect_at <= 200, suspect_at  # 1.0 .. 2.0 s of silence
    assert first_tick_in(d, "p", DEAD, last, 2000) - last == 1000
    d.heard("p", last + 1500)
    assert d.state("p", last + 1501) == ALIVE


def test_a_peer_never_heard_from_is_suspect():
    d = FailureDetector(CFG)
    assert d.state("nobody", 10) == SUSPECT and d.phi("nobody", 10) == float("inf")


def test_jittery_heartbeats_widen_the_margin_instead_of_flapping():
    rng = random.Random(3)
    steady, jittery = FailureDetector(CFG), FailureDetector(CFG)
    a = beating(steady, "p", 0, 5000) - 5
    b = beating(jittery, "p", 0, 5000, every=30, jitter=25, rng=rng)
    assert first_tick_in(jittery, "p", SUSPECT, b, 3000) - b > \
        first_tick_in(steady, "p", SUSPECT, a, 3000) - a
    # no false suspicion while the jittery peer keeps beating
    j = FailureDetector(CFG)
    t = 0
    flips = 0
    for _ in range(2000):
        j.heard("p", t)
        gap = 30 + rng.randint(-25, 25)
        flips += any(j.state("p", t + k) != ALIVE for k in range(0, gap, 5))
        t += gap
    assert flips == 0


def test_this_nodes_own_stall_is_not_the_peers_silence():
    d = FailureDetector(CFG)
    last = beating(d, "p", 0, 2000) - 5
    # our loop was stuck for 3 s: the messages it could not read arrive after it
    d.stalled(300)
    assert d.state("p", last + 300 + 50) == ALIVE
    baseline = FailureDetector(CFG)
    beating(baseline, "p", 0, 2000)
    assert baseline.state("p", last + 350) == SUSPECT


def test_states_count_transitions():
    d = FailureDetector(CFG)
    beating(d, "p", 0, 1000)
    assert d.states(["p"], 1000) == {"p": ALIVE}
    assert d.states(["p"], 1400) == {"p": SUSPECT}
    d.heard("p", 1401)
    d.states(["p"], 1402)
    assert d.transitions == 2 and d.suspicions == 1


@pytest.mark.parametrize("bad", [
    {"suspect_phi": 0}, {"min_std_ticks": 0}, {"dead_after_ticks": 0}, {"window": 1},
    {"acceptable_pause_ticks": -1},
])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        DetectorConfig(**bad)
