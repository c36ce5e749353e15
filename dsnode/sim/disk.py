"""Simulated disk: records are durable only once a sync covering them completes.

The sim shell appends a Ready's ``persist`` records and requests a sync; the
sync completes a random number of ticks later (``SimConfig.fsync_ticks_max``;
0 completes it at once), making durable every record appended before the
request (a later sync covers earlier ones, as fsync does). Until then the shell
holds that drain's sends and replies, and those of every later drain
(``effects.Ready`` contract). A crash loses the requested syncs and keeps a
random prefix of the unsynced tail (writes may reach the platter without
fsync) and may tear the next record; the WAL's checksum drops a torn record on
replay, so here it simply vanishes.

Snapshot files (one per group and index, as ``runtime/snapshots.py`` keeps
them) are durable when written: the runtime fsyncs a file and renames it into
place before it tells the core (``snapshot_ready``), whose WAL record naming
the file may still be lost in a crash. Old files go once a durable checkpoint
names a newer one.
"""

from __future__ import annotations

import random
from typing import Any

from dsnode.core.paxos.outputs import StoredSnapshot


class SimDisk:
    def __init__(self) -> None:
        self.durable: list[bytes] = []
        self.unsynced: list[bytes] = []
        self.torn = 0
        # requested syncs: (tick due, records appended in all when requested)
        self.syncs: list[tuple[int, int]] = []
        # group -> index -> (snapshot, records appended when it was written, and
        # when a checkpoint made it obsolete, or None while it is current)
        self.snapfiles: dict[Any, dict[int, tuple[StoredSnapshot, int, int | None]]] = {}

    @property
    def appended(self) -> int:
        """Records appended since the disk was new (durable or not)."""
        return len(self.durable) + len(self.unsynced)

    def append(self, records: list[bytes]) -> None:
        self.unsynced.extend(records)

    def fsync(self) -> list[bytes]:
        """Make the tail durable now; returns the records that just became durable."""
        done = self.unsynced
        self.durable.extend(done)
        self.unsynced = []
        self.syncs = []
        return done

    def request_sync(self, due: int) -> None:
        """Start a sync of everything appended so far; it completes at tick ``due``."""
        self.syncs.append((due, self.appended))

    def complete(self, now: int) -> list[bytes]:
        """Complete the syncs due by ``now``; returns the records that just became durable."""
        target = max((mark for due, mark in self.syncs if due <= now), default=0)
        self.syncs = [s for s in self.syncs if s[1] > target]
        n = target - len(self.durable)
        if n <= 0:
            return []
        done = self.unsynced[:n]
        self.durable.extend(done)
        self.unsynced = self.unsynced[n:]
        return done

    def crash(self, rng: random.Random) -> list[bytes]:
        """Lose the unsynced tail except a random prefix; returns what survived."""
        keep = rng.randint(0, len(self.unsynced)) if self.unsynced else 0
        survived = self.unsynced[:keep]
        if keep < len(self.unsynced):
            self.torn += 1
        self.durable.extend(survived)
        self.unsynced = []
        self.syncs = []
        return survived

    def records(self) -> list[bytes]:
        return list(self.durable)

    def write_snapshot(self, group: Any, snap: StoredSnapshot) -> None:
        self.snapfiles.setdefault(group, {})[snap.index] = (snap, self.appended, None)

    def _live(self) -> dict[Any, dict[int, StoredSnapshot]]:
        return {
            g: {i: snap for i, (snap, _, gone) in files.items() if gone is None}
            for g, files in self.snapfiles.items()
        }

    def newest_snapshots(self) -> dict[Any, StoredSnapshot]:
        """Per group, the newest snapshot file (what the runtime recovers from)."""
        return {g: files[max(files)] for g, files in self._live().items() if files}

    def prune_snapshots(self, current: dict[Any, int]) -> None:
        """A durable checkpoint names ``current[group]``: older files go (their
        history stays, for :meth:`roll_back`)."""
        for g, index in current.items():
            files = self.snapfiles.get(g, {})
            for i, (snap, mark, gone) in list(files.items()):
                if i < index and gone is None:
                    files[i] = (snap, mark, self.appended)

    def roll_back(self, keep: int) -> None:
        """An old copy of the directory: the first ``keep`` records and the
        snapshot files that existed when the last of them was written."""
        self.durable = self.durable[:keep]
        for files in self.snapfiles.values():
            for i, (snap, mark, gone) in list(files.items()):
                if mark > keep:
                    del files[i]
                elif gone is not None and gone > keep:
                    files[i] = (snap, mark, None)

    def copy(self) -> SimDisk:
        """The directory as it is (for a probe of an old copy)."""
        other = SimDisk()
        other.durable = list(self.durable)
        other.snapfiles = {g: dict(files) for g, files in self.snapfiles.items()}
        return other
