"""Restart speed (issue 14): snapshot files are read and checked on worker threads
while the node scans its WAL (``SnapshotStore.start_recovery``); a damaged or
unreadable file still stops the node with a clear error, and no reading thread
outlives a failed start."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
from pathlib import Path

import pytest
from polling import async_wait_until
from test_driver import _answers, _connect
from test_snapshot_files import _flip_byte

from dsnode.config import load_config
from dsnode.runtime import snapshots as snapshots_mod
from dsnode.runtime.main import Node, StartupError
from dsnode.runtime.snapshots import (
    HEADER_BYTES,
    SnapshotCorruptError,
    SnapshotStore,
    read_snapshot_file,
    snapshot_file_name,
)
from dsnode.runtime.wal import WALCorruptError, WriteAheadLog
from dsnode.wire.framing import pack_frame

WAIT_S = 10.0


async def _store_with_files(tmp_path: Path) -> SnapshotStore:
    """Groups "meta", 0, 1, 2: meta and 0 with two good files; 1 with a good old file
    and a damaged newer one; 2 with only a damaged file."""
    store = SnapshotStore(tmp_path, fsync=False)
    store.recover([])
    for group in ("meta", 0, 1, 2):
        for index in (5, 9):
            await store.write(group, index, [b"%s@%d:" % (str(group).encode(), index), b"x" * 5000])
    store.close()
    _flip_byte(tmp_path / snapshot_file_name(1, 9), HEADER_BYTES + 100)
    os.unlink(tmp_path / snapshot_file_name(2, 5))
    _flip_byte(tmp_path / snapshot_file_name(2, 9), HEADER_BYTES + 100)
    return SnapshotStore(tmp_path, fsync=False)


def _one_at_a_time(directory: Path, groups) -> tuple[dict, list]:
    """What recovery must find, read here file by file on this thread."""
    found, corrupt = {}, []
    for group in groups:
        for index in (9, 5):
            path = directory / snapshot_file_name(group, index)
            if not path.exists():
                continue
            try:
                found[group] = read_snapshot_file(path, group, index)
                break
            except SnapshotCorruptError as e:
                corrupt.append((group, index, e.reason))
    return found, corrupt


async def test_threads_find_per_group_the_newest_good_file_and_the_damaged_newer_ones(tmp_path):
    store = await _store_with_files(tmp_path)
    groups = ["meta", 0, 1, 2]
    got = store.start_recovery(groups).result()
    want, want_corrupt = _one_at_a_time(tmp_path, groups)
    assert {g: (s.index, s.crc, bytes(s.blob)) for g, s in got.snapshots.items()} == {
        g: (s.index, s.crc, bytes(s.blob)) for g, s in want.items()
    }
    assert list(got.snapshots) == [0, 1, "meta"]  # the order the files are listed in
    assert got.snapshots[1].index == 5 and 2 not in got.snapshots
    assert sorted((str(g), i, e.reason) for g, i, e in got.corrupt) == sorted(
        (str(g), i, r) for g, i, r in want_corrupt
    )
    assert {(g, i) for g, i, _ in got.corrupt} == {(1, 9), (2, 9)}
    assert store.files(0) == [5, 9]  # the store knows every file, used or not
    store.close()


async def test_the_caller_goes_on_while_worker_threads_read_the_files(tmp_path, monkeypatch):
    """start_recovery returns before any file is read; the reads happen on the
    recovery threads (at most two at a time), and result() waits for all of them."""
    store = await _store_with_files(tmp_path)
    release = threading.Event()
    lock = threading.Lock()
    readers: list[str] = []
    busy = [0, 0]  # now, most at once

    def gated(path, group, index):
        with lock:
            busy[0] += 1
            busy[1] = max(busy[1], busy[0])
            readers.append(threading.current_thread().name)
        try:
            if not release.wait(WAIT_S):
                raise AssertionError("never released")
            return read_snapshot_file(path, group, index)
        finally:
            with lock:
                busy[0] -= 1

    monkeypatch.setattr(snapshots_mod, "read_snapshot_file", gated)
    job = store.start_recovery(["meta", 0, 1, 2])
    await async_wait_until(lambda: len(readers) == 2, WAIT_S, "two files being read")
    assert busy[0] == 2  # both threads wait on the gate: nothing was read on this thread
    release.set()
    found = job.result()
    assert set(found.snapshots) == {"meta", 0, 1}
    assert busy == [0, snapshots_mod.RECOVERY_THREADS]
    assert all(name.startswith("snapshot-recovery") for name in readers)
    store.close()


async def test_an_unreadable_file_fails_the_recovery_once_no_thread_reads_any_more(
    tmp_path, monkeypatch
):
    store = await _store_with_files(tmp_path)
    finished: list[object] = []

    def failing(path, group, index):
        if group == 0:
            raise PermissionError(13, "Permission denied", str(path))
        snap = read_snapshot_file(path, group, index)
        finished.append(group)
        return snap

    monkeypatch.setattr(snapshots_mod, "read_snapshot_file", failing)
    job = store.start_recovery(["meta", 0, 1, 2])
    with pytest.raises(PermissionError):
        job.result()
    assert sorted(map(str, finished)) == ["1", "meta"]  # every other group was done first
    assert not [t for t in threading.enumerate() if t.name.startswith("snapshot-recovery")
                and t.is_alive() and _busy(t)]
    store.close()


def _busy(thread: threading.Thread) -> bool:
    """A recovery thread is idle once its pool has no work: it exits on its own."""
    thread.join(WAIT_S)
    return thread.is_alive()


# ----------------------------------------------------------------------- a whole node


def _config(data: Path, **settings):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return load_config(
        {"node_id": "n1", "listen": f"127.0.0.1:{port}", "data_dir": str(data),
         "log_format": "json", "election_timeout_ms": "50", "heartbeat_interval_ms": "10",
         "partitions": "1", "fsync": "false", **settings},
        {},
    )


async def _stopped_node_with_snapshots(tmp_path: Path) -> Path:
    """A stopped node's data directory whose WAL checkpoint names a snapshot file of
    partition 0 (and dropped the records before it)."""
    data = tmp_path / "d"
    node = Node(_config(data, snapshot_interval_slots="3", snapshot_every_records="10"))
    await node.start()
    task = asyncio.create_task(node.driver.run())
    await async_wait_until(lambda: 0 in node.core.groups and node.core.leader_of(0), WAIT_S,
                           "a leader")
    conn, transport = _connect(node)
    for i in range(1, 31):  # one slot per put
        conn.data_received(pack_frame({"id": i, "op": "put", "key": b"k%d" % i, "value": b"v"}))
        await _answers(transport, i)
    await async_wait_until(lambda: node.wal.snapshot_lsn > 0 and node.snapshots.files(0),
                           WAIT_S, "a checkpoint naming a snapshot file")
    node.driver.stop()
    await task
    await node.wal.close()
    node.snapshots.close()
    node.server_handle.close()
    return data


async def _refused(data: Path, check=lambda: None) -> StartupError:
    """The error a start on ``data`` fails with; ``check`` runs the moment it failed."""
    node = Node(_config(data))
    with pytest.raises(StartupError) as info:
        await node.start()
    check()
    if node.wal is not None:
        await node.wal.close()
    if node.snapshots is not None:
        node.snapshots.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("snapshot-recovery")
                and _busy(t)]
    return info.value


async def test_a_node_whose_only_snapshot_file_is_damaged_does_not_start(tmp_path):
    """The files are checked on worker threads now, and a damaged one the log no
    longer covers still stops the node, naming the file."""
    data = await _stopped_node_with_snapshots(tmp_path)
    snaps = data / "snapshots"
    files = sorted(n for n in os.listdir(snaps) if n.startswith("snap-0-"))
    for name in files:
        _flip_byte(snaps / name, HEADER_BYTES + 1)
    err = await _refused(data)
    assert "snapshot file" in str(err) and "corrupt" in str(err)


async def test_an_unreadable_snapshot_file_stops_the_node(tmp_path, monkeypatch):
    data = await _stopped_node_with_snapshots(tmp_path)

    def unreadable(path, group, index):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(snapshots_mod, "read_snapshot_file", unreadable)
    err = await _refused(data)
    assert str(err).startswith("snapshot files cannot be read:")
    assert "Permission denied" in str(err)


async def test_a_corrupt_wal_stops_the_node_and_leaves_no_thread_reading_snapshots(
    tmp_path, monkeypatch
):
    """The WAL scan fails while files are still being read: the start fails only
    once the reads under way are done, and the files not started are dropped."""
    data = await _stopped_node_with_snapshots(tmp_path)
    scan_failed = threading.Event()
    checked = threading.Event()
    started: list[int] = []
    finished: list[int] = []

    def slow(path, group, index):
        started.append(index)
        assert scan_failed.wait(WAIT_S)  # still reading when the WAL scan fails
        # and for a while after: a start that did not wait for it would fail first
        checked.wait(0.5)
        snap = read_snapshot_file(path, group, index)
        finished.append(index)
        return snap

    scan = WriteAheadLog.recover

    def failing_scan(self):
        try:
            return scan(self)
        except WALCorruptError:
            scan_failed.set()
            raise

    monkeypatch.setattr(snapshots_mod, "read_snapshot_file", slow)
    monkeypatch.setattr(WriteAheadLog, "recover", failing_scan)
    wal = data / "wal"
    segment = [n for n in sorted(os.listdir(wal)) if n.endswith(".seg")][0]
    _flip_byte(wal / segment, 40)  # the first record: damage, not a torn tail
    in_flight = []

    def check() -> None:
        in_flight.append(len(started) - len(finished))
        checked.set()

    err = await _refused(data, check)
    assert str(err).startswith("write-ahead log is corrupt")
    assert scan_failed.is_set() and started and in_flight == [0]
