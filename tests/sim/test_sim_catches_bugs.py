"""The simulator must catch deliberately broken Paxos variants.

If it cannot, its fault model or its checkers are too weak to trust a pass.
"""

from __future__ import annotations

import dataclasses

import pytest

from dsnode.core.paxos.group import PaxosGroup
from dsnode.sim.broken import BROKEN, LIVENESS_BROKEN, RING_BROKEN, configure
from dsnode.sim.world import SimConfig, SimWorld, partitioned_config

SEARCH = range(0, 2000)  # stops at the first seed that catches the bug


@pytest.mark.parametrize("variant", sorted(BROKEN))
def test_sim_catches_broken_acceptor_with_a_safety_violation(variant):
    """ForgetfulAcceptor does not persist promises (Paxos Made Simple 2.3,
    stable storage); NackFreeAcceptor accepts below its promise (P1a). Some
    seed must end in a safety violation (not just a liveness failure)."""
    cfg = SimConfig(acceptor_cls=BROKEN[variant])
    for seed in SEARCH:
        res = SimWorld(seed, dataclasses.replace(cfg)).run()
        if not res.ok and "convergence" not in res.error:
            return
    pytest.fail(f"no seed in {SEARCH} caught {variant}")


@pytest.mark.parametrize("variant", sorted(LIVENESS_BROKEN))
def test_sim_catches_unbounded_messages_with_the_liveness_check(variant):
    """An acceptor that reports its whole accepted tail in one promise (the
    bug behind a cluster that stayed leaderless after a full restart) is
    caught by the leader-within-N-ticks-after-heal check: its promises
    outgrow the network's frame limit, so no candidate ever wins."""
    base = SimConfig(large_value_chance=0.5)
    for seed in SEARCH:
        res = SimWorld(seed, configure(base, variant)).run()
        if not res.ok:
            assert "liveness: no leader" in res.error, res.error
            return
    pytest.fail(f"no seed in {SEARCH} caught {variant}")


@pytest.mark.parametrize("seed", range(40))
def test_sim_full_restarts_with_large_values_stay_live(seed):
    """The same stress as above (every node crashing at once, half the puts
    carrying values up to the sim's value limit, small message budgets) with
    the real acceptor: every run elects leaders after the heal, converges and
    passes the safety checks."""
    cfg = SimConfig(large_value_chance=0.5)
    cfg = dataclasses.replace(cfg, faults=dataclasses.replace(cfg.faults, crash_all_weight=2))
    res = SimWorld(seed, cfg).run()
    assert res.ok, f"{res.error}\nrepro: python -m dsnode.sim --seed {seed}"


@pytest.mark.parametrize("direct_check", [True, False])
def test_sim_catches_peers_that_let_an_amnesiac_vote(direct_check):
    """Issue 15: with no identity gate, a node that came back with a wiped or
    rolled-back data directory votes again. The direct check (an amnesiac's
    promise or accept is delivered) catches it; and without that check the
    ground-truth checks do too (two values chosen for one slot, a lost write
    or a non-linearizable history), which shows the hazard is real."""
    cfg = configure(SimConfig(check_amnesiac_votes=direct_check), "trusting-peers")
    for seed in SEARCH:
        res = SimWorld(seed, dataclasses.replace(cfg)).run()
        if res.ok or "convergence" in res.error or "liveness" in res.error:
            continue
        if direct_check:
            assert "voted after coming back" in res.error, res.error
        return
    pytest.fail(f"no seed in {SEARCH} caught trusting peers")


@pytest.mark.parametrize("seed", range(40))
def test_sim_amnesia_is_refused_and_the_rest_stays_safe_and_live(seed):
    """Nodes come back wiped or rolled back; the gate refuses them (they stay
    out), no amnesiac vote is ever delivered, and the others converge."""
    cfg = SimConfig()
    cfg = dataclasses.replace(cfg, faults=dataclasses.replace(cfg.faults, amnesia_weight=3))
    w = SimWorld(seed, cfg)
    res = w.run()
    assert res.ok, f"{res.error}\nrepro: python -m dsnode.sim --seed {seed}"


def _stale_leader_learns_by_catch_up(group_cls) -> str:
    """Issue 7: leader A batches a client's put into slot s but is cut off
    before anyone accepts it; B takes over and chooses another client's put
    in slot s with C; the partition heals and A, not yet aware it was
    deposed, learns slot s from C by catch-up before B's ballot reaches it.
    The run then heals and goes through every checker. Returns the error."""
    from dsnode.sim.faults import FaultConfig
    from dsnode.sim.world import SIM_PAXOS

    paxos = dataclasses.replace(
        SIM_PAXOS, election_timeout_ticks=10, leader_quorum_timeout_ticks=400,
        leader_probe_chance=0.0, pre_vote=False, leader_stickiness=False,
    )
    # a scripted interleaving: syncs complete at once, so the steps below line up
    cfg = SimConfig(swarm=False, fault_ticks=0, paxos=paxos, delay_max_ticks=1,
                    faults=FaultConfig(event_chance=0.0), group_cls=group_cls,
                    fsync_ticks_max=0)
    w = SimWorld(7, cfg)
    wl = w.workload
    wl.issuing = False
    key = next(k for k in wl.keys if wl.group_of(k) == 0)
    a = b = None
    for _ in range(200):
        w.run_tick(faulty=False)
        leaders = [n for n in w.node_ids if w.cores[n].is_leader(0)]
        if leaders and all(w.cores[n].applied_index(0) >= 1 for n in w.node_ids):
            a = leaders[0]
            break
    assert a is not None, "no leader"
    b, c = [n for n in w.node_ids if n != a]
    w.net.partition([[a], [b, c]])
    first, second = wl.clients[0], wl.clients[1]
    first.target[0] = a
    wl._begin(first, w.now, "put", key)  # batched by a into slot s; its accepts are lost
    w.run_tick(faulty=False)
    w.cores[b].campaign(0)
    for _ in range(30):
        w.run_tick(faulty=False)
    assert w.cores[b].is_leader(0) and w.cores[a].is_leader(0)
    second.target[0] = b
    wl._begin(second, w.now, "put", key)
    for _ in range(30):
        w.run_tick(faulty=False)
    assert w.cores[c].applied_index(0) > w.cores[a].applied_index(0)
    w.net.heal()
    w.cores[a].groups[0]._send_catchup(c)  # a's catch-up goes out before its next heartbeat
    w._drain(a)
    res = w.run()
    return res.error


def test_sim_catches_a_leader_answering_with_another_leaders_value():
    """The old behaviour (AnswersAnyValueGroup) acknowledges a's put with the
    result of b's: the simulator's checkers report the acknowledged write as
    lost (or the history as not linearizable). The fixed group passes."""
    from dsnode.sim.broken import AnswersAnyValueGroup

    error = _stale_leader_learns_by_catch_up(AnswersAnyValueGroup)
    assert "acknowledged write lost" in error or "not linearizable" in error, error
    assert _stale_leader_learns_by_catch_up(PaxosGroup) == ""


def _lease_outlives_honour(group_cls) -> str:
    """a leads with a lease, its clock at the slowest rate the drift bound allows and
    b's and c's at the fastest. a is cut off from b and c (its clients still reach
    it); b campaigns every tick until c's honour of a's lease ends, wins, and
    acknowledges a put; then a client reads the key at a. A lease within the bound
    has ended by then (a falls back to a read-index round it cannot complete); one
    as long as the election timeout answers the old value."""
    from dsnode.core.paxos.config import lease_ticks_for
    from dsnode.sim.faults import FaultConfig
    from dsnode.sim.world import SIM_PAXOS

    e, drift = 200, 0.1
    paxos = dataclasses.replace(
        SIM_PAXOS, election_timeout_ticks=e, heartbeat_interval_ticks=2,
        leader_quorum_timeout_ticks=400, leader_probe_chance=0.0, pre_vote=False,
        leader_stickiness=False, lease_ticks=lease_ticks_for(e, drift),
    )
    cfg = SimConfig(swarm=False, fault_ticks=0, paxos=paxos, delay_max_ticks=1,
                    faults=FaultConfig(event_chance=0.0), group_cls=group_cls,
                    fsync_ticks_max=0, clock_drift=drift)
    w = SimWorld(3, cfg)
    wl = w.workload
    wl.issuing = False
    key = next(k for k in wl.keys if wl.group_of(k) == 0)
    a, since = None, 0
    for _ in range(3000):  # a leader that held its lease for 3 election timeouts
        w.run_tick(faulty=False)
        leaders = [n for n in w.node_ids if w.cores[n].lease_held(0)]
        if leaders != [a]:
            a, since = (leaders[0] if leaders else None), w.now
        elif w.now - since > 3 * e:
            break
    assert a is not None and w.now - since > 3 * e, "no stable leader with a lease"
    b, c = [n for n in w.node_ids if n != a]
    w.clock_rate.update({a: 1 - drift, b: 1 + drift, c: 1 + drift})
    first, second = wl.clients[0], wl.clients[1]
    first.target[0] = a
    wl._begin(first, w.now, "put", key)
    for _ in range(20):
        w.run_tick(faulty=False)
    assert first.op is None, "the first put was not acknowledged"
    w.net.partition([[a], [b, c]])
    while not w.cores[b].is_leader(0):
        assert w.now < 5000, "b never became leader"
        if w.cores[b].groups[0].role.value == "follower":
            w.cores[b].campaign(0)
        w.run_tick(faulty=False)
    second.target[0] = b
    wl._begin(second, w.now, "put", key)
    while second.op is not None:
        w.run_tick(faulty=False)
    wl._begin(first, w.now, "get", key)
    for _ in range(3):
        w.run_tick(faulty=False)
    w.net.heal()
    return w.run().error


def test_sim_catches_a_lease_that_ignores_the_clock_drift_bound():
    """LeaseIgnoresDriftGroup serves a read after another leader acknowledged a write:
    the linearizability checker reports it. The lease within the bound passes."""
    from dsnode.sim.broken import LeaseIgnoresDriftGroup

    error = _lease_outlives_honour(LeaseIgnoresDriftGroup)
    assert "not linearizable" in error, error
    assert _lease_outlives_honour(PaxosGroup) == ""


def test_sim_catches_a_state_machine_that_applies_a_retried_request_id_twice():
    """Client retries reuse their request id; a state machine that ignores ids
    (IdBlindKV) lets a retried write take effect a second time. The exactly-once
    check (the applied log replayed with each id applied once) must see it."""
    base = SimConfig()
    for seed in SEARCH:
        res = SimWorld(seed, configure(base, "id-blind-dedup")).run()
        if not res.ok:
            assert "took effect twice or never" in res.error, res.error
            return
    pytest.fail(f"no seed in {SEARCH} caught id-blind-dedup")


@pytest.mark.parametrize(
    ("variant", "expected"),
    [
        # off by one: a partition hosted where the ring does not place it, or (where
        # the shifted placement still includes the node) on other replicas
        ("next-partition", ("which the ring does not place on it", "the ring places it on")),
        ("sorted-replicas", ("the ring places it on",)),
        ("leaders-only", ("live replicas do not host their partitions",)),
    ],
)
def test_sim_catches_partitions_placed_otherwise_than_the_ring(variant, expected):
    """Issue 8.9: a node whose sync_partitions hosts a partition the ring does not
    place on it (off by one), one that orders a partition's replicas otherwise than
    the ring (so its preferred leader is wrong) or one that never creates the
    partitions it is only a follower of must each be flagged by the placement checks
    (every hosted partition matches the ring; once settled every live replica hosts
    its partitions), with the error naming the ring."""
    assert set(RING_BROKEN) == {"next-partition", "sorted-replicas", "leaders-only"}
    res = SimWorld(0, configure(partitioned_config(), variant)).run()
    assert not res.ok
    assert res.error.startswith("SafetyViolation: ring: "), res.error
    assert any(e in res.error for e in expected), res.error
