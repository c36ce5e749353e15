"""Tunables of the Paxos core, in ticks and counts (never milliseconds)."""

from __future__ import annotations

from dataclasses import dataclass

from dsnode.core.kv.store import SHARDS, check_shards
from dsnode.core.paxos.messages import ENTRY_OVERHEAD_BYTES, MESSAGE_OVERHEAD_BYTES

MESSAGE_BYTES_MAX = 1024 * 1024


@dataclass(frozen=True, slots=True)
class PaxosConfig:
    election_timeout_ticks: int = 10
    heartbeat_interval_ticks: int = 2
    inflight_slots_max: int = 32
    batch_commands_max: int = 64
    batch_bytes_max: int = 256 * 1024  # one slot's commands, keys and values together
    # values in one Accept, Learn or Promise (a message of one entry may exceed it)
    message_bytes_max: int = MESSAGE_BYTES_MAX
    # hard bound on any message the core builds, checked at every send: at least
    # message_bytes_max plus the largest single slot value (one client command,
    # bounded by the client frame limit), plus framing; the transport's peer frame
    # limit is set from the same number
    peer_message_bytes_max: int = 17 * 1024 * 1024 + 64 * 1024
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
    # the group whose first chosen value (slot 1) names the cluster: a Form command
    # with a fresh UUID (the metadata group); None: no group does
    formation_group: object = 0
    # what that first value also holds, when the formation group is the metadata group
    # of a partitioned cluster: the ring it starts with, (sorted members, partitions,
    # replication) (a ``SetRing`` of epoch 1 next to the ``Form``); None: no ring
    formation_ring: tuple | None = None
    # the UUID the ``Form`` names (a data directory that already belongs to a cluster
    # formed before the metadata group existed); None: a fresh random one
    formation_uuid: str | None = None
    # per tick, the chance that a leader also asks a random peer for chosen values past
    # its own (a catch-up request is always safe); the simulator turns it on so that
    # deposed leaders that have not noticed yet learn what a newer leader chose
    leader_probe_chance: float = 0.0
    # leader leases (0 = off): a leader whose heartbeat round sent at tick t was
    # acknowledged by a quorum serves linearizable reads from its own state until
    # tick t + lease_ticks, without a read-index round. Safe only when it is at most
    # ``lease_ticks_for(election_timeout_ticks, drift)`` for the clocks' drift bound:
    # every acknowledging follower refuses to help elect anyone else for an election
    # timeout of its own clock after it heard that round (and after its own restart).
    lease_ticks: int = 0
    # each group's leader hands leadership over (TimeoutNow, no election timeout) to the
    # first member in the group's preference order (its ring order) that answers it and
    # has acknowledged everything chosen, once it has led for three election timeouts
    prefer_leader: bool = False
    # an idle group whose live members have everything stops its heartbeats (both
    # ways) until it has work; its followers rely on the leader node's NodeHeartbeat,
    # which every node sends each peer once per heartbeat interval whatever the
    # number of groups. Idle cost then does not grow with the number of groups.
    quiesce: bool = False
    # replica-set changes through the group's own log (``core.paxos.reconfig``): a leader
    # takes ConfChange commands, fences its pipeline at them and re-runs phase 1 when its
    # promises came from an older configuration. False: such commands are refused, so the
    # configuration never changes and none of that is needed (the behaviour before)
    reconfig: bool = False
    # shards of each KV group's store (a power of two; ``kv.store.shards_for``)
    kv_shards: int = SHARDS

    def __post_init__(self) -> None:
        if not 0 < self.heartbeat_interval_ticks < self.election_timeout_ticks:
            raise ValueError("need 0 < heartbeat_interval_ticks < election_timeout_ticks")
        for name in (
            "inflight_slots_max",
            "batch_commands_max",
            "batch_bytes_max",
            "message_bytes_max",
            "peer_message_bytes_max",
            "accept_slots_per_msg_max",
            "snapshot_interval_slots",
            "snapshot_chunk_bytes",
            "catchup_entries_max",
            "catchup_retry_ticks",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        check_shards(self.kv_shards)
        if not 0 <= self.lease_ticks < self.election_timeout_ticks:
            raise ValueError("need 0 <= lease_ticks < election_timeout_ticks")
        if self.peer_message_bytes_max < bound_for(self.batch_bytes_max, self.message_bytes_max):
            raise ValueError(
                "peer_message_bytes_max must hold message_bytes_max and one full batch plus framing"
            )


def bound_for(largest_value_bytes: int, message_bytes_max: int = MESSAGE_BYTES_MAX) -> int:
    """The least ``peer_message_bytes_max`` for slot values of up to
    ``largest_value_bytes``: one message holds at most ``message_bytes_max``
    of entries, or one entry that alone exceeds it, plus its framing."""
    return MESSAGE_OVERHEAD_BYTES + max(message_bytes_max, largest_value_bytes + ENTRY_OVERHEAD_BYTES)


def lease_ticks_for(election_timeout_ticks: int, drift: float) -> int:
    """The longest safe lease, in the leader's ticks, when every clock runs at a rate
    within ``1 +- drift`` of real time (0 = leases impossible with these numbers).

    A follower honours a lease from when it receives a round until its own clock has
    advanced an election timeout: tick granularity leaves at least
    ``election_timeout_ticks - 1`` of its ticks, at most ``(E - 1) / (1 + drift)``
    of real time at its fastest. The leader counts its lease from the tick it sent
    the round (never later than the receipt), so ``L`` of its ticks last at most
    ``L / (1 - drift)`` of real time at its slowest. ``L / (1 - drift) <= (E - 1) /
    (1 + drift)`` gives the bound."""
    if not 0.0 <= drift < 1.0:
        raise ValueError("drift must be in [0, 1)")
    return max(0, int((election_timeout_ticks - 1) * (1.0 - drift) / (1.0 + drift)))
