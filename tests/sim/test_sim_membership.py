"""Membership changes of a partitioned cluster in the middle of faults
(``SimConfig.membership``, issue 10 part 4; ``dsnode.sim.membership``).

The cluster forms without some of its nodes; during the faults spares join, members
leave and dead members are removed (then never restarted), while every node's core
replica mover moves the partitions to each new ring through their own logs. Besides
every usual check (the ground truth counting only a slot's voters, as the
partitions' own logs chose them), once quiet: the member table settled, every
partition's voting set is the final ring's placement with no learner, no node keeps
a group it no longer holds, and every acknowledged write is still read back.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsnode.sim.__main__ import main as sim_main
from dsnode.sim.broken import MEMBER_BROKEN, configure
from dsnode.sim.trace import Trace
from dsnode.sim.world import SimWorld, partitioned_config

SEARCH = range(0, 40)  # stops at the first seed that catches the bug


def _cfg(**kw):
    return partitioned_config(5, 16, 3, membership=True, **kw)


def _run(seed: int, **kw):
    res = SimWorld(seed, _cfg(**kw)).run()
    assert res.ok, (f"{res.error}\n{res.trace_tail[-3000:]}\nrepro: python -m dsnode.sim "
                    f"--seed {seed} --nodes 5 --partitions 16 --replication 3 --membership")
    return res


@pytest.mark.parametrize("seed", range(24))
def test_members_join_leave_and_are_removed_during_faults_safely(seed):
    _run(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(24, 300))
def test_members_join_leave_and_are_removed_during_faults_safely_slow(seed):
    _run(seed)


def test_the_membership_really_changes_and_the_replicas_really_move():
    """Over a few seeds, joins, leaves and removals are chosen (by the member table's
    own answers) and the movers' configuration changes are done."""
    stats: dict[str, int] = {}
    for seed in range(6):
        for k, v in _run(seed).stats.items():
            stats[k] = stats.get(k, 0) + v
    assert stats.get("member_add_done", 0) >= 3
    assert stats.get("member_leave_done", 0) >= 1
    assert stats.get("member_remove_done", 0) >= 1
    assert stats.get("moves_done", 0) >= 100


def test_two_spares_join_a_cluster_formed_with_three():
    res = _run(2, spares=2)
    assert res.stats.get("member_add_done", 0) >= 1


def test_a_membership_seed_replays_exactly():
    lines = []
    for _ in range(2):
        trace = Trace(enabled=True, keep=1 << 30)
        res = SimWorld(4, _cfg(), trace).run()
        lines.append((res.ok, res.ticks, res.ops, res.messages, list(trace.lines)))
    assert lines[0] == lines[1]


def test_a_membership_seed_replays_under_any_hash_seed():
    def run(hash_seed: str) -> str:
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-m", "dsnode.sim", "--seed", "7", "--nodes", "5",
                              "--partitions", "16", "--membership"], env=env,
                             capture_output=True, text=True, timeout=120, check=False)
        return out.stdout.splitlines()[0].rsplit(" wall=", 1)[0]

    assert run("1") == run("2")


@pytest.mark.parametrize(("variant", "why"), [
    # the member table settles before the partitions moved: they keep an older ring's
    # replicas (check a)
    ("eager-moved", "places it on"),
    # a node keeps a partition it no longer holds (check b)
    ("keeps-retired", "which it no longer holds"),
])
def test_the_sim_catches_a_broken_membership_variant_with_the_convergence_checks(variant, why):
    assert variant in MEMBER_BROKEN
    cfg = configure(partitioned_config(5, 16, 3), variant)
    for seed in SEARCH:
        res = SimWorld(seed, cfg).run()
        if not res.ok:
            assert res.error.startswith("SafetyViolation: membership:"), res.error
            assert why in res.error, res.error
            return
    pytest.fail(f"no seed in {SEARCH} caught {variant}")


def test_cli_runs_membership_and_refuses_it_without_partitions(capsys):
    assert sim_main(["--seed", "2", "--nodes", "5", "--partitions", "16", "--membership"]) == 0
    assert "moves_done=" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sim_main(["--seed", "1", "--membership", "--groups", "3"])
    with pytest.raises(SystemExit):
        sim_main(["--seed", "1", "--broken", "eager-moved"])
