"""Tunables of the Paxos core, in ticks and counts (never milliseconds)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PaxosConfig:
    election_timeout_ticks: int = 10
    heartbeat_interval_ticks: int = 2
    inflight_slots_max: int = 32
    batch_commands_max: int = 64
    batch_bytes_max: int = 256 * 1024  # one slot's commands, keys and values together
    message_bytes_max: int = 1024 * 1024  # values in one Accept or Learn (one entry may exceed)
    accept_slots_per_msg_max: int = 32
    snapshot_interval_slots: int = 256
    snapshot_chunk_bytes: int = 64 * 1024
    catchup_entries_max: int = 64
    catchup_retry_ticks: int = 4
    # a leader that heard from no quorum for this long steps down
    leader_quorum_timeout_ticks: int = 20
    # followers that heard from a live leader ignore other nodes' prepares
    leader_stickiness: bool = True
    # a follower whose election timer fires first asks for pre-votes (no round
    # raised, nothing promised or persisted) and runs phase 1 only once a quorum
    # hears no live leader; False: straight to phase 1, as before
    pre_vote: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval_ticks < self.election_timeout_ticks:
            raise ValueError("need 0 < heartbeat_interval_ticks < election_timeout_ticks")
        for name in (
            "inflight_slots_max",
            "batch_commands_max",
            "batch_bytes_max",
            "message_bytes_max",
            "accept_slots_per_msg_max",
            "snapshot_interval_slots",
            "snapshot_chunk_bytes",
            "catchup_entries_max",
            "catchup_retry_ticks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
