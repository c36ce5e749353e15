"""Deliberately broken variants (of Paxos, the placement, the world, and the
two-phase commit): the simulator must catch each of them for some seed
(tests/sim/test_sim_catches_bugs.py, tests/sim/test_sim_txns.py)."""

from __future__ import annotations

import dataclasses

from dsnode.core.commands import SubDelete, SubGet
from dsnode.core.effects import Reply
from dsnode.core.membership.members import GroupMoved
from dsnode.core.membership.mover import Mover
from dsnode.core.paxos.acceptor import Acceptor
from dsnode.core.paxos.group import PaxosGroup
from dsnode.core.paxos.messages import Ballot
from dsnode.core.paxos.node import PaxosNode
from dsnode.core.paxos.roles import Role
from dsnode.core.paxos.statemachine import DedupKV
from dsnode.core.ring import Ring
from dsnode.core.twopc.coordinator import Coordinator, State
from dsnode.core.twopc.records import TxResolve
from dsnode.core.twopc.recovery import Recovery
from dsnode.sim.txns import TxConfig


class ForgetfulAcceptor(Acceptor):
    """Never persists its promises, so a crash makes it forget them."""

    __slots__ = ()

    def _record_promise(self, ballot: Ballot, records: list[bytes]) -> None:
        return None


class NackFreeAcceptor(Acceptor):
    """Accepts any ballot in phase 2, ignoring its promise."""

    __slots__ = ()

    def on_accept(self, m, records, chosen_through=0):
        saved = self.promised
        self.promised = min(self.promised, m.ballot)
        try:
            return super().on_accept(m, records, chosen_through)
        finally:
            self.promised = max(saved, self.promised)


class UnboundedPromiseAcceptor(Acceptor):
    """Answers phase 1 the old way: every accepted value above its snapshot in
    one message, whatever the byte budget and whatever its log knows to be
    chosen. After a restart of every node such a promise outgrows the peer
    frame limit, the network drops it and no candidate ever wins: a liveness
    failure, not a safety one (see ``LIVENESS_BROKEN``)."""

    __slots__ = ()

    def on_prepare(self, m, records, chosen_through=0, budget=0):
        return super().on_prepare(dataclasses.replace(m, from_slot=0), records, 0, 1 << 62)


BROKEN = {"forgetful-acceptor": ForgetfulAcceptor, "nack-free-acceptor": NackFreeAcceptor}
# variants that break liveness (the simulator's leader-after-heal check catches them);
# the cores' own message bound is lifted for them, as if it did not exist
LIVENESS_BROKEN = {"unbounded-promises": UnboundedPromiseAcceptor}


class AnswersAnyValueGroup(PaxosGroup):
    """The old leader bug: answers the commands it batched into a slot with the
    results of whatever value was chosen there, even another leader's."""

    def _answer(self, p, slot, n, results, mine):
        for i, result in enumerate(results[:n]):
            token = p.tokens.pop((slot, i), None)
            if token is not None:
                self.out.reply.append(Reply(token, result=result))
        for i in range(len(results), n):
            p.tokens.pop((slot, i), None)
        return True


class LeaseIgnoresDriftGroup(PaxosGroup):
    """The naive lease: as long as the election timeout the followers honour,
    measured on the leader's own clock, as if all clocks ran at one rate and ticks
    had no granularity (``config.lease_ticks_for`` is the bound it ignores)."""

    def _lease_length(self) -> int:
        return self.cfg.election_timeout_ticks


class IdBlindKV(DedupKV):
    """Ignores request ids: a retried write whose first attempt was applied takes
    effect again."""

    __slots__ = ()

    def apply(self, rid, cmd, index):
        return super().apply(None, cmd, index)


class IdBlindGroup(PaxosGroup):
    sm_cls = IdBlindKV


BROKEN_GROUPS = {
    "answers-any-value": AnswersAnyValueGroup,
    "lease-ignores-drift": LeaseIgnoresDriftGroup,
    "id-blind-dedup": IdBlindGroup,
}

class LearnerVotesGroup(PaxosGroup):
    """Counts a learner's acceptance toward the quorum, as if it were a voter: a
    leader cut off with a fresh learner chooses alone what the voters never
    accepted (``core.paxos.reconfig``: learners never count)."""

    def _on_accepted(self, frm, m):
        voters = self.member_set
        self.member_set = counted = voters | frozenset(self.learners)
        try:
            super()._on_accepted(frm, m)
        finally:
            if self.member_set is counted:  # (unless a new configuration came in)
                self.member_set = voters


# variants of replica-set changes (they run with the mover on: ``SimConfig.reconfig``)
CONF_BROKEN = {"learner-votes": LearnerVotesGroup}


class _PlacementNode(PaxosNode):
    """A node that hosts the partitions ``placement(ring)`` names, each on the
    members given; as it stands the ring's own placement, which the broken
    placements below override."""

    def placement(self, ring: Ring) -> dict[int, tuple[str, ...]]:
        mine = ring.partitions_of(self.node_id) if self.node_id in ring.members else ()
        return {p: ring.replicas(p) for p in mine}

    def sync_partitions(self) -> list:
        ring = self.ring
        if ring is None:
            return []
        self._ring_epoch = ring.epoch
        created = []
        for pid, members in sorted(self.placement(ring).items()):
            if pid not in self.groups and self.node_id in members:
                self.add_group(pid, members)
                created.append(pid)
        return created


class NextPartitionNode(_PlacementNode):
    """Off by one: partition p goes where the ring places partition p + 1, on its
    replicas (so some nodes host partitions the ring does not place on them)."""

    def placement(self, ring: Ring) -> dict[int, tuple[str, ...]]:
        n = ring.partitions
        return {p: ring.replicas((p + 1) % n) for p in range(n)}


class LeadersOnlyNode(_PlacementNode):
    """Creates only the partitions it is the preferred leader of, not those it is
    a follower replica of: each such partition has one member hosting it, so no
    quorum and no leader (the settle check sees the replicas missing first)."""

    def placement(self, ring: Ring) -> dict[int, tuple[str, ...]]:
        mine = ring.led_by(self.node_id) if self.node_id in ring.members else ()
        return {p: ring.replicas(p) for p in mine}


class SortedReplicasNode(_PlacementNode):
    """Right members, wrong order: each partition's replicas sorted by node id, so
    the preferred leader is no longer the ring's first replica."""

    def placement(self, ring: Ring) -> dict[int, tuple[str, ...]]:
        return {p: tuple(sorted(m)) for p, m in super().placement(ring).items()}


# variants that place partitions otherwise than the ring (the placement checks catch
# them); they run only in the partitioned mode (SimConfig.partitions > 0)
RING_BROKEN = {
    "next-partition": NextPartitionNode,
    "leaders-only": LeadersOnlyNode,
    "sorted-replicas": SortedReplicasNode,
}

# variants of the world itself: "trusting-peers" admits a node whatever it lost
# (no identity gate), so a wiped or rolled-back acceptor votes again
WORLD_BROKEN = ("trusting-peers",)


class DecidesEarlyCoordinator(Coordinator):
    """Commits a writing transaction at its home as soon as it starts, beside its
    prepares instead of after them, taking the other participants' compares to hold
    (what the home needs of them it makes up): a prepare that then dies on a lock, or
    comes after the resolve and is refused, leaves the home's writes applied and the
    participant's not. (Read-only transactions it runs as it should.)"""

    def _start(self, token, txn, ts, deadline, ring, restarts=0, rid=None):
        super()._start(token, txn, ts, deadline, ring, restarts, rid)
        a = next(reversed(self.attempts.values()))
        if not any(type(s) is not SubGet for s in (*txn.then, *txn.otherwise)):
            return
        for q, prep in a.plan.prepares.items():
            if q != a.plan.home:
                a.prepared[q] = {"versions": [[k, v] for k, v in prep.compares],
                                 "reads": [[k, None, 0] for k in prep.reads],
                                 "existed": [[w.key, True] for w in (*prep.then,
                                                                     *prep.otherwise)
                                             if type(w) is SubDelete],
                                 "revision": 1}
        a.state = State.DECIDING
        self._decide(a)


class ReleasesOnTimeoutRecovery(Recovery):
    """A participant whose transaction stayed prepared past the timeout releases its
    locks (resolves abort) on its own, without asking the home: the coordinator may
    have decided commit, and resolve the other participants with it."""

    def scan(self, now, led):
        for pid, table in led.items():
            for txid in list(table.prepared):
                key = ("participant", pid, txid)
                since = self._seen.setdefault(key, now)
                if now - since >= self.cfg.prepare_timeout_ticks and key not in self._busy:
                    self._busy[key] = set()
                    self._count("participant_released")
                    self._submit((*key, "resolve"), pid, TxResolve(txid, pid, False, False))
        super().scan(now, led)


class EagerMover(Mover):
    """Reports every partition it leads as moved (``GroupMoved``) as soon as a ring's
    moves are pending, before its replicas match the ring: the member table settles
    early, the movers stop, and partitions keep the replicas of an older ring."""

    def tick(self) -> list[GroupMoved]:
        out = super().tick()
        core = self.core
        meta = core.groups.get(core.metadata) if core.metadata is not None else None
        if meta is None or not meta.sm.changes_pending():
            return out
        epoch = meta.sm.ring.epoch
        told = self.__dict__.setdefault("told", set())  # (group, epoch) reported once
        told.update((c.group, c.epoch) for c in out)
        for gid, g in sorted(core.groups.items(), key=lambda kv: str(kv[0])):
            if gid != core.metadata and g.role is Role.LEADER and (str(gid), epoch) not in told:
                told.add((str(gid), epoch))
                out.append(GroupMoved(str(gid), epoch))
        return out


# variants of the membership changes (they run with them on: ``SimConfig.membership``):
# a mover that reports partitions moved too early, a shell that keeps retired groups
MEMBER_BROKEN = {"eager-moved": ("mover_cls", EagerMover),
                 "keeps-retired": ("drop_retired", False)}


# variants of the two-phase commit (they run with the transactions' workload on)
TXN_BROKEN = {"decide-early": ("coordinator_cls", DecidesEarlyCoordinator),
              "release-on-timeout": ("recovery_cls", ReleasesOnTimeoutRecovery)}


def configure(cfg, name: str):
    """``cfg`` (a ``SimConfig``) running the broken variant ``name``."""
    if name in MEMBER_BROKEN:
        if not cfg.partitions:
            raise ValueError(f"the broken variant {name!r} runs only in a partitioned "
                             "cluster (--partitions P)")
        field_name, value = MEMBER_BROKEN[name]
        return dataclasses.replace(cfg, membership=True, **{field_name: value})
    if name in TXN_BROKEN:
        if not cfg.partitions:
            raise ValueError(f"the broken variant {name!r} runs only in a partitioned "
                             "cluster (--partitions P)")
        field_name, cls = TXN_BROKEN[name]
        tx = cfg.txns if cfg.txns is not None else TxConfig()
        return dataclasses.replace(cfg, txns=dataclasses.replace(tx, **{field_name: cls}))
    if name in BROKEN:
        return dataclasses.replace(cfg, acceptor_cls=BROKEN[name])
    if name in CONF_BROKEN:
        if cfg.partitions:
            raise ValueError(f"the broken variant {name!r} runs only with --groups")
        return dataclasses.replace(cfg, group_cls=CONF_BROKEN[name], reconfig=True)
    if name in BROKEN_GROUPS:
        return dataclasses.replace(cfg, group_cls=BROKEN_GROUPS[name])
    if name in RING_BROKEN:
        if not cfg.partitions:
            raise ValueError(f"the broken variant {name!r} runs only in a partitioned "
                             "cluster (--partitions P)")
        return dataclasses.replace(cfg, node_cls=RING_BROKEN[name])
    if name == "trusting-peers":
        return dataclasses.replace(
            cfg, identity_gate=False,
            faults=dataclasses.replace(cfg.faults, amnesia_weight=3),
        )
    frame = cfg.frame_bytes_max or cfg.paxos.peer_message_bytes_max
    return dataclasses.replace(
        cfg,
        acceptor_cls=LIVENESS_BROKEN[name],
        paxos=dataclasses.replace(cfg.paxos, peer_message_bytes_max=1 << 62),
        frame_bytes_max=frame,
        large_value_chance=max(cfg.large_value_chance, 0.5),
        faults=dataclasses.replace(cfg.faults, crash_all_weight=2),
    )
