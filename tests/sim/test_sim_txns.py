"""Cross-partition transactions in the simulator (issue 9, dsnode/sim/txns.py).

A partitioned cluster (5 nodes, 16 partitions of 3) where every node runs the
2PC coordinator and recovery cores; a bank workload of transfers, read-all
transactions and single-key gets on the accounts beside the single-key workload;
coordinators crashed at each of their steps; then the atomicity, bank, fractured
read and real-time checks, and nothing left prepared, locked or decided after
the heal. Two broken variants must be caught by some seed the real cores pass.
"""

from __future__ import annotations

import dataclasses

import pytest

from dsnode.sim.broken import TXN_BROKEN, configure
from dsnode.sim.txns import CRASH_POINTS, START, Bank, BankOp, TxConfig
from dsnode.sim.world import SimWorld, partitioned_config

SEEDS = range(0, 12)
SLOW_SEEDS = range(12, 300)
# the checks that catch a broken 2PC (a liveness failure would not count)
SAFETY = ("atomicity", "bank:", "fractured read", "real time")


def _cfg(**tx):
    return partitioned_config(5, 16, 3, txns=TxConfig(**tx))


def _run(seed: int, cfg=None):
    """The world after a run of ``seed``, and its result (which must pass)."""
    w = SimWorld(seed, cfg or _cfg())
    res = w.run()
    if not res.ok:
        pytest.fail(f"{res.error}\n{res.trace_tail[-2000:]}\nrepro: python -m dsnode.sim "
                    f"--seed {seed} --nodes 5 --partitions 16 --txns")
    return w, res


# (Seeds 26, 167 and 204 once ended on the Paxos liveness check, a partition with no
# leader 300 ticks after the heal: without pre-votes, a member that promised a
# candidate did not restart its election timer and the two survivors of a group took
# turns deposing each other. Fixed in PaxosGroup._on_prepare; seeds 0-299 pass.)


@pytest.mark.parametrize(
    "seed", [*SEEDS, *(pytest.param(s, marks=pytest.mark.slow) for s in SLOW_SEEDS)]
)
def test_sim_txns_seed_is_atomic_and_settles(seed):
    _run(seed)


def test_sim_txns_commit_transfers_and_read_the_total():
    """Not only safe but doing the work: over a few seeds transfers commit, some
    find their compares stale, read-alls and single-key gets succeed, targeted
    coordinator crashes happen, and the replicas' tables end empty."""
    totals: dict[str, int] = {}
    for seed in range(3):
        w, res = _run(seed)
        for k, v in res.stats.items():
            totals[k] = totals.get(k, 0) + v
        for g in w.groups:
            if g == w.metadata:
                continue
            for m in w.live_members(g):
                tx = w.cores[m].state_machine(g).txns
                assert not (tx.prepared or tx.decisions or tx.xlocks or tx.slocks)

    def count(prefix: str) -> int:  # (a key names the last error an op met, if any)
        return sum(v for k, v in totals.items() if k.startswith(prefix))

    assert count("transfer_commit") >= 3, totals
    assert count("readall_ok") >= 5, totals
    assert count("aget_ok") >= 5, totals
    assert count("tx_crashes") >= 1, totals


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_sim_txns_coordinator_crashes_at_each_step(point):
    """The coordinator's node crashes whenever one of its attempts is at ``point``
    (often: a fifth of the ticks it is there): the participants ask the home, the
    home re-drives its decision, and the checks hold."""
    crashes = 0
    for seed in range(7, 11):
        w, _res = _run(seed, _cfg(crash_point=point, crash_chance=0.3))
        crashes += w.tx.crashes
        if crashes >= 1:
            return
    pytest.fail(f"{crashes} crashes at {point} in seeds 7-10")


@pytest.mark.parametrize("variant", sorted(TXN_BROKEN))
def test_sim_catches_broken_2pc(variant):
    """``decide-early`` (a coordinator that decides commit once one prepare is chosen)
    and ``release-on-timeout`` (a participant that aborts on its own when its
    prepare waited too long, without asking the home) each break atomicity or the
    bank in some seed of a small range; the real cores pass that seed."""
    base = _cfg()
    for seed in range(0, 20):
        res = SimWorld(seed, configure(dataclasses.replace(base), variant)).run()
        if not res.ok:
            assert any(s in res.error for s in SAFETY), res.error
            _run(seed)
            return
    pytest.fail(f"no seed in 0-19 caught {variant}")


# ---------------------------------------------------------------- the checks alone

class _World:
    """Just what ``Bank`` reads of a world."""

    def __init__(self) -> None:
        from dsnode.core.ring import Ring
        self.ring = Ring(("n1", "n2", "n3"), 8, 3)
        self.seq = 0

    def next_event(self) -> int:
        self.seq += 1
        return self.seq


def _bank() -> tuple[Bank, bytes, bytes]:
    bank = Bank(__import__("random").Random(1), _World(), None, TxConfig(accounts=4))
    a, b = next((x, y) for x in bank.accounts for y in bank.accounts
                if bank.pid(x) != bank.pid(y))
    return bank, a, b


def _op(bank: Bank, kind: str, keys, outcome: str, **kw) -> BankOp:
    op = BankOp(len(bank.ops), "b0", kind, tuple(keys), outcome=outcome, **kw)
    op.invoke_seq = bank.world.next_event()
    op.complete_seq = bank.world.next_event()
    bank.ops.append(op)
    return op


def _closing(bank: Bank, values: dict, versions: dict) -> None:
    _op(bank, "readall", bank.accounts, "ok", values=values, versions=versions)


def test_bank_check_passes_a_consistent_history():
    bank, a, b = _bank()
    _op(bank, "transfer", (a, b), "commit", tag=b"t0", written=True,
        versions={a: 3, b: 5})
    final = {k: None for k in bank.accounts}
    final[a], final[b] = b"90|t0", b"110|t0"
    hist = {k: {} for k in bank.accounts}
    hist[a][b"t0"], hist[b][b"t0"] = 3, 5
    _closing(bank, final, {k: hist[k].get(b"t0", 0) for k in bank.accounts})
    assert bank.check(hist, final) is None


def test_bank_check_catches_half_a_transfer():
    bank, a, b = _bank()
    _op(bank, "transfer", (a, b), "indeterminate", tag=b"t0", written=True)
    hist = {k: {} for k in bank.accounts}
    hist[a][b"t0"] = 3
    final = {k: None for k in bank.accounts}
    final[a] = b"%d|t0" % START
    assert "atomicity" in bank.check(hist, final)


def test_bank_check_catches_an_acknowledged_transfer_that_vanished():
    bank, a, b = _bank()
    _op(bank, "transfer", (a, b), "commit", tag=b"t0", written=True, versions={a: 3, b: 5})
    hist = {k: {} for k in bank.accounts}
    assert "acknowledged" in bank.check(hist, {k: None for k in bank.accounts})


def test_bank_check_catches_a_fractured_read_and_a_stale_one():
    bank, a, b = _bank()
    _op(bank, "transfer", (a, b), "commit", tag=b"t0", written=True, versions={a: 3, b: 5})
    hist = {k: {} for k in bank.accounts}
    hist[a][b"t0"], hist[b][b"t0"] = 3, 5
    final = {k: None for k in bank.accounts}
    final[a], final[b] = b"90|t0", b"110|t0"
    # saw the transfer on a, and b before it (the sum happens to hold: 90 + 110)
    seen = dict(final)
    seen[b] = b"110|t9"
    _closing(bank, seen, {k: (3 if k == a else 1) for k in bank.accounts})
    assert "fractured read" in bank.check(hist, final)
    bank.ops.pop()
    # began after the commit was acknowledged, read a at its old version
    seen = {k: None for k in bank.accounts}
    _closing(bank, seen, {k: 0 for k in bank.accounts})
    assert "real time" in bank.check(hist, final)
