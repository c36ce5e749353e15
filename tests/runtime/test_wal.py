"""Tests for dsnode.runtime.wal: durability, group commit, torn tails, corruption, snapshots.

Crashes are emulated without sleeps: ``abort()`` (or a real SIGKILL in a child process)
models process death, where the page cache survives; :class:`PowerLoss` models a power
failure by keeping only what an fsync had covered.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsnode.runtime import wal as wal_mod
from dsnode.runtime.wal import (
    REC_HEADER_BYTES,
    SEG_HEADER_BYTES,
    Recovered,
    WALClosedError,
    WALCorruptError,
    WALFailedError,
    WriteAheadLog,
    segment_name,
    snapshot_name,
)

# --------------------------------------------------------------------------- helpers


def open_wal(directory: Path, **kwargs: Any) -> tuple[WriteAheadLog, Recovered]:
    wal = WriteAheadLog(directory, **kwargs)
    return wal, wal.recover()


def reopen(directory: Path, **kwargs: Any) -> Recovered:
    """Recover a fresh WAL on ``directory`` and abort it (no writes)."""
    wal, rec = open_wal(directory, **kwargs)
    wal.abort()
    return rec


def segments(directory: Path) -> list[Path]:
    return sorted(directory.glob("wal-*.seg"))


def payloads(n: int, start: int = 1) -> list[bytes]:
    return [b"rec-%d-" % i + b"x" * (i % 7) for i in range(start, start + n)]


def numbered(items: list[bytes], first_lsn: int = 1) -> list[tuple[int, bytes]]:
    return list(enumerate(items, first_lsn))


def run_on_uvloop(main: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main())


class FsyncCounter:
    """Stands in for ``wal._fsync``: counts calls, then really fsyncs."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, fd: int) -> None:
        self.calls += 1
        os.fsync(fd)


class PowerLoss:
    """Stands in for ``wal._fsync`` and remembers what each fsync made durable.

    A file's durable length is its size when last fsynced; the durable set of names is
    the directory listing when the directory was last fsynced. ``copy_survivors``
    builds what a machine would find after losing power now.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.sizes: dict[tuple[int, int], int] = {}
        self.names: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        st_ = os.fstat(fd)
        with self._lock:
            if stat.S_ISDIR(st_.st_mode):
                self.names = set(os.listdir(self.directory))
            else:
                self.sizes[(st_.st_dev, st_.st_ino)] = st_.st_size
        os.fsync(fd)

    def copy_survivors(self, target: Path) -> None:
        target.mkdir()
        for name in sorted(self.names):
            src = self.directory / name
            if not src.exists():
                continue  # deleted later; a real disk might resurrect it, we do not
            st_ = src.stat()
            keep = self.sizes.get((st_.st_dev, st_.st_ino), 0)
            (target / name).write_bytes(src.read_bytes()[:keep])


# --------------------------------------------------------------------------- basics


async def test_append_then_recover_returns_every_record_in_lsn_order(tmp_path: Path) -> None:
    """Records come back byte-for-byte with consecutive lsns starting at 1."""
    wal, rec = open_wal(tmp_path / "wal")
    assert rec == Recovered(None, 0, [], 0, [])
    assert wal.append(b"first") == 1
    assert wal.append(b"") == 2  # empty payloads are legal
    assert wal.append_many(payloads(5)) == 7
    assert wal.append_many([]) == 7
    assert wal.last_lsn == 7 and wal.durable_lsn == 0
    assert await wal.sync() == 7
    assert wal.durable_lsn == 7
    assert wal.stats["records"] == 7
    await wal.close()

    wal2, rec2 = open_wal(tmp_path / "wal")
    assert rec2.records == numbered([b"first", b""] + payloads(5))
    assert rec2.torn_bytes_dropped == 0
    assert wal2.last_lsn == wal2.durable_lsn == 7
    assert wal2.append(b"after") == 8  # continues in the reopened segment
    await wal2.close()
    assert len(segments(tmp_path / "wal")) == 1
    assert reopen(tmp_path / "wal").records[-1] == (8, b"after")


async def test_missing_directory_is_created_as_a_fresh_log(tmp_path: Path) -> None:
    wal, rec = open_wal(tmp_path / "a" / "b" / "c")
    assert rec.records == [] and rec.snapshot is None and wal.last_lsn == 0
    assert (tmp_path / "a" / "b" / "c").is_dir()
    await wal.close()


def test_unusable_directory_raises_oserror(tmp_path: Path) -> None:
    """A data directory that cannot be created surfaces as OSError (caller exits 2)."""
    (tmp_path / "file").write_bytes(b"not a directory")
    wal = WriteAheadLog(tmp_path / "file" / "wal")
    with pytest.raises(OSError):
        wal.recover()
    wal.abort()


async def test_append_before_recover_or_after_close_is_refused(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path)
    with pytest.raises(WALClosedError):
        wal.append(b"x")
    wal.recover()
    with pytest.raises(WALClosedError):
        wal.recover()
    await wal.close()
    with pytest.raises(WALClosedError):
        wal.append(b"x")
    await wal.close()  # idempotent


async def test_process_death_without_sync_loses_nothing(tmp_path: Path) -> None:
    """Appends reach the OS at once; dying before fsync keeps them (page cache survives)."""
    wal, _ = open_wal(tmp_path, segment_bytes=256)
    wal.append_many(payloads(40))
    wal.abort()
    assert reopen(tmp_path).records == numbered(payloads(40))


def test_sigkill_after_append_loses_nothing(tmp_path: Path) -> None:
    """A real SIGKILL right after append, with no sync: every record is recovered."""
    script = (
        "import os, signal, sys\n"
        "from dsnode.runtime.wal import WriteAheadLog\n"
        "w = WriteAheadLog(sys.argv[1], segment_bytes=4096)\n"
        "w.recover()\n"
        "for i in range(500):\n"
        "    w.append(b'rec-%d' % i)\n"
        "w.append_many([b'batch-%d' % i for i in range(500)])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, timeout=60)
    assert proc.returncode == -9
    expected = [b"rec-%d" % i for i in range(500)] + [b"batch-%d" % i for i in range(500)]
    assert reopen(tmp_path).records == numbered(expected)


# --------------------------------------------------------------------------- group commit


async def test_concurrent_sync_callers_share_one_fsync_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many writers awaiting sync() together are covered by far fewer fsyncs."""
    counter = FsyncCounter()
    monkeypatch.setattr(wal_mod, "_fsync", counter)
    wal, _ = open_wal(tmp_path)
    callers = 200

    async def writer(i: int) -> None:
        lsn = wal.append(b"w%d" % i)
        assert await wal.sync() >= lsn
        assert wal.durable_lsn >= lsn

    before = counter.calls
    await asyncio.gather(*(writer(i) for i in range(callers)))
    assert wal.durable_lsn == callers
    assert wal.stats["fsyncs"] <= 2 < callers
    assert counter.calls - before <= 4  # segment + directory, at most twice
    await wal.close()


def test_group_commit_on_uvloop_shares_fsyncs(tmp_path: Path) -> None:
    """Same rule on the production event loop."""

    async def main() -> None:
        wal, _ = open_wal(tmp_path)
        lsns = [wal.append(b"%d" % i) for i in range(100)]
        results = await asyncio.gather(*(wal.sync() for _ in lsns))
        assert min(results) >= 100 and wal.stats["fsyncs"] == 1
        await wal.close()

    run_on_uvloop(main)


async def test_sync_called_during_a_round_waits_for_a_round_covering_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record appended while an fsync is in flight is not acknowledged by that fsync."""
    entered = threading.Event()
    release = threading.Event()

    def slow_fsync(fd: int) -> None:
        entered.set()
        release.wait(timeout=30)
        os.fsync(fd)

    wal, _ = open_wal(tmp_path)
    monkeypatch.setattr(wal_mod, "_fsync", slow_fsync)
    wal.append(b"a")
    first = asyncio.ensure_future(wal.sync())
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, entered.wait, 30)  # round 1 is inside fsync
    wal.append(b"b")
    second = asyncio.ensure_future(wal.sync())
    await asyncio.sleep(0)
    assert not second.done()
    release.set()
    assert await first >= 1
    assert await second == 2
    assert wal.stats["fsyncs"] == 2
    await wal.close()


async def test_cancelled_sync_caller_does_not_cancel_the_shared_round(tmp_path: Path) -> None:
    wal, _ = open_wal(tmp_path)
    wal.append(b"a")
    doomed = asyncio.ensure_future(wal.sync())
    survivor = asyncio.ensure_future(wal.sync())
    await asyncio.sleep(0)
    doomed.cancel()
    assert await survivor == 1
    assert doomed.cancelled()
    await wal.close()


async def test_fsync_false_never_fsyncs_and_acknowledges_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    counter = FsyncCounter()
    monkeypatch.setattr(wal_mod, "_fsync", counter)
    wal, _ = open_wal(tmp_path, fsync=False, segment_bytes=128)
    wal.append_many(payloads(30))
    assert await wal.sync() == 30 == wal.durable_lsn
    await wal.write_snapshot(10, b"state")
    await wal.close()
    assert counter.calls == 0
    rec = reopen(tmp_path, fsync=False)
    assert rec.snapshot == b"state" and rec.records == numbered(payloads(30)[10:], 11)


async def test_failed_fsync_poisons_the_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After an fsync error nothing more is acknowledged (the page cache is suspect)."""

    def broken(fd: int) -> None:
        raise OSError(errno.EIO, "injected I/O error")

    wal, _ = open_wal(tmp_path)
    monkeypatch.setattr(wal_mod, "_fsync", broken)
    wal.append(b"a")
    with pytest.raises(OSError, match="injected"):
        await wal.sync()
    assert wal.durable_lsn == 0
    with pytest.raises(WALFailedError):
        wal.append(b"b")
    with pytest.raises(WALFailedError):
        await wal.sync()
    await wal.close()  # does not try to sync again


# --------------------------------------------------------------------------- rotation


async def test_rotation_spreads_records_over_segments_and_recovers_them(tmp_path: Path) -> None:
    wal, _ = open_wal(tmp_path, segment_bytes=300)
    items = payloads(60)
    for item in items[:30]:
        wal.append(item)
    wal.append_many(items[30:])
    big = b"B" * 1000  # larger than a segment: gets a segment of its own
    assert wal.append(big) == 61
    await wal.close()
    segs = segments(tmp_path)
    assert len(segs) > 5
    assert all(p.stat().st_size <= 300 for p in segs[:-1])
    assert segs[-1].name == segment_name(61)
    firsts = [int(p.name[4:24]) for p in segs]
    assert firsts[0] == 1 and firsts == sorted(firsts)
    assert reopen(tmp_path, segment_bytes=300).records == numbered(items + [big])


async def test_rotated_segment_is_fsynced_before_being_acknowledged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round after a rotation fsyncs the retired segment, the new one and the dir."""
    fsynced: list[int] = []

    def spy(fd: int) -> None:
        fsynced.append(os.fstat(fd).st_ino)
        os.fsync(fd)

    wal, _ = open_wal(tmp_path, segment_bytes=200)
    wal.append(b"x" * 100)
    monkeypatch.setattr(wal_mod, "_fsync", spy)
    wal.append(b"y" * 100)  # rotates
    await wal.sync()
    inodes = {p.stat().st_ino for p in segments(tmp_path)} | {tmp_path.stat().st_ino}
    assert len(inodes) == 3 and set(fsynced) == inodes
    await wal.close()


# --------------------------------------------------------------------------- snapshots


async def test_snapshot_drops_covered_segments_and_recovery_replays_only_the_tail(
    tmp_path: Path,
) -> None:
    wal, _ = open_wal(tmp_path, segment_bytes=256)
    items = payloads(100)
    wal.append_many(items[:60])
    await wal.write_snapshot(20, b"state@20")
    wal.append_many(items[60:])
    before = segments(tmp_path)
    await wal.write_snapshot(70, b"state@70")
    after = segments(tmp_path)
    assert len(after) < len(before)
    assert sorted(p.name for p in tmp_path.glob("*.snap")) == [snapshot_name(70)]
    # Every remaining segment except the first starts after the snapshot.
    assert all(int(p.name[4:24]) > 70 for p in after[1:])
    assert int(after[0].name[4:24]) <= 71
    await wal.close()

    wal2, rec = open_wal(tmp_path, segment_bytes=256)
    assert (rec.snapshot, rec.snapshot_lsn) == (b"state@70", 70)
    assert rec.records == numbered(items[70:], 71)
    assert wal2.append(b"next") == 101
    await wal2.close()


async def test_snapshot_of_the_whole_log_then_restart(tmp_path: Path) -> None:
    wal, _ = open_wal(tmp_path, segment_bytes=128)
    wal.append_many(payloads(20))
    await wal.write_snapshot(20, b"all")
    await wal.close()
    wal2, rec = open_wal(tmp_path, segment_bytes=128)
    assert (rec.snapshot, rec.snapshot_lsn, rec.records) == (b"all", 20, [])
    assert wal2.append(b"x") == 21
    await wal2.close()
    assert reopen(tmp_path).records == [(21, b"x")]


async def test_snapshot_lsn_must_be_within_the_log(tmp_path: Path) -> None:
    wal, _ = open_wal(tmp_path)
    wal.append_many(payloads(5))
    await wal.write_snapshot(3, b"s")
    for bad in (0, 2, 6):
        with pytest.raises(ValueError):
            await wal.write_snapshot(bad, b"s")
    await wal.close()


async def test_leftover_tmp_snapshot_is_deleted(tmp_path: Path) -> None:
    wal, _ = open_wal(tmp_path)
    wal.append_many(payloads(3))
    await wal.close()
    leftover = tmp_path / (snapshot_name(3) + ".tmp")
    leftover.write_bytes(b"half a snapshot")
    rec = reopen(tmp_path)
    assert not leftover.exists()
    assert rec.snapshot is None and rec.records == numbered(payloads(3))
    assert any(".tmp" in r for r in rec.repairs)


async def test_corrupt_newest_snapshot_without_fallback_raises(tmp_path: Path) -> None:
    """Segments before the snapshot are gone, so a damaged snapshot is unrecoverable."""
    wal, _ = open_wal(tmp_path, segment_bytes=128)
    wal.append_many(payloads(30))
    await wal.write_snapshot(25, b"precious state")
    await wal.close()
    snap = tmp_path / snapshot_name(25)
    data = bytearray(snap.read_bytes())
    data[-1] ^= 0xFF
    snap.write_bytes(bytes(data))
    with pytest.raises(WALCorruptError, match=snapshot_name(25)) as info:
        WriteAheadLog(tmp_path).recover()
    assert "checksum" in str(info.value)


async def test_corrupt_snapshot_is_survivable_when_the_log_still_covers_it(
    tmp_path: Path,
) -> None:
    """With every record still in the log, recovery replays from lsn 1 instead."""
    wal, _ = open_wal(tmp_path)  # one big segment: nothing gets deleted
    wal.append_many(payloads(10))
    await wal.write_snapshot(5, b"s")
    await wal.close()
    (tmp_path / snapshot_name(5)).write_bytes(b"garbage")
    rec = reopen(tmp_path)
    assert (rec.snapshot, rec.snapshot_lsn) == (None, 0)
    assert rec.records == numbered(payloads(10))
    assert any("corrupt snapshot" in r for r in rec.repairs)


# --------------------------------------------------------------------------- torn tails


async def _write_log(directory: Path, n: int, **kwargs: Any) -> list[bytes]:
    wal, _ = open_wal(directory, **kwargs)
    items = payloads(n)
    wal.append_many(items)
    await wal.close()
    return items


@pytest.mark.parametrize("cut", [1, REC_HEADER_BYTES - 1, REC_HEADER_BYTES, REC_HEADER_BYTES + 3])
async def test_torn_final_record_is_dropped_and_appends_continue(tmp_path: Path, cut: int) -> None:
    """A final record cut short (inside its header or payload) is dropped, file truncated."""
    items = await _write_log(tmp_path, 10)
    seg = segments(tmp_path)[-1]
    full = seg.stat().st_size
    last_len = REC_HEADER_BYTES + len(items[-1])
    os.truncate(seg, full - last_len + cut)

    wal, rec = open_wal(tmp_path)
    assert rec.records == numbered(items[:-1])
    assert rec.torn_bytes_dropped == cut
    assert seg.stat().st_size == full - last_len
    assert rec.repairs and "torn" in rec.repairs[0]
    assert wal.append(b"replacement") == 10
    await wal.close()
    assert reopen(tmp_path).records == numbered(items[:-1] + [b"replacement"])


async def test_final_record_with_bad_checksum_at_eof_is_dropped(tmp_path: Path) -> None:
    items = await _write_log(tmp_path, 10)
    seg = segments(tmp_path)[-1]
    data = bytearray(seg.read_bytes())
    data[-1] ^= 0x55  # garbage in the last record's payload
    seg.write_bytes(bytes(data))
    rec = reopen(tmp_path)
    assert rec.records == numbered(items[:-1])
    assert rec.torn_bytes_dropped == REC_HEADER_BYTES + len(items[-1])


async def test_zero_filled_tail_after_last_record_is_dropped(tmp_path: Path) -> None:
    """File systems may leave zeroed blocks after a crash; they are not corruption."""
    items = await _write_log(tmp_path, 10)
    seg = segments(tmp_path)[-1]
    with open(seg, "ab") as f:
        f.write(bytes(4096))
    rec = reopen(tmp_path)
    assert rec.records == numbered(items)
    assert rec.torn_bytes_dropped == 4096


async def test_empty_segment_left_by_crash_during_rotation_is_removed(tmp_path: Path) -> None:
    items = await _write_log(tmp_path, 10)
    empty = tmp_path / segment_name(11)
    empty.write_bytes(b"")
    wal, rec = open_wal(tmp_path)
    assert rec.records == numbered(items) and not empty.exists()
    assert wal.append(b"x") == 11
    await wal.close()


async def test_power_loss_during_rotation_keeps_the_synced_prefix(tmp_path: Path) -> None:
    """The old segment lost its unsynced tail and the new one holds no record: not corrupt."""
    items = await _write_log(tmp_path, 10, segment_bytes=4096)
    seg = segments(tmp_path)[0]
    os.truncate(seg, seg.stat().st_size - 5)  # torn record 10
    (tmp_path / segment_name(11)).write_bytes(wal_mod.encode_segment_header(11))
    wal, rec = open_wal(tmp_path)
    assert rec.records == numbered(items[:9])
    assert [p.name for p in segments(tmp_path)] == [segment_name(1)]
    assert wal.append(b"x") == 10
    await wal.close()


# --------------------------------------------------------------------------- corruption


def _record_offset(items: list[bytes], index: int) -> int:
    return SEG_HEADER_BYTES + sum(REC_HEADER_BYTES + len(p) for p in items[:index])


async def test_flipped_byte_in_an_early_record_raises_naming_file_and_offset(
    tmp_path: Path,
) -> None:
    items = await _write_log(tmp_path, 10)
    seg = segments(tmp_path)[0]
    offset = _record_offset(items, 2)
    data = bytearray(seg.read_bytes())
    data[offset + REC_HEADER_BYTES] ^= 0x01
    seg.write_bytes(bytes(data))
    with pytest.raises(WALCorruptError) as info:
        WriteAheadLog(tmp_path).recover()
    assert info.value.path == str(seg) and info.value.offset == offset
    assert seg.name in str(info.value) and f"offset {offset}" in str(info.value)
    assert "checksum" in str(info.value)
    assert seg.read_bytes() == bytes(data)  # nothing was "repaired"


async def test_corrupt_length_mid_segment_is_not_mistaken_for_a_torn_tail(tmp_path: Path) -> None:
    """A length running past EOF with valid records after it is corruption, not a tear."""
    items = await _write_log(tmp_path, 10)
    seg = segments(tmp_path)[0]
    offset = _record_offset(items, 3)
    data = bytearray(seg.read_bytes())
    data[offset + 4 : offset + 8] = (10**6).to_bytes(4, "little")
    seg.write_bytes(bytes(data))
    with pytest.raises(WALCorruptError, match="runs past end of file"):
        WriteAheadLog(tmp_path).recover()


async def test_short_segment_that_is_not_the_last_raises(tmp_path: Path) -> None:
    await _write_log(tmp_path, 30, segment_bytes=200)
    first = segments(tmp_path)[0]
    os.truncate(first, first.stat().st_size - 3)
    with pytest.raises(WALCorruptError, match="not in the last segment") as info:
        WriteAheadLog(tmp_path).recover()
    assert info.value.path == str(first)


async def test_missing_middle_segment_is_an_lsn_gap(tmp_path: Path) -> None:
    await _write_log(tmp_path, 30, segment_bytes=200)
    segs = segments(tmp_path)
    assert len(segs) >= 3
    segs[1].unlink()
    with pytest.raises(WALCorruptError, match="previous segment ended") as info:
        WriteAheadLog(tmp_path).recover()
    assert info.value.path == str(segs[2])


async def test_log_not_starting_at_lsn_1_without_snapshot_raises(tmp_path: Path) -> None:
    await _write_log(tmp_path, 30, segment_bytes=200)
    segments(tmp_path)[0].unlink()
    with pytest.raises(WALCorruptError, match="are missing"):
        WriteAheadLog(tmp_path).recover()


async def test_repeated_lsn_raises(tmp_path: Path) -> None:
    items = await _write_log(tmp_path, 3)
    seg = segments(tmp_path)[0]
    with open(seg, "ab") as f:
        f.write(wal_mod.encode_record(3, b"again"))
        f.write(wal_mod.encode_record(4, b"more"))
    with pytest.raises(WALCorruptError, match="lsn repeat: expected 4, found 3") as info:
        WriteAheadLog(tmp_path).recover()
    assert info.value.offset == _record_offset(items, 3)


async def test_bad_segment_header_raises(tmp_path: Path) -> None:
    await _write_log(tmp_path, 3)
    seg = segments(tmp_path)[0]
    data = bytearray(seg.read_bytes())
    data[0:6] = b"NOTWAL"
    seg.write_bytes(bytes(data))
    with pytest.raises(WALCorruptError, match="magic") as info:
        WriteAheadLog(tmp_path).recover()
    assert info.value.offset == 0


# --------------------------------------------------------------------------- power loss


async def test_power_loss_keeps_every_record_whose_sync_returned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only fsynced bytes survive; every acknowledged record must still be recovered,
    and what is recovered must be a prefix of what was appended."""
    live = tmp_path / "live"
    power = PowerLoss(live)
    monkeypatch.setattr(wal_mod, "_fsync", power)
    wal, _ = open_wal(live, segment_bytes=512)
    appended: list[bytes] = []
    acked = 0

    async def write_and_sync(batch: list[bytes]) -> None:
        nonlocal acked
        appended.extend(batch)
        lsn = wal.append_many(batch)
        await wal.sync()
        acked = max(acked, lsn)

    for round_ in range(12):
        batches = [payloads(1 + (round_ * 3 + i) % 5, len(appended) + 1) for i in range(4)]
        tasks = []
        for batch in batches:  # each batch is appended before the next task is created
            tasks.append(asyncio.ensure_future(write_and_sync(batch)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)
        if round_ == 6:
            await wal.write_snapshot(acked - 2, b"snap")
    unsynced = payloads(7, len(appended) + 1)
    wal.append_many(unsynced)  # written to the OS, never fsynced
    appended.extend(unsynced)

    power.copy_survivors(tmp_path / "after")
    wal.abort()
    rec = reopen(tmp_path / "after")
    assert rec.snapshot_lsn > 0
    got = rec.records
    assert got[0][0] == rec.snapshot_lsn + 1
    assert got == numbered(appended[rec.snapshot_lsn : got[-1][0]], rec.snapshot_lsn + 1)
    assert got[-1][0] >= acked


# --------------------------------------------------------------------------- property


_op = st.one_of(
    st.tuples(st.just("append"), st.lists(st.binary(max_size=60), min_size=1, max_size=8)),
    st.tuples(st.just("sync"), st.integers(1, 4)),
    st.tuples(st.just("snapshot"), st.floats(0, 1)),
    st.tuples(st.just("reopen"), st.sampled_from(["close", "abort"])),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(_op, max_size=40), segment_bytes=st.sampled_from([64, 150, 1 << 20]))
def test_any_history_recovers_exactly_the_records_after_the_last_snapshot(
    ops: list[tuple[str, Any]], segment_bytes: int
) -> None:
    """Appends, syncs, snapshots, rotations and reopens (clean or abrupt) never lose,
    reorder, duplicate or invent a record; recovery returns exactly the tail."""

    async def main(directory: Path) -> None:
        log: list[bytes] = []
        snap_lsn = 0
        wal, rec = open_wal(directory, segment_bytes=segment_bytes)

        def check(rec: Recovered) -> None:
            assert rec.snapshot_lsn == snap_lsn
            assert rec.snapshot == (b"snap@%d" % snap_lsn if snap_lsn else None)
            assert rec.records == numbered(log[snap_lsn:], snap_lsn + 1)
            assert rec.torn_bytes_dropped == 0

        for kind, arg in ops:
            if kind == "append":
                if len(arg) == 1:
                    assert wal.append(arg[0]) == len(log) + 1
                else:
                    assert wal.append_many(arg) == len(log) + len(arg)
                log.extend(arg)
            elif kind == "sync":
                results = await asyncio.gather(*(wal.sync() for _ in range(arg)))
                assert results == [len(log)] * arg
            elif kind == "snapshot" and len(log) > snap_lsn:
                snap_lsn += round(arg * (len(log) - snap_lsn)) or 1
                await wal.write_snapshot(snap_lsn, b"snap@%d" % snap_lsn)
            elif kind == "reopen":
                await wal.close() if arg == "close" else wal.abort()
                wal, rec = open_wal(directory, segment_bytes=segment_bytes)
                check(rec)
            assert wal.last_lsn == len(log)
        await wal.close()
        check(reopen(directory, segment_bytes=segment_bytes))

    with tempfile.TemporaryDirectory() as tmp:
        run_on_uvloop(lambda: main(Path(tmp) / "wal"))


async def test_zero_filled_trailing_segment_is_removed(tmp_path: Path) -> None:
    """A segment created just before power loss may read back as zeros only."""
    items = await _write_log(tmp_path, 10)
    junk = tmp_path / segment_name(11)
    junk.write_bytes(bytes(8192))
    rec = reopen(tmp_path)
    assert rec.records == numbered(items) and not junk.exists()
    assert rec.torn_bytes_dropped == 8192


async def test_zero_filled_segment_before_the_last_raises(tmp_path: Path) -> None:
    await _write_log(tmp_path, 30, segment_bytes=200)
    first = segments(tmp_path)[0]
    first.write_bytes(bytes(first.stat().st_size))
    with pytest.raises(WALCorruptError, match="all zero bytes") as info:
        WriteAheadLog(tmp_path).recover()
    assert info.value.path == str(first)


async def test_segment_chain_is_checked_before_anything_is_deleted(tmp_path: Path) -> None:
    """Issue 7.5: a broken chain (a segment missing after the snapshot) fails
    recovery with the directory exactly as it was: the segments the snapshot
    covers and the torn tail are still there, for an operator to inspect."""
    await _write_log(tmp_path, 60, segment_bytes=200)
    segs = segments(tmp_path)
    assert len(segs) >= 5
    covered_through = int(segs[2].name[4:24]) - 1  # the first two segments are covered
    data = b"state"
    (tmp_path / snapshot_name(covered_through)).write_bytes(
        wal_mod.encode_snapshot(covered_through, data) + data
    )
    with open(segs[-1], "ab") as f:
        f.write(b"\x01\x02\x03")  # a torn tail
    segs[3].unlink()  # the gap
    listing = sorted(os.listdir(tmp_path))
    sizes = {p.name: p.stat().st_size for p in segments(tmp_path)}
    with pytest.raises(WALCorruptError, match="previous segment ended"):
        WriteAheadLog(tmp_path).recover()
    assert sorted(os.listdir(tmp_path)) == listing
    assert {p.name: p.stat().st_size for p in segments(tmp_path)} == sizes
