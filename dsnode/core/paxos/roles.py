"""The roles a Paxos group's node can play; only ``become_*`` methods change them."""

from __future__ import annotations

from enum import Enum


class Role(Enum):
    FOLLOWER = "follower"
    PRECANDIDATE = "precandidate"
    CANDIDATE = "candidate"
    LEADER = "leader"
