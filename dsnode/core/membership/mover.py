"""The replica mover (issue 10, part 2): pure, one per node, driven by the shell.

While the metadata group's newest ring has moves not done yet
(``MetaSM.changes_pending``: a member joined, is leaving or was removed), every
node takes, for each group it leads, the next step toward the ring's
placement (``moves.next_step``): add the new replica as a learner (its node
starts hosting the group when the leader tells it so, ``messages.Host``, and
catches up by snapshot and log), promote it once it acknowledged everything
chosen, remove a replica the ring no longer places (handing leadership over
first when that is the leader itself). Each step is a configuration change
chosen through the group's own log (``core.paxos.reconfig``), one at a time
per group; at most ``moves_max`` groups move at once on a node, the others
wait their turn.

A group whose configuration matches the ring is reported to the metadata group
(``GroupMoved``); once every group has been, the ring's moves are done and the
member list turns ``joining`` into ``active`` and ``leaving`` into ``left``
(``members.MemberTable``). The metadata group moves like the partitions, toward
its own target (``meta_target``): every member on the ring, the first
``meta_voters_max`` of them voters (those that vote already first), the rest
learners; a leaving member stays in it until every partition moved off it.

When nothing is pending, ``tick`` costs one comparison: an idle node's work does
not grow with the number of groups it hosts.

The shell calls ``tick`` every tick, carries out what it returns (metadata
commands to propose through the metadata group's leader) and hands back the
replies whose token is a ``MoveToken`` (``on_reply``); it also drops the groups
the core reports retired (``PaxosNode.retired_groups``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from dsnode.core.membership import moves
from dsnode.core.membership.members import LEAVING, META_LABEL, REMOVED, GroupMoved
from dsnode.core.membership.moves import ADD_LEARNER, PROMOTE, REMOVE, TRANSFER, Step
from dsnode.core.paxos.reconfig import GroupConf
from dsnode.core.paxos.roles import Role

META_VOTERS_MAX = 5


@dataclass(frozen=True, slots=True)
class MoveToken:
    """The token of a configuration change the mover asked for."""

    group: Any
    seq: int


def meta_target(conf: GroupConf, on_ring: tuple[str, ...],
                voters_max: int = META_VOTERS_MAX) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The metadata group's wanted (voters, learners): every member on the ring; its
    voters those that vote now and are on the ring, then the others in id order,
    ``voters_max`` at most; the rest learners."""
    on = set(on_ring)
    keep = [v for v in conf.voters if v in on]
    voters = tuple((keep + sorted(on - set(keep)))[:max(voters_max, 1)])
    return voters, tuple(n for n in sorted(on) if n not in voters)


def meta_matches(conf: GroupConf, on_ring: tuple[str, ...], voters_max: int = META_VOTERS_MAX
                 ) -> bool:
    voters, learners = meta_target(conf, on_ring, voters_max)
    return set(conf.voters) == set(voters) and set(conf.learners) == set(learners)


def meta_step(gid: Any, conf: GroupConf, on_ring: tuple[str, ...], caught_up: list[str],
              leader: str | None, voters_max: int = META_VOTERS_MAX) -> Step | None:
    """The metadata group's next change toward ``meta_target`` (None: none now)."""
    voters, learners = meta_target(conf, on_ring, voters_max)
    on = set(on_ring)
    for n in conf.learners:
        if n not in on:
            return Step(gid, REMOVE, n)
    # the voters' part as for a partition, with the learners meant to stay out of sight
    sub = GroupConf(conf.voters, tuple(n for n in conf.learners if n in voters), conf.epoch)
    step = moves.next_step(gid, voters, sub, caught_up, leader)
    if step is not None:
        return step
    for n in learners:
        if n not in conf.voters and n not in conf.learners:
            return Step(gid, ADD_LEARNER, n)
    return None


class Mover:
    def __init__(self, core: Any, moves_max: int = 4, answer_ticks: int = 100,
                 every_ticks: int = 1, meta_voters_max: int = META_VOTERS_MAX) -> None:
        if moves_max < 1:
            raise ValueError("moves_max must be >= 1")
        self.core = core
        self.moves_max = moves_max
        self.answer_ticks = answer_ticks  # a step not answered by then is looked at again
        self.every_ticks = max(1, every_ticks)
        self.meta_voters_max = meta_voters_max
        # group -> (token or None for a transfer, tick asked, the step)
        self.running: dict[Any, tuple[MoveToken | None, int, Step]] = {}
        self.reporting: dict[str, tuple[int, int]] = {}  # label -> (epoch, tick asked)
        self.counts: Counter[str] = Counter()  # steps asked, done, refused; reports
        self.pending = 0  # groups led here that do not match the ring (last look)
        self.epoch = 0  # the ring epoch moved toward (last look; 0: none pending)
        self.log: list[tuple[int, Step]] = []  # steps taken (ring epoch, step), for the shell
        self._seq = 0
        self._last = -(10**9)

    # ------------------------------------------------------------ inputs
    def tick(self) -> list[GroupMoved]:
        """Take the next steps; returns the metadata commands to propose."""
        core = self.core
        meta = core.metadata
        g = core.groups.get(meta) if meta is not None else None
        if g is None or not g.sm.changes_pending():
            if self.epoch:
                self.running.clear()
                self.reporting.clear()
                self.pending = self.epoch = 0
            return []
        now = core.now
        if now - self._last < self.every_ticks:
            return []
        self._last = now
        sm = g.sm
        ring = sm.ring
        table = sm.members
        on_ring = table.on_ring()
        self.epoch = ring.epoch
        partitions_done = all(table.reached.get(str(p), 0) >= ring.epoch
                              for p in range(ring.partitions))
        if not partitions_done:
            # a leaving member stays in the metadata group until every partition moved
            # off it: it leads some of them, and it takes the ring to move them
            on_ring = tuple(sorted((*on_ring, *(i for i, m in table.members.items()
                                                if m.state == LEAVING))))
        led = [gid for gid, grp in core.groups.items()
               if grp.role is Role.LEADER and not grp.retired]
        for gid in list(self.running):
            if gid not in led:
                del self.running[gid]  # not ours any more: its new leader carries on
        out: list[GroupMoved] = []
        unmatched = []
        # the metadata group first: a new member learns the ring from it, and hosts a
        # partition it is invited to only once it knows the ring
        for gid in sorted(led, key=lambda x: (x != meta, str(x))):
            conf = core.group_conf(gid)
            if gid == meta:  # (reported last: its target changes once partitions are done)
                ok, label = meta_matches(conf, on_ring, self.meta_voters_max), META_LABEL
                if ok and not partitions_done:
                    continue
            else:
                ok, label = moves.matches(ring.replicas(gid), conf), str(gid)
            if not ok:
                unmatched.append(gid)
            elif table.reached.get(label, 0) < ring.epoch:
                asked = self.reporting.get(label)
                if asked is None or asked[0] < ring.epoch or now - asked[1] >= self.answer_ticks:
                    self.reporting[label] = (ring.epoch, now)
                    self.counts["reports"] += 1
                    out.append(GroupMoved(label, ring.epoch))
        self.pending = len(unmatched)
        # voters removed while dead go first when a partition's voters shrink
        dead = [i for i, m in table.members.items() if m.state == REMOVED]
        moving = [gid for gid in unmatched if gid in self.running]
        for gid in unmatched:
            if len(moving) >= self.moves_max:
                break
            if gid not in moving:
                moving.append(gid)
        for gid in moving:
            asked = self.running.get(gid)
            if asked is not None and now - asked[1] < self.answer_ticks:
                continue  # its last step (or a leadership transfer) is not answered yet
            self._step(gid, on_ring, ring, dead)
        return out

    def on_reply(self, reply: Any) -> None:
        """The answer to a step (``Ready.reply`` with a ``MoveToken``)."""
        t = reply.token
        asked = self.running.get(t.group)
        if asked is not None and asked[0] == t:
            del self.running[t.group]
        self.counts["done" if reply.error is None else "refused"] += 1

    # ------------------------------------------------------------ steps
    def _step(self, gid: Any, on_ring: tuple[str, ...], ring: Any, dead: list[str]) -> None:
        core = self.core
        conf = core.group_conf(gid)
        caught_up = core.caught_up_learners(gid)
        me = core.node_id
        if gid == core.metadata:
            step = meta_step(gid, conf, on_ring, caught_up, me, self.meta_voters_max)
        else:
            step = moves.next_step(gid, ring.replicas(gid), conf, caught_up, me, dead)
        if step is None:
            self.running[gid] = (None, core.now - self.answer_ticks, Step(gid, "wait", ""))
            return  # learners still catching up: looked at again next time
        self.counts["asked"] += 1
        self.counts[step.action] += 1  # add_learner: a replica copied to a node
        self.log.append((self.epoch, step))
        if step.action == TRANSFER:
            core.transfer_leadership(gid, step.node)
            self.running[gid] = (None, core.now, step)
            return
        self._seq += 1
        token = MoveToken(gid, self._seq)
        self.running[gid] = (token, core.now, step)
        if step.action == ADD_LEARNER:
            core.add_learner(gid, token, step.node)
        elif step.action == PROMOTE:
            core.promote_learner(gid, token, step.node)
        else:
            assert step.action == REMOVE
            core.remove_replica(gid, token, step.node)

    # ------------------------------------------------------------ automatic removal
    @staticmethod
    def dead_to_remove(table: Any, me: str, silent_ticks: dict[str, int | None],
                       after_ticks: int) -> list[str]:
        """Members on the ring (other than ``me``) silent for ``after_ticks`` or more (the
        failure detector's ``silence``; None: never heard since this node started, not
        counted): to be removed so that every partition gets its R replicas back. The
        metadata group's leader asks (one per call); the member list refuses the last
        member."""
        out = []
        for node_id in table.on_ring():
            silent = silent_ticks.get(node_id)
            if node_id != me and silent is not None and silent >= after_ticks:
                out.append(node_id)
        return out[:1]

    # ------------------------------------------------------------ views
    def status(self) -> dict:
        """For ``status``: the ring epoch moved toward (0: nothing pending), the groups
        led here that do not match it yet, and the steps running now."""
        running = []
        core = self.core
        for gid, (_t, _at, step) in sorted(self.running.items(), key=lambda kv: str(kv[0])):
            if step.action != "wait":
                running.append({"group": gid, "step": step.action, "node": step.node})
            elif gid in core.groups:  # learners catching up: how far each acknowledged
                running.append({"group": gid, "step": "catch_up",
                                "learners": core.learner_progress(gid),
                                "commit": core.groups[gid].log.chosen_through})
        return {"epoch": self.epoch, "pending": self.pending, "running": running,
                "steps": dict(self.counts)}
