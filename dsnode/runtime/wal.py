"""Write-ahead log: append-only segment files, a CRC per record, group-committed fsync.

Contract
--------
* Records carry opaque ``bytes`` payloads; the WAL never interprets them. Log sequence
  numbers (LSNs) are consecutive integers starting at 1.
* :meth:`WriteAheadLog.append` / :meth:`~WriteAheadLog.append_many` ``os.write`` the
  encoded records to the current segment from the event loop. Once they return, the
  records survive the death of the process (they are in the page cache) but not a power
  loss. :meth:`~WriteAheadLog.sync` makes everything appended before the call durable;
  concurrent callers share one fsync round, which runs on a dedicated single-thread
  executor so the event loop never blocks on the disk.
* A snapshot at ``lsn`` stands for every record ``<= lsn``. Writing one deletes the
  segments and snapshots it makes obsolete, so restart time does not grow with history.
* :meth:`~WriteAheadLog.recover` (called once, before serving) loads the newest valid
  snapshot and the records after it. A torn final record is dropped and the file
  truncated; any other damage raises :class:`WALCorruptError` naming file and offset.

On-disk format (all integers little-endian)
-------------------------------------------
Segment ``wal-<first_lsn:020d>.seg``::

    header  [6s magic b"DSNWAL"][u16 version=1][u64 first_lsn][u32 crc32(previous 16 bytes)]
    record  [u32 crc][u32 payload_len][u64 lsn][payload]     crc = crc32(bytes 4.. of record)

Snapshot ``snapshot-<lsn:020d>.snap`` (written as ``….snap.tmp``, fsynced, renamed)::

    [6s magic b"DSNSNP"][u16 version=1][u64 lsn][u64 data_len][u32 crc][data]
    crc = crc32(header bytes 0..24 + data)
"""

from __future__ import annotations

import asyncio
import os
import re
import struct
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Recovered",
    "WALClosedError",
    "WALCorruptError",
    "WALFailedError",
    "WriteAheadLog",
]

SEGMENT_MAGIC = b"DSNWAL"
SNAPSHOT_MAGIC = b"DSNSNP"
FORMAT_VERSION = 1
DEFAULT_SEGMENT_BYTES = 64 << 20
MAX_PAYLOAD_BYTES = (1 << 32) - 1

_SEG_HDR = struct.Struct("<6sHQI")  # magic, version, first_lsn, crc
_SEG_HDR_BODY = struct.Struct("<6sHQ")
_REC_HDR = struct.Struct("<IIQ")  # crc, payload_len, lsn
_REC_LEN_LSN = struct.Struct("<IQ")
_CRC = struct.Struct("<I")
_LSN = struct.Struct("<Q")
_SNAP_HDR = struct.Struct("<6sHQQI")  # magic, version, lsn, data_len, crc
_SNAP_HDR_BODY = struct.Struct("<6sHQQ")

SEG_HEADER_BYTES = _SEG_HDR.size
REC_HEADER_BYTES = _REC_HDR.size

_SEGMENT_RE = re.compile(r"^wal-(\d{20})\.seg$")
_SNAPSHOT_RE = re.compile(r"^snapshot-(\d{20})\.snap$")
_OPEN_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
_OPEN_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | getattr(os, "O_CLOEXEC", 0)
_FDATASYNC = getattr(os, "fdatasync", os.fsync)

_crc32 = zlib.crc32


def _fsync(fd: int) -> None:
    """Flush ``fd``'s data (and the metadata needed to read it back) to stable storage.

    Every fsync the WAL issues goes through this function, so tests can count them or
    record what was durable at the time.
    """
    _FDATASYNC(fd)


class WALCorruptError(Exception):
    """The log or snapshot on disk is damaged in a way recovery must not paper over."""

    def __init__(self, path: str | os.PathLike[str], offset: int, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: offset {offset}: {reason}")
        self.path = os.fspath(path)
        self.offset = offset
        self.reason = reason


class WALFailedError(OSError):
    """A write or fsync failed earlier; the log can no longer promise durability."""


class WALClosedError(RuntimeError):
    """The log was used before :meth:`WriteAheadLog.recover` or after it was closed."""


@dataclass
class Recovered:
    """What :meth:`WriteAheadLog.recover` found.

    ``records`` holds ``(lsn, payload)`` for every record with ``lsn > snapshot_lsn``, in
    LSN order. ``torn_bytes_dropped`` counts bytes cut off torn tails; ``repairs`` says in
    words what recovery changed on disk (for the startup log).
    """

    snapshot: bytes | None
    snapshot_lsn: int
    records: list[tuple[int, bytes]]
    torn_bytes_dropped: int = 0
    repairs: list[str] = field(default_factory=list)


def segment_name(first_lsn: int) -> str:
    """File name of the segment whose first record has ``first_lsn``."""
    return f"wal-{first_lsn:020d}.seg"


def snapshot_name(lsn: int) -> str:
    """File name of the snapshot covering every record ``<= lsn``."""
    return f"snapshot-{lsn:020d}.snap"


def encode_segment_header(first_lsn: int) -> bytes:
    body = _SEG_HDR_BODY.pack(SEGMENT_MAGIC, FORMAT_VERSION, first_lsn)
    return body + _CRC.pack(_crc32(body))


def encode_record(lsn: int, payload: bytes) -> bytes:
    """One record as it sits on disk."""
    len_lsn = _REC_LEN_LSN.pack(len(payload), lsn)
    return _CRC.pack(_crc32(payload, _crc32(len_lsn))) + len_lsn + payload


def encode_snapshot(lsn: int, data: bytes) -> bytes:
    """Header of a snapshot file (the data follows it)."""
    body = _SNAP_HDR_BODY.pack(SNAPSHOT_MAGIC, FORMAT_VERSION, lsn, len(data))
    return body + _CRC.pack(_crc32(data, _crc32(body)))


# --------------------------------------------------------------------------- recovery scan


@dataclass
class _Problem:
    offset: int
    reason: str
    tearable: bool  # acceptable if (and only if) it is the tail of the last segment


@dataclass
class _SegmentScan:
    path: Path
    first_lsn: int
    size: int
    count: int = 0  # good records, including those covered by the snapshot
    good_end: int = 0  # byte offset just past the last good record (or header)
    records: list[tuple[int, bytes]] = field(default_factory=list)
    problem: _Problem | None = None

    @property
    def next_lsn(self) -> int:
        return self.first_lsn + self.count


def _is_zeros(data: bytes, start: int) -> bool:
    return data.count(0, start) == len(data) - start


def _valid_record_at(data: bytes, pos: int) -> bool:
    if pos < 0 or len(data) - pos < REC_HEADER_BYTES:
        return False
    crc, length, _ = _REC_HDR.unpack_from(data, pos)
    end = pos + REC_HEADER_BYTES + length
    return end <= len(data) and _crc32(memoryview(data)[pos + 4 : end]) == crc


def _later_record_exists(data: bytes, start: int, lsn: int) -> bool:
    """True if a valid record with ``lsn`` starts somewhere after ``start``.

    Used to tell a torn tail (nothing valid follows) from a corrupted length field in
    the middle of the last segment (valid records follow).
    """
    needle = _LSN.pack(lsn)
    hit = data.find(needle, start + REC_HEADER_BYTES + 8)
    while hit != -1:
        if _valid_record_at(data, hit - 8):
            return True
        hit = data.find(needle, hit + 1)
    return False


def _scan_header(scan: _SegmentScan, data: bytes) -> bool:
    """Check the segment header; on failure set ``scan.problem`` and return False."""
    expected = encode_segment_header(scan.first_lsn)
    if len(data) < SEG_HEADER_BYTES:
        junk = expected.startswith(data) or _is_zeros(data, 0)
        reason = f"segment header incomplete ({len(data)} of {SEG_HEADER_BYTES} bytes)"
        scan.problem = _Problem(0, reason, tearable=junk)
        return False
    if data[:SEG_HEADER_BYTES] != expected:
        if _is_zeros(data, 0):  # created, then power lost before any data reached disk
            scan.problem = _Problem(0, "segment is all zero bytes", tearable=True)
            return False
        magic, version, first_lsn, crc = _SEG_HDR.unpack_from(data, 0)
        if magic != SEGMENT_MAGIC:
            reason = f"bad segment magic {magic!r}"
        elif version != FORMAT_VERSION:
            reason = f"unsupported segment format version {version}"
        elif crc != _crc32(data[: _SEG_HDR_BODY.size]):
            reason = "segment header checksum mismatch"
        else:
            reason = f"segment header says first lsn {first_lsn}, file name says {scan.first_lsn}"
        scan.problem = _Problem(0, reason, tearable=False)
        return False
    scan.good_end = SEG_HEADER_BYTES
    return True


def _scan_segment(path: Path, first_lsn: int, keep_after: int) -> _SegmentScan:
    """Read and verify one segment; collect records with ``lsn > keep_after``.

    Stops at the first problem, which is recorded (not raised): whether it is fatal
    depends on whether this turns out to be the last segment.
    """
    data = path.read_bytes()
    size = len(data)
    scan = _SegmentScan(path, first_lsn, size)
    if not _scan_header(scan, data):
        return scan
    view = memoryview(data)
    records = scan.records
    unpack = _REC_HDR.unpack_from
    expect = first_lsn
    pos = SEG_HEADER_BYTES
    while pos < size:
        if size - pos < REC_HEADER_BYTES:
            reason = f"truncated record header ({size - pos} of {REC_HEADER_BYTES} bytes)"
            scan.problem = _Problem(pos, reason, tearable=True)
            break
        crc, length, lsn = unpack(data, pos)
        start = pos + REC_HEADER_BYTES
        end = start + length
        if end > size:
            reason = f"record length {length} runs past end of file (size {size})"
            torn = not _later_record_exists(data, pos, expect + 1)
            scan.problem = _Problem(pos, reason, tearable=torn)
            break
        if _crc32(view[pos + 4 : end]) != crc:
            reason = f"record checksum mismatch (expected lsn {expect})"
            scan.problem = _Problem(pos, reason, tearable=_is_zeros(data, end))
            break
        if lsn != expect:
            reason = f"lsn {'repeat' if lsn < expect else 'gap'}: expected {expect}, found {lsn}"
            scan.problem = _Problem(pos, reason, tearable=False)
            break
        if lsn > keep_after:
            records.append((lsn, data[start:end]))
        expect += 1
        pos = end
    scan.count = expect - first_lsn
    scan.good_end = pos if scan.problem is None else scan.problem.offset
    return scan


def _read_snapshot(path: Path, lsn: int) -> bytes:
    """Return a snapshot's data, or raise :class:`WALCorruptError` if it is damaged.

    The data is read straight into the bytes returned (no copy of a log window
    that may be hundreds of megabytes)."""
    with open(path, "rb") as f:
        head = f.read(_SNAP_HDR.size)
        size = os.fstat(f.fileno()).st_size
        if len(head) < _SNAP_HDR.size:
            raise WALCorruptError(
                path, 0, f"snapshot shorter than its {_SNAP_HDR.size}-byte header"
            )
        magic, version, hdr_lsn, length, crc = _SNAP_HDR.unpack_from(head, 0)
        if magic != SNAPSHOT_MAGIC:
            raise WALCorruptError(path, 0, f"bad snapshot magic {magic!r}")
        if version != FORMAT_VERSION:
            raise WALCorruptError(path, 0, f"unsupported snapshot format version {version}")
        if hdr_lsn != lsn:
            raise WALCorruptError(path, 0, f"snapshot header lsn {hdr_lsn} != file name lsn {lsn}")
        if size != _SNAP_HDR.size + length:
            raise WALCorruptError(
                path, _SNAP_HDR.size, f"snapshot data is {size - _SNAP_HDR.size} bytes, "
                f"header says {length}"
            )
        body = f.read(length)
    if len(body) != length or _crc32(body, _crc32(head[: _SNAP_HDR_BODY.size])) != crc:
        raise WALCorruptError(path, _SNAP_HDR.size, "snapshot checksum mismatch")
    return body


def _fsync_all(fds: Iterable[int]) -> None:
    for fd in fds:
        _fsync(fd)


# --------------------------------------------------------------------------- the log


class WriteAheadLog:
    """An append-only, checksummed, group-committed log in one directory.

    Single owner: call it from one event loop only. Lifecycle: ``recover()`` once, then
    any mix of ``append``/``append_many``/``sync``/``write_snapshot``, then ``close()``
    (or ``abort()`` after a fatal error).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        fsync: bool = True,
        segment_bytes: int = DEFAULT_SEGMENT_BYTES,
    ) -> None:
        if segment_bytes <= SEG_HEADER_BYTES + REC_HEADER_BYTES:
            raise ValueError(f"segment_bytes={segment_bytes} is too small")
        self._dir = Path(directory)
        self._fsync_enabled = fsync
        self._segment_bytes = segment_bytes
        self._dir_fd = -1
        self._fd = -1  # current segment, opened lazily on the first append
        self._seg_size = 0
        self._segments: list[int] = []  # first lsn of every live segment file, ascending
        self._unsynced: list[int] = []  # rotated-out fds still awaiting fsync, then close
        self._dir_dirty = False
        self._snapshots: list[int] = []  # lsns of snapshot files on disk
        self._snapshot_lsn = 0
        self._last_lsn = 0
        self._durable_lsn = 0
        self._flush_task: asyncio.Task[None] | None = None
        self._snap_lock = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-fsync")
        self._snap_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wal-snap")
        self._state = "new"  # new -> open -> closed
        self._failed: BaseException | None = None
        self.stats: dict[str, int] = {"fsyncs": 0, "records": 0, "bytes": 0, "snapshots": 0}
        # Called after each group-commit round with (seconds it took, records it made durable).
        self.on_fsync: Callable[[float, int], None] | None = None

    # ----------------------------------------------------------------------- properties

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def last_lsn(self) -> int:
        """LSN of the newest appended record (or of the snapshot, if newer)."""
        return self._last_lsn

    @property
    def durable_lsn(self) -> int:
        """Every record ``<=`` this is known to be on stable storage."""
        return self._durable_lsn

    @property
    def snapshot_lsn(self) -> int:
        return self._snapshot_lsn

    # ----------------------------------------------------------------------- recovery

    def recover(self) -> Recovered:
        """Open (creating if needed) the directory and return the recoverable state.

        Blocking; call once before serving. Repairs a torn tail and removes leftovers
        of interrupted operations; raises :class:`WALCorruptError` for anything else and
        lets ``OSError`` from an unusable directory propagate.
        """
        if self._state != "new":
            raise WALClosedError("recover() must be called exactly once, before use")
        self._dir.mkdir(parents=True, exist_ok=True)
        self._dir_fd = os.open(self._dir, _OPEN_DIR_FLAGS)
        try:
            result = self._recover()
        except BaseException:
            self._close_fds()
            raise
        self._state = "open"
        return result

    def _recover(self) -> Recovered:
        repairs: list[str] = []
        segs, snaps = self._list_dir(repairs)
        snapshot, snap_lsn, bad_snaps = self._load_snapshot(snaps)
        self._snapshots = snaps
        self._snapshot_lsn = snap_lsn

        keep = 0  # segments wholly covered by the snapshot are obsolete: never read
        while keep + 1 < len(segs) and segs[keep + 1] - 1 <= snap_lsn:
            keep += 1
        scans = [self._scan(first, snap_lsn) for first in segs[keep:]]

        # Decide first, change the disk after: nothing is deleted or truncated
        # unless the whole chain checks out.
        torn, kept, settle = self._settle_tail(scans)
        try:
            self._check_chain(kept, snap_lsn)
        except WALCorruptError as exc:
            if bad_snaps:  # the corrupt snapshot is the real culprit: name it
                raise self._unrecoverable(bad_snaps[0][1], exc.reason) from exc
            raise
        log_end = kept[-1].next_lsn - 1 if kept else snap_lsn
        records = [rec for scan in kept for rec in scan.records]
        last = max(log_end, snap_lsn)
        for bad_lsn, bad in bad_snaps:
            if bad_lsn > last:
                raise self._unrecoverable(bad, f"the log only reaches lsn {last}")
        for first in segs[:keep]:
            self._unlink(segment_name(first))
        if keep:
            repairs.append(f"removed {keep} segment(s) covered by snapshot {snap_lsn}")
        settle(repairs)
        if kept and log_end < snap_lsn:
            for scan in kept:
                self._unlink(scan.path.name)
            repairs.append(f"removed segments ending at lsn {log_end} < snapshot {snap_lsn}")
            kept = []
        for _, bad in bad_snaps:
            repairs.append(f"ignored corrupt snapshot (log covers it): {bad}")
        self._open_tail(kept)
        self._last_lsn = self._durable_lsn = last
        return Recovered(snapshot, snap_lsn, records, torn, repairs)

    @staticmethod
    def _unrecoverable(bad: WALCorruptError, why: str) -> WALCorruptError:
        return WALCorruptError(
            bad.path, bad.offset, f"{bad.reason}; no valid older snapshot covers it and {why}"
        )

    def _list_dir(self, repairs: list[str]) -> tuple[list[int], list[int]]:
        """Sorted segment first-lsns and snapshot lsns; deletes leftover ``*.tmp`` files."""
        segs: list[int] = []
        snaps: list[int] = []
        for name in os.listdir(self._dir):
            if name.endswith(".tmp"):
                self._unlink(name)
                repairs.append(f"removed leftover {name}")
            elif m := _SEGMENT_RE.match(name):
                segs.append(int(m.group(1)))
            elif m := _SNAPSHOT_RE.match(name):
                snaps.append(int(m.group(1)))
        segs.sort()
        snaps.sort()
        return segs, snaps

    def _load_snapshot(
        self, snaps: list[int]
    ) -> tuple[bytes | None, int, list[tuple[int, WALCorruptError]]]:
        """Newest valid snapshot as (data, lsn, errors of newer corrupt ones, newest first).

        A corrupt snapshot is survivable only if an older one plus the log still reach
        past it; :meth:`_recover` checks that.
        """
        bad: list[tuple[int, WALCorruptError]] = []
        for lsn in reversed(snaps):
            try:
                return _read_snapshot(self._dir / snapshot_name(lsn), lsn), lsn, bad
            except WALCorruptError as exc:
                bad.append((lsn, exc))
        return None, 0, bad

    def _scan(self, first_lsn: int, keep_after: int) -> _SegmentScan:
        return _scan_segment(self._dir / segment_name(first_lsn), first_lsn, keep_after)

    def _settle_tail(
        self, scans: list[_SegmentScan]
    ) -> tuple[int, list[_SegmentScan], Callable[[list[str]], None]]:
        """Plan dropping record-less trailing segments and a torn tail: return
        (bytes dropped, kept scans, a function that carries the plan out).

        The last segment holding a good record is the final one: only its tail (and
        segments after it that hold no record at all) may be torn. Nothing on disk
        changes until the returned function runs.
        """
        last = max((i for i, s in enumerate(scans) if s.count), default=-1)
        torn = 0
        empty = scans[last + 1 :]
        for scan in empty:
            if scan.problem is not None and not scan.problem.tearable:
                raise WALCorruptError(scan.path, scan.problem.offset, scan.problem.reason)
            torn += scan.size - scan.good_end
        kept = scans[: last + 1]
        for scan in kept[:-1]:
            if scan.problem is not None:
                reason = scan.problem.reason + " (not in the last segment)"
                raise WALCorruptError(scan.path, scan.problem.offset, reason)
        cut: _SegmentScan | None = None
        if kept and (final := kept[-1]).problem is not None:
            problem = final.problem
            if not problem.tearable:
                raise WALCorruptError(final.path, problem.offset, problem.reason)
            torn += final.size - final.good_end
            cut = final

        def carry_out(repairs: list[str]) -> None:
            for scan in empty:
                self._unlink(scan.path.name)
                repairs.append(f"removed {scan.path.name}: it held no complete record")
            if cut is not None:
                assert cut.problem is not None
                os.truncate(cut.path, cut.good_end)
                repairs.append(
                    f"truncated torn tail of {cut.path.name} at offset {cut.good_end} "
                    f"({cut.size - cut.good_end} bytes): {cut.problem.reason}"
                )
                cut.size = cut.good_end

        return torn, kept, carry_out

    def _check_chain(self, kept: list[_SegmentScan], snap_lsn: int) -> None:
        """Raise unless the kept segments continue the snapshot without gaps or repeats."""
        expect = None
        for scan in kept:
            if expect is None:
                if scan.first_lsn > snap_lsn + 1:
                    what = f"snapshot lsn {snap_lsn}" if snap_lsn else "no valid snapshot"
                    raise WALCorruptError(
                        scan.path, 0,
                        f"log starts at lsn {scan.first_lsn} but {what}: lsns "
                        f"{snap_lsn + 1}..{scan.first_lsn - 1} are missing",
                    )
            elif scan.first_lsn != expect:
                raise WALCorruptError(
                    scan.path, 0,
                    f"segment starts at lsn {scan.first_lsn}, previous segment ended at "
                    f"{expect - 1}",
                )
            expect = scan.next_lsn

    def _open_tail(self, kept: list[_SegmentScan]) -> None:
        """Make what recovery read durable, then reopen the last segment for append."""
        self._segments = [scan.first_lsn for scan in kept]
        if self._fsync_enabled:
            for scan in kept:
                fd = os.open(scan.path, os.O_RDONLY)
                try:
                    _fsync(fd)
                finally:
                    os.close(fd)
            _fsync(self._dir_fd)
            self._dir_dirty = False
        if kept:
            self._fd = os.open(kept[-1].path, _OPEN_APPEND_FLAGS)
            self._seg_size = kept[-1].size

    def _unlink(self, name: str) -> None:
        os.unlink(self._dir / name)
        self._dir_dirty = True

    # ----------------------------------------------------------------------- appending

    def append(self, payload: bytes) -> int:
        """Write one record to the OS (not yet durable) and return its lsn."""
        return self.append_many((payload,))

    def append_many(self, payloads: Sequence[bytes]) -> int:
        """Write records with one ``os.write`` per segment touched; return the last lsn.

        If no payloads are given, returns :attr:`last_lsn` and writes nothing.
        """
        self._check_writable()
        if not payloads:
            return self._last_lsn
        if max(map(len, payloads)) > MAX_PAYLOAD_BYTES:
            raise ValueError(f"a payload exceeds {MAX_PAYLOAD_BYTES} bytes")
        lsn = self._last_lsn
        limit = self._segment_bytes
        chunk: list[bytes] = []
        chunk_bytes = 0
        for payload in payloads:
            lsn += 1
            len_lsn = _REC_LEN_LSN.pack(len(payload), lsn)
            crc = _CRC.pack(_crc32(payload, _crc32(len_lsn)))
            rec_bytes = REC_HEADER_BYTES + len(payload)
            used = self._seg_size + chunk_bytes
            if self._fd < 0 or (used > SEG_HEADER_BYTES and used + rec_bytes > limit):
                if chunk:
                    self._write(b"".join(chunk), lsn - 1, len(chunk) // 3)
                    chunk.clear()
                    chunk_bytes = 0
                self._rotate(lsn)
            chunk += (crc, len_lsn, payload)
            chunk_bytes += rec_bytes
        if chunk:
            self._write(b"".join(chunk), lsn, len(chunk) // 3)
        return self._last_lsn

    def _write(self, data: bytes, last_lsn: int, count: int) -> None:
        """Write ``data`` (whole records ending at ``last_lsn``) to the current segment."""
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                view = memoryview(data)
                while written < len(data):
                    written += os.write(self._fd, view[written:])
        except OSError as exc:
            # Part of a record may be on disk; recovery drops it as a torn tail.
            self._failed = exc
            raise
        self._seg_size += len(data)
        self._last_lsn = last_lsn
        stats = self.stats
        stats["records"] += count
        stats["bytes"] += len(data)

    def _rotate(self, first_lsn: int) -> None:
        """Retire the current segment (fsync pending) and start one at ``first_lsn``."""
        if self._fd >= 0:
            if self._fsync_enabled:
                self._unsynced.append(self._fd)
            else:
                os.close(self._fd)
            self._fd = -1
        path = self._dir / segment_name(first_lsn)
        flags = _OPEN_APPEND_FLAGS | os.O_CREAT | os.O_EXCL
        header = encode_segment_header(first_lsn)
        try:
            fd = os.open(path, flags, 0o644)
        except OSError as exc:
            self._failed = exc
            raise
        try:
            if os.write(fd, header) != len(header):
                raise OSError(f"short write of the header of {path}")
        except OSError as exc:
            os.close(fd)
            self._failed = exc
            raise
        self._fd = fd
        self._seg_size = len(header)
        self._segments.append(first_lsn)
        self._dir_dirty = True
        self.stats["bytes"] += len(header)

    def _check_writable(self) -> None:
        if self._state != "open":
            raise WALClosedError(f"write-ahead log is {self._state}; call recover() first")
        if self._failed is not None:
            raise WALFailedError(
                f"write-ahead log failed earlier and cannot be used: {self._failed!r}"
            ) from self._failed

    # ----------------------------------------------------------------------- durability

    async def sync(self) -> int:
        """Return once everything appended before the call is durable; returns durable lsn.

        Concurrent callers share fsync rounds: a caller arriving while a round is running
        waits for it and then joins the next one. With ``fsync=False`` it returns at once.
        Cancelling a caller does not cancel the shared round.
        """
        self._check_writable()
        target = self._last_lsn
        if not self._fsync_enabled:
            self._durable_lsn = max(self._durable_lsn, target)
            return self._durable_lsn
        while self._durable_lsn < target:
            task = self._flush_task
            if task is None:
                task = asyncio.get_running_loop().create_task(self._flush())
                self._flush_task = task
            await asyncio.shield(task)
            self._check_writable()
        return self._durable_lsn

    async def _flush(self) -> None:
        """One group-commit round: fsync retired segments, the current one, the directory."""
        target = self._last_lsn
        retired = len(self._unsynced)
        fds = self._unsynced[:retired]
        if self._fd >= 0:
            fds.append(self._fd)
        if self._dir_dirty:
            fds.append(self._dir_fd)
            self._dir_dirty = False
        started = time.perf_counter()
        try:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._executor, _fsync_all, fds)
        except asyncio.CancelledError:
            self._dir_dirty = True
            raise
        except BaseException as exc:
            self._failed = exc  # after a failed fsync the page cache cannot be trusted
            raise
        finally:
            self._flush_task = None
        if self._state == "closed":
            return  # abort() closed the fds while we were in the executor
        for fd in self._unsynced[:retired]:
            os.close(fd)
        del self._unsynced[:retired]
        made_durable = target - self._durable_lsn
        self._durable_lsn = max(self._durable_lsn, target)
        self.stats["fsyncs"] += 1
        if self.on_fsync is not None:
            self.on_fsync(time.perf_counter() - started, max(0, made_durable))

    # ----------------------------------------------------------------------- snapshots

    async def write_snapshot(self, lsn: int, data: bytes) -> None:
        """Durably store ``data`` as the state after record ``lsn``; drop what it covers.

        Requires ``snapshot_lsn <= lsn <= last_lsn``. Records up to ``lsn`` are synced
        first. The file appears atomically; afterwards older snapshots and every
        segment whose records are all ``<= lsn`` (except the current one) are deleted.
        """
        self._check_writable()
        if not 0 < lsn <= self._last_lsn or lsn < self._snapshot_lsn:
            raise ValueError(
                f"snapshot lsn {lsn} outside [{max(self._snapshot_lsn, 1)}, {self._last_lsn}]"
            )
        async with self._snap_lock:
            await self.sync()
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._snap_executor, self._write_snapshot_file, lsn, data)
            self._snapshot_lsn = max(self._snapshot_lsn, lsn)
            self.stats["snapshots"] += 1
            doomed = [snapshot_name(old) for old in self._snapshots if old != lsn]
            self._snapshots = [lsn]
            doomed += [segment_name(first) for first in self._take_covered_segments(lsn)]
            if doomed:
                await loop.run_in_executor(self._snap_executor, self._unlink_durably, doomed)

    def _write_snapshot_file(self, lsn: int, data: bytes) -> None:
        """Executor side: tmp file, fsync, rename, fsync directory."""
        final = self._dir / snapshot_name(lsn)
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(encode_snapshot(lsn, data))
            f.write(data)
            f.flush()
            if self._fsync_enabled:
                _fsync(f.fileno())
        os.replace(tmp, final)
        if self._fsync_enabled:
            _fsync(self._dir_fd)

    def _take_covered_segments(self, lsn: int) -> list[int]:
        """Remove from the live list, and return, retired segments wholly ``<= lsn``."""
        segs = self._segments
        n = 0
        while n + 1 < len(segs) and segs[n + 1] - 1 <= lsn:
            n += 1
        covered = segs[:n]
        del segs[:n]
        return covered

    def _unlink_durably(self, names: list[str]) -> None:
        for name in names:
            try:
                os.unlink(self._dir / name)
            except FileNotFoundError:
                pass
        if self._fsync_enabled:
            _fsync(self._dir_fd)

    # ----------------------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Final sync, then close every fd and shut the executors down. Idempotent."""
        if self._state == "closed":
            return
        try:
            if self._state == "open" and self._failed is None:
                async with self._snap_lock:
                    await self.sync()
        finally:
            self.abort()

    def abort(self) -> None:
        """Close everything without a final sync, as if the process died here.

        For fatal-error paths (e.g. after :class:`WALFailedError`) and crash tests.
        Appended records stay in the OS page cache, so nothing is lost unless the
        machine loses power. Blocks until an fsync already in progress finishes.
        """
        if self._state == "closed":
            return
        self._state = "closed"
        self._executor.shutdown(wait=True)
        self._snap_executor.shutdown(wait=True)
        self._close_fds()

    def _close_fds(self) -> None:
        fds = [*self._unsynced, self._fd, self._dir_fd]
        self._unsynced.clear()
        self._fd = self._dir_fd = -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)
