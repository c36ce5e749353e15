"""One Multi-Paxos group (one partition, or the metadata group) on one node.

Driven only through ``step``, ``tick``, ``propose``, ``read``, ``flush`` and
``campaign``; every effect goes into the shared ``Outbox`` that
``PaxosNode.ready`` drains.
Messages to this node itself take the same code path through a local queue.
Roles change only in ``become_follower``/``become_precandidate``/
``become_candidate``/``become_leader``.

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
from collections import Counter
from dataclasses import dataclass, field, fields
from enum import Enum
from typing import Any

from dsnode.core.commands import STALE, Form, Get, size_of
from dsnode.core.effects import Ready, Reply
from dsnode.core.errors import InvariantBroken, PeerMisbehaved
from dsnode.core.kv.store import ERROR_KEY
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.acceptor import Acceptor
from dsnode.core.paxos.config import PaxosConfig
from dsnode.core.paxos.learner import Learner
from dsnode.core.paxos.log import Log
from dsnode.core.paxos.messages import (
    ENTRY_OVERHEAD_BYTES,
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
from dsnode.core.paxos.proposer import PendingRead, Proposer, merge_promises
from dsnode.core.paxos.statemachine import DedupKV, pack_batch


class Role(Enum):
    FOLLOWER = "follower"
    PRECANDIDATE = "precandidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True, slots=True)
class Applied:
    """Notice in ``Ready.apply``: ``slot``'s chosen ``value`` was applied here."""

    group: Any
    slot: int
    value: bytes


@dataclass(frozen=True, slots=True)
class SnapshotInstalled:
    """Notice in ``Ready.apply``: the state machine jumped to ``index``."""

    group: Any
    index: int


@dataclass(frozen=True, slots=True)
class SnapshotWanted:
    """Work in ``Ready.snapshots``: encode ``writer`` (a capture of the state
    machine at ``index``) step by step, then call ``snapshot_ready(group,
    index, writer.result())``. Until then the group starts no other snapshot."""

    group: Any
    index: int
    writer: Any  # DedupSnapshotWriter: step(n) -> bool, result() -> bytes


_READY_FIELDS = tuple(f.name for f in fields(Ready))


@dataclass(slots=True)
class Outbox(Ready):
    """What the groups of one node have produced since the last drain, plus the
    running count of what they dropped (which is never drained)."""

    dropped: Counter = field(default_factory=Counter)
    largest_message: int = 0  # wire_size of the largest message built so far

    def take(self) -> Ready:
        """Hand over everything produced so far as a ``Ready`` and start afresh."""
        r = Ready(**{name: getattr(self, name) for name in _READY_FIELDS})
        for name in _READY_FIELDS:
            setattr(self, name, [])
        return r


def _batch_len(queue: list[tuple[Any, Any, Any]], max_count: int, max_bytes: int) -> int:
    """How many queued commands go into the next slot: bounded by count and bytes, >= 1."""
    size = 0
    n = 0
    for _token, _rid, cmd in queue[:max_count]:
        size += size_of(cmd)
        if n and size > max_bytes:
            break
        n += 1
    return max(n, 1)


def _unavailable(token: Any, why: str, indeterminate: bool) -> Reply:
    return Reply(token, error=("unavailable", why, indeterminate))


class PaxosGroup:
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

    def _fail_pending(self, why: str) -> None:
        p = self.proposer
        if p is None:
            return
        hint = f"{why}; leader={self.leader_hint}"
        for token in p.tokens.values():
            self.out.reply.append(_unavailable(token, hint, True))
        for token, _rid, _cmd in p.queue:
            self.out.reply.append(_unavailable(token, hint, False))
        for r in p.reads:
            self.out.reply.append(_unavailable(r.token, hint, False))
        p.tokens.clear()
        p.queue.clear()
        p.reads.clear()

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

    def propose(self, token: Any, cmd: Any, rid: Any = None) -> None:
        if self.role is not Role.LEADER:
            self.out.reply.append(
                _unavailable(token, f"not leader; leader={self.leader_hint}", False)
            )
            return
        self.proposer.queue.append((token, list(rid) if rid is not None else None, cmd))

    def read(self, token: Any, cmd: Get) -> None:
        if cmd.consistency == STALE:
            self.out.reply.append(Reply(token, result=self.sm.kv.apply(cmd)))
            return
        if self.role is not Role.LEADER:
            self.out.reply.append(
                _unavailable(token, f"not leader; leader={self.leader_hint}", False)
            )
            return
        p = self.proposer
        read_index = max(self.log.chosen_through, p.recovery_end)
        p.reads.append(PendingRead(token, cmd, read_index, p.read_seq + 1))
        p.read_wanted = True

    def flush(self) -> None:
        """Turn queued commands into slots and start a read round (batching point)."""
        p = self.proposer
        if p is None or self.role is not Role.LEADER:
            return
        new: list[tuple[int, bytes]] = []
        while p.queue and p.next_slot - 1 - self.log.chosen_through < self.cfg.inflight_slots_max:
            n = _batch_len(p.queue, self.cfg.batch_commands_max, self.cfg.batch_bytes_max)
            batch = p.queue[:n]
            del p.queue[:n]
            slot = p.next_slot
            p.next_slot += 1
            items = [(rid, cmd) for _t, rid, cmd in batch]
            value = pack_batch(items)
            p.batches[slot] = (value, items)
            for i, (token, _rid, _cmd) in enumerate(batch):
                p.tokens[(slot, i)] = token
            p.proposals[slot] = value
            self.learner.track(slot)
            new.append((slot, value))
        if p.read_wanted:
            p.read_seq += 1
            p.read_wanted = False
            if not new:
                self._heartbeat(retransmit=False)
                return
        if new:
            self._broadcast_accepts(new)
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

    def _heartbeat(self, retransmit: bool) -> None:
        p = self.proposer
        self.last_heartbeat = self.now
        commit = self.log.chosen_through
        for m in self.members:
            entries: tuple = ()
            if retransmit and m != self.me:
                missing = [
                    (s, v) for s, v in sorted(p.proposals.items()) if not self.learner.voted(s, m)
                ]
                entries = tuple(next(self._chunks(missing), ()))
            self._send(m, Accept(self.group, self.ballot, entries, commit, p.read_seq))
        self._drain_local()

    def _broadcast_accepts(self, entries: list[tuple[int, bytes]]) -> None:
        p = self.proposer
        commit = self.log.chosen_through
        for chunk in self._chunks(entries):
            msg = Accept(self.group, self.ballot, tuple(chunk), commit, p.read_seq)
            for m in self.members:
                self._send(m, msg)
        self._drain_local()

    def _chunks(self, entries: list[tuple[int, bytes]]):
        """Split (slot, value) entries into messages bounded by count and bytes
        (values plus per-entry overhead; a single entry may exceed the budget)."""
        cap_n, cap_b = self.cfg.accept_slots_per_msg_max, self.cfg.message_bytes_max
        chunk: list[tuple[int, bytes]] = []
        size = 0
        for e in entries:
            cost = len(e[1]) + ENTRY_OVERHEAD_BYTES
            if chunk and (len(chunk) >= cap_n or size + cost > cap_b):
                yield chunk
                chunk, size = [], 0
            chunk.append(e)
            size += cost
        if chunk:
            yield chunk

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

    def _on_accepted(self, frm: str, m: Accepted) -> None:
        if not m.ok:
            self._see_round(m.promised)
            if self.role is Role.LEADER and m.promised > self.ballot:
                self.become_follower()
            return
        if self.role is not Role.LEADER or m.ballot != self.ballot:
            self.out.dropped["stale_accepted"] += 1
            return
        p = self.proposer
        p.last_ack[frm] = self.now
        if m.read_seq > p.acked_seq.get(frm, 0):
            p.acked_seq[frm] = m.read_seq
        for s in m.slots:
            if self.learner.vote(s, frm):
                self._learn(s, p.proposals.pop(s))
        self._advance()

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

    def _answer(self, p: Proposer, slot: int, n: int, results: list[dict], mine: bool) -> bool:
        """Answer the ``n`` commands this leader batched into ``slot``, now chosen.

        A reply belongs to the value that was chosen: only when that is our
        batch (``mine``) do its commands get ``results``. Otherwise a newer
        leader chose another value there (we learned it by catch-up), and our
        batch can never be chosen anywhere: a leader proposes a value in one
        slot only, and phase 1 carries values over in their own slots. So the
        commands fail definitely, and False tells the caller to step down."""
        tokens = p.tokens
        if not mine:
            for i in range(n):
                token = tokens.pop((slot, i), None)
                if token is not None:
                    self.out.reply.append(_unavailable(
                        token, "another leader chose a different value in its slot; "
                        f"not applied; leader={self.leader_hint}", False))
            return False
        for i, result in enumerate(results):
            token = tokens.pop((slot, i), None)
            if token is not None:
                err = result.get(ERROR_KEY)
                if err is None:
                    self.out.reply.append(Reply(token, result=result))
                else:
                    self.out.reply.append(Reply(token, error=(*err, False)))
        return True

    def _serve_reads(self) -> None:
        p = self.proposer
        confirmed = p.confirmed_seq(self.members, self.quorum)
        keep = []
        for r in p.reads:
            if r.seq <= confirmed and self.log.applied >= r.read_index:
                self.out.reply.append(Reply(r.token, result=self.sm.kv.apply(r.cmd)))
            else:
                keep.append(r)
        p.reads = keep

    def _take_snapshot(self) -> None:
        """Capture the state machine at ``applied`` (shallow copies, cheap) and
        hand its encoding to the shell; ``snapshot_ready`` persists and compacts.

        Applying goes on meanwhile. ``log.snap_index``/``snap_blob`` (served to
        catching-up peers, written by checkpoints) keep the previous snapshot
        until then, so they always form a consistent pair.
        """
        index = self.log.applied
        self.snap_pending = index
        self.out.snapshots.append(SnapshotWanted(self.group, index, self.sm.snapshot_writer()))

    def snapshot_ready(self, index: int, blob: bytes) -> None:
        """The shell encoded the snapshot requested at ``index``: persist it, then
        compact the log and the acceptor up to it."""
        if index != self.snap_pending:
            # Requested by an earlier incarnation, or overtaken by an installed snapshot.
            self.out.dropped["snapshot_not_pending"] += 1
            return
        self.snap_pending = None
        if index <= self.log.snap_index:
            return
        self.out.persist.append(rec.snapshot(self.group, index, blob))
        self.log.compact(index, blob)
        self.acceptor.compact(index)

    # ---------------------------------------------------------------- catch-up
    def _leader_catchup(self) -> None:
        """A leader missing chosen slots nobody re-proposes (below a peer's
        snapshot) asks the peers in turn until one serves them."""
        p = self.proposer
        ct = self.log.chosen_through
        if self.catchup_peer is None and ct < p.recovery_end and ct + 1 not in p.proposals:
            others = [m for m in self.members if m != self.me]
            if others:
                self._catchup_turn += 1
                self._want_catchup(others[self._catchup_turn % len(others)], p.recovery_end)

    def _reset_catchup(self) -> None:
        self.catchup_peer = None
        self.catchup_target = 0

    def _want_catchup(self, peer: str, target: int) -> None:
        self.catchup_peer = peer
        self.catchup_target = max(self.catchup_target, target)
        if self.now - self.catchup_sent_at >= self.cfg.catchup_retry_ticks:
            self._send_catchup()

    def _send_catchup(self, to: str | None = None) -> None:
        """Ask ``to`` (default: the catch-up peer) for what comes next."""
        to = to or self.catchup_peer
        if to is None:
            return  # catch-up was called off (a role change) while a reply was on its way
        self.catchup_sent_at = self.now
        idx, off = 0, 0
        if self.snap_in is not None:
            idx, off = self.snap_in[0], len(self.snap_buf)
        self._send(to, CatchupReq(self.group, self.log.chosen_through + 1, idx, off))

    def _on_catchup_req(self, frm: str, m: CatchupReq) -> None:
        log = self.log
        if m.from_slot <= log.snap_index and log.snap_blob is not None:
            blob = log.snap_blob
            off = m.offset if m.snap_index == log.snap_index and m.offset < len(blob) else 0
            data = blob[off : off + self.cfg.snapshot_chunk_bytes]
            self._send(
                frm,
                SnapChunk(self.group, log.snap_index, len(blob), off, data, zlib.crc32(blob)),
            )
            return
        # An empty Learn tells the asker we cannot help (we restarted, or lag).
        entries = log.entries(m.from_slot, self.cfg.catchup_entries_max)
        self._send(frm, Learn(self.group, tuple(next(self._chunks(list(entries)), ()))))

    def _on_learn(self, frm: str, m: Learn) -> None:
        if not m.entries:
            if frm == self.catchup_peer:
                self._reset_catchup()
            return
        for slot, value in m.entries:
            self._learn(slot, value)
        self._after_catchup_progress()

    def _after_catchup_progress(self) -> None:
        before = self.log.chosen_through
        self._advance()
        if self.log.chosen_through < self.catchup_target and self.log.chosen_through > before:
            self._send_catchup()

    def _on_snap_chunk(self, frm: str, m: SnapChunk) -> None:
        if m.index <= self.log.applied:
            return
        if (
            self.snap_in is not None
            and self.snap_in[0] == m.index
            and m.offset < len(self.snap_buf)
        ):
            self.out.dropped["snap_chunk_duplicate"] += 1
            return
        if self.snap_in is None or self.snap_in[0] != m.index or m.offset != len(self.snap_buf):
            if m.offset != 0:
                self.snap_in = None
                self.snap_buf = bytearray()
                self.out.dropped["snap_chunk_out_of_order"] += 1
                return
            self.snap_in = (m.index, m.total, m.crc)
            self.snap_buf = bytearray()
        self.snap_buf += m.data
        if len(self.snap_buf) < m.total:
            self._send_catchup(self.catchup_peer or frm)
            return
        blob = bytes(self.snap_buf)
        self.snap_in = None
        self.snap_buf = bytearray()
        if zlib.crc32(blob) != m.crc or len(blob) != m.total:
            self.out.dropped["snap_bad_checksum"] += 1
            return
        self.install_snapshot(m.index, blob, persist=True)
        self._after_catchup_progress()

    def install_snapshot(self, index: int, blob: bytes, persist: bool) -> None:
        if index <= self.log.applied:
            return
        if persist:
            self.out.persist.append(rec.snapshot(self.group, index, blob))
        self.sm = DedupKV.restore(blob)
        self.log.install(index, blob)
        if self.snap_pending is not None and self.snap_pending <= index:
            self.snap_pending = None  # its result would be older than this state: dropped

        self.acceptor.compact(index)
        self.out.apply.append(SnapshotInstalled(self.group, index))
        p = self.proposer
        if p is not None:
            for s in [s for s in p.proposals if s <= index]:
                del p.proposals[s]
                p.batches.pop(s, None)
                self.learner.votes.pop(s, None)
            for key in [k for k in p.tokens if k[0] <= index]:
                self.out.reply.append(_unavailable(p.tokens.pop(key), "outcome unknown", True))

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
        elif tag == rec.SNAPSHOT:
            self.install_snapshot(r[2], r[3], persist=False)
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

    def finish_recovery(self) -> None:
        """After the last record: apply the chosen prefix the records proved."""
        self._advance()
