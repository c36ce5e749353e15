"""Simulated network: per-link delay, loss, duplication, reordering, cuts.

Every random choice comes from the rng handed in (derived from the world
seed). Cuts are one-way (``(src, dst)`` pairs); a partition is the set of
cuts between its sides in both directions. Cuts apply when a message is sent.
"""

from __future__ import annotations

import heapq
import random
from typing import Any

from dsnode.core.paxos.messages import wire_size


class SimNetwork:
    def __init__(
        self,
        rng: random.Random,
        nodes: list[str],
        delay_max_ticks: int = 3,
        frame_bytes_max: int = 1 << 62,
    ) -> None:
        self.rng = rng
        self.nodes = nodes
        self.queue: list[tuple[int, int, str, str, Any]] = []
        self.seq = 0
        self.loss = 0.0
        self.dup = 0.0
        self.jitter_ticks = 1
        self.link_delay = {
            (a, b): rng.randint(1, delay_max_ticks) for a in nodes for b in nodes if a != b
        }
        self.cut: set[tuple[str, str]] = set()
        # like the runtime transport, a message larger than a peer frame never arrives
        self.frame_bytes_max = frame_bytes_max
        self.oversized = 0
        self.sent = 0
        self.delivered = 0

    def partition(self, sides: list[list[str]]) -> None:
        self.cut = {
            (a, b)
            for i, side in enumerate(sides)
            for j, other in enumerate(sides)
            if i != j
            for a in side
            for b in other
        }

    def cut_one_way(self, src: str, dst: str) -> None:
        self.cut.add((src, dst))

    def heal(self) -> None:
        self.cut.clear()

    def send(self, now: int, src: str, dst: str, msg: Any) -> None:
        self.sent += 1
        if (src, dst) in self.cut:
            return
        if wire_size(msg) > self.frame_bytes_max:
            self.oversized += 1
            return
        rng = self.rng
        if self.loss and rng.random() < self.loss:
            return
        copies = 2 if self.dup and rng.random() < self.dup else 1
        for _ in range(copies):
            at = now + self.link_delay[(src, dst)] + rng.randint(0, self.jitter_ticks)
            self.seq += 1
            heapq.heappush(self.queue, (at, self.seq, src, dst, msg))

    def due(self, now: int) -> list[tuple[str, str, Any]]:
        out = []
        q = self.queue
        while q and q[0][0] <= now:
            _, _, src, dst, msg = heapq.heappop(q)
            out.append((src, dst, msg))
        self.delivered += len(out)
        return out
