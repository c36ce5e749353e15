"""Durability of a real node: SIGKILL mid-load, SIGTERM/SIGINT, snapshots, damaged logs.

The load generator records, per write, what was sent and what was acknowledged;
after a restart on the same data directory the checker demands (PROTOCOL.md
"Guarantees" and "indeterminate"):

* every acknowledged write is present with its value and version;
* every write answered with a definite failure had no effect;
* every other write either took full effect or none: each key holds its value
  from before the write or the value sent (never anything else), and the keys of
  one txn all agree on which;
* versions only grow, and nothing appears under keys never written.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from harness import (
    ConnectionClosed,
    RawConn,
    ServerPool,
    ServerProcess,
    assert_ok,
    single_error_line,
)

pytestmark = pytest.mark.cluster

Entry = tuple[bytes | None, int]  # (value, version); (None, 0) is absent
ABSENT: Entry = (None, 0)




# ====================================================================== reading state
async def read_keys(addr: tuple[str, int], keys: list[bytes], batch: int = 512) -> dict:
    """Linearizable gets of ``keys``, pipelined; returns key -> (value, version)."""
    out: dict[bytes, Entry] = {}
    async with await RawConn.open(addr) as c:
        for i in range(0, len(keys), batch):
            chunk = keys[i : i + batch]
            ids = c.send_many([{"op": "get", "key": key} for key in chunk])
            for rid, key in zip(ids, chunk, strict=True):
                r = assert_ok(await c.recv_id(rid, timeout=20))
                out[key] = (r["value"], r["version"])
                assert (r["value"] is None) == (r["version"] == 0), (key, r)
    return out


# ====================================================================== the load and its model
@dataclass
class Group:
    """One write request: a put (one key) or a txn (several keys, one value)."""

    keys: list[bytes]
    value: bytes
    before: list[Entry]
    outcome: str = "unanswered"  # acked | definite | indeterminate | unanswered
    versions: list[int] = field(default_factory=list)


@dataclass
class Cycle:
    groups: list[Group] = field(default_factory=list)
    acks: int = 0

    @property
    def touched(self) -> set[bytes]:
        return {k for g in self.groups for k in g.keys}


class Model:
    """The exact state the store must hold after each verified restart."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.state: dict[bytes, Entry] = {}
        self.never_written: list[bytes] = []

    def reusable(self) -> list[bytes]:
        keys = sorted(self.state)
        self.rng.shuffle(keys)
        return keys


def make_writer(
    mode: str, cycle_no: int, conn_no: int, model: Model, cycle: Cycle, reuse: list[bytes],
    txn_keys: int,
) -> Callable[[int], tuple[dict, Group]]:
    """Build the request for (connection, seq); each key is written at most once a cycle."""

    def make(seq: int) -> tuple[dict, Group]:
        value = b"c%d/conn%d/seq%d/" % (cycle_no, conn_no, seq) + model.rng.randbytes(
            model.rng.randrange(0, 48))
        fresh = f"{mode}-c{cycle_no}-conn{conn_no}-{seq}"
        if mode == "put":
            key = reuse.pop() if reuse and seq % 3 == 0 else fresh.encode()
            group = Group([key], value, [model.state.get(key, ABSENT)])
            req = {"op": "put", "key": key, "value": value}
        else:
            keys = [f"{fresh}/{j}".encode() for j in range(txn_keys - 2)]
            keys += [reuse.pop() for _ in range(2) if reuse]
            group = Group(keys, value, [model.state.get(k, ABSENT) for k in keys])
            req = {
                "op": "txn",
                "if": [{"key": keys[0], "version": 0}],  # fresh key: always holds
                "then": [{"op": "put", "key": k, "value": value} for k in keys],
                "else": [{"op": "get", "key": keys[0]}],
            }
        cycle.groups.append(group)
        return req, group

    return make


def record_answer(mode: str, group: Group, resp: dict, cycle: Cycle) -> None:
    if resp.get("ok"):
        if mode == "put":
            assert resp["succeeded"] is True, resp
            group.versions = [resp["version"]]
        else:
            assert resp["succeeded"] is True, resp
            group.versions = [r["version"] for r in resp["results"]]
        group.outcome = "acked"
        cycle.acks += 1
    else:
        err = resp["error"]
        assert err["code"] in ("unavailable", "timeout", "overloaded", "internal"), resp
        group.outcome = "indeterminate" if err["indeterminate"] else "definite"


async def _worker(
    addr: tuple[str, int], make: Callable[[int], tuple[dict, Group]], mode: str, cycle: Cycle,
    window: int, max_seq: int, on_ack: Callable[[], None],
) -> None:
    """Keep ``window`` writes in flight on one connection until the server goes away."""
    try:
        c = await RawConn.open(addr)
    except OSError:
        return
    inflight: dict[int, Group] = {}
    seq = 0
    try:
        while True:
            while len(inflight) < window and seq < max_seq:
                req, group = make(seq)
                seq += 1
                inflight[c.send(req)] = group
            if not inflight:
                return
            await c.drain()
            resp = await c.recv(timeout=30)
            record_answer(mode, inflight.pop(resp["id"]), resp, cycle)
            on_ack()
    except (ConnectionClosed, ConnectionError, OSError):
        return  # the node died or shut down: what is still in flight stays unanswered
    finally:
        await c.close()


async def run_load_and_stop(
    srv: ServerProcess, *, mode: str, cycle_no: int, model: Model, stop_after_acks: int,
    sig: int = signal.SIGKILL, conns: int = 8, window: int = 16, max_seq: int = 1000,
    txn_keys: int = 4,
) -> tuple[Cycle, int, float]:
    """Write from ``conns`` connections; once ``stop_after_acks`` writes are acknowledged,
    send ``sig`` to the node. Returns (cycle, exit status, seconds from signal to exit)."""
    cycle = Cycle()
    reuse = model.reusable()
    reached = asyncio.Event()

    def on_ack() -> None:
        if cycle.acks >= stop_after_acks:
            reached.set()

    workers = [
        asyncio.create_task(_worker(
            srv.addr, make_writer(mode, cycle_no, i, model, cycle, reuse, txn_keys), mode,
            cycle, window, max_seq, on_ack,
        ))
        for i in range(conns)
    ]
    all_done = asyncio.ensure_future(asyncio.gather(*workers))
    reached_wait = asyncio.ensure_future(reached.wait())
    await asyncio.wait({all_done, reached_wait}, timeout=60,
                       return_when=asyncio.FIRST_COMPLETED)
    reached_wait.cancel()
    if all_done.done():
        all_done.result()  # a worker failed (e.g. a malformed answer): show that
    assert reached.is_set(), (
        f"load ended before {stop_after_acks} acks ({cycle.acks})" + srv.output_tail())
    in_flight = sum(g.outcome == "unanswered" for g in cycle.groups)
    srv.send_signal(sig)
    t0 = time.monotonic()
    rc = await asyncio.to_thread(srv.wait_exit, 15.0)
    elapsed = time.monotonic() - t0
    async with asyncio.timeout(30):
        await all_done
    assert in_flight > 0, "the signal did not hit mid-load (nothing was in flight)"
    return cycle, rc, elapsed


def check_cycle(model: Model, cycle: Cycle, state: dict[bytes, Entry], mode: str) -> None:
    """The checker described in the module docstring; then the model takes the new state."""
    applied_unacked = 0
    for g in cycle.groups:
        got = [state[k] for k in g.keys]
        applied = [
            v == g.value and ver > b[1] for (v, ver), b in zip(got, g.before, strict=True)
        ]
        unchanged = [e == b for e, b in zip(got, g.before, strict=True)]
        what = f"{mode} {g.outcome} keys={g.keys[:2]}... got={got} before={g.before}"
        if g.outcome == "acked":
            assert all(applied), "acknowledged write lost or altered: " + what
            assert [ver for _, ver in got] == g.versions, "version changed: " + what
        elif g.outcome == "definite":
            assert all(unchanged), "write answered with a definite error took effect: " + what
        else:
            assert all(applied) or all(unchanged), "half-applied or invented data: " + what
            applied_unacked += all(applied) and not all(unchanged)
    for k in cycle.touched:
        model.state[k] = state[k]


async def verify_after_restart(srv: ServerProcess, model: Model, cycle: Cycle, mode: str) -> None:
    keys = sorted(set(model.state) | cycle.touched | set(model.never_written))
    state = await read_keys(srv.addr, keys)
    # untouched keys of earlier cycles are exactly as verified before
    for k, entry in model.state.items():
        if k not in cycle.touched:
            assert state[k] == entry, f"key {k!r} changed without a write: {state[k]} != {entry}"
    for k in model.never_written:
        assert state[k] == ABSENT, f"data appeared under never-written key {k!r}"
    check_cycle(model, cycle, state, mode)
    # versions are never reused: a new write of a present key gets a higher version
    present = [(k, ver) for k, (_, ver) in model.state.items() if ver]
    if present:
        k, ver = max(present, key=lambda kv: kv[1])
        async with await RawConn.open(srv.addr) as c:
            r = assert_ok(await c.call("put", key=k, value=b"probe"))
            assert r["version"] > ver, f"version reused/decreased after restart: {r} <= {ver}"
            model.state[k] = (b"probe", r["version"])


# ====================================================================== SIGKILL mid-load
@pytest.mark.parametrize("mode", ["put", "txn"])
async def test_acknowledged_writes_survive_repeated_sigkill_mid_load(
    pool: ServerPool, seed: int, mode: str
) -> None:
    """Every acknowledged write survives SIGKILL once the node restarts with its data dir;
    unacknowledged writes take full effect or none (a txn is all-or-nothing across its
    keys); nothing is invented. Three kill/restart cycles on the same data directory, each
    cycle also overwriting keys written in earlier cycles."""
    rng = random.Random(seed)
    model = Model(rng)
    model.never_written = [f"{mode}-never-{i}".encode() for i in range(20)]
    srv = pool.start()
    for cycle_no in range(3):
        stop_after = rng.randrange(150, 600)
        cycle, rc, _ = await run_load_and_stop(
            srv, mode=mode, cycle_no=cycle_no, model=model, stop_after_acks=stop_after)
        assert rc == -signal.SIGKILL, srv.output_tail()
        srv.restart()
        await verify_after_restart(srv, model, cycle, mode)
    assert sum(1 for _, ver in model.state.values() if ver) > 100, "the load wrote little"


# ====================================================================== SIGTERM / SIGINT
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_or_sigint_mid_load_exits_0_within_10s_keeping_acked_writes(
    pool: ServerPool, seed: int, sig: int
) -> None:
    """SIGTERM or SIGINT: stop accepting work, finish or fail in-flight requests, flush,
    exit 0 within 10 seconds; acknowledged writes are there after restart, and requests
    failed definitely had no effect."""
    rng = random.Random(seed)
    model = Model(rng)
    srv = pool.start()
    cycle, rc, elapsed = await run_load_and_stop(
        srv, mode="put", cycle_no=0, model=model, stop_after_acks=rng.randrange(200, 600),
        sig=sig)
    assert rc == 0, f"exit status {rc}" + srv.output_tail()
    assert elapsed < 10.0, f"took {elapsed:.1f}s to exit"
    srv.restart()
    await verify_after_restart(srv, model, cycle, "put")


async def test_sigstop_then_sigcont_answers_everything_exactly_once(pool: ServerPool) -> None:
    """A paused process (SIGSTOP) loses nothing: after SIGCONT every pipelined request is
    answered exactly once and every acknowledged write is readable."""
    srv = pool.start()
    async with await RawConn.open(srv.addr) as c:
        srv.pause()
        try:
            ids = c.send_many([{"op": "put", "key": b"paused-%d" % i, "value": b"%d" % i}
                               for i in range(200)])
            await c.drain()
        finally:
            srv.resume()
        answers = {}
        while len(answers) < len(ids):
            r = await c.recv(timeout=20)
            assert r["id"] not in answers
            answers[r["id"]] = assert_ok(r)
    state = await read_keys(srv.addr, [b"paused-%d" % i for i in range(200)])
    for i, rid in enumerate(ids):
        assert state[b"paused-%d" % i] == (b"%d" % i, answers[rid]["version"])


# ====================================================================== snapshots
def wal_files(data_dir: Path) -> tuple[list[str], list[str]]:
    names = sorted(os.listdir(data_dir / "wal"))
    return ([n for n in names if n.endswith(".seg")], [n for n in names if n.endswith(".snap")])


async def write_keys(
    addr: tuple[str, int], items: dict[bytes, bytes], conns: int = 4, window: int = 256
) -> dict:
    """Put every item over ``conns`` connections, ``window`` requests in flight on each;
    returns key -> version."""
    keys = list(items)
    versions: dict[bytes, int] = {}

    async def one(part: list[bytes]) -> None:
        async with await RawConn.open(addr) as c:
            for i in range(0, len(part), window):
                chunk = part[i : i + window]
                ids = c.send_many([{"op": "put", "key": k, "value": items[k]} for k in chunk])
                for rid, k in zip(ids, chunk, strict=True):
                    versions[k] = assert_ok(await c.recv_id(rid, timeout=20))["version"]

    async with asyncio.timeout(60):
        await asyncio.gather(*(one(keys[i::conns]) for i in range(conns)))
    return versions


async def test_restart_after_sigkill_recovers_from_snapshot_plus_log(
    pool: ServerPool, seed: int
) -> None:
    """A snapshot stands for the records it covers and lets the covered segments go:
    after 5,000 writes with --snapshot-every-records 500, SIGKILL and restart, every key
    is there, the data dir holds a snapshot, and fewer segments than a node without
    snapshots that took the same writes."""
    rng = random.Random(seed)
    items = {b"snap-%05d" % i: rng.randbytes(rng.randrange(60, 140)) for i in range(5000)}
    small = ("--wal-segment-bytes", "65536")
    with_snap = pool.new(*small, "--snapshot-every-records", "500")
    without = pool.new(*small)
    for s in (with_snap, without):
        s.spawn()
    for s in (with_snap, without):
        s.wait_ready()
    # one write in flight per connection: a WAL record holds a few writes, not a batch of 64
    versions, _ = await asyncio.gather(write_keys(with_snap.addr, items, 8, 1),
                                       write_keys(without.addr, items, 8, 1))
    for s in (with_snap, without):
        assert s.kill() == -signal.SIGKILL
    segs, snaps = wal_files(with_snap.data_dir)
    segs_without, snaps_without = wal_files(without.data_dir)
    assert snaps, f"no snapshot written: {segs}"
    assert not snaps_without
    assert len(segs) < len(segs_without), (segs, segs_without)

    with_snap.restart()
    state = await read_keys(with_snap.addr, list(items))
    for k, v in items.items():
        assert state[k] == (v, versions[k]), f"{k!r} lost or changed across snapshot restart"
    # and it keeps going: a new write gets a higher version than anything recovered
    async with await RawConn.open(with_snap.addr) as c:
        r = assert_ok(await c.call("put", key=b"snap-00000", value=b"new"))
        assert r["version"] > max(versions.values())


# ====================================================================== damaged logs
SEG_HEADER = 20  # [6s magic][u16 version][u64 first_lsn][u32 crc]
REC_HEADER = struct.Struct("<IIQ")  # crc, payload_len, lsn


def record_offsets(path: Path) -> list[tuple[int, int]]:
    """(offset, total length) of each record in a segment file."""
    data = path.read_bytes()
    out = []
    pos = SEG_HEADER
    while pos + REC_HEADER.size <= len(data):
        _, length, _ = REC_HEADER.unpack_from(data, pos)
        out.append((pos, REC_HEADER.size + length))
        pos += REC_HEADER.size + length
    return out


async def write_sequentially(srv: ServerProcess, n: int, prefix: str) -> list[tuple[bytes, int]]:
    """n puts, one at a time, so the log order is the write order; returns (key, version)."""
    out = []
    async with await RawConn.open(srv.addr) as c:
        for i in range(n):
            key = f"{prefix}-{i:04d}".encode()
            r = assert_ok(await c.call("put", key=key, value=b"v" + key))
            out.append((key, r["version"]))
    return out


@pytest.mark.parametrize("where", ["early_segment", "middle_of_last_segment"])
async def test_corrupt_record_in_the_middle_of_the_log_refuses_to_start(
    pool: ServerPool, where: str
) -> None:
    """Damage anywhere but a torn tail must not be papered over: the node refuses to start,
    exit status 2, one line naming the damaged file."""
    seg_bytes = "4096" if where == "early_segment" else "1048576"
    srv = pool.start("--wal-segment-bytes", seg_bytes)
    await write_sequentially(srv, 120, "corrupt")
    assert srv.terminate() == 0
    segs, _ = wal_files(srv.data_dir)
    if where == "early_segment":
        assert len(segs) >= 3, segs
        victim = srv.data_dir / "wal" / segs[0]
    else:
        assert len(segs) == 1, segs
        victim = srv.data_dir / "wal" / segs[-1]
    offset, length = record_offsets(victim)[2]
    data = bytearray(victim.read_bytes())
    data[offset + REC_HEADER.size + length // 3] ^= 0x40  # a payload byte of the 3rd record
    victim.write_bytes(bytes(data))

    srv.spawn()
    rc = srv.wait_exit()
    assert rc == 2, f"started on a corrupt log (status {rc})" + srv.output_tail()
    line = single_error_line(srv.last_run_output())
    assert victim.name in line, line


async def test_torn_final_record_is_dropped_and_the_rest_recovered(pool: ServerPool) -> None:
    """A torn final record (the tail of the last segment cut short, as by a crash during
    the write) is dropped: the node starts and only that last record is lost."""
    srv = pool.start()
    written = await write_sequentially(srv, 30, "torn")
    assert srv.kill() == -signal.SIGKILL
    segs, _ = wal_files(srv.data_dir)
    last = srv.data_dir / "wal" / segs[-1]
    data = last.read_bytes()
    # The last write's record, and after it at most small bookkeeping (a commit record
    # for the chosen prefix): cut inside that record, as a crash during its write would.
    holding = [(o, n) for o, n in record_offsets(last) if written[-1][0] in data[o : o + n]]
    assert holding, "the last write is not in the last segment"
    offset, length = holding[-1]
    assert last.stat().st_size - (offset + length) < 200, "more than bookkeeping follows it"
    os.truncate(last, offset + length - 3)

    srv.restart()
    state = await read_keys(srv.addr, [k for k, _ in written])
    for key, version in written[:-1]:
        assert state[key] == (b"v" + key, version), f"{key!r} lost with the torn record"
    assert state[written[-1][0]] == ABSENT, "the torn record was applied"
    async with await RawConn.open(srv.addr) as c:  # and the log accepts appends again
        r = assert_ok(await c.call("put", key=b"after-torn", value=b"x"))
    assert srv.kill() == -signal.SIGKILL
    srv.restart()
    state = await read_keys(srv.addr, [b"after-torn", written[-2][0]])
    assert state[b"after-torn"] == (b"x", r["version"])
    assert state[written[-2][0]] == (b"v" + written[-2][0], written[-2][1])


# ====================================================================== identity of a data dir
async def test_restart_with_same_peers_is_fine_but_other_peers_or_node_id_is_refused(
    pool: ServerPool,
) -> None:
    """Once a data directory holds a cluster, membership comes from it: the same --peers is
    fine; a different --peers, or a different --node-id, is an error (exit 2, one line),
    not a silent change; the data survives the refused starts."""
    first = pool.new()
    peers = f"n1={first.listen}"
    first.extra_args += ["--peers", peers]
    first.start()
    [(key, version)] = await write_sequentially(first, 1, "ident")
    assert first.terminate() == 0

    other_addr = f"n1=127.0.0.1:{first.port + 1 if first.port < 65535 else first.port - 1}"
    rc, out = pool.run_to_exit("--peers", other_addr, data_dir=first.data_dir, port=first.port)
    assert rc == 2, out
    assert "peers" in single_error_line(out)

    rc, out = pool.run_to_exit(node_id="n2", data_dir=first.data_dir, port=first.port)
    assert rc == 2, out
    line = single_error_line(out)
    assert "node_id" in line and "n2" in line, line

    first.restart()  # same --peers as before: fine
    state = await read_keys(first.addr, [key])
    assert state[key] == (b"v" + key, version)


@pytest.mark.parametrize("damage", [b"", b"\xc1garbage", b"\x93\x01\x02\x03"])
async def test_corrupt_cluster_identity_file_refuses_to_start(
    pool: ServerPool, damage: bytes
) -> None:
    """The data directory's identity file (which node and cluster it belongs to) is
    checked like the log: a damaged one is a clear start-up error naming it (exit 2),
    never silently replaced; the data is still there once it is repaired."""
    first = pool.start()
    [(key, version)] = await write_sequentially(first, 1, "idfile")
    assert first.terminate() == 0
    ident = first.data_dir / "cluster.msgpack"
    good = ident.read_bytes()
    ident.write_bytes(damage)
    rc, out = pool.run_to_exit(data_dir=first.data_dir, port=first.port)
    assert rc == 2, out
    assert "cluster.msgpack" in single_error_line(out)
    ident.write_bytes(good)
    first.restart()
    state = await read_keys(first.addr, [key])
    assert state[key] == (b"v" + key, version)
