"""One Multi-Paxos group (one partition, or the metadata group) on one node.

Driven only through ``step``, ``tick``, ``propose``, ``read``, ``flush`` and
``campaign``; every effect goes into the shared ``Outbox`` that
``PaxosNode.ready`` drains.
Messages to this node itself take the same code path through a local queue.
Roles change only in ``become_follower``/``become_precandidate``/
``become_candidate``/``become_leader``. This module holds the roles, elections,
the acceptor side and learning; the leader's work (batching, phase 2, replies,
reads) is ``proposer.LeaderSide`` and catch-up and snapshots are
``catchup.CatchUp``, both mixed into ``PaxosGroup`` over its one set of state.

Elections (``PaxosConfig.pre_vote``, Raft thesis 9.6): a follower whose timer
fires becomes a pre-candidate and asks every member whether it would promise
the next ballot. Neither side changes any state for that question, so a node
cut off from a quorum never raises its round and cannot depose the leader it
rejoins (its higher promise would nack the leader's accepts). Only with grants
from a quorum, itself included, does it become a candidate and run phase 1.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable
from typing import Any

from dsnode.core.commands import ConfChange, Form, SetRing
from dsnode.core.errors import InvariantBroken, PeerMisbehaved, StateLost
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.acceptor import Acceptor
from dsnode.core.paxos.catchup import CatchUp
from dsnode.core.paxos.config import PaxosConfig
from dsnode.core.paxos.learner import Learner
from dsnode.core.paxos.log import Log
from dsnode.core.paxos.messages import (
    ZERO_BALLOT,
    Accept,
    Accepted,
    Ballot,
    CatchupReq,
    Dropped,
    Host,
    Learn,
    Prepare,
    PreVote,
    PreVoteReply,
    Promise,
    SnapChunk,
    TimeoutNow,
    wire_size,
)
from dsnode.core.paxos.outputs import (
    Applied,
    Outbox,
    StoredSnapshot,
)
from dsnode.core.paxos.proposer import LeaderSide, Proposer, merge_promises
from dsnode.core.paxos.reconfig import GroupConf
from dsnode.core.paxos.roles import Role
from dsnode.core.paxos.statemachine import DedupKV, pack_batch, unpack_batch


class PaxosGroup(LeaderSide, CatchUp):
    sm_cls: type[DedupKV] = DedupKV  # the state machine (a subclass in the sim's broken variants)

    def __init__(
        self,
        group: Any,
        node_id: str,
        members: tuple[str, ...],
        rng: random.Random,
        out: Outbox,
        cfg: PaxosConfig,
        acceptor_cls: type[Acceptor] = Acceptor,
        alive: Callable[[str], bool] | None = None,
        conf: GroupConf | None = None,
    ) -> None:
        """``members``: the voters in preference order; ``conf``: the configuration
        the group starts from instead (a node hosting it as a learner, created after
        it changed: ``PaxosNode.host_learner``)."""
        if conf is None:
            conf = GroupConf(tuple(members))
        if not conf.hosts(node_id):
            raise InvariantBroken(f"{node_id} not a member of group {group}")
        self.group = group
        self.me = node_id
        # the configuration the group was created with, and the one in effect (applied)
        self.base_conf = conf
        # created as a learner (``PaxosNode.host_learner``): the slot of the change that
        # added it; 0 for a replica that has been in the group from its start
        self.joined_at = conf.slot if conf.learners and node_id in conf.learners else 0
        self._set_conf(conf)
        # this replica applied a configuration without it: it takes no part any more
        self.retired = False
        # the nodes the last configuration change applied here removed, and its slot: a
        # leader goes on telling them the commit until they have learned it
        self.removed: dict[str, int] = {}
        self.rng = rng
        self.out = out
        self.cfg = cfg
        # node-level liveness (``PaxosNode.peer_alive``); alone, a group trusts only itself
        self.alive: Callable[[str], bool] = alive or (lambda m: m == node_id)
        self.quiesced = False
        self.quiet_seq = 0  # the read round of the leader's quiesce heartbeats
        self.acceptor = acceptor_cls(group)
        self.log = Log()
        self.sm = self.sm_cls(shards=cfg.kv_shards)
        self.now = 0
        self.max_round = 0
        self.leader_hint: str | None = None
        # With leases, a (re)started node honours whatever lease it may have
        # acknowledged before it went down: no vote for anyone for an election timeout.
        self.heard_leader_at = 0 if cfg.lease_ticks else -(10**9)
        self.failed_elections = 0
        self._local: list[Any] = []
        # role state
        self.role = Role.FOLLOWER
        self.ballot: Ballot = (0, node_id)
        self.promises: dict[str, Promise] = {}
        # pieces of promises still coming in (chunked phase-1 replies), per acceptor
        self.promise_parts: dict[str, dict[int, tuple[Ballot, bytes]]] = {}
        self.prevote_ballot: Ballot = (0, node_id)
        self.prevotes: set[str] = set()
        self.proposer: Proposer | None = None
        self.learner: Learner | None = None
        self.elapsed = 0
        self.timeout = 0
        self.last_heartbeat = 0
        # catch-up (pull) state
        self.catchup_peer: str | None = None
        self.catchup_target = 0
        self.catchup_sent_at = -(10**9)
        self.snap_in: tuple[int, int, int] | None = None  # (index, total, crc)
        self.snap_buf = bytearray()
        # index of a peer's snapshot handed to the shell to restore (SnapshotRestore)
        # and not yet back (snapshot_restored)
        self.snap_restoring: int | None = None
        self._restoring_blob: tuple[bytes, int] = (b"", 0)  # its bytes and CRC-32
        self._catchup_turn = 0
        self._catchup_progress: tuple[int, int] = (-1, -1)
        self._catchup_stalls = 0
        # index of the snapshot handed to the shell and not yet back (snapshot_ready)
        self.snap_pending: int | None = None
        # newest snapshot the shell holds durably in a file (snapshot_ready, or
        # recovered from one); checkpoints name it
        self.snap_file_index = 0
        # newest snapshot file the replayed WAL records name (records.SNAPFILE)
        self.snap_file_named = 0
        # highest chosen_through written in a commit record (records.COMMIT)
        self.commit_persisted = 0
        # chosen slots above commit_persisted whose value a chosen record holds: a
        # checkpoint keeps those records even where the acceptor later accepted the
        # same value (above a gap no commit record says they were chosen)
        self.chosen_recorded: set[int] = set()
        self.recovery_gaps = 0
        # leadership transfer: as leader, (target, tick started); as candidate, the
        # leader that handed over to us (sent along with our Prepare)
        self.transfer: tuple[str, int] | None = None
        self.transfer_from: Ballot = ZERO_BALLOT
        self.leader_since = 0
        self.become_follower()

    def _set_conf(self, conf: GroupConf) -> None:
        """Only here do the members change (``core.paxos.reconfig``)."""
        self.conf = conf
        self.members = tuple(sorted(conf.voters))
        self.member_set = frozenset(conf.voters)
        # the order in which members should lead (the ring's replica order)
        self.preferred = tuple(conf.voters)
        self.quorum = conf.quorum
        self.learners = tuple(sorted(conf.learners))
        # who gets the leader's accepts and commits: the voters, then the learners
        self.everyone = self.members + self.learners
        self.voter = self.me in self.member_set

    # ================================================================ roles
    def become_follower(self) -> None:
        if self.leader_hint == self.me:
            self.leader_hint = None
        if self.cfg.reconfig and not self.conf.hosts(self.me):
            self.retired = True  # a removed leader stepping down: now it takes no part
        self._fail_pending("leadership lost")
        self.role = Role.FOLLOWER
        self.out.role_changes += 1
        self.quiesced = False
        self.transfer = None
        self.transfer_from = ZERO_BALLOT
        self.proposer = None
        self.learner = None
        self.promises = {}
        self.promise_parts = {}
        self.prevotes = set()
        self._reset_catchup()
        self.elapsed = 0
        self.timeout = self._random_timeout()

    def become_precandidate(self) -> None:
        """Ask for pre-votes on the ballot ``become_candidate`` would use.

        Changes no ballot state: ``max_round``, the acceptor's promise and the
        disk stay as they are (etcd raft ``becomePreCandidate`` likewise keeps
        the term). The own grant counts at once, so a group of one goes
        straight on to phase 1.
        """
        if self.role is Role.LEADER:
            raise InvariantBroken("a leader does not become a pre-candidate")
        if not self.voter:
            raise InvariantBroken("a learner does not campaign")
        self.role = Role.PRECANDIDATE
        self.promises = {}
        self.prevote_ballot = (max(self.max_round, self.acceptor.promised[0]) + 1, self.me)
        self.prevotes = {self.me}
        self.leader_hint = None
        self.elapsed = 0
        self.timeout = self._random_timeout()
        if len(self.prevotes) >= self.quorum:
            self.become_candidate()
            return
        msg = PreVote(self.group, self.prevote_ballot, self.log.chosen_through)
        for m in self.members:
            if m != self.me:
                self._send(m, msg)

    def become_candidate(self, transfer_from: Ballot = ZERO_BALLOT) -> None:
        if not self.voter:
            raise InvariantBroken("a learner does not campaign")
        self._fail_pending("leadership lost")
        self.role = Role.CANDIDATE
        self.out.role_changes += 1
        self.quiesced = False
        self.transfer = None
        self.transfer_from = transfer_from
        self.proposer = None
        self.learner = None
        self._reset_catchup()
        self.max_round = max(self.max_round, self.acceptor.promised[0]) + 1
        self.ballot = (self.max_round, self.me)
        self.promises = {}
        self.promise_parts = {}
        self.prevotes = set()
        self.leader_hint = None
        self.elapsed = 0
        self.timeout = self._random_timeout()
        self.failed_elections += 1
        msg = Prepare(self.group, self.ballot, self.log.chosen_through + 1, transfer_from)
        for m in self.members:
            self._send(m, msg)

    def become_leader(self) -> None:
        res = merge_promises(self.promises, self.log.chosen_through + 1, self.log.chosen_through)
        self.role = Role.LEADER
        self.out.role_changes += 1
        self.quiesced = False
        self.transfer = None
        self.transfer_from = ZERO_BALLOT
        self.leader_since = self.now
        self.promises = {}
        self.promise_parts = {}
        self._reset_catchup()
        self.failed_elections = 0
        self.leader_hint = self.me
        self.learner = Learner(self.quorum)
        p = Proposer(
            self.ballot,
            next_slot=res.recovery_end + 1,
            recovery_end=res.recovery_end,
        )
        for m in self.members:
            p.last_ack[m] = self.now
        p.gone.update(self.removed)
        self.proposer = p
        for slot, value in res.proposals.items():
            if slot in self.log.chosen:
                value = self.log.chosen[slot]
            p.proposals[slot] = value
        if self.cfg.reconfig:
            self._fence_recovery(p, res.snap_index)
        for slot in p.proposals:
            self.learner.track(slot)
        if (
            self.group == self.cfg.formation_group
            and res.recovery_end == 0
            and not res.proposals
            and self.sm.cluster_uuid is None
        ):
            # A new cluster: nothing was ever accepted by this quorum, so slot 1 is
            # free; choosing the cluster's UUID there is how the members agree on it.
            uuid = f"{self.rng.getrandbits(128):032x}"
            if self.cfg.formation_uuid is not None:
                uuid = self.cfg.formation_uuid
            first: list = [(None, Form(uuid))]
            if self.cfg.formation_ring is not None:
                members, partitions, replication = self.cfg.formation_ring
                first.append((None, SetRing(tuple(members), partitions, replication, 1)))
            p.proposals[1] = pack_batch(first)
            self.learner.track(1)
            p.next_slot = 2
        if res.snap_peer is not None and res.snap_index > self.log.chosen_through:
            self._want_catchup(res.snap_peer, res.snap_index)
        self._broadcast_accepts(sorted(p.proposals.items()))
        self._heartbeat(retransmit=False)  # announce the new leader at once

    def _fence_recovery(self, p: Proposer, snap_index: int) -> None:
        """Rule R3 of ``core.paxos.reconfig``: phase 1 ran with the configuration this
        node has applied. A chosen prefix beyond ours (it may hold changes we do not
        know): propose nothing, catch up, then phase 1 again. Else propose the
        re-proposals up to the first configuration change among them and hold the rest
        until it is applied."""
        p.phase1_epoch = self.conf.epoch
        if snap_index > self.log.chosen_through:
            p.catchup_to = snap_index
            p.held, p.proposals = p.proposals, {}
            return
        for slot in sorted(p.proposals):
            if _has_conf_change(p.proposals[slot]):
                p.fence = slot
                for s in [s for s in p.proposals if s > slot]:
                    p.held[s] = p.proposals.pop(s)
                return

    def _random_timeout(self) -> int:
        t = self.cfg.election_timeout_ticks
        return self.rng.randint(t, t * (2 + min(self.failed_elections, 4)) - 1)

    # ================================================================ client inputs
    def campaign(self) -> None:
        """Start phase 1 now, skipping pre-vote (an operator's or a test's
        input; etcd's leadership transfer skips pre-vote as well). Safety never
        rests on pre-vote, so the simulator uses this to stage contested
        elections that pre-vote would otherwise make rare."""
        if self.role is Role.LEADER or not self.voter:
            return
        if self.cfg.lease_ticks and len(self.members) > 1 and self._leader_recent():
            # We may have acknowledged a live leader's lease: our own promise
            # would help elect another leader while it still serves reads alone.
            # (A group of one can only have acknowledged its own: this node's, or
            # an earlier incarnation's, gone. Nothing to honour: a restarted
            # single-node cluster leads at once, not after an election timeout.)
            self.out.dropped["campaign_during_lease"] += 1
            return
        self.become_candidate()
        self._drain_local()

    # ================================================================ ticks
    def tick(self, n: int = 1) -> None:
        """``n`` ticks of this node's clock have passed (more than one after the
        process was paused or its loop fell behind: time-based decisions,
        leases above all, must see all of it)."""
        if n < 1:
            raise InvariantBroken(f"tick({n})")
        self.now += n
        cfg = self.cfg
        if self.log.chosen_through > self.commit_persisted:
            self.commit_persisted = self.log.chosen_through
            self.out.persist.append(rec.commit(self.group, self.commit_persisted))
            if self.chosen_recorded:
                self._forget_recorded()
        if self.role is Role.LEADER:
            p = self.proposer
            if (
                cfg.leader_probe_chance
                and self.catchup_peer is None
                and self.snap_in is None
                and self.snap_restoring is None
                and self.rng.random() < cfg.leader_probe_chance
            ):
                others = [m for m in self.members if m != self.me]
                if others:
                    self._send_catchup(self.rng.choice(others))
            if self.now - self.last_heartbeat >= cfg.heartbeat_interval_ticks:
                if self.learners:
                    self._invite_learners(p)
                if not self.quiesced:
                    self._heartbeat(retransmit=True)
                elif self._behind():
                    self._wake()  # heartbeats again until they report everything chosen
                else:
                    self._send_quiesce()  # to live members that did not ack it yet
            fresh = sum(1 for m in self.members if self._member_fresh(m))
            if fresh < self.quorum:
                self.become_follower()
            else:
                self._leader_catchup()
                if p.catchup_to and self.voter and self._catchup_stuck(p):
                    self.become_candidate()  # what it must learn is nowhere: phase 1 again
                    self._drain_local()
                    return
                self._tend_transfer()
                if self.role is Role.LEADER:  # (a transfer may have just ended it)
                    p.forget_rounds(p.confirmed_seq(self.members, self.quorum))
                    if cfg.quiesce and not self.quiesced and self._idle():
                        self._quiesce()
        elif not self.voter:
            # a learner never campaigns; one that heard no leader for an election
            # timeout asks a voter for what follows its log (it may have been removed,
            # or the leader may have changed, without a word reaching it), quiet
            # group or not: a leader no longer tells a removed learner anything
            self.elapsed += n
            if self.elapsed >= self.timeout:
                self.elapsed = 0
                self.timeout = self._random_timeout()
                if not self.retired:
                    self._send_catchup(self.rng.choice(self.members))
        elif self.quiesced and self.leader_hint is not None and self.alive(self.leader_hint):
            self.elapsed = 0  # a quiet group whose leader's node is alive: nothing to time
        else:
            self.quiesced = False
            self.elapsed += n
            if self.elapsed >= self.timeout:
                self._election_timeout()
        if (
            self.catchup_peer is not None
            and self.log.chosen_through < self.catchup_target
            and self.now - self.catchup_sent_at >= cfg.catchup_retry_ticks
        ):
            self._rotate_stalled_catchup()
            self._send_catchup()
        self._drain_local()

    def _rotate_stalled_catchup(self) -> None:
        """A catch-up peer that gave nothing for three retries in a row (down, cut
        off, retired) is replaced by the next other member: any member's chosen
        values are as good, and one that is gone must not stall us for good."""
        progress = (self.log.chosen_through, len(self.snap_buf))
        if progress != self._catchup_progress:
            self._catchup_progress, self._catchup_stalls = progress, 0
            return
        self._catchup_stalls += 1
        if self._catchup_stalls < 3:
            return
        self._catchup_stalls = 0
        others = [m for m in self.everyone if m not in (self.me, self.catchup_peer)]
        if others:
            self._catchup_turn += 1
            self.catchup_peer = others[self._catchup_turn % len(others)]
            self.out.dropped["catchup_peer_stalled"] += 1

    def _election_timeout(self) -> None:
        if not self.voter:
            return
        if not self.cfg.pre_vote:
            self.become_candidate()
        elif self.role is Role.PRECANDIDATE:
            # No quorum granted in time: back off (a wider window each time, as
            # for a failed phase 1) and ask again when the follower timer fires.
            self.failed_elections += 1
            self.become_follower()
        else:
            # A follower, or a candidate whose phase 1 stalled: a candidate cut
            # off after its pre-vote must not go on raising its round either.
            self.become_precandidate()

    # ================================================================ peer input
    def step(self, frm: str, msg: Any) -> None:
        if type(msg) is Dropped:
            if self.proposer is not None and self.role is Role.LEADER:
                self.proposer.gone.pop(frm, None)  # it knows it was removed
            return
        if frm not in self.member_set and not self._may_hear(frm, msg):
            self.out.dropped["not_member"] += 1
            if self.cfg.reconfig and type(msg) in (Prepare, PreVote):
                # a node of a configuration one of us has not applied: the one behind
                # learns from the other (a replica that missed its removal, or one that
                # missed the change that made the asker a voter)
                start = msg.from_slot if type(msg) is Prepare else msg.chosen_through + 1
                if start - 1 > self.log.chosen_through:
                    self._want_catchup(frm, start - 1)
                else:
                    self._on_catchup_req(frm, CatchupReq(self.group, start, 0, 0))
            return
        if self.retired and type(msg) is not CatchupReq:
            self.out.dropped["retired"] += 1  # it takes no part; it still serves catch-up
            return
        try:
            self._dispatch(frm, msg)
        except PeerMisbehaved:
            self.out.dropped["misbehaved"] += 1
        self._drain_local()

    def _dispatch(self, frm: str, msg: Any) -> None:
        t = type(msg)
        if t is Accept:
            self._on_accept(frm, msg)
        elif t is Accepted:
            self._on_accepted(frm, msg)
        elif t is Prepare:
            self._on_prepare(frm, msg)
        elif t is Promise:
            self._on_promise(frm, msg)
        elif t is PreVote:
            self._on_prevote(frm, msg)
        elif t is PreVoteReply:
            self._on_prevote_reply(frm, msg)
        elif t is TimeoutNow:
            self._on_timeout_now(frm, msg)
        elif t is CatchupReq:
            self._on_catchup_req(frm, msg)
        elif t is Learn:
            self._on_learn(frm, msg)
        elif t is SnapChunk:
            self._on_snap_chunk(frm, msg)
        else:
            raise PeerMisbehaved(f"unknown message {t.__name__}")

    def _may_hear(self, frm: str, msg: Any) -> bool:
        """A message from a node that is no voter here: with reconfiguration, phase 2,
        commits and catch-up come from anyone (a leader of a configuration this
        replica has not applied yet); phase 1, pre-votes and hand-overs only from the
        group's learners (which may be voters of a newer configuration), so a removed
        node that missed its removal cannot disturb the group; a hand-over from the
        leader this replica follows also when that leader just left the voters."""
        if not self.cfg.reconfig:
            return False
        t = type(msg)
        if t is TimeoutNow and msg.ballot == self.acceptor.promised:
            return True  # the leader we follow, handing over as it leaves the group
        if t is Prepare or t is PreVote or t is TimeoutNow:
            return frm in self.learners
        return True

    def _send(self, to: str, msg: Any) -> None:
        size = wire_size(msg)
        if size > self.out.largest_message:
            self.out.largest_message = size
        if size > self.cfg.peer_message_bytes_max:
            raise InvariantBroken(
                f"{type(msg).__name__} of {size} bytes exceeds peer_message_bytes_max "
                f"{self.cfg.peer_message_bytes_max}"
            )
        if to == self.me:
            self._local.append(msg)
        else:
            self.out.send.append((to, msg))

    def _drain_local(self) -> None:
        while self._local:
            msg = self._local.pop(0)
            try:
                self._dispatch(self.me, msg)
            except PeerMisbehaved as e:
                raise InvariantBroken(f"own message rejected: {e}") from None

    def _see_round(self, ballot: Ballot) -> None:
        if ballot[0] > self.max_round:
            self.max_round = ballot[0]

    def _leader_recent(self) -> bool:
        if self.role is Role.LEADER:
            return True
        if self.quiesced and self.leader_hint is not None and self.alive(self.leader_hint):
            return True  # (never a lease: honour is dated by heard_leader_at alone)
        return self.now - self.heard_leader_at < self.cfg.election_timeout_ticks

    # ---------------------------------------------------------------- quiescence
    def is_quiet(self) -> bool:
        """Quiesced with nothing that needs the clock: the node may stop ticking it
        until an input or a peer's liveness change (``PaxosNode.tick``)."""
        if not self.quiesced or self.log.chosen_through > self.commit_persisted:
            return False
        if self._busy():
            return False
        if self.role is Role.FOLLOWER:
            # (a learner keeps its clock: it asks around when no leader talks to it)
            return self.voter and self.leader_hint is not None and self.alive(self.leader_hint)
        p = self.proposer
        if self.role is not Role.LEADER or p is None:
            return False
        live = [m for m in self.members if m != self.me and self.alive(m)]
        if len(live) + 1 < self.quorum:
            return False  # it must notice it lost its quorum and step down
        live += [m for m in self.learners if self.alive(m)]
        ct = self.log.chosen_through
        # all told, and all known to have everything chosen (see ``_behind``)
        return all(p.acked_seq.get(m, 0) >= self.quiet_seq and p.match.get(m, 0) >= ct
                   for m in live)

    def _busy(self) -> bool:
        """Catching up, or (as leader) commands, reads or a transfer in progress."""
        if (self.catchup_peer is not None or self.snap_in is not None
                or self.snap_restoring is not None):
            return True
        p = self.proposer
        return p is not None and bool(
            p.proposals or p.queue or p.reads or p.read_wanted or self.transfer is not None
        )

    def _member_fresh(self, m: str) -> bool:
        """Answered this leader lately, or (quiesced) its node is alive."""
        p = self.proposer
        if self.now - p.last_ack.get(m, -(10**9)) <= self.cfg.leader_quorum_timeout_ticks:
            return True
        return self.quiesced and self.alive(m)

    def _idle(self) -> bool:
        """Nothing to do and a quorum (live members all) has everything chosen."""
        p = self.proposer
        if self._busy() or self.log.applied < self.log.chosen_through:
            return False
        ct = self.log.chosen_through
        fresh = self.cfg.heartbeat_interval_ticks * 2
        if any(self.alive(m) for m in p.gone):
            return False  # a removed replica still to be told: keep telling it
        caught_up = 1
        for m in self.everyone:
            if m == self.me:
                continue
            ok = p.match.get(m, 0) >= ct and self.now - p.last_ack.get(m, -(10**9)) <= fresh
            if ok:
                caught_up += m in self.member_set
            elif self.alive(m):
                return False  # a live member behind: keep feeding it
        return caught_up >= self.quorum

    def _quiesce(self) -> None:
        """Go quiet: a quiesce heartbeat in a round of its own, sent again each
        heartbeat interval to every live member that has not acknowledged it (a
        member that missed it would time out and disturb the group); then silence."""
        p = self.proposer
        self.quiesced = True
        p.new_round(self.now)
        self.quiet_seq = p.read_seq
        self._send_quiesce()
        self.out.dropped["quiesced"] += 1

    def _invite_learners(self, p: Proposer) -> None:
        """Tell each learner not heard from yet, or behind and silent for a quorum
        timeout, that it is one (``Host``): a node that does not host the group (any
        more) starts to, and catches up from us. (An old copy of the group on the node,
        from before a change removed it, may have acknowledged us, then applied its
        removal and dropped the group; a node that hosts it ignores the message.)"""
        c = self.conf
        msg = None
        ct = self.log.chosen_through
        silent = self.now - self.cfg.leader_quorum_timeout_ticks
        for m in self.learners:
            seen = p.match.get(m, 0)
            if (not seen or (seen < ct and p.last_ack.get(m, -(10**9)) < silent)) and self.alive(m):
                if msg is None:
                    msg = Host(self.group, c.voters, c.learners, c.epoch, c.slot)
                self._send(m, msg)

    def _behind(self) -> bool:
        """A live member's last report shows less than everything chosen. It may well have
        it all by now (a replica reports the prefix its records prove, and its commit
        record follows its learning by a tick), but only a fresh report says so: moves
        wait for a learner to be known caught up, a removed leader for its successors."""
        p = self.proposer
        ct = self.log.chosen_through
        return any(p.match.get(m, 0) < ct and self.alive(m) for m in self.everyone
                   if m != self.me)

    def _send_quiesce(self) -> None:
        p = self.proposer
        msg = Accept(self.group, self.ballot, (), self.log.chosen_through, self.quiet_seq, True)
        for m in self.everyone:
            if m != self.me and p.acked_seq.get(m, 0) < self.quiet_seq and self.alive(m):
                self.last_heartbeat = self.now
                self._send(m, msg)

    def _wake(self) -> None:
        """A quiesced leader has work, or a member that did not hear the quiesce asks
        around: heartbeats resume at once."""
        if self.quiesced and self.role is Role.LEADER:
            self.quiesced = False
            # acks stopped while quiet: the members' node heartbeats stand in for them,
            # or the quorum check would depose us before the first new acks arrive
            p = self.proposer
            for m in self.everyone:
                if self.alive(m):
                    p.last_ack[m] = max(p.last_ack.get(m, -(10**9)), self.now)
            self._heartbeat(retransmit=False)

    # ---------------------------------------------------------------- pre-vote
    def _on_prevote(self, frm: str, m: PreVote) -> None:
        """Grant unless a live leader was heard within the election timeout.

        The node we follow asking for itself has stepped down, so it is no
        live leader. Answering changes nothing here: no ``_see_round``, no
        promise, no record. ``m.chosen_through`` is deliberately no condition
        (see ``PreVote``).
        """
        self._wake()
        granted = frm == self.leader_hint or not self._leader_recent()
        if not granted:
            self.out.dropped["prevote_while_leader_live"] += 1
        self._send(frm, PreVoteReply(self.group, m.ballot, granted))

    def _on_prevote_reply(self, frm: str, m: PreVoteReply) -> None:
        if self.role is not Role.PRECANDIDATE or m.ballot != self.prevote_ballot:
            self.out.dropped["stale_prevote_reply"] += 1
            return
        if not m.granted:
            return
        self.prevotes.add(frm)
        if len(self.prevotes) >= self.quorum:
            self.become_candidate()

    # ---------------------------------------------------------------- leadership transfer
    def transfer_leadership(self, target: str) -> bool:
        """Start handing leadership to ``target`` (an operator's, a test's or the
        preference policy's input). The leader stops taking commands, waits until
        everything it proposed is chosen, then sends ``TimeoutNow`` and steps down;
        the target runs phase 1 at once. Abandoned after an election timeout.
        False (and nothing changes) when this node does not lead or ``target`` is
        no other member."""
        if self.role is not Role.LEADER or target == self.me or target not in self.members:
            return False
        if self.transfer is None:
            self.quiesced = False
            self.transfer = (target, self.now)
            self._try_transfer()
            self._drain_local()
        return True

    def _try_transfer(self) -> None:
        p = self.proposer
        if self.transfer is None or p.proposals or p.queue:
            return
        if p.handover_slot:  # a removed leader: not before a majority of voters applied it
            ready = [m for m in self.preferred if p.match.get(m, 0) >= p.handover_slot]
            if len(ready) < self.quorum:
                return
            best = max(p.match[m] for m in ready)
            self.transfer = (next(m for m in ready if p.match[m] == best), self.transfer[1])
        target = self.transfer[0]
        self._send(target, TimeoutNow(self.group, self.ballot))
        self.become_follower()
        self.leader_hint = target
        # give the handover (a message, phase 1, the first heartbeat) time before
        # this node's own election timer may fire
        self.timeout += self.cfg.election_timeout_ticks
        self.out.dropped["leadership_transferred"] += 1

    def _tend_transfer(self) -> None:
        """Per tick as leader: give up a transfer that did not happen in time; with
        ``prefer_leader``, start one towards the first member in preference order
        that is alive (answered within an election timeout) and caught up."""
        cfg = self.cfg
        if self.transfer is not None:
            if self.proposer.handover_slot:
                self._try_transfer()  # a removed leader waits for its successors
            elif self.now - self.transfer[1] >= cfg.election_timeout_ticks:
                self.transfer = None
                self.out.dropped["leadership_transfer_abandoned"] += 1
            return
        if not cfg.prefer_leader or self.now - self.leader_since < 3 * cfg.election_timeout_ticks:
            return
        p = self.proposer
        for m in self.preferred:
            if m == self.me:
                return
            if (
                (self.now - p.last_ack.get(m, -(10**9)) <= cfg.election_timeout_ticks
                 or (self.quiesced and self.alive(m)))
                and p.match.get(m, 0) + cfg.inflight_slots_max >= self.log.chosen_through
            ):
                self.transfer_leadership(m)
                return

    def _on_timeout_now(self, frm: str, m: TimeoutNow) -> None:
        """Our leader hands over: campaign now, telling the acceptors it did."""
        self._see_round(m.ballot)
        if (self.role is Role.LEADER or m.ballot[1] != frm or m.ballot < self.acceptor.promised
                or not self.voter):
            self.out.dropped["stale_timeout_now"] += 1
            return
        self.become_candidate(transfer_from=m.ballot)

    def _handed_over(self, m: Prepare) -> bool:
        """``m`` comes from the successor our leader named in the ballot we promised
        it: that leader has stepped down (and serves no lease); nothing to honour."""
        t = m.transfer_from
        return t != ZERO_BALLOT and t == self.acceptor.promised and t[1] == self.leader_hint

    @property
    def joining(self) -> bool:
        """A replica added afresh that has not yet applied the change that added it. Its
        acceptor is empty, yet a leader with an old configuration may count it under
        the node's old identity: it must not answer phase 1 or 2 before it knows that
        every slot up to that change is chosen (then its promises say so)."""
        return self.log.applied < self.joined_at

    # ---------------------------------------------------------------- phase 1
    def _on_prepare(self, frm: str, m: Prepare) -> None:
        self._see_round(m.ballot)
        if self.joining:
            self.out.dropped["joining"] += 1
            return
        if frm != self.me:
            self._wake()  # a member that does not follow us: let it hear the leader
        if (
            (self.cfg.leader_stickiness or self.cfg.lease_ticks)
            and frm != self.me
            and m.ballot > self.acceptor.promised
            and frm != self.leader_hint
            and not self._handed_over(m)
            and self._leader_recent()
        ):
            # Leader stickiness: a live leader is not deposed by a node that
            # merely lost touch with it. Ignoring a prepare is always safe. With
            # leases it is required: this is how an acknowledged lease is honoured.
            self.out.dropped["prepare_while_leader_live"] += 1
            return
        reply = self.acceptor.on_prepare(
            m, self.out.persist, self.log.chosen_through, self.cfg.message_bytes_max
        )
        if reply.ok and frm != self.me and m.ballot[1] == frm:
            # Promised a candidate (our leader handed over to it, or none is heard):
            # give it time to win and be heard before our own timer runs out. Without
            # this (and without pre-votes) two members whose timers are both past due
            # take turns deposing each other's fresh leadership for good.
            self.elapsed = 0
        if (
            reply.ok
            and frm != self.me
            and self.role is not Role.FOLLOWER
            and m.ballot > self.ballot
        ):
            self.become_follower()
        self._send(frm, reply)

    def _on_promise(self, frm: str, m: Promise) -> None:
        if not m.ok:
            self._see_round(m.promised)
            if self.role is Role.CANDIDATE and m.ballot == self.ballot:
                self.become_follower()
            return
        if self.role is not Role.CANDIDATE or m.ballot != self.ballot or frm in self.promises:
            self.out.dropped["stale_promise"] += 1
            return
        if self.cfg.reconfig and m.chosen_through > self.log.chosen_through:
            # (rule R3, before winning) the promiser knows a longer chosen prefix, which
            # may hold a newer configuration: learn it, for we may be campaigning among
            # voters of the old one that are gone, and every election of ours resets the
            # others' timers (the up-to-date may never campaign)
            self._want_catchup(frm, m.chosen_through)
        if m.more_from or frm in self.promise_parts:
            # A piece of a chunked report: keep it, ask for the next one.
            parts = self.promise_parts.setdefault(frm, {})
            for slot, ballot, value in m.accepted:
                cur = parts.get(slot)
                if cur is None or ballot > cur[0]:
                    parts[slot] = (ballot, value)
            if m.more_from:
                self._send(frm, Prepare(self.group, self.ballot, m.more_from, self.transfer_from))
                return
            del self.promise_parts[frm]
            acc = tuple((slot, b, v) for slot, (b, v) in sorted(parts.items()))
            m = Promise(m.group, m.ballot, True, m.promised, m.chosen_through, acc)
        self.promises[frm] = m
        if len(self.promises) >= self.quorum:
            self.become_leader()

    # ---------------------------------------------------------------- phase 2
    def _on_accept(self, frm: str, m: Accept) -> None:
        self._see_round(m.ballot)
        if m.ballot[1] != frm:
            raise PeerMisbehaved("accept from a node that does not own the ballot")
        if self.joining:  # (see ``joining``) only the commit: catch up to it
            self.leader_hint, self.elapsed = frm, 0
            if m.commit > self.log.chosen_through:
                self._want_catchup(frm, m.commit)
            return
        # with reconfiguration a replica reports the chosen prefix its records prove (a
        # removed leader hands over, and its data goes, only once a majority of the new
        # voters know the change durably: ``_try_transfer``)
        known = (min(self.log.chosen_through, self.commit_persisted) if self.cfg.reconfig
                 else self.log.chosen_through)
        reply = self.acceptor.on_accept(m, self.out.persist, known)
        if reply.ok and frm != self.me:
            self.leader_hint = frm
            if self.role is not Role.FOLLOWER:
                self.become_follower()
            self.heard_leader_at = self.now
            self.elapsed = 0
            self.failed_elections = 0
            self.quiesced = m.quiesce
            self._learn_from_commit(frm, m)
        self._send(frm, reply)

    def _learn_from_commit(self, frm: str, m: Accept) -> None:
        log, acc = self.log, self.acceptor.accepted
        s = log.chosen_through + 1
        while s <= m.commit:
            if s not in log.chosen:
                a = acc.get(s)
                if a is None or a[0] != m.ballot:
                    break
                log.learn(s, a[1])  # our own accept record holds it
            s += 1
        self._advance()
        if log.chosen_through < m.commit:
            self._want_catchup(frm, m.commit)

    # ---------------------------------------------------------------- learning / apply
    def _learn(self, slot: int, value: bytes) -> None:
        """``value`` is chosen in ``slot``. Unless our own acceptor's record
        already holds it, record it, so a commit record can cover the slot."""
        log = self.log
        if slot <= log.snap_index or slot in log.chosen:
            return
        a = self.acceptor.accepted.get(slot)
        if a is None or a[1] != value:
            self.out.persist.append(rec.chosen(self.group, slot, value))
            self.chosen_recorded.add(slot)
        log.learn(slot, value)

    def _advance(self) -> None:
        log = self.log
        log.advance()
        overtaken = False
        if log.applied < log.chosen_through:
            p = self.proposer
            if self.sm.conf is None and self.cfg.reconfig:
                self.sm.conf = self.conf  # nothing changed since the group's creation
            for slot, value in log.to_apply():
                cached = p.batches.pop(slot, None) if p is not None else None
                mine = cached is not None and cached[0] == value
                if mine:
                    results = self.sm.apply_items(cached[1], slot)
                else:
                    results = self.sm.apply_value(value, slot)
                self.out.apply.append(Applied(self.group, slot, value))
                if cached is not None:
                    overtaken |= not self._answer(p, slot, len(cached[1]), results, mine)
            if (
                self.snap_pending is None
                and log.applied - log.snap_index >= self.cfg.snapshot_interval_slots
            ):
                self._take_snapshot()
        if overtaken and self.role is Role.LEADER:
            self.become_follower()  # someone with a higher ballot chose in our slots
        if self.cfg.reconfig:
            self._adopt_conf()
        if self.proposer is not None and self.proposer.reads:
            self._serve_reads()

    # ---------------------------------------------------------------- configuration
    def _adopt_conf(self) -> None:
        """After applying (or installing a snapshot): switch to the configuration the
        state machine holds if it is newer than ours (``core.paxos.reconfig``), then,
        as leader, lift what fenced the pipeline (rules R2 to R4)."""
        sm = self.sm
        if sm.conf is not None and sm.conf.epoch > self.conf.epoch:
            self._switch_conf(sm.conf)
        p = self.proposer
        if self.role is not Role.LEADER or p is None or not self.voter:
            return  # (a removed leader hands over: ``_hand_over_after_removal``)
        if p.catchup_to and self.log.chosen_through >= p.catchup_to:
            self.become_candidate()  # caught up: phase 1 again, with what we now know
        elif p.fence and self.log.applied >= p.fence:
            p.fence = 0
            if p.held:
                self.become_candidate()

    def _catchup_stuck(self, p: Proposer) -> bool:
        """A leader waiting to learn a chosen prefix (rule R3) that made no progress for
        two election timeouts: the one that reported it may be gone for good, and a
        new phase 1 among those left shows what they hold (re-proposing it)."""
        progress = (self.log.chosen_through, len(self.snap_buf))
        if progress != p.catchup_progress:
            p.catchup_progress, p.catchup_since = progress, self.now
            return False
        return self.now - p.catchup_since >= 2 * self.cfg.election_timeout_ticks

    def _switch_conf(self, conf: GroupConf) -> None:
        was_leader = self.role is Role.LEADER
        self.removed = {m: self.log.applied for m in self.everyone
                        if not conf.hosts(m) and m != self.me}
        added = [m for m in (*conf.voters, *conf.learners)
                 if m not in self.everyone and m != self.me]
        self._set_conf(conf)
        if was_leader:
            p = self.proposer
            p.gone.update(self.removed)
            for m in added:
                # a replica added (back) starts from nothing: what it acknowledged
                # before it dropped its data is not its progress (so it is invited,
                # ``_invite_learners``, and not promoted before it caught up)
                for seen in (p.match, p.acked_seq, p.last_ack, p.gone):
                    seen.pop(m, None)
        self.out.conf_changes += 1
        if not conf.hosts(self.me) and not was_leader:
            self.retired = True
        if was_leader:
            p = self.proposer
            self.learner.quorum = self.quorum  # slots in flight now count the new voters
            if not self.voter:
                self._hand_over_after_removal(p)
            elif conf.epoch > p.phase1_epoch + 1:
                self.become_candidate()  # rule R4: our promises are two changes old
        elif not self.voter and self.role is not Role.FOLLOWER:
            self.become_follower()

    def _hand_over_after_removal(self, p: Proposer) -> None:
        """This leader applied a configuration without it as a voter. It stays on as a
        lame duck, taking no commands (a transfer is under way) and telling everyone
        the commit, until a majority of the new voters have applied the change (they
        know the chosen prefix through it: dropping this replica's data loses
        nothing), then hands the group to the one furthest along (``TimeoutNow``) and
        steps down (``_try_transfer``); only then is it retired."""
        p.handover_slot = self.log.applied
        self.transfer = (self.preferred[0], self.now)
        self.out.dropped["leader_removed"] += 1
        self._heartbeat(retransmit=False, new_round=False)

    # ---------------------------------------------------------------- recovery
    def recover_record(self, r: list) -> None:
        tag = r[0]
        if tag == rec.ACCEPT:
            self.acceptor.recover_accept(r[2], r[3], r[4])
        elif tag == rec.COMMIT:
            self._recover_commit(r[2])
        elif tag == rec.CHOSEN:
            self.log.learn(r[2], r[3])
            self.chosen_recorded.add(r[2])
        elif tag == rec.PROMISE:
            self.acceptor.recover_promise(r[2])
        elif tag == rec.SNAPFILE:
            self.snap_file_named = max(self.snap_file_named, r[2])
        elif tag == rec.SNAPSHOT:  # the inline format: moved into a file on the way
            self.install_snapshot(r[2], r[3], zlib.crc32(r[3]), persist=True)
        self.max_round = max(self.max_round, self.acceptor.promised[0])

    def _recover_commit(self, through: int) -> None:
        """Slots up to ``through`` are chosen; each value is in an earlier
        record: a chosen record (already in the log) or our last accept."""
        log, accepted = self.log, self.acceptor.accepted
        for s in range(log.chosen_through + 1, through + 1):
            if s in log.chosen:
                continue
            a = accepted.get(s)
            if a is None:
                self.recovery_gaps += 1  # cannot happen with an intact log; learn it anew
                break
            log.learn(s, a[1])
        log.advance()
        self.commit_persisted = max(self.commit_persisted, log.chosen_through)
        self._forget_recorded()

    def _forget_recorded(self) -> None:
        """Chosen records the commit records now cover need no keeping."""
        through = self.commit_persisted
        self.chosen_recorded = {s for s in self.chosen_recorded if s > through}

    def recover_snapshot(self, snap: StoredSnapshot) -> None:
        """Before any record: start from the snapshot the shell read from its file."""
        self.install_snapshot(snap.index, snap.blob, snap.crc, persist=False)
        self.snap_file_index = max(self.snap_file_index, snap.index)

    def finish_recovery(self) -> None:
        """After the last record: apply the chosen prefix the records proved.

        Raises ``StateLost`` if the records name a snapshot file (as the state
        they no longer hold) that the snapshot recovered from does not reach
        and the records after it do not cover either."""
        self._advance()
        if self.snap_file_named > self.log.chosen_through:
            raise StateLost(
                f"group {self.group}: the log names snapshot file {self.snap_file_named} as "
                f"current, but no valid snapshot file reaches it and the log only proves "
                f"slots through {self.log.chosen_through}"
            )


def _has_conf_change(value: bytes) -> bool:
    return bool(value) and any(type(cmd) is ConfChange for _rid, cmd in unpack_batch(value))
