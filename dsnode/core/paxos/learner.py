"""The learner: a slot's value is chosen once a quorum of acceptors accepted
it in one ballot (Paxos Made Simple, section 2.3).

The leader counts votes for the values it proposed in its own ballot;
followers learn chosen slots from the leader's commit index (only where they
accepted the leader's own value) or from ``Learn``/snapshots. The log
releases chosen slots strictly in order.
"""

from __future__ import annotations


class Learner:
    __slots__ = ("quorum", "votes")

    def __init__(self, quorum: int) -> None:
        self.quorum = quorum
        self.votes: dict[int, set[str]] = {}

    def vote(self, slot: int, node: str) -> bool:
        """Count ``node``'s acceptance; true the first time a quorum is reached."""
        voters = self.votes.get(slot)
        if voters is None:
            return False  # not in flight (chosen already, or not ours)
        voters.add(node)
        if len(voters) >= self.quorum:
            del self.votes[slot]
            return True
        return False

    def track(self, slot: int) -> None:
        self.votes.setdefault(slot, set())

    def voted(self, slot: int, node: str) -> bool:
        v = self.votes.get(slot)
        return v is not None and node in v
