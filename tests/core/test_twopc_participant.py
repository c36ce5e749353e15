"""The participant's and home's table (core.twopc.participant), through DedupKV.apply."""

from __future__ import annotations

import msgpack
import pytest

from dsnode.core.commands import (
    LINEARIZABLE,
    STALE,
    Get,
    Put,
    SubDelete,
    SubGet,
    SubPut,
    Txn,
    decode,
    decode_checked,
    encode,
)
from dsnode.core.kv.store import ERROR_KEY
from dsnode.core.paxos.statemachine import LOCKED, DedupKV
from dsnode.core.twopc import participant as part
from dsnode.core.twopc.records import TxCommit, TxDecide, TxForget, TxPrepare, TxResolve


def prep(txid=b"t1", ts=100, pid=0, home=0, compares=(), reads=(), then=(), otherwise=()):
    return TxPrepare(txid, ts, pid, home, tuple(compares), tuple(reads), tuple(then),
                     tuple(otherwise))


def apply(sm: DedupKV, cmd, index=[0]):  # noqa: B006 - a shared log index is the point
    index[0] += 1
    return sm.apply(None, cmd, index[0])


def test_prepare_locks_reads_and_reserves_a_revision_then_commit_applies_at_it():
    sm = DedupKV()
    apply(sm, Put(b"a", b"1"))
    apply(sm, Put(b"b", b"2"))
    r = apply(sm, prep(compares=[(b"a", 1)], reads=[b"b"],
                       then=[SubPut(b"a", b"10"), SubDelete(b"b")], otherwise=[SubPut(b"c", b"x")]))
    assert r["prepared"] and r["versions"] == [[b"a", 1]]
    assert r["reads"] == [[b"b", b"2", 2]] and r["existed"] == [[b"b", True]]
    assert r["revision"] == 3 and sm.kv.revision == 3
    assert sm.txns.xlocks == {b"a": b"t1", b"b": b"t1", b"c": b"t1"}
    # the same prepare again: the same answer, nothing more locked or reserved
    assert apply(sm, prep(compares=[(b"a", 1)], reads=[b"b"],
                          then=[SubPut(b"a", b"10"), SubDelete(b"b")],
                          otherwise=[SubPut(b"c", b"x")])) is r
    assert sm.kv.revision == 3
    # other writers and linearizable readers of a locked key wait; stale readers don't
    blocked = apply(sm, Put(b"a", b"no"))
    assert blocked[ERROR_KEY][0] == LOCKED
    assert sm.read(Get(b"a", LINEARIZABLE))[ERROR_KEY][0] == LOCKED
    assert sm.read(Get(b"a", STALE)) == {"value": b"1", "version": 1}
    apply(sm, Put(b"z", b"free"))  # an unlocked key is written as usual
    assert sm.kv.revision == 4
    assert apply(sm, TxResolve(b"t1", 0, True, True)) == {"resolved": part.COMMIT}
    assert sm.kv.get(b"a") == (b"10", 3) and b"b" not in sm.kv and b"c" not in sm.kv
    assert not sm.txns.xlocks and not sm.txns.prepared
    assert apply(sm, Put(b"a", b"11"))["version"] == 5  # strictly above the txn's 3


def test_abort_releases_and_writes_nothing_and_a_late_prepare_is_refused():
    sm = DedupKV()
    apply(sm, prep(then=[SubPut(b"a", b"1")]))
    assert apply(sm, TxResolve(b"t1", 0, False, True)) == {"resolved": part.ABORT}
    assert b"a" not in sm.kv and not sm.txns.xlocks
    assert apply(sm, prep(then=[SubPut(b"a", b"1")])) == {"prepared": False,
                                                          "conflict": part.RESOLVED}
    # a resolve that overtakes its prepare leaves a tombstone: the prepare is refused
    assert apply(sm, TxResolve(b"t2", 0, False, False)) == {"resolved": part.UNKNOWN}
    assert apply(sm, prep(txid=b"t2", then=[SubPut(b"a", b"1")]))["conflict"] == part.RESOLVED
    assert not sm.txns.xlocks


def test_wait_die_older_waits_younger_dies_shared_locks_share():
    sm = DedupKV()
    assert apply(sm, prep(txid=b"mid", ts=200, reads=[b"k"]))["prepared"]
    assert apply(sm, prep(txid=b"mid2", ts=250, compares=[(b"k", 0)]))["prepared"]  # shared
    old = apply(sm, prep(txid=b"old", ts=100, then=[SubPut(b"k", b"v")]))
    assert old == {"prepared": False, "conflict": part.WAIT, "holder": b"mid"}
    young = apply(sm, prep(txid=b"young", ts=300, then=[SubPut(b"k", b"v")]))
    assert young == {"prepared": False, "conflict": part.DIE, "holder": b"mid"}
    assert sm.txns.slocks == {b"k": {b"mid", b"mid2"}} and not sm.txns.xlocks
    # a single-key get reads a shared-locked key; a put waits
    assert sm.read(Get(b"k")) == {"value": None, "version": 0}
    assert apply(sm, Put(b"k", b"x"))[ERROR_KEY][0] == LOCKED
    # a one-partition txn that only reads it goes through; one that writes it waits
    assert apply(sm, Txn((), (SubGet(b"k"),)))["succeeded"]
    assert apply(sm, Txn((), (SubPut(b"k", b"1"),)))[ERROR_KEY][0] == LOCKED
    apply(sm, TxResolve(b"mid", 0, True, True))
    apply(sm, TxResolve(b"mid2", 0, True, True))
    assert apply(sm, prep(txid=b"old", ts=100, then=[SubPut(b"k", b"v")]))["prepared"]


def test_a_locked_put_with_a_request_id_is_not_remembered():
    sm = DedupKV()
    apply(sm, prep(then=[SubPut(b"a", b"1")]))
    rid = [b"client", 1]
    assert sm.apply(rid, Put(b"a", b"x"), 50)[ERROR_KEY][0] == LOCKED
    sm.apply(None, TxResolve(b"t1", 0, False, True), 51)
    assert sm.apply(rid, Put(b"a", b"x"), 52) == {"succeeded": True, "version": 2}
    assert sm.apply(rid + [True], Put(b"a", b"x"), 53) == {"succeeded": True, "version": 2}


def test_decide_first_wins_forget_and_the_floor():
    sm = DedupKV()
    d = apply(sm, TxDecide(b"t1", 100, 0, True, True, (0, 1)))
    assert d == {"decision": part.COMMIT, "holds": True, "participants": [0, 1], "txid": b"t1",
                 "result": None, "home": 0}
    late_abort = apply(sm, TxDecide(b"t1", 100, 0, False, False, (1,)))
    assert late_abort["decision"] == part.COMMIT and late_abort["holds"] is True
    assert apply(sm, TxDecide(b"t2", 101, 0, False, False, (1,)))["decision"] == part.ABORT
    assert apply(sm, TxDecide(b"t2", 101, 0, True, True, (0, 1)))["decision"] == part.ABORT
    apply(sm, TxForget(0, (b"t1",)))
    assert set(sm.txns.decisions) == {b"t2"}
    # forgotten: remembered, not decided anew
    assert apply(sm, TxDecide(b"t1", 100, 0, False, False, (1,)))["decision"] == part.COMMIT
    assert b"t1" not in sm.txns.decisions
    # forgets ride on a decide
    apply(sm, TxDecide(b"t3", 102, 0, True, True, (0,), forget=(b"t2",)))
    assert set(sm.txns.decisions) == {b"t3"}
    # past the horizon, tombstones go and the floor rises: a commit for an unknown
    # txid at or below it is "unknown", an abort is answered abort without a record
    far = 102 + part.HORIZON_MS + 10
    apply(sm, TxDecide(b"t4", far, 0, True, True, (0,), forget=(b"t3",)))
    assert sm.txns.forgotten.floor >= 101
    assert apply(sm, TxDecide(b"t1", 100, 0, True, True, (0,)))["decision"] == part.UNKNOWN
    assert apply(sm, TxDecide(b"t0", 50, 0, False, False, (0,)))["decision"] == part.ABORT
    assert set(sm.txns.decisions) == {b"t4"}


def test_tombstones_expire_past_the_horizon_and_raise_the_floor():
    sm = DedupKV()
    apply(sm, prep(txid=b"a", ts=1000, then=[SubPut(b"x", b"1")]))
    apply(sm, TxResolve(b"a", 0, True, True))
    later = 1000 + part.HORIZON_MS + 1
    apply(sm, prep(txid=b"b", ts=later, then=[SubPut(b"y", b"1")]))
    apply(sm, TxResolve(b"b", 0, True, True))
    assert b"a" not in sm.txns.resolved.done and sm.txns.resolved.floor == 1000
    r = apply(sm, prep(txid=b"a", ts=1000, then=[SubPut(b"x", b"2")]))
    assert r == {"prepared": False, "conflict": part.TOO_OLD, "floor": 1000}
    assert sm.kv.get(b"x")[0] == b"1"


def test_prepare_refuses_gets_too_large_to_answer(monkeypatch):
    monkeypatch.setattr(part, "TXN_RESULT_BYTES_MAX", 10)
    sm = DedupKV()
    apply(sm, Put(b"big", b"x" * 11))
    r = apply(sm, prep(reads=[b"big"]))
    assert r[ERROR_KEY][0] == "too_large" and not sm.txns.prepared and not sm.txns.slocks


def test_snapshot_round_trip_keeps_prepared_locks_and_decisions():
    sm = DedupKV()
    apply(sm, Put(b"a", b"1"))
    apply(sm, prep(compares=[(b"a", 1)], then=[SubPut(b"a", b"2")], reads=[b"r"]))
    apply(sm, TxDecide(b"t9", 5, 0, True, False, (0, 3)))
    apply(sm, TxResolve(b"t8", 0, False, False))
    for blob in (sm.snapshot(), _streamed(sm)):
        back = DedupKV.restore(blob)
        assert back.dedup_state() == sm.dedup_state()
        assert back.txns.xlocks == {b"a": b"t1"} and back.txns.slocks == {b"r": {b"t1"}}
        assert apply(back, Put(b"a", b"x"))[ERROR_KEY][0] == LOCKED
        apply(back, TxResolve(b"t1", 0, True, True))
        assert back.kv.get(b"a") == (b"2", 2)
    # a snapshot from before transactions (four parts) still restores
    old = msgpack.packb([sm.kv.snapshot(), [], None, 0], use_bin_type=True)
    assert not DedupKV.restore(old).txns


def _streamed(sm: DedupKV) -> bytes:
    w = sm.snapshot_writer()
    parts: list[bytes] = []
    while not w.step(3):
        parts += w.take_kv_parts()
    parts += w.take_kv_parts()
    return w.stream_head(sum(map(len, parts))) + b"".join(parts) + w.tail()


@pytest.mark.parametrize("cmd", [
    prep(compares=[(b"a", 1)], reads=[b"b"], then=[SubPut(b"a", b"v"), SubDelete(b"c")],
         otherwise=[SubPut(b"d", b"")]),
    TxDecide(b"t1", 7, 3, True, False, (1, 3), (b"t0",)),
    TxResolve(b"t1", 2, False, True),
    TxForget(4, (b"a", b"b")),
    TxCommit(prep(pid=3, home=3, then=[SubPut(b"h", b"v")]),
             Txn(((b"o", 1),), (SubPut(b"h", b"v"), SubGet(b"o"))),
             {"versions": [[b"o", 1]], "reads": [[b"o", b"x", 1]], "existed": [],
              "revisions": [[b"o", 4]]}, (1,), (b"t0",)),
])
def test_commands_encode_and_decode_checked(cmd):
    wire = msgpack.unpackb(msgpack.packb(encode(cmd), use_bin_type=True), raw=False)
    assert decode(wire) == cmd == decode_checked(wire)


@pytest.mark.parametrize("bad", [
    ["X", b"t", 1, 0, 0, [], [], [["p", b"k"]], []],  # a put without a value
    ["X", "t", 1, 0, 0, [], [], [], []],  # a txid as a string
    ["X", b"t", -1, 0, 0, [], [], [], []],  # a negative ts
    ["X", b"t", 1, 0, 0, [[b"", 1]], [], [], []],  # an empty key
    ["Y", b"t", 1, 0, "yes", True, [], []],  # commit not a bool
    ["Y", b"t", 1, 0, True, True, [0], [7]],  # a forget txid not bin
    ["Y", b"t", 1, 0, True, True, [0]],  # short
    ["Z", b"t", 0, True],  # short
    ["W", 0, "t"],
    ["V", ["X", b"t", 1, 0, 0, [], [], [], []], ["T", [], [], []],
     {"versions": [], "reads": [], "existed": []}, [], []],  # knowledge without revisions
    ["V", ["X", b"t", 1, 0, 0, [], [], [], []], ["P", b"k", b"v", None],
     {"versions": [], "reads": [], "existed": [], "revisions": []}, [], []],  # not a txn
    ["X", b"x" * 65, 1, 0, 0, [], [], [], []],  # txid too long
])
def test_malformed_transaction_commands_are_refused(bad):
    with pytest.raises(ValueError):
        decode_checked(bad)


def commit(txid=b"t1", ts=100, home_then=(), txn=None, known=None, participants=(1,)):
    txn = txn or Txn((), tuple(home_then))
    known = known or {"versions": [], "reads": [], "existed": [], "revisions": []}
    return TxCommit(prep(txid=txid, ts=ts, home=0, then=home_then), txn, known,
                    tuple(participants))


def test_commit_at_home_applies_its_part_decides_and_answers_for_everyone():
    sm = DedupKV()
    apply(sm, Put(b"h", b"old"))
    txn = Txn(((b"h", 1), (b"o", 7)), (SubPut(b"h", b"new"), SubGet(b"o"), SubPut(b"o", b"x")))
    known = {"versions": [[b"o", 7]], "reads": [[b"o", b"ov", 7]], "existed": [],
             "revisions": [[b"o", 12]]}
    c = TxCommit(prep(home=0, compares=[(b"h", 1)], then=[SubPut(b"h", b"new")]), txn, known,
                 (1,))
    r = apply(sm, c)
    assert r["decision"] == part.COMMIT and r["holds"] is True
    assert r["result"] == {"succeeded": True, "results": [
        {"version": 2}, {"value": b"ov", "version": 7}, {"version": 12}]}
    assert sm.kv.get(b"h") == (b"new", 2) and not sm.txns.xlocks
    # a participant asking afterwards learns commit; the same commit again changes nothing
    assert apply(sm, TxDecide(b"t1", 100, 0, False, False, (1,)))["decision"] == part.COMMIT
    assert apply(sm, c)["result"] == r["result"] and sm.kv.get(b"h") == (b"new", 2)


def test_commit_after_a_participant_chose_abort_applies_nothing():
    sm = DedupKV()
    assert apply(sm, TxDecide(b"t1", 100, 0, False, False, (1,)))["decision"] == part.ABORT
    r = apply(sm, commit(home_then=[SubPut(b"h", b"v")]))
    assert r["decision"] == part.ABORT and b"h" not in sm.kv


def test_commit_meeting_a_lock_decides_nothing_and_is_not_remembered_under_its_id():
    sm = DedupKV()
    apply(sm, prep(txid=b"older", ts=50, then=[SubPut(b"h", b"x")]))
    rid = [b"client", 9]
    r = sm.apply(rid, commit(home_then=[SubPut(b"h", b"v")]), 20)
    assert r == {"prepared": False, "conflict": part.DIE, "holder": b"older"}
    assert not sm.txns.decisions
    sm.apply(None, TxResolve(b"older", 0, False, False), 21)
    r = sm.apply(rid + [True], commit(home_then=[SubPut(b"h", b"v")]), 22)
    assert r["decision"] == part.COMMIT and sm.kv.get(b"h")[0] == b"v"
    # a retry of the request (another attempt, another txid) is told the first one
    again = sm.apply(rid + [True], commit(txid=b"t2", home_then=[SubPut(b"h", b"v")]), 23)
    assert again["txid"] == b"t1" and again["result"] == r["result"]


def test_commit_lacking_a_participant_part_is_refused():
    sm = DedupKV()
    txn = Txn(((b"o", 3),), (SubPut(b"h", b"v"),))
    r = apply(sm, commit(home_then=[SubPut(b"h", b"v")], txn=txn))
    assert r[ERROR_KEY][0] == "bad_request" and not sm.txns.decisions and b"h" not in sm.kv
