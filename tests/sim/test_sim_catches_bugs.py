"""The simulator must catch deliberately broken Paxos variants.

If it cannot, its fault model or its checkers are too weak to trust a pass.
"""

from __future__ import annotations

import dataclasses

import pytest

from dsnode.sim.broken import BROKEN
from dsnode.sim.world import SimConfig, SimWorld

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
