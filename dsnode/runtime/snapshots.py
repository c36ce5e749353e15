"""State-machine snapshot files: one per group and index, beside the WAL.

Contract
--------
* :meth:`SnapshotStore.write` stores a group's snapshot (the pieces a
  ``SnapshotWanted`` writer produced, never joined in memory) as
  ``snap-<group>-<index:020d>.snap``: written to ``….tmp`` on a worker thread
  (CRC-32 computed there too), fsynced, renamed into place, then the directory
  fsynced. Only then does the driver tell the core (``snapshot_ready``), which
  records in the WAL which file is current: the WAL never holds the state.
* The file is handed back as a read-only ``mmap`` of its data (the page after
  the header), which the core keeps to serve catch-up chunks: the snapshot
  costs page cache, not heap, and the event loop never copies it.
* :meth:`SnapshotStore.recover` (called once, before serving) removes torn
  ``*.tmp`` files and returns, per group, the newest file whose header and
  checksum are valid, plus the newer ones that are not (``corrupt``): the node
  may start only if the log covers each of those (``main`` checks it after
  replay). :meth:`SnapshotStore.start_recovery` does the same with the files
  read and checked on worker threads while the node scans its WAL.
* :meth:`SnapshotStore.prune` removes a group's files older than the one a
  durable WAL checkpoint names: recovery never needs them again.

On-disk format (integers little-endian): a 4096-byte header page, then data::

    [8s magic b"DSNGSNAP"][u16 version=1][u64 index][u64 data_len][u32 data_crc]
    [u16 group_len][group id, msgpack][u32 crc32 of the header bytes before it]
    zero padding to 4096 bytes, then data_len bytes of data
"""

from __future__ import annotations

import asyncio
import mmap
import os
import re
import struct
import zlib
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from dsnode.core.paxos.outputs import StoredSnapshot
from dsnode.runtime import memory

__all__ = [
    "RecoveredSnapshots",
    "RecoveryJob",
    "SnapshotCorruptError",
    "SnapshotStore",
    "snapshot_file_name",
]

MAGIC = b"DSNGSNAP"
FORMAT_VERSION = 1
HEADER_BYTES = 4096  # one page, so the data can be mapped on its own
_HDR = struct.Struct("<8sHQQIH")
_CRC = struct.Struct("<I")
_NAME_RE = re.compile(r"^snap-(.+)-(\d{20})\.snap$")
_OPEN_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
_FDATASYNC = getattr(os, "fdatasync", os.fsync)
# Threads reading and checking snapshot files at recovery: the checksum releases the
# GIL, so two keep two cores busy; more would only contend for the disk.
RECOVERY_THREADS = 2


class SnapshotCorruptError(Exception):
    """A snapshot file is damaged (bad header, wrong size or checksum)."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


def _group_token(group: Any) -> str:
    token = str(group)
    if not token or "/" in token or token.startswith("."):
        raise ValueError(f"group id {group!r} cannot name a snapshot file")
    return token


def snapshot_file_name(group: Any, index: int) -> str:
    return f"snap-{_group_token(group)}-{index:020d}.snap"


def encode_header(group: Any, index: int, data_len: int, data_crc: int) -> bytes:
    gid = msgpack.packb(group, use_bin_type=True)
    body = _HDR.pack(MAGIC, FORMAT_VERSION, index, data_len, data_crc, len(gid)) + gid
    head = body + _CRC.pack(zlib.crc32(body))
    if len(head) > HEADER_BYTES:
        raise ValueError(f"group id {group!r} is too long for a snapshot header")
    return head + bytes(HEADER_BYTES - len(head))


def _map_data(fd: int, data_len: int) -> Any:
    if data_len == 0:
        return b""
    return mmap.mmap(fd, data_len, access=mmap.ACCESS_READ, offset=HEADER_BYTES)


def read_snapshot_file(path: Path, group: Any, index: int) -> StoredSnapshot:
    """Open and verify one file; raise :class:`SnapshotCorruptError` if it is damaged."""
    with open(path, "rb") as f:
        head = f.read(HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
        if len(head) < _HDR.size:
            raise SnapshotCorruptError(path, f"shorter than its header ({size} bytes)")
        magic, version, hdr_index, data_len, data_crc, gid_len = _HDR.unpack_from(head, 0)
        if magic != MAGIC:
            raise SnapshotCorruptError(path, f"bad magic {magic!r}")
        if version != FORMAT_VERSION:
            raise SnapshotCorruptError(path, f"unsupported format version {version}")
        end = _HDR.size + gid_len
        if end + _CRC.size > len(head) or _CRC.unpack_from(head, end)[0] != zlib.crc32(
            head[:end]
        ):
            raise SnapshotCorruptError(path, "header checksum mismatch")
        try:
            hdr_group = msgpack.unpackb(head[_HDR.size : end], raw=False)
        except ValueError as e:
            raise SnapshotCorruptError(path, f"bad group id in header: {e}") from None
        if hdr_index != index or str(hdr_group) != str(group):
            raise SnapshotCorruptError(
                path, f"header says group {hdr_group!r} index {hdr_index}, the name says "
                f"group {group!r} index {index}"
            )
        if size != HEADER_BYTES + data_len:
            raise SnapshotCorruptError(
                path, f"data is {size - HEADER_BYTES} bytes, header says {data_len}"
            )
        data = _map_data(f.fileno(), data_len)
    if zlib.crc32(data) != data_crc:
        raise SnapshotCorruptError(path, "data checksum mismatch")
    return StoredSnapshot(index, data, data_crc)


@dataclass
class RecoveredSnapshots:
    """What :meth:`SnapshotStore.recover` found. ``corrupt`` lists, per group,
    the damaged files newer than the one used, as ``(group, index, error)``."""

    snapshots: dict[Any, StoredSnapshot] = field(default_factory=dict)
    corrupt: list[tuple[Any, int, SnapshotCorruptError]] = field(default_factory=list)
    repairs: list[str] = field(default_factory=list)


class RecoveryJob:
    """The snapshot files :meth:`SnapshotStore.start_recovery` is reading."""

    def __init__(self, jobs: list[tuple[Any, Future]], repairs: list[str]) -> None:
        self._jobs = jobs
        self._repairs = repairs

    def cancel(self) -> None:
        """Not needed after all (the WAL failed): drop the files not started, wait
        for those being read."""
        for _, f in self._jobs:
            f.cancel()
        wait([f for _, f in self._jobs])

    def result(self) -> RecoveredSnapshots:
        """Wait for every file; raises what reading one raised (``OSError``), once
        all are done (no thread is left reading a file when it returns)."""
        wait([f for _, f in self._jobs])
        out = RecoveredSnapshots(repairs=self._repairs)
        for group, f in self._jobs:  # in the order the groups were listed
            snap, corrupt = f.result()
            if snap is not None:
                out.snapshots[group] = snap
            out.corrupt += corrupt
        return out


class SnapshotStore:
    """The snapshot files of one node, in one directory. Single owner (the driver)."""

    def __init__(self, directory: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self._dir = Path(directory)
        self._fsync = fsync
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="snapshots")
        # group -> indexes of its files on disk
        self._files: dict[str, set[int]] = {}
        self._groups: dict[str, Any] = {}
        self.stats: dict[str, int] = {"written": 0, "bytes_written": 0, "removed": 0}

    @property
    def directory(self) -> Path:
        return self._dir

    # ----------------------------------------------------------------------- recovery

    def recover(self, groups: Iterable[Any]) -> RecoveredSnapshots:
        """Blocking; call once before serving. Files of groups not in ``groups``
        are left alone (and ignored)."""
        return self.start_recovery(groups).result()

    def start_recovery(
        self, groups: Iterable[Any], threads: int = RECOVERY_THREADS
    ) -> RecoveryJob:
        """:meth:`recover` with the files read and checked on ``threads`` worker
        threads (the checksum releases the GIL, and reading a mapped file through
        is where its pages are faulted in), so the caller can go on meanwhile (the
        node scans its WAL); ``result()`` waits for them. Removing torn ``.tmp``
        files and listing the directory happen here, before it returns."""
        self._dir.mkdir(parents=True, exist_ok=True)
        repairs: list[str] = []
        self._groups = {_group_token(g): g for g in groups}
        for name in sorted(os.listdir(self._dir)):
            if name.endswith(".tmp"):
                os.unlink(self._dir / name)  # torn: never renamed, never named by the WAL
                repairs.append(f"removed leftover {name}")
                continue
            m = _NAME_RE.match(name)
            if m is not None and m.group(1) in self._groups:
                self._files.setdefault(m.group(1), set()).add(int(m.group(2)))
        if repairs:
            self._sync_dir()
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="snapshot-recovery")
        jobs = [  # each thread gets its own list of the group's indexes, newest first
            (self._groups[token],
             pool.submit(self._newest_valid, self._groups[token], sorted(indexes, reverse=True)))
            for token, indexes in self._files.items()
        ]
        pool.shutdown(wait=False)  # the threads end once the jobs are done
        return RecoveryJob(jobs, repairs)

    def _newest_valid(
        self, group: Any, newest_first: list[int]
    ) -> tuple[StoredSnapshot | None, list[tuple[Any, int, SnapshotCorruptError]]]:
        """The group's newest file that checks out, and the damaged newer ones."""
        corrupt = []
        for index in newest_first:
            path = self._dir / snapshot_file_name(group, index)
            try:
                return read_snapshot_file(path, group, index), corrupt
            except SnapshotCorruptError as e:
                corrupt.append((group, index, e))
        return None, corrupt

    # ----------------------------------------------------------------------- writing

    def create(self, group: Any, index: int, reserve: int = 0) -> SnapshotFile:
        """A new file for the group's snapshot at ``index``, filled piece by piece
        (``append``) and made durable by ``finish``; ``reserve`` bytes at the start
        of the data are written last (``finish(head=...)``)."""
        return SnapshotFile(self, group, index, reserve)

    async def write(self, group: Any, index: int, pieces: list[bytes]) -> StoredSnapshot:
        """Store ``pieces`` (concatenated: the snapshot) durably as the group's
        file for ``index``; returns it mapped read-only."""
        f = self.create(group, index)
        f.append(pieces)
        return await f.finish()

    def _stored(self, group: Any, snap: StoredSnapshot) -> None:
        token = _group_token(group)
        self._files.setdefault(token, set()).add(snap.index)
        self._groups.setdefault(token, group)
        self.stats["written"] += 1
        self.stats["bytes_written"] += len(snap.blob)

    # ----------------------------------------------------------------------- pruning

    async def prune(self, current: dict[Any, int]) -> int:
        """Remove each group's files older than ``current[group]`` (named by a
        durable checkpoint); returns how many went."""
        doomed: list[str] = []
        for group, index in current.items():
            token = _group_token(group)
            files = self._files.get(token, set())
            old = [i for i in files if i < index]
            files.difference_update(old)
            doomed += [snapshot_file_name(group, i) for i in old]
        if doomed:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, self._unlink, doomed)
            self.stats["removed"] += len(doomed)
        return len(doomed)

    def _unlink(self, names: list[str]) -> None:
        for name in names:
            try:
                os.unlink(self._dir / name)
            except FileNotFoundError:
                pass
        self._sync_dir()

    def _sync_dir(self) -> None:
        if not self._fsync:
            return
        fd = os.open(self._dir, _OPEN_DIR_FLAGS)
        try:
            _FDATASYNC(fd)
        finally:
            os.close(fd)

    def files(self, group: Any) -> list[int]:
        """Indexes of the group's files on disk, ascending."""
        return sorted(self._files.get(_group_token(group), ()))

    def close(self) -> None:
        """Wait for a write in progress, then stop the worker thread. Idempotent."""
        self._executor.shutdown(wait=True)


class SnapshotFile:
    """One snapshot file being written: every disk operation and the checksum
    run on the store's worker thread, in the order they were asked for, so the
    event loop only hands over pieces (``append`` does not wait)."""

    def __init__(self, store: SnapshotStore, group: Any, index: int, reserve: int) -> None:
        self._store = store
        self.group = group
        self.index = index
        self._final = store.directory / snapshot_file_name(group, index)
        self._tmp = self._final.with_name(self._final.name + ".tmp")
        self._reserve = reserve
        self._fd = -1
        self._size = reserve  # data bytes so far, the reserved ones included
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._pending: list[asyncio.Future[None]] = [
            loop.run_in_executor(store._executor, self._open)
        ]

    def _open(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self._fd = os.open(self._tmp, flags, 0o644)
        os.lseek(self._fd, HEADER_BYTES + self._reserve, os.SEEK_SET)

    @property
    def backlog(self) -> int:
        """Appends handed over and not yet written."""
        self._pending = [f for f in self._pending if not f.done()]
        return len(self._pending)

    async def drained(self) -> None:
        """Wait until every append so far is written (raises what a write raised)."""
        pending, self._pending = self._pending, []
        for f in pending:
            await f

    def append(self, pieces: list[bytes]) -> None:
        """Queue ``pieces`` to be written next (on the worker thread)."""
        if pieces:
            self._size += sum(map(len, pieces))
            self._pending.append(
                self._loop.run_in_executor(self._store._executor, self._write, pieces)
            )

    def _write(self, pieces: list[bytes]) -> None:
        fd = self._fd
        for piece in pieces:
            view = memoryview(piece)
            while view:
                view = view[os.write(fd, view) :]

    async def finish(self, head: bytes = b"", tail: bytes = b"") -> StoredSnapshot:
        """Write ``head`` into the reserved bytes and ``tail`` at the end, checksum,
        fsync, rename into place, fsync the directory; the file, mapped read-only."""
        if len(head) != self._reserve:
            raise ValueError(f"head is {len(head)} bytes, {self._reserve} were reserved")
        self.append([tail])
        try:
            await self.drained()
            snap = await self._loop.run_in_executor(self._store._executor, self._seal, head)
        except BaseException:
            await self._loop.run_in_executor(self._store._executor, self._discard)
            raise
        self._store._stored(self.group, snap)
        return snap

    def _seal(self, head: bytes) -> StoredSnapshot:
        fd = self._fd
        if head:
            os.pwrite(fd, head, HEADER_BYTES)
        data = _map_data(fd, self._size)
        crc = zlib.crc32(data)  # the GIL is released while it runs
        os.pwrite(fd, encode_header(self.group, self.index, self._size, crc), 0)
        if self._store._fsync:
            _FDATASYNC(fd)
        os.replace(self._tmp, self._final)
        self._store._sync_dir()
        os.close(fd)
        self._fd = -1
        if isinstance(data, mmap.mmap):
            data.madvise(mmap.MADV_DONTNEED)  # written through the fd: the pages stay cached
        memory.trim()  # the encoded pieces are gone: give their heap pages back
        return StoredSnapshot(self.index, data, crc)

    def _discard(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass

    async def abandon(self) -> None:
        """Give up on the file (a failed or superseded snapshot): remove the temp file."""
        try:
            await self.drained()
        finally:
            await self._loop.run_in_executor(self._store._executor, self._discard)
