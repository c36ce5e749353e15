"""Leader-role state: phase-1 merge, the phase-2 pipeline, read-index rounds.

Rules (Paxos Made Simple, sections 2.2 and 3; Paxos Made Moderately Complex,
section 3, "Leaders", "Scouts" and "Commanders"):

- after phase 1 over all open slots, a new leader re-proposes, for every slot
  some acceptor in its quorum reported, the value with the highest ballot;
  slots below the highest reported one that nobody reported get a no-op;
- slots an acceptor reports as chosen (``Promise.chosen_through``: in its
  log or compacted into its snapshot) are chosen: the leader must learn them
  (catch-up by log or snapshot) and never propose into them;
- new commands go into fresh slots above all of that, many per slot, many
  slots in flight (bounded by ``inflight_slots_max``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dsnode.core.commands import STALE, ConfChange, Get
from dsnode.core.effects import Reply
from dsnode.core.kv.store import ERROR_KEY
from dsnode.core.paxos.messages import ENTRY_OVERHEAD_BYTES, NOOP, Accept, Accepted, Ballot, Promise
from dsnode.core.paxos.outputs import batch_len, unavailable
from dsnode.core.paxos.reconfig import CONF_PENDING, CONF_REFUSED, GroupConf
from dsnode.core.paxos.roles import Role
from dsnode.core.paxos.statemachine import pack_batch


@dataclass(slots=True)
class Phase1Result:
    proposals: dict[int, bytes]  # slots to re-propose, in the new ballot
    snap_index: int  # highest chosen_through reported (chosen there, learn by catch-up)
    snap_peer: str | None  # who reported it
    recovery_end: int  # every slot up to here is settled by the recovery


def merge_promises(
    promises: dict[str, Promise], from_slot: int, chosen_through: int
) -> Phase1Result:
    best: dict[int, tuple[Ballot, bytes]] = {}
    snap_index, snap_peer = chosen_through, None
    for node in sorted(promises):
        p = promises[node]
        if p.chosen_through > snap_index:
            snap_index, snap_peer = p.chosen_through, node
        for slot, ballot, value in p.accepted:
            cur = best.get(slot)
            if cur is None or ballot > cur[0]:
                best[slot] = (ballot, value)
    top = max(best, default=0)
    start = max(from_slot, snap_index + 1)
    proposals = {}
    for slot in range(start, top + 1):
        got = best.get(slot)
        proposals[slot] = got[1] if got is not None else NOOP
    return Phase1Result(proposals, snap_index, snap_peer, max(top, snap_index, chosen_through))


@dataclass(slots=True)
class PendingRead:
    token: Any
    cmd: Any
    read_index: int  # answer once applied through here: every write taken before the read
    seq: int  # ... and a quorum confirmed this round (unless the lease covers it)
    queued: int = 0  # commands taken before the read and still queued (not yet in a slot)


@dataclass(slots=True)
class Proposer:
    ballot: Ballot
    next_slot: int
    recovery_end: int
    proposals: dict[int, bytes] = field(default_factory=dict)  # in flight, not chosen
    queue: list[tuple[Any, Any, Any]] = field(default_factory=list)  # (token, rid, cmd)
    tokens: dict[tuple[int, int], Any] = field(default_factory=dict)  # (slot, i) -> token
    # slot -> (value, its decoded commands) for slots this leader filled itself, so that
    # applying them needs no decoding; used only while the chosen value is that same value
    batches: dict[int, tuple[bytes, list]] = field(default_factory=dict)
    read_seq: int = 0
    read_wanted: bool = False
    reads: list[PendingRead] = field(default_factory=list)
    acked_seq: dict[str, int] = field(default_factory=dict)
    last_ack: dict[str, int] = field(default_factory=dict)
    # member -> the chosen prefix it last reported (is it caught up?)
    match: dict[str, int] = field(default_factory=dict)
    # read round -> the tick it was first sent (leases count from there)
    round_sent: dict[int, int] = field(default_factory=dict)
    # reconfiguration (``core.paxos.reconfig``): the configuration epoch phase 1 ran
    # with; the slot of a change in flight (nothing proposed above it until applied);
    # a chosen prefix to learn before proposing anything; re-proposals held back
    phase1_epoch: int = 0
    fence: int = 0
    catchup_to: int = 0
    catchup_progress: tuple[int, int] = (-1, -1)  # (chosen_through, snapshot bytes) seen
    catchup_since: int = 0  # the tick it was last seen to move
    held: dict[int, bytes] = field(default_factory=dict)
    # replicas the last configuration change removed -> its slot: heartbeats go on
    # reaching them until they acknowledge a commit that covers it (so they retire)
    gone: dict[str, int] = field(default_factory=dict)
    # a leader the last change removed: the slot of that change (it hands over once a
    # majority of the new voters applied it), else 0
    handover_slot: int = 0

    def blocked(self, applied: int) -> bool:
        """No new slot may be proposed now (rules R2 and R3)."""
        return bool(self.catchup_to or self.held or (self.fence and applied < self.fence))

    def conf_pending(self) -> bool:
        """A configuration change is queued, or proposed and not yet applied."""
        return bool(self.fence or any(type(c) is ConfChange for _t, _r, c in self.queue))

    def confirmed_seq(self, members: tuple[str, ...], quorum: int) -> int:
        """Highest read round acknowledged by a quorum in this ballot."""
        acks = sorted((self.acked_seq.get(m, 0) for m in members), reverse=True)
        return acks[quorum - 1]

    def new_round(self, now: int) -> None:
        self.read_seq += 1
        self.round_sent[self.read_seq] = now

    def forget_rounds(self, confirmed: int) -> None:
        """Rounds below the confirmed one can no longer extend the lease."""
        for seq in [s for s in self.round_sent if s < confirmed]:
            del self.round_sent[seq]


def read_reply(token: Any, sm: Any, cmd: Get) -> Reply:
    """A linearizable get answered from this leader's state machine: its value, or the
    definite ``locked`` error while a prepared transaction may still write the key
    (``DedupKV.read``; the shell asks again later)."""
    result = sm.read(cmd) if hasattr(sm, "read") else sm.kv.apply(cmd)
    err = result.get(ERROR_KEY)
    if err is None:
        return Reply(token, result=result)
    return Reply(token, error=(err[0], err[1], False))


class LeaderSide:
    """The leader's half of ``PaxosGroup`` (a mixin; the group owns the state):
    taking client commands and reads, batching them into slots, phase 2 and
    its retransmission, counting acceptances, answering clients, read-index
    rounds. Every method runs on the group's own state."""

    def propose(self, token: Any, cmd: Any, rid: Any = None) -> None:
        if self.role is not Role.LEADER:
            self.out.reply.append(
                unavailable(token, f"not leader; leader={self.leader_hint}", False)
            )
            return
        if self.transfer is not None:
            self.out.reply.append(unavailable(
                token, f"leadership is moving to {self.transfer[0]}; leader={self.me}", False))
            return
        self.proposer.queue.append((token, list(rid) if rid is not None else None, cmd))

    def change_config(self, token: Any, conf: GroupConf) -> None:
        """Propose ``conf`` as the group's next configuration (``core.paxos.reconfig``).
        The answer comes when it is applied: ``{"epoch": n}``, or the definite
        ``conf_refused`` error (the same on every replica) saying why. Refused here at
        once, definitely, when this node does not lead, reconfiguration is off, another
        change is queued or in flight (``conf_pending``), or ``conf`` promotes a
        learner that has not acknowledged everything chosen yet."""
        if self.role is not Role.LEADER or self.transfer is not None:
            self.propose(token, conf.command())  # answers "not leader" / "moving"
            return
        p = self.proposer
        why = None
        if not self.cfg.reconfig:
            why = (CONF_REFUSED, "reconfiguration is off (PaxosConfig.reconfig)")
        elif p.conf_pending() or p.blocked(self.log.applied):
            why = (CONF_PENDING, "another configuration change is in progress")
        else:
            ct = self.log.chosen_through
            for m in sorted(set(conf.voters) - self.member_set):
                if m in self.learners and p.match.get(m, 0) < ct:
                    why = (CONF_PENDING, f"learner {m} has not caught up "
                           f"({p.match.get(m, 0)} of {ct} slots)")
        if why is not None:
            self.out.reply.append(Reply(token, error=(why[0], why[1], False)))
            return
        self.propose(token, conf.command())

    def read(self, token: Any, cmd: Get) -> None:
        if cmd.consistency == STALE:
            self.out.reply.append(Reply(token, result=self.sm.kv.apply(cmd)))
            return
        if self.role is not Role.LEADER:
            self.out.reply.append(
                unavailable(token, f"not leader; leader={self.leader_hint}", False)
            )
            return
        p = self.proposer
        # Session order: a read also waits for the writes this leader took before it
        # (in flight or still queued), so a pipelined get sees the put sent before it.
        read_index = max(self.log.chosen_through, p.recovery_end, p.next_slot - 1)
        queued = len(p.queue)
        if not queued and self.log.applied >= read_index and self.lease_held():
            self.out.reads["lease"] += 1
            self.out.reply.append(read_reply(token, self.sm, cmd))
            return
        p.reads.append(PendingRead(token, cmd, read_index, p.read_seq + 1, queued))
        p.read_wanted = True

    def lease_held(self) -> bool:
        """Whether this leader may answer a linearizable read from its own state
        now: a quorum acknowledged a round sent less than ``lease_ticks`` ago, and
        each of those acceptors refuses every other candidate for an election
        timeout of its own clock after it heard that round (see
        ``config.lease_ticks_for``), so no other leader can have been chosen."""
        p = self.proposer
        if not self.cfg.lease_ticks or p is None or self.role is not Role.LEADER:
            return False
        if self.transfer is not None:
            return False  # about to hand over: the successor must not wait for us
        sent = p.round_sent.get(p.confirmed_seq(self.members, self.quorum))
        return sent is not None and self.now < sent + self._lease_length()

    def _lease_length(self) -> int:
        return self.cfg.lease_ticks

    def flush(self) -> None:
        """Turn queued commands into slots and start a read round (batching point)."""
        p = self.proposer
        if p is None or self.role is not Role.LEADER:
            return
        if self.quiesced and (p.queue or p.read_wanted):
            self._wake()
        new: list[tuple[int, bytes]] = []
        while (p.queue and p.next_slot - 1 - self.log.chosen_through < self.cfg.inflight_slots_max
               and not p.blocked(self.log.applied)):
            n = batch_len(p.queue, self.cfg.batch_commands_max, self.cfg.batch_bytes_max)
            conf = [] if not self.cfg.reconfig else [
                i for i, q in enumerate(p.queue[:n]) if type(q[2]) is ConfChange]
            if conf:  # a change goes alone into its slot, and fences the pipeline there
                n = max(conf[0], 1)
                if conf[0] == 0:
                    p.fence = p.next_slot
            batch = p.queue[:n]
            del p.queue[:n]
            slot = p.next_slot
            p.next_slot += 1
            items = [(rid, cmd) for _t, rid, cmd in batch]
            value = pack_batch(items)
            p.batches[slot] = (value, items)
            for i, (token, _rid, _cmd) in enumerate(batch):
                p.tokens[(slot, i)] = token
            for r in p.reads:
                if r.queued:
                    r.queued = max(0, r.queued - n)
                    if not r.queued:
                        r.read_index = max(r.read_index, slot)
            p.proposals[slot] = value
            self.learner.track(slot)
            new.append((slot, value))
        if p.read_wanted:
            p.new_round(self.now)
            p.read_wanted = False
            if not new:
                self._heartbeat(retransmit=False, new_round=False)
                return
        if new:
            self._broadcast_accepts(new)
        self._drain_local()
        self._try_transfer()

    def _fail_pending(self, why: str) -> None:
        p = self.proposer
        if p is None:
            return
        hint = f"{why}; leader={self.leader_hint}"
        for token in p.tokens.values():
            self.out.reply.append(unavailable(token, hint, True))
        for token, _rid, _cmd in p.queue:
            self.out.reply.append(unavailable(token, hint, False))
        for r in p.reads:
            self.out.reply.append(unavailable(r.token, hint, False))
        p.tokens.clear()
        p.queue.clear()
        p.reads.clear()

    def _heartbeat(self, retransmit: bool, new_round: bool = True) -> None:
        p = self.proposer
        self.last_heartbeat = self.now
        if new_round and self.cfg.lease_ticks:
            p.new_round(self.now)  # its acks renew the lease
        commit = self.log.chosen_through
        for m in (*self.everyone, *p.gone):
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
            for m in self.everyone:
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
        if m.chosen_through > p.match.get(frm, 0):
            p.match[frm] = m.chosen_through
        if m.read_seq > p.acked_seq.get(frm, 0):
            p.acked_seq[frm] = m.read_seq
        if frm not in self.member_set:
            if p.gone.get(frm, 1 << 62) <= m.chosen_through:
                del p.gone[frm]  # it knows it was removed
            return  # a learner's acceptance counts for nothing (its progress, above, does)
        for s in m.slots:
            if self.learner.vote(s, frm):
                self._learn(s, p.proposals.pop(s))
        self._advance()
        if self.transfer is not None and self.role is Role.LEADER:
            self._try_transfer()

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
                    self.out.reply.append(unavailable(
                        token, "another leader chose a different value in its slot; "
                        f"not applied; leader={self.leader_hint}", False))
            return False
        for i, result in enumerate(results):
            token = tokens.pop((slot, i), None)
            if token is not None:
                err = result.get(ERROR_KEY)
                if err is None:
                    self.out.reply.append(Reply(token, result=result))
                else:  # [code, message] (no effect) or [code, message, indeterminate]
                    self.out.reply.append(Reply(token, error=(err[0], err[1], len(err) > 2
                                                              and bool(err[2]))))
        return True

    def _serve_reads(self) -> None:
        p = self.proposer
        confirmed = p.confirmed_seq(self.members, self.quorum)
        lease = self.lease_held()
        keep = []
        for r in p.reads:
            if (lease or r.seq <= confirmed) and not r.queued and self.log.applied >= r.read_index:
                self.out.reads["lease" if lease else "read_index"] += 1
                self.out.reply.append(read_reply(r.token, self.sm, r.cmd))
            else:
                keep.append(r)
        p.reads = keep

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
