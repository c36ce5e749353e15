"""Who leads the partitions a node does not host (issue 8 part 5), pure.

A node knows the leaders of its own partitions from their Paxos groups. For
the others it keeps what their leaders say: every node tells each peer the
partitions it leads, with each one's ballot, whenever that set changes and
once a second (``report``). A claim with a higher ballot replaces a lower
one; a node's report drops its earlier claims to partitions it no longer
lists; a forward answered "not leader" drops the claim it followed
(``forget``). A hint may be stale for a message delay: a request sent on a
wrong hint is answered "not leader" (definitely not applied) and routed again.
"""

from __future__ import annotations

from collections.abc import Iterable

Ballot = tuple[int, str]


class LeaderHints:
    __slots__ = ("_claims", "_by_node")

    def __init__(self) -> None:
        self._claims: dict[int, tuple[str, Ballot]] = {}  # pid -> (node, ballot)
        self._by_node: dict[str, set[int]] = {}

    def leader(self, pid: int) -> str | None:
        claim = self._claims.get(pid)
        return None if claim is None else claim[0]

    def report(self, node: str, led: Iterable[tuple[int, Ballot]]) -> None:
        """``node`` says it leads exactly the partitions ``led`` (pid, ballot)."""
        now: set[int] = set()
        for pid, ballot in led:
            now.add(pid)
            have = self._claims.get(pid)
            if have is None or have[0] == node or ballot > have[1]:
                if have is not None and have[0] != node:
                    self._by_node.get(have[0], set()).discard(pid)
                self._claims[pid] = (node, ballot)
        for pid in self._by_node.get(node, set()) - now:
            if self._claims.get(pid, ("",))[0] == node:
                del self._claims[pid]
        self._by_node[node] = {p for p in now if self._claims.get(p, ("",))[0] == node}

    def forget(self, pid: int, node: str) -> None:
        """``node`` answered that it does not lead ``pid``."""
        claim = self._claims.get(pid)
        if claim is not None and claim[0] == node:
            del self._claims[pid]
            self._by_node.get(node, set()).discard(pid)

    def lost(self, node: str) -> None:
        """``node`` is unreachable: its claims no longer help route anything."""
        for pid in self._by_node.pop(node, set()):
            if self._claims.get(pid, ("",))[0] == node:
                del self._claims[pid]


def encode_led(led: Iterable[tuple[int, Ballot]]) -> list:
    """The wire form of a report: ``[[pid, round, node], ...]``."""
    return [[pid, b[0], b[1]] for pid, b in led]


def decode_led(raw: object, partitions: int) -> list[tuple[int, Ballot]]:
    """A peer's report, checked: ValueError for anything malformed."""
    if not isinstance(raw, list):
        raise ValueError("a leader report is an array")
    out = []
    for e in raw:
        if (not isinstance(e, list) or len(e) != 3 or type(e[0]) is not int
                or not 0 <= e[0] < partitions or type(e[1]) is not int
                or not isinstance(e[2], str)):
            raise ValueError(f"bad leader report entry {e!r}")
        out.append((e[0], (e[1], e[2])))
    return out
