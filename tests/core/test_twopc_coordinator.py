"""The coordinator and recovery cores (core.twopc) against in-memory partitions.

Each partition is one ``DedupKV`` (its Paxos log is what the simulator and the
cluster tests add): a ``Submit`` is applied to it at once, and the harness can
lose the answer, fail the submission before it is applied, reorder answers and
crash the coordinator at any step. Checked: atomicity (a transfer's two writes
both or neither), the bank total seen by every read-all transaction and at the
end, and that after healing nothing stays prepared, locked or decided.
"""

from __future__ import annotations

import random

import pytest

from dsnode.core.commands import SubGet, SubPut, Txn
from dsnode.core.paxos.statemachine import DedupKV
from dsnode.core.ring import Ring
from dsnode.core.twopc import coordinator as co
from dsnode.core.twopc.coordinator import Coordinator, Event, State, TwoPCConfig
from dsnode.core.twopc.records import TxResolve
from dsnode.core.twopc.recovery import Recovery

RING = Ring(("n1", "n2", "n3"), 8, 3)
ACCOUNTS = [b"acct%d" % i for i in range(12)]
START = 100
CFG = TwoPCConfig(prepare_timeout_ticks=30, decision_timeout_ticks=60,
                  resolve_horizon_ticks=40)


class Bank:
    def __init__(self, seed: int, coordinator_cls=Coordinator, recovery_cls=Recovery,
                 lose: float = 0.0, fail: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.parts = {pid: DedupKV() for pid in range(RING.partitions)}
        self.index = 0
        for k in ACCOUNTS:
            self._apply(RING.partition_of(k), _put(k, START))
        self.coordinator_cls = coordinator_cls
        self.coord = coordinator_cls("n1", random.Random(seed), CFG, lambda: RING)
        self.recovery = recovery_cls(CFG)
        self.now = 0
        self.lose, self.fail = lose, fail
        self.replies: dict = {}
        self.submitted = 0
        self.crash_after: int | None = None

    def _apply(self, pid: int, cmd, rid=None) -> dict:
        self.index += 1
        return self.parts[pid].apply(rid, cmd, self.index)

    def begin(self, token, txn: Txn, timeout: int = 200, rid=None) -> None:
        self.coord.begin(token, txn, 1000 + self.now, self.now + timeout, rid)

    def step(self) -> None:
        self.now += 1
        self.coord.tick(self.now)
        self.recovery.scan(self.now, {pid: sm.txns for pid, sm in self.parts.items()})
        submits, replies = self.coord.take()
        for r in replies:
            self.replies[r.token] = r
        answers = []
        for s in submits:
            if self.crash_after is not None and self.submitted >= self.crash_after:
                self.crash()
                break
            self.submitted += 1
            answers.append((self.coord, s, self._deliver(s)))
        for s in self.recovery.take():
            answers.append((self.recovery, s, self._deliver(s)))
        self.rng.shuffle(answers)
        for who, s, (result, error) in answers:
            if who is self.coord or who is self.recovery:
                who.on_result(s.handle, result, error)

    def _deliver(self, s: co.Submit):
        if self.rng.random() < self.fail:
            return None, ("unavailable", "no leader", False)
        result = self._apply(s.pid, s.cmd, s.rid)
        if self.rng.random() < self.lose:
            return None, ("timeout", "lost", True)
        if "_error" in result:
            err = result["_error"]
            return None, (err[0], err[1], False)
        return result, None

    def crash(self) -> None:
        """The coordinator's node dies: everything it held is gone."""
        # a restarted node draws a new txid nonce (the runtime seeds from the OS)
        self.coord = self.coordinator_cls("n1", random.Random(self.rng.random()), CFG,
                                          lambda: RING)
        self.crash_after = None

    def run(self, ticks: int) -> None:
        for _ in range(ticks):
            self.step()

    def balances(self) -> dict[bytes, int]:
        out = {}
        for k in ACCOUNTS:
            value, _v = self.parts[RING.partition_of(k)].kv.get(k)
            out[k] = int(value)
        return out

    def settled(self) -> bool:
        return all(not sm.txns.prepared and not sm.txns.decisions and not sm.txns.xlocks
                   and not sm.txns.slocks for sm in self.parts.values())


def _put(k: bytes, n: int):
    from dsnode.core.commands import Put
    return Put(k, str(n).encode())


def transfer(bank: Bank, a: bytes, b: bytes, amount: int) -> Txn:
    (va, xa), (vb, xb) = (bank.parts[RING.partition_of(k)].kv.get(k) for k in (a, b))
    return Txn(((a, xa), (b, xb)),
               (SubPut(a, str(int(va) - amount).encode()),
                SubPut(b, str(int(vb) + amount).encode())))


def cross_pair(seed: int) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    while True:
        a, b = rng.sample(ACCOUNTS, 2)
        if RING.partition_of(a) != RING.partition_of(b):
            return a, b


READ_ALL = Txn((), tuple(SubGet(k) for k in ACCOUNTS))


def test_plan_splits_by_partition_and_picks_the_first_written_key_as_home():
    a, b = cross_pair(1)
    txn = Txn(((a, 1),), (SubGet(b), SubPut(b, b"x")), (SubPut(a, b"y"),))
    p = co.plan(txn, RING, b"t", 5)
    assert p.home == RING.partition_of(b)
    pa, pb = p.prepares[RING.partition_of(a)], p.prepares[RING.partition_of(b)]
    assert pa.compares == ((a, 1),) and pa.otherwise == (SubPut(a, b"y"),) and not pa.then
    assert pb.reads == (b,) and pb.then == (SubPut(b, b"x"),)
    assert pa.exclusive() == (a,) and pb.exclusive() == (b,) and not pb.shared()


def test_a_transfer_commits_atomically_with_versions_from_each_partition():
    bank = Bank(1)
    a, b = cross_pair(2)
    bank.begin("t", transfer(bank, a, b, 30))
    bank.run(5)
    r = bank.replies["t"]
    assert r.error is None and r.result["succeeded"]
    bal = bank.balances()
    assert bal[a] == START - 30 and bal[b] == START + 30
    versions = [x["version"] for x in r.result["results"]]
    assert versions == [bank.parts[RING.partition_of(k)].kv.get(k)[1] for k in (a, b)]
    bank.run(CFG.forget_delay_ticks + 2)
    assert bank.settled() and bank.coord.idle()


def test_failed_compares_take_the_other_branch_and_read_all_sees_the_total():
    bank = Bank(2)
    a, b = cross_pair(3)
    bank.begin("stale", Txn(((a, 999),), (SubPut(a, b"0"),), (SubGet(b),)))
    bank.begin("all", READ_ALL)
    bank.run(20)
    stale = bank.replies["stale"].result
    assert stale["succeeded"] is False and stale["results"][0]["value"] == str(START).encode()
    total = sum(int(x["value"]) for x in bank.replies["all"].result["results"])
    assert total == START * len(ACCOUNTS)
    assert bank.settled()


@pytest.mark.parametrize("seed", range(12))
def test_concurrent_transfers_under_lost_and_failed_messages_keep_the_total(seed):
    bank = Bank(seed, lose=0.1, fail=0.1)
    rng = random.Random(seed)
    n = 0
    for _round in range(40):
        for _ in range(rng.randint(0, 3)):
            a, b = rng.sample(ACCOUNTS, 2)
            bank.begin(("x", n), transfer(bank, a, b, rng.randint(1, 20)))
            n += 1
        if rng.random() < 0.3:
            bank.begin(("all", n), READ_ALL)
            n += 1
        bank.run(3)
    bank.run(400)  # heal: timeouts, recovery, forgets
    assert bank.settled(), [sm.txns.state() for sm in bank.parts.values()]
    assert sum(bank.balances().values()) == START * len(ACCOUNTS)
    for token, r in bank.replies.items():
        if token[0] == "all" and r.error is None:
            assert sum(int(x["value"]) for x in r.result["results"]) == START * len(ACCOUNTS)
    ok = sum(1 for t, r in bank.replies.items() if t[0] == "x" and r.error is None)
    assert ok > 0


def _crash_run(crash_after: int, coordinator_cls=Coordinator, recovery_cls=Recovery):
    bank = Bank(crash_after, coordinator_cls, recovery_cls)
    a, b = cross_pair(4)
    bank.crash_after = crash_after
    bank.begin("t", transfer(bank, a, b, 10))
    bank.run(300)
    bal = bank.balances()
    reply = bank.replies.get("t")
    return bank, bal[a] + bal[b] == 2 * START, (bal[a], bal[b]), reply


@pytest.mark.parametrize("crash_after", range(7))
def test_a_coordinator_crash_at_any_step_resolves_all_or_nothing(crash_after):
    """Submissions of one transfer: 2 prepares, 1 decide, 2 resolves, (a forget): the
    coordinator dies after each; the participants ask the home, the home re-drives."""
    bank, atomic, bal, reply = _crash_run(crash_after)
    assert atomic, bal
    assert bal in ((START, START), (START - 10, START + 10))
    assert bank.settled()
    if reply is not None and reply.error is None:
        assert bal == (START - 10, START + 10)  # acknowledged means applied


class DecidesEarly(Coordinator):
    """Broken: commits at the home as soon as one prepare is chosen (what it does not
    know yet of the others it makes up, so the home accepts the commit)."""

    def _on_prepared(self, a, pid, result):
        a.prepared[pid] = result
        if a.state is State.PREPARING:
            a.state = State.DECIDING
            for q, prep in a.plan.prepares.items():
                if q != a.plan.home and q not in a.prepared:
                    a.prepared[q] = {"versions": [[k, v] for k, v in prep.compares],
                                     "reads": [[k, None, 0] for k in prep.reads],
                                     "existed": [], "revision": 1}
            self._decide(a)

    def _committed(self, a, pid, result):
        a.decided, a.token = True, None  # (no answer: it cannot know every result)
        self._resolve_all(a, commit=True)


class ReleasesOnTimeout(Recovery):
    """Broken: a participant whose transaction waited too long aborts it on its own."""

    def on_result(self, handle, result, error):
        role, pid, txid, *rest = handle
        if role == "participant" and not rest and self._busy.get((role, pid, txid)) is not None:
            self._submit((role, pid, txid, "resolve"), pid, TxResolve(txid, pid, False, False))
            return
        super().on_result(handle, result, error)


def _early_decide_run(seed: int, coordinator_cls) -> bool:
    """A three-partition write whose third prepare dies on a lock an older, orphaned
    transaction holds; True if it ended partly applied."""
    bank = Bank(seed, coordinator_cls)
    rng = random.Random(seed)
    keys: dict[int, bytes] = {}
    for k in rng.sample(ACCOUNTS, len(ACCOUNTS)):
        keys.setdefault(RING.partition_of(k), k)
    a, b, c, d = list(keys.values())[:4]
    # the oldest (ts 1), home d: its prepare at c is chosen, its coordinator dies then
    bank.coord.begin("old", Txn((), (SubPut(d, b"1"), SubPut(c, b"500"))), 1, 500)
    bank.run(1)
    assert bank.parts[RING.partition_of(c)].txns.xlocks
    bank.crash()
    bank.begin("t", Txn((), (SubPut(a, b"7"), SubPut(b, b"7"), SubPut(c, b"7"))))
    bank.run(10)
    got = [bank.parts[RING.partition_of(k)].kv.get(k)[0] for k in (a, b, c)]
    return b"7" in got and got != [b"7"] * 3


def test_the_broken_variants_are_caught():
    """Each broken variant breaks atomicity in some run that the real cores pass."""
    assert not any(_early_decide_run(seed, Coordinator) for seed in range(10))
    assert any(_early_decide_run(seed, DecidesEarly) for seed in range(10))
    # releasing on a timeout: the coordinator decided commit, resolved one side, died
    assert any(not _crash_run(k, recovery_cls=ReleasesOnTimeout)[1] for k in range(7))


def test_transitions_table_names_only_real_states_and_events():
    for (state, event), handler in co.TRANSITIONS.items():
        assert isinstance(state, State) and isinstance(event, Event)
        assert callable(getattr(Coordinator, handler))
    assert (State.DONE, Event.RESOLVED) not in co.TRANSITIONS


def test_deadline_while_preparing_answers_a_definite_timeout_and_releases():
    bank = Bank(6, fail=1.0)  # no submission ever reaches a partition
    a, b = cross_pair(5)
    bank.begin("t", transfer(bank, a, b, 1), timeout=10)
    bank.run(12)
    r = bank.replies["t"]
    assert r.error[0] == "timeout" and r.error[2] is False
    bank.fail = 0.0
    bank.run(100)
    assert bank.settled() and bank.coord.idle()


def test_a_retry_of_a_committed_request_id_gets_its_answer_and_applies_nothing_more():
    """The client's retry (same request id, a new coordinator after the first one's node
    died) is told the first attempt's decision and answer by the home's deduplication
    table; its own prepares are released."""
    bank = Bank(7)
    a, b = cross_pair(6)
    txn = transfer(bank, a, b, 5)
    bank.begin("first", txn, rid=[b"client", 1])
    bank.run(4)
    first = bank.replies["first"]
    assert first.error is None and first.result["succeeded"]
    bank.crash()
    bank.begin("retry", txn, rid=[b"client", 1, True])
    bank.run(20)
    retry = bank.replies["retry"]
    assert retry.error is None and retry.result == first.result
    bal = bank.balances()
    assert (bal[a], bal[b]) == (START - 5, START + 5)
    bank.run(CFG.decision_timeout_ticks + 20)  # the first one's decision: the home forgets it
    assert bank.settled()


def test_a_transaction_that_keeps_dying_is_answered_conflict_after_its_restarts():
    bank = Bank(8)
    a, b = cross_pair(7)
    c = next(k for k in ACCOUNTS if RING.partition_of(k) not in
             (RING.partition_of(a), RING.partition_of(b)))
    # the oldest (ts 1) holds b's lock and its coordinator is gone (home c)
    bank.coord.begin("old", Txn((), (SubPut(c, b"1"), SubPut(b, b"500"))), 1, 10_000)
    bank.run(1)
    bank.crash()
    bank.begin("t", transfer(bank, a, b, 1), timeout=1000)
    for _ in range(200):
        bank.step()
        if "t" in bank.replies:
            break
    r = bank.replies["t"]
    assert r.error is not None and r.error[0] == "conflict" and r.error[2] is False
    assert bank.coord.counters["restarted"] == CFG.restarts_max
    assert bank.now < 200  # long before its deadline (1000 ticks)
