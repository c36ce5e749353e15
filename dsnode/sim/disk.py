"""Simulated disk: records are durable only once fsynced.

The sim shell appends a Ready's ``persist`` records, then fsyncs, then sends
(``effects.Ready`` contract). A crash between append and fsync keeps a random
prefix of the unsynced tail (writes may reach the platter without fsync) and
may tear the next record; the WAL's checksum drops a torn record on replay,
so here it simply vanishes.
"""

from __future__ import annotations

import random


class SimDisk:
    def __init__(self) -> None:
        self.durable: list[bytes] = []
        self.unsynced: list[bytes] = []
        self.torn = 0

    def append(self, records: list[bytes]) -> None:
        self.unsynced.extend(records)

    def fsync(self) -> list[bytes]:
        """Make the tail durable; returns the records that just became durable."""
        done = self.unsynced
        self.durable.extend(done)
        self.unsynced = []
        return done

    def crash(self, rng: random.Random) -> list[bytes]:
        """Lose the unsynced tail except a random prefix; returns what survived."""
        keep = rng.randint(0, len(self.unsynced)) if self.unsynced else 0
        survived = self.unsynced[:keep]
        if keep < len(self.unsynced):
            self.torn += 1
        self.durable.extend(survived)
        self.unsynced = []
        return survived

    def records(self) -> list[bytes]:
        return list(self.durable)
