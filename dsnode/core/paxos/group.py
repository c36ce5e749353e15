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
from typing import Any

from dsnode.core.commands import Form
from dsnode.core.errors import InvariantBroken, PeerMisbehaved, StateLost
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.acceptor import Acceptor
from dsnode.core.paxos.catchup import CatchUp
from dsnode.core.paxos.config import PaxosConfig
from dsnode.core.paxos.learner import Learner
from dsnode.core.paxos.log import Log
from dsnode.core.paxos.messages import (
    Accept,
    Accepted,
    Ballot,
    CatchupReq,
    Learn,
    Prepare,
    PreVote,
    PreVoteReply,
    Promise,
    SnapChunk,
    wire_size,
)
from dsnode.core.paxos.outputs import (
    Applied,
    Outbox,
    StoredSnapshot,
)
from dsnode.core.paxos.proposer import LeaderSide, Proposer, merge_promises
from dsnode.core.paxos.roles import Role
from dsnode.core.paxos.statemachine import DedupKV, pack_batch


class PaxosGroup(LeaderSide, CatchUp):
    def __init__(
        self,
        group: Any,
        node_id: str,
        members: tuple[str, ...],
        rng: random.Random,
        out: Outbox,
        cfg: PaxosConfig,
        acceptor_cls: type[Acceptor] = Acceptor,
    ) -> None:
        if node_id not in members:
            raise InvariantBroken(f"{node_id} not a member of group {group}")
        self.group = group
        self.me = node_id
        self.members = tuple(sorted(members))
        self.quorum = len(self.members) // 2 + 1
        self.rng = rng
        self.out = out
        self.cfg = cfg
        self.acceptor = acceptor_cls(group)
        self.log = Log()
        self.sm = DedupKV()
        self.now = 0
        self.max_round = 0
        self.leader_hint: str | None = None
        self.heard_leader_at = -(10**9)
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
        self._catchup_turn = 0
        # index of the snapshot handed to the shell and not yet back (snapshot_ready)
        self.snap_pending: int | None = None
        # newest snapshot the shell holds durably in a file (snapshot_ready, or
        # recovered from one); checkpoints name it
        self.snap_file_index = 0
        # newest snapshot file the replayed WAL records name (records.SNAPFILE)
        self.snap_file_named = 0
        # highest chosen_through written in a commit record (records.COMMIT)
        self.commit_persisted = 0
        self.recovery_gaps = 0
        self.become_follower()

    # ================================================================ roles
    def become_follower(self) -> None:
        if self.leader_hint == self.me:
            self.leader_hint = None
        self._fail_pending("leadership lost")
        self.role = Role.FOLLOWER
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

    def become_candidate(self) -> None:
        self._fail_pending("leadership lost")
        self.role = Role.CANDIDATE
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
        msg = Prepare(self.group, self.ballot, self.log.chosen_through + 1)
        for m in self.members:
            self._send(m, msg)

    def become_leader(self) -> None:
        res = merge_promises(self.promises, self.log.chosen_through + 1, self.log.chosen_through)
        self.role = Role.LEADER
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
        self.proposer = p
        for slot, value in res.proposals.items():
            if slot in self.log.chosen:
                value = self.log.chosen[slot]
            p.proposals[slot] = value
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
            p.proposals[1] = pack_batch([(None, Form(uuid))])
            self.learner.track(1)
            p.next_slot = 2
        if res.snap_peer is not None and res.snap_index > self.log.chosen_through:
            self._want_catchup(res.snap_peer, res.snap_index)
        self._broadcast_accepts(sorted(p.proposals.items()))
        self._heartbeat(retransmit=False)  # announce the new leader at once

    def _random_timeout(self) -> int:
        t = self.cfg.election_timeout_ticks
        return self.rng.randint(t, t * (2 + min(self.failed_elections, 4)) - 1)

    # ================================================================ client inputs
    def campaign(self) -> None:
        """Start phase 1 now, skipping pre-vote (an operator's or a test's
        input; etcd's leadership transfer skips pre-vote as well). Safety never
        rests on pre-vote, so the simulator uses this to stage contested
        elections that pre-vote would otherwise make rare."""
        if self.role is Role.LEADER:
            return
        self.become_candidate()
        self._drain_local()

    # ================================================================ ticks
    def tick(self) -> None:
        self.now += 1
        cfg = self.cfg
        if self.log.chosen_through > self.commit_persisted:
            self.commit_persisted = self.log.chosen_through
            self.out.persist.append(rec.commit(self.group, self.commit_persisted))
        if self.role is Role.LEADER:
            p = self.proposer
            if (
                cfg.leader_probe_chance
                and self.catchup_peer is None
                and self.snap_in is None
                and self.rng.random() < cfg.leader_probe_chance
            ):
                others = [m for m in self.members if m != self.me]
                if others:
                    self._send_catchup(self.rng.choice(others))
            if self.now - self.last_heartbeat >= cfg.heartbeat_interval_ticks:
                self._heartbeat(retransmit=True)
            fresh = sum(
                1
                for m in self.members
                if self.now - p.last_ack.get(m, -(10**9)) <= cfg.leader_quorum_timeout_ticks
            )
            if fresh < self.quorum:
                self.become_follower()
            else:
                self._leader_catchup()
        else:
            self.elapsed += 1
            if self.elapsed >= self.timeout:
                self._election_timeout()
        if (
            self.catchup_peer is not None
            and self.log.chosen_through < self.catchup_target
            and self.now - self.catchup_sent_at >= cfg.catchup_retry_ticks
        ):
            self._send_catchup()
        self._drain_local()

    def _election_timeout(self) -> None:
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
        if frm not in self.members:
            self.out.dropped["not_member"] += 1
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
        elif t is CatchupReq:
            self._on_catchup_req(frm, msg)
        elif t is Learn:
            self._on_learn(frm, msg)
        elif t is SnapChunk:
            self._on_snap_chunk(frm, msg)
        else:
            raise PeerMisbehaved(f"unknown message {t.__name__}")

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
        return self.now - self.heard_leader_at < self.cfg.election_timeout_ticks

    # ---------------------------------------------------------------- pre-vote
    def _on_prevote(self, frm: str, m: PreVote) -> None:
        """Grant unless a live leader was heard within the election timeout.

        The node we follow asking for itself has stepped down, so it is no
        live leader. Answering changes nothing here: no ``_see_round``, no
        promise, no record. ``m.chosen_through`` is deliberately no condition
        (see ``PreVote``).
        """
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

    # ---------------------------------------------------------------- phase 1
    def _on_prepare(self, frm: str, m: Prepare) -> None:
        self._see_round(m.ballot)
        if (
            self.cfg.leader_stickiness
            and frm != self.me
            and m.ballot > self.acceptor.promised
            and frm != self.leader_hint
            and self._leader_recent()
        ):
            # Leader stickiness: a live leader is not deposed by a node that
            # merely lost touch with it. Ignoring a prepare is always safe.
            self.out.dropped["prepare_while_leader_live"] += 1
            return
        reply = self.acceptor.on_prepare(
            m, self.out.persist, self.log.chosen_through, self.cfg.message_bytes_max
        )
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
        if m.more_from or frm in self.promise_parts:
            # A piece of a chunked report: keep it, ask for the next one.
            parts = self.promise_parts.setdefault(frm, {})
            for slot, ballot, value in m.accepted:
                cur = parts.get(slot)
                if cur is None or ballot > cur[0]:
                    parts[slot] = (ballot, value)
            if m.more_from:
                self._send(frm, Prepare(self.group, self.ballot, m.more_from))
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
        reply = self.acceptor.on_accept(m, self.out.persist)
        if reply.ok and frm != self.me:
            self.leader_hint = frm
            if self.role is not Role.FOLLOWER:
                self.become_follower()
            self.heard_leader_at = self.now
            self.elapsed = 0
            self.failed_elections = 0
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
        log.learn(slot, value)

    def _advance(self) -> None:
        log = self.log
        log.advance()
        overtaken = False
        if log.applied < log.chosen_through:
            p = self.proposer
            for slot, value in log.to_apply():
                cached = p.batches.pop(slot, None) if p is not None else None
                mine = cached is not None and cached[0] == value
                if mine:
                    results = self.sm.apply_items(cached[1])
                else:
                    results = self.sm.apply_value(value)
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
        if self.proposer is not None and self.proposer.reads:
            self._serve_reads()

    # ---------------------------------------------------------------- recovery
    def recover_record(self, r: list) -> None:
        tag = r[0]
        if tag == rec.ACCEPT:
            self.acceptor.recover_accept(r[2], r[3], r[4])
        elif tag == rec.COMMIT:
            self._recover_commit(r[2])
        elif tag == rec.CHOSEN:
            self.log.learn(r[2], r[3])
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
