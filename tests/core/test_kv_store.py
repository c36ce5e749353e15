"""The KV state machine: versions, conditional writes, transactions, snapshots."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsnode.core import commands
from dsnode.core.commands import Delete, Get, Put, SubDelete, SubGet, SubPut, Txn
from dsnode.core.kv.store import KVStore, pack_entry, shards_for
from dsnode.core.paxos.statemachine import DedupKV


def test_version_strictly_increases_and_is_never_reused_after_delete_and_recreate():
    """PROTOCOL.md: a key's version strictly increases with each change, even across delete."""
    s = KVStore()
    v1 = s.apply(Put(b"k", b"a"))["version"]
    v2 = s.apply(Put(b"k", b"b"))["version"]
    d = s.apply(Delete(b"k"))
    assert d == {"succeeded": True, "existed": True, "version": v2}
    v3 = s.apply(Put(b"k", b"c"))["version"]
    assert 0 < v1 < v2 < v3


@pytest.mark.parametrize(
    "setup, cmd, expected",
    [
        ([], Put(b"k", b"v", if_version=0), {"succeeded": True, "version": 1}),
        ([Put(b"k", b"v")], Put(b"k", b"w", if_version=0), {"succeeded": False, "version": 1}),
        ([Put(b"k", b"v")], Put(b"k", b"w", if_version=1), {"succeeded": True, "version": 2}),
        ([Put(b"k", b"v")], Put(b"k", b"w", if_version=7), {"succeeded": False, "version": 1}),
        ([], Delete(b"k"), {"succeeded": True, "existed": False, "version": 0}),
        ([Put(b"k", b"v")], Delete(b"k", if_version=2),
         {"succeeded": False, "existed": True, "version": 1}),
        ([Put(b"k", b"v")], Delete(b"k", if_version=1),
         {"succeeded": True, "existed": True, "version": 1}),
        ([], Delete(b"k", if_version=0), {"succeeded": True, "existed": False, "version": 0}),
        ([Put(b"k", b"v")], Get(b"k"), {"value": b"v", "version": 1}),
        ([], Get(b"k"), {"value": None, "version": 0}),
    ],
)
def test_conditional_ops_follow_the_protocol_table(setup, cmd, expected):
    s = KVStore()
    for c in setup:
        s.apply(c)
    assert s.apply(cmd) == expected


def test_txn_gets_see_state_before_own_writes_and_writes_share_one_revision():
    s = KVStore()
    s.apply(Put(b"a", b"1"))
    r = s.apply(Txn(((b"a", 1),), (SubGet(b"a"), SubPut(b"a", b"2"), SubPut(b"b", b"x"),
                                    SubGet(b"b"))))
    assert r["succeeded"] is True
    assert r["results"][0] == {"value": b"1", "version": 1}
    assert r["results"][1] == r["results"][2] == {"version": 2}
    assert r["results"][3] == {"value": None, "version": 0}
    assert s.get(b"a") == (b"2", 2) and s.get(b"b") == (b"x", 2)


def test_txn_failed_compare_runs_else_branch_only():
    s = KVStore()
    s.apply(Put(b"a", b"1"))
    r = s.apply(Txn(((b"a", 0),), (SubPut(b"a", b"then"),), (SubDelete(b"a"), SubGet(b"a"))))
    assert r == {"succeeded": False, "results": [{"existed": True}, {"value": b"1", "version": 1}]}
    assert s.get(b"a") == (None, 0)


def test_read_only_or_no_op_txn_does_not_advance_revision():
    s = KVStore()
    s.apply(Txn((), (SubGet(b"a"), SubDelete(b"zz"))))
    assert s.revision == 0


keys = st.binary(min_size=1, max_size=3)
vals = st.binary(max_size=4)
vers = st.integers(0, 6)
ops = st.one_of(
    st.builds(Put, keys, vals, st.none() | vers),
    st.builds(Delete, keys, st.none() | vers),
    st.builds(Get, keys),
    st.builds(
        Txn,
        st.lists(st.tuples(keys, vers), max_size=2).map(tuple),
        st.lists(st.one_of(st.builds(SubGet, keys), st.builds(SubPut, keys, vals)),
                 max_size=3).map(tuple),
        st.lists(st.builds(SubDelete, keys), max_size=2, unique_by=lambda s: s.key).map(tuple),
    ),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=30))
def test_replay_from_snapshot_and_encoded_commands_is_identical(cmds):
    """Determinism: same commands, same order -> same state and results, through encode/decode."""
    a, b = KVStore(), KVStore()
    cut = len(cmds) // 2
    for c in cmds[:cut]:
        a.apply(c)
        b.apply(commands.decode(commands.encode(c)))
    b = KVStore.restore(b.snapshot())
    for c in cmds[cut:]:
        assert a.apply(c) == b.apply(commands.decode(commands.encode(c)))
    assert dict(a.items()) == dict(b.items()) and a.revision == b.revision


@settings(max_examples=200, deadline=None)
@given(st.lists(ops, max_size=30), st.integers(min_value=1, max_value=5))
def test_piecewise_snapshot_restores_the_same_store_at_any_step_size(cmds, per_step):
    """Format 3: a header ``[3, revision, count]``, then one map per step; the
    bytes depend only on the step sizes (replicas stepping alike agree), and
    ``restore`` rebuilds the same store whatever they were."""
    kv = KVStore()
    for c in cmds:
        kv.apply(c)
    w = kv.snapshot_writer()
    steps = 0
    while not w.step(per_step):
        steps += 1
    assert steps == max(0, -(-len(kv) // per_step) - 1)
    again = KVStore.restore(kv.snapshot())
    w2 = again.snapshot_writer()
    while not w2.step(per_step):
        pass
    assert w2.result() == w.result()  # same state, same steps: the same bytes
    for blob in (w.result(), kv.snapshot()):
        back = KVStore.restore(blob)
        assert dict(back.items()) == dict(kv.items()) and back.revision == kv.revision


def _v3(count: int, *pieces) -> bytes:
    from dsnode.core.kv.store import SHARDS

    return msgpack.packb([3, 1, count, SHARDS]) + b"".join(map(msgpack.packb, pieces))


@pytest.mark.parametrize(
    "blob, why",
    [
        (_v3(2, [0, {b"a": pack_entry(b"1", 1)}]), "1 entries, the header says 2"),
        (_v3(0, [0, {b"a": b"x" * 8}]), "unexpected data"),
        (_v3(1, [5000, {b"a": b"x" * 8}]), "bad shard piece"),
        (_v3(2, [0, {b"a": b"x" * 8}], [0, {b"a": b"y" * 8}]), "a key appears twice"),
        (msgpack.packb([9, 1, 0]), "unknown KV snapshot format 9"),
        (msgpack.packb("junk"), "bad header"),
    ],
)
def test_a_damaged_snapshot_is_refused_with_a_reason(blob, why):
    with pytest.raises(ValueError, match=why):
        KVStore.restore(blob)


def test_snapshot_writer_is_a_point_in_time_capture():
    """Writes after the capture do not leak into the snapshot being encoded."""
    kv = KVStore()
    kv.apply(Put(b"a", b"1"))
    kv.apply(Put(b"b", b"2"))
    before = kv.snapshot()
    w = kv.snapshot_writer()
    w.step(1)
    kv.apply(Put(b"a", b"changed"))
    kv.apply(Delete(b"b"))
    kv.apply(Put(b"c", b"new"))
    while not w.step(1):
        pass
    assert _content(w.result()) == _content(before)


def test_unfinished_snapshot_writer_refuses_to_give_a_result():
    kv = KVStore()
    kv.apply(Put(b"a", b"1"))
    kv.apply(Put(b"b", b"2"))
    w = kv.snapshot_writer()
    assert not w.step(1)
    with pytest.raises(ValueError):
        w.result()


@pytest.mark.parametrize("n_keys, n_clients", [(0, 0), (1, 1), (300, 3), (70_000, 5)])
def test_dedup_snapshot_writer_equals_one_shot_and_restores(n_keys, n_clients):
    """The state machine's writer (KV blob as bin, then the dedup table) restores
    the same state machine, across bin 8/16/32 lengths."""
    sm = DedupKV()
    for i in range(n_keys):
        rid = [f"c{i % n_clients}", i + 1] if n_clients else None
        sm.apply(rid, Put(b"k%d" % i, b"v" * (i % 50)), i + 1)
    w = sm.snapshot_writer()
    while not w.step(1000):
        pass
    back = DedupKV.restore(w.result())
    assert dict(back.kv.items()) == dict(sm.kv.items()) and back.dedup_state() == sm.dedup_state()


def test_txn_whose_gets_would_outgrow_a_frame_fails_with_no_effect():
    """Issue 13: no answer may outgrow a frame. A transaction whose gets would
    return more than TXN_RESULT_BYTES_MAX fails as too_large, definitely: its
    writes are not applied, on every replica alike (it is decided by the state)."""
    from dsnode.core.kv.store import ERROR_KEY, TXN_RESULT_BYTES_MAX

    s = KVStore()
    big = b"x" * (1024 * 1024)
    n = TXN_RESULT_BYTES_MAX // len(big) + 1
    for i in range(n):
        s.apply(Put(b"k%d" % i, big))
    rev = s.revision
    r = s.apply(Txn((), tuple(SubGet(b"k%d" % i) for i in range(n)) + (SubPut(b"w", b"1"),)))
    assert r[ERROR_KEY][0] == "too_large"
    assert s.revision == rev and s.get(b"w") == (None, 0)
    ok = s.apply(Txn((), tuple(SubGet(b"k%d" % i) for i in range(n - 1))))
    assert ok["succeeded"] is True and len(ok["results"]) == n - 1


def test_a_snapshot_of_the_old_format_restores():
    """Format 2 (key -> [value, version], before packed entries) still loads."""
    blob = msgpack.packb([2, 7, {b"a": [b"1", 3], b"b": [b"", 7]}], use_bin_type=True)
    kv = KVStore.restore(blob)
    assert (kv.get(b"a"), kv.get(b"b"), kv.revision, len(kv)) == ((b"1", 3), (b"", 7), 7, 2)


def test_capture_copies_only_the_shards_written_while_a_writer_is_live():
    """The capture shares the shards; a write copies its shard first (so the
    writer's view never changes), and once the writer is done nothing is copied."""
    kv = KVStore()
    for i in range(5000):
        kv.apply(Put(b"k%d" % i, b"v%d" % i))
    before = kv.snapshot()
    shards = list(kv._shards)
    w = kv.snapshot_writer()
    assert w.remaining == 5000
    kv.apply(Put(b"k1", b"changed"))
    kv.apply(Delete(b"k2"))
    copied = [i for i, (a, b) in enumerate(zip(shards, kv._shards, strict=True)) if a is not b]
    assert 1 <= len(copied) <= 2
    while not w.step(700):
        pass
    assert _content(w.result()) == _content(before)
    assert kv.get(b"k1") == (b"changed", 5001) and len(kv) == 4999
    shards = list(kv._shards)
    kv.apply(Put(b"k3", b"after"))
    assert all(a is b for a, b in zip(shards, kv._shards, strict=True))


def test_a_key_costs_well_under_300_bytes_of_memory():
    """Issue 14: per key, the store keeps its key and one packed entry in a dict
    (no tuple, no int object); tracemalloc counts what 20,000 keys allocate."""
    import tracemalloc

    keys = [b"key%012d" % i for i in range(20_000)]
    values = [b"%08d" % i + b"v" * 92 for i in range(20_000)]  # 100 bytes
    tracemalloc.start()
    base = tracemalloc.take_snapshot()
    kv = KVStore()
    for k, v in zip(keys, values, strict=True):
        kv.apply(Put(k, v))
    grown = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(base, "filename"))
    tracemalloc.stop()
    per_key = (grown + sum(map(len, keys)) + 33 * len(keys)) / len(keys)  # keys count too
    assert per_key < 300, per_key


def _content(blob: bytes) -> tuple[int, dict]:
    kv = KVStore.restore(blob)
    return kv.revision, dict(kv.items())


def test_a_shard_the_writer_has_read_is_changed_in_place():
    """Copy on write only where it is needed: once the writer has read a shard,
    writes to it no longer copy it."""
    kv = KVStore()
    for i in range(5000):
        kv.apply(Put(b"k%d" % i, b"v"))
    w = kv.snapshot_writer()
    w.step(2500)  # about half the shards read
    shards = list(kv._shards)
    for i in range(5000):
        kv.apply(Put(b"k%d" % i, b"w"))
    copied = sum(a is not b for a, b in zip(shards, kv._shards, strict=True))
    assert 300 < copied < 800  # the unread half, not all 1,024
    while not w.step(1000):
        pass
    assert all(v == b"v" for _, (v, _) in KVStore.restore(w.result()).items())


def test_a_step_stops_near_its_byte_budget_for_large_values():
    """Entries count steps for small values; for large ones the byte budget does,
    so no step packs more than about a megabyte (plus one entry)."""
    kv = KVStore()
    for i in range(40):
        kv.apply(Put(b"k%d" % i, bytes([i]) * 100_000))
    w = kv.snapshot_writer()
    sizes = []
    while True:
        done = w.step(1024, 300_000)
        sizes.append(sum(map(len, w.take_parts())))
        if done:
            break
    assert len(sizes) >= 10 and max(sizes) < 300_000 + 2 * 100_100
    kv2 = KVStore()
    w2 = kv.snapshot_writer()
    while not w2.step(1024):
        pass
    assert dict(kv2.restore(w2.result()).items()) == dict(kv.items())


@pytest.mark.parametrize("partitions, shards", [(1, 1024), (2, 512), (16, 64), (64, 16),
                                                (100, 16), (256, 16), (4096, 16)])
def test_a_node_keeps_about_1024_shards_over_its_partitions(partitions, shards):
    """Issue 14: 64 partitions of 1,024 small dicts each cost 40 more bytes per key
    than 64 of 16 larger ones (dict headers, free slots, a fragmented heap)."""
    assert shards_for(partitions) == shards


@pytest.mark.parametrize("bad", [0, -4, 3, 48, 1.0, "16", None, True])
def test_a_shard_count_that_is_no_power_of_two_is_refused(bad):
    with pytest.raises(ValueError, match="power of two"):
        KVStore(bad)


@pytest.mark.parametrize("written, read", [(1024, 16), (16, 1024), (16, 16), (1, 64)])
def test_a_snapshot_restores_into_any_shard_count(written, read):
    """A snapshot written with one shard count (an older build's 1,024, or a peer's)
    restores into another: every key is placed in its own shard anew."""
    kv = KVStore(written)
    for i in range(3000):
        kv.apply(Put(b"k%d" % i, b"v%d" % i))
    kv.apply(Delete(b"k7"))
    back = KVStore.restore(kv.snapshot(), read)
    assert back.shard_count == read and len(back) == 2999 and back.revision == kv.revision
    assert dict(back.items()) == dict(kv.items())
    assert all(back.get(b"k%d" % i) == kv.get(b"k%d" % i) for i in range(3000))
    assert back.apply(Put(b"k1", b"x"))["version"] == kv.revision + 1


def test_a_snapshot_with_a_bad_shard_count_is_refused():
    blob = msgpack.packb([3, 1, 0, "many"], use_bin_type=True)
    with pytest.raises(ValueError, match="shard count"):
        KVStore.restore(blob)


def test_the_dedup_state_machine_restores_with_the_shards_asked_for():
    sm = DedupKV(shards=16)
    sm.kv.apply(Put(b"a", b"1"))
    assert sm.kv.shard_count == 16
    back = DedupKV.restore(sm.snapshot(), shards=64)
    assert back.kv.shard_count == 64 and back.kv.get(b"a") == (b"1", 1)
