"""The state machine's deduplication table (``DedupKV``): a retried request id is
answered with its first result and never applied twice; the table is bounded
and expires by log index, identically on every replica (PROTOCOL.md, "Client
request ids")."""

from __future__ import annotations

import random

import msgpack
import pytest
from test_paxos_node import NODES, Cluster

from dsnode.core.commands import Put
from dsnode.core.kv.store import ERROR_KEY
from dsnode.core.paxos.statemachine import EXPIRED, DedupKV, DedupLimits, pack_batch

C = b"client-a"


def put(key: bytes, value: bytes = b"v") -> Put:
    return Put(key, value, None)


def is_expired(result: dict) -> bool:
    err = result.get(ERROR_KEY)
    return err is not None and err[0] == EXPIRED and err[2] is True


def test_pipelined_seqs_applied_out_of_order_each_keep_their_own_result():
    """64 writes in flight from one client, applied in a shuffled order: a retry of
    any of them (a lower seq than the highest applied included) gets that seq's
    own first result and changes nothing."""
    sm = DedupKV()
    order = list(range(1, 65))
    random.Random(7).shuffle(order)
    first = {}
    for index, seq in enumerate(order, start=1):
        first[seq] = sm.apply([C, seq], put(b"k%d" % seq), index)
    revision = sm.kv.revision
    for index, seq in enumerate(sorted(order), start=100):
        again = sm.apply([C, seq, True], put(b"k%d" % seq, b"other"), index)
        assert again == first[seq]
        assert "duplicate" not in again
    assert sm.kv.revision == revision
    assert sm.kv.get(b"k1") == (b"v", first[1]["version"])


def test_retry_returns_the_first_result_even_after_later_writes_changed_the_key():
    sm = DedupKV()
    r1 = sm.apply([C, 1], put(b"k", b"one"), 1)
    sm.apply([C, 2], put(b"k", b"two"), 2)
    assert sm.apply([C, 1, True], put(b"k", b"one"), 3) == r1
    assert sm.kv.get(b"k")[0] == b"two"


def test_results_are_not_shared_between_clients():
    sm = DedupKV()
    a = sm.apply([b"a", 1], put(b"k"), 1)
    b = sm.apply([b"b", 1], put(b"k"), 2)
    assert b["version"] > a["version"]


def test_a_result_older_than_age_slots_expires_and_is_never_applied_again():
    """Age is the log index at which a result was applied (agreed by every
    replica), not a clock: at ``age_slots`` slots later the retry is still
    answered; one slot further it gets ``expired`` and the store is unchanged."""
    sm = DedupKV(DedupLimits(age_slots=10))
    r = sm.apply([C, 1], put(b"k"), 5)
    sm.apply([C, 2], put(b"j"), 14)  # keeps the client active
    assert sm.apply([C, 1, True], put(b"k"), 15) == r
    revision = sm.kv.revision
    assert is_expired(sm.apply([C, 1, True], put(b"k"), 16))
    assert sm.kv.revision == revision


def test_an_idle_client_is_dropped_after_age_slots_and_its_retries_expire():
    sm = DedupKV(DedupLimits(age_slots=10))
    sm.apply([C, 1], put(b"k"), 1)
    sm.apply([b"other", 1], put(b"x"), 20)  # expires the idle client
    assert C not in sm.clients and sm.forgotten == 1
    revision = sm.kv.revision
    assert is_expired(sm.apply([C, 1, True], put(b"k"), 21))
    assert sm.kv.revision == revision


def test_a_record_recreated_after_the_client_was_dropped_never_readmits_its_old_seqs():
    """Rule 4: once any client was dropped, a new record starts at floor seq-1, so a
    late retry of a seq the dropped record held is answered ``expired``."""
    sm = DedupKV(DedupLimits(clients_max=1))
    sm.apply([C, 1], put(b"k"), 1)
    sm.apply([b"other", 1], put(b"x"), 2)  # drops C (clients_max=1)
    assert sm.forgotten == 1
    sm.apply([C, 2], put(b"k2"), 3)  # a first attempt: applied, record recreated
    revision = sm.kv.revision
    assert is_expired(sm.apply([C, 1, True], put(b"k"), 4))
    assert sm.kv.revision == revision


def test_unknown_client_retry_is_applied_while_nothing_was_ever_forgotten():
    """A retry of a brand-new client's first write whose first attempt never made
    it: with no client ever dropped the table knows it was not applied."""
    sm = DedupKV()
    r = sm.apply([C, 1, True], put(b"k"), 1)
    assert r["succeeded"] and sm.kv.revision == 1


def test_window_bound_drops_oldest_result_and_raises_the_floor():
    sm = DedupKV(DedupLimits(window_max=4))
    for seq in range(1, 7):
        sm.apply([C, seq], put(b"k%d" % seq), seq)
    w = sm.clients[C]
    assert list(w.results) == [3, 4, 5, 6] and w.floor == 2 and sm.entries == 4
    revision = sm.kv.revision
    assert is_expired(sm.apply([C, 2, True], put(b"k2"), 7))
    assert sm.apply([C, 3, True], put(b"k3"), 8)["succeeded"]
    assert sm.kv.revision == revision


def test_entries_bound_over_all_clients():
    sm = DedupKV(DedupLimits(entries_max=5))
    for i in range(12):
        sm.apply([b"c%d" % (i % 3), i // 3 + 1], put(b"k%d" % i), i + 1)
    assert sm.entries == 5 == sum(len(w.results) for w in sm.clients.values())


def test_clients_bound_drops_least_recently_active_client():
    sm = DedupKV(DedupLimits(clients_max=2))
    sm.apply([b"a", 1], put(b"k"), 1)
    sm.apply([b"b", 1], put(b"k"), 2)
    sm.apply([b"a", 2], put(b"k"), 3)  # a is now the most recent
    sm.apply([b"c", 1], put(b"k"), 4)
    assert list(sm.clients) == [b"a", b"c"]


@pytest.mark.parametrize("field, value", [
    ("clients_max", 0), ("window_max", 0), ("entries_max", -1), ("age_slots", 0),
])
def test_limits_must_be_positive(field, value):
    with pytest.raises(ValueError, match=field):
        DedupLimits(**{field: value})


def _replay(entries: list[bytes], limits: DedupLimits) -> DedupKV:
    sm = DedupKV(limits)
    for index, value in enumerate(entries, start=1):
        sm.apply_value(value, index)
    return sm


def test_replicas_applying_the_same_log_agree_on_table_and_snapshot_bytes():
    """Seeded random log with retries, several clients, tight bounds: two replicas
    (one restored from a snapshot midway) end with the same table and the same
    snapshot bytes; the writer's piecewise bytes equal the one-shot ones."""
    rng = random.Random(3)
    limits = DedupLimits(clients_max=3, window_max=5, entries_max=9, age_slots=40)
    entries = []
    seqs = dict.fromkeys(range(5), 0)
    for _ in range(200):
        batch = []
        for _ in range(rng.randint(1, 4)):
            c = rng.randrange(5)
            if seqs[c] and rng.random() < 0.3:
                rid = [b"c%d" % c, rng.randint(max(1, seqs[c] - 8), seqs[c]), True]
            else:
                seqs[c] += 1
                rid = [b"c%d" % c, seqs[c]]
            batch.append((rid, put(b"k%d" % rng.randrange(8), b"%d" % rng.randrange(99))))
        entries.append(pack_batch(batch))
    a = _replay(entries, limits)
    half = _replay(entries[:100], limits)
    b = DedupKV.restore(half.snapshot(), limits)
    for index, value in enumerate(entries[100:], start=101):
        b.apply_value(value, index)
    assert a.dedup_state() == b.dedup_state()
    assert a.snapshot() == b.snapshot()
    assert a.forgotten > 0 and a.entries <= limits.entries_max
    w = a.snapshot_writer()
    while not w.step(3):
        pass
    assert w.result() == a.snapshot()


def test_restore_accepts_the_older_two_and_three_element_formats():
    """0.1 snapshots were ``[kv_blob, table]``, later ``[kv_blob, table, uuid]``, the
    table ``[client, highest seq, result]``: that seq's retry keeps its result,
    lower seqs are ``expired`` (they answered ``duplicate`` before)."""
    kv = DedupKV()
    kv.apply(None, put(b"k"), 1)
    kv_blob = kv.kv.snapshot()
    old_result = {"succeeded": True, "version": 1}
    table = [[C, 5, old_result]]
    for blob in (msgpack.packb([kv_blob, table], use_bin_type=True),
                 msgpack.packb([kv_blob, table, "uuid-1"], use_bin_type=True)):
        sm = DedupKV.restore(blob)
        assert sm.kv.get(b"k") == (b"v", 1)
        assert sm.apply([C, 5, True], put(b"k"), 10) == old_result
        assert is_expired(sm.apply([C, 4, True], put(b"k"), 11))
        assert sm.apply([C, 6], put(b"k"), 12)["succeeded"]
    assert DedupKV.restore(msgpack.packb([kv_blob, table, "uuid-1"])).cluster_uuid == "uuid-1"


def test_expired_answers_are_indeterminate_errors_not_results():
    """The proposer turns ``[code, message, True]`` into an indeterminate error reply."""
    sm = DedupKV(DedupLimits(window_max=1))
    sm.apply([C, 1], put(b"k"), 1)
    sm.apply([C, 2], put(b"k"), 2)
    err = sm.apply([C, 1, True], put(b"k"), 3)[ERROR_KEY]
    assert err[0] == "expired" and "cannot tell" in err[1] and err[2] is True


@pytest.mark.parametrize("window", [1, 15, 16, 70_000])
@pytest.mark.parametrize("step", [1, 7, 100_000])
def test_snapshot_writer_encodes_the_table_in_steps_to_the_one_shot_bytes(window, step):
    """Across msgpack's array header sizes (fixarray, array 16, array 32), any step
    size, a client whose results all expired (an empty row), and a snapshot captured
    before later applies change the table."""
    if window == 70_000 and step == 1:
        pytest.skip("covered by step 7; 70k single steps are slow")
    limits = DedupLimits(window_max=window, entries_max=200_000, age_slots=100_000)
    sm = DedupKV(limits)
    sm.apply([b"old", 1], put(b"o"), 1)
    sm.apply([b"old", 2], put(b"o"), 2)
    n = min(window + 3, 70_003)
    for seq in range(1, n + 1):
        sm.apply([b"a", seq], put(b"k%d" % (seq % 50)), seq)
    sm.apply([b"old", 1, True], put(b"o"), n + 1)  # a cache hit keeps the client active
    sm.apply([b"b", 1], put(b"x"), n + 2)
    assert is_expired(sm.apply([b"old", 2, True], put(b"o"), 100_003))  # all expired
    assert not sm.clients[b"old"].results and sm.clients[b"old"].floor == 2
    expected = sm.snapshot()
    w = sm.snapshot_writer()
    sm.apply([b"a", n + 1], put(b"later"), 100_004)  # after capture: not in the snapshot
    while not w.step(step):
        pass
    assert w.result() == expected
    assert DedupKV.restore(expected, limits).dedup_state()[1][0][3][-1][0] == n


def test_leader_answers_an_expired_retry_with_an_indeterminate_error_on_every_replica():
    """Through Paxos: replicas apply the same entries and agree on the table; the
    leader answers a retry of a dropped id with ``expired``, indeterminate, and the
    store is unchanged."""
    c = Cluster()
    for n in NODES:
        c.nodes[n].groups[0].sm = DedupKV(DedupLimits(window_max=1))
    c.elect("a")
    c.nodes["a"].propose(0, "t1", put(b"k"), request_id=(b"cl", 1))
    c.settle()
    c.nodes["a"].propose(0, "t2", put(b"k"), request_id=(b"cl", 2))
    c.settle()
    c.nodes["a"].propose(0, "t3", put(b"k"), request_id=(b"cl", 1, True))
    c.settle()
    replies = {r.token: r for r in c.replies["a"]}
    assert replies["t1"].result["version"] == 1 and replies["t2"].result["version"] == 2
    assert replies["t3"].result is None
    code, message, indeterminate = replies["t3"].error
    assert code == "expired" and indeterminate is True and "cannot tell" in message
    c.tick(3)  # heartbeats carry the commit point: followers apply the last entry too
    states = {repr(c.nodes[n].groups[0].sm.dedup_state()) for n in NODES}
    assert len(states) == 1
    assert {c.nodes[n].groups[0].sm.kv.revision for n in NODES} == {2}


def test_restore_reads_the_kv_blob_in_place_and_rejects_a_cut_snapshot():
    """The KV blob (nearly all of a snapshot) is decoded from a view of the
    snapshot's bytes, not a copy, for the whole-blob form and the streamed one
    (bin 32 header); a snapshot cut short or with bytes after it is refused."""
    from dsnode.core.paxos.statemachine import _split_snapshot

    sm = DedupKV()
    for i in range(50):
        sm.apply([C, i + 1], put(b"k%d" % i), i + 1)
    whole = sm.snapshot()
    w = sm.snapshot_writer()
    kv_parts: list[bytes] = []
    while not w.step(7):
        kv_parts += w.take_kv_parts()
    kv_parts += w.take_kv_parts()
    kv_len = sum(map(len, kv_parts))
    streamed = w.stream_head(kv_len) + b"".join(kv_parts) + w.tail()
    assert streamed != whole
    for blob in (whole, streamed):
        parts = _split_snapshot(blob)
        assert isinstance(parts[0], memoryview) and len(parts) == 5
        back = DedupKV.restore(blob)
        assert sorted(back.kv.items()) == sorted(sm.kv.items())
        assert back.dedup_state() == sm.dedup_state()
    for bad in (whole[:-3], whole + b"\x00", whole[:40]):
        with pytest.raises(ValueError):
            DedupKV.restore(bad)
