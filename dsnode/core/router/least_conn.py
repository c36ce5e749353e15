"""Least connections: among equally eligible targets, the one with the fewest
requests in flight from this node; ties broken by the seeded generator the
caller passes in (never module-level randomness)."""

from __future__ import annotations

import random
from collections.abc import Iterable

from dsnode.core.errors import InvariantBroken


class InFlight:
    """Requests in flight from this node, per target node id."""

    __slots__ = ("_count", "_total")

    def __init__(self) -> None:
        self._count: dict[str, int] = {}
        self._total = 0

    def start(self, node: str) -> None:
        self._count[node] = self._count.get(node, 0) + 1
        self._total += 1

    def finish(self, node: str) -> None:
        n = self._count.get(node, 0)
        if n <= 0:
            raise InvariantBroken(f"finish for {node!r} with no request in flight to it")
        if n == 1:
            del self._count[node]
        else:
            self._count[node] = n - 1
        self._total -= 1

    def count(self, node: str) -> int:
        return self._count.get(node, 0)

    @property
    def total(self) -> int:
        return self._total

    def snapshot(self) -> dict[str, int]:
        """Targets with requests in flight -> how many (for status and tests)."""
        return dict(self._count)


def pick(candidates: Iterable[str], inflight: InFlight, rng: random.Random) -> str:
    """The candidate with the fewest requests in flight; ties broken by ``rng``.

    The choice depends only on the set of candidates (not their order) and the
    generator's state, so a seeded generator gives the same picks every run.
    """
    unique = sorted(set(candidates))
    if not unique:
        raise ValueError("pick needs at least one candidate")
    least = min(inflight.count(c) for c in unique)
    tied = [c for c in unique if inflight.count(c) == least]
    return tied[0] if len(tied) == 1 else tied[rng.randrange(len(tied))]
