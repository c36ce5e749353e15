"""The simulator's membership changes (``SimConfig.membership``, issue 10 part 4):
joins, graceful leaves and removals of dead nodes on a partitioned cluster, in
the middle of the faults, carried out by the cores' own replica mover.

The cluster forms with the first nodes (``SimWorld.formed``); the others are
spares: running cores with no group (``PaxosNode(n, {}, ...)``) that heartbeat
every other node (``set_contacts``), as a node started to join one does. Now and
then during the fault phase the driver proposes, through the metadata group's
leader, one change the member table may take (``core.membership.members``):

- ``MemberAdd`` of a spare that was never a member (up and admitted);
- ``MemberLeave`` of an active member, while more than R members are on the ring
  and no earlier change is pending;
- ``MemberRemove`` of a member that is down, likewise, if the fault model may lose
  it for good (every configuration it counts keeps a majority without it); from
  then on the node is retired and lost (the fault model never restarts it: its data directory was
  given up), and so is any member the identity gate refused (an amnesiac), even
  below R members on the ring (the movers remove such dead voters first).

The member table refuses what it must (a change while an earlier one's moves are
pending, a leave of a joining member): refusals are counted, not errors. A
removal whose answer was lost is asked again until the table shows it.

Every running node has a core ``Mover`` (``core.membership.mover``), made anew at
each start. Per tick the driver calls ``tick`` on each, proposes the
``GroupMoved`` reports it returns to the metadata group's leader, hands replies
whose token is a ``MoveToken`` back to it (``on_reply``) and drops the groups the
core reports retired, with the pins and the checker told (as ``sim/reconfig.py``
does). The leaders invite new learners themselves (``messages.Host``); the driver
only tells the checker a node hosts a group afresh (``SafetyChecker.on_host``).

The fault model keeps a majority of every configuration in use alive
(``SimWorld.fault_budget``), including each change a mover asked for and not
yet seen chosen or superseded (``asked``).

Once quiet, ``misplaced`` says what keeps the cluster from the end state the
checks demand: the member table settled (no ``joining`` or ``leaving``, moves
done for the newest ring epoch); (a) every partition's voting set, as its own
log chose it (the checker's replay), is the ring's placement and has no
learner, and the metadata group holds exactly the members on the ring; (b) no
live node keeps a group it no longer holds, and every live replica hosts its
partitions with the chosen configuration.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

from dsnode.core.membership.members import (
    GONE,
    JOINING,
    LEAVING,
    ON_RING,
    MemberAdd,
    MemberLeave,
    MemberRemove,
    MemberTable,
)
from dsnode.core.membership.mover import Mover as CoreMover
from dsnode.core.membership.mover import MoveToken
from dsnode.core.membership.moves import ADD_LEARNER, PROMOTE, REMOVE
from dsnode.core.paxos import reconfig
from dsnode.core.paxos.reconfig import GroupConf

CHANGES = {ADD_LEARNER: reconfig.add_learner, PROMOTE: reconfig.promote,
           REMOVE: reconfig.remove}
TOKEN = "membership"


class Membership:
    def __init__(self, rng: random.Random, world: Any, change_chance: float = 0.015,
                 answer_ticks: int = 60, moves_max: int = 2,
                 mover_cls: type = CoreMover, drop_retired: bool = True) -> None:
        self.rng = rng
        self.world = world
        self.change_chance = change_chance
        self.answer_ticks = answer_ticks  # a change not answered by then is forgotten
        self.moves_max = moves_max
        self.mover_cls = mover_cls
        self.drop_retired = drop_retired  # False: the broken shell that keeps them
        self.issuing = True
        self.movers: dict[str, CoreMover] = {}
        self.known: dict[str, set] = {}  # node -> the groups its core hosted last tick
        # (node, token) -> (group, the configuration its mover asked for)
        self.asked_confs: dict[tuple, tuple[Any, GroupConf]] = {}
        self.waiting: tuple[Any, int, Any] | None = None  # (token, tick, command)
        self.removing: set[str] = set()  # retired members whose removal is asked until seen
        self.seq = 0
        self.steps: Counter[str] = Counter()
        self.epochs: dict[Any, tuple[int, int]] = {}  # group -> (chosen conf epoch, tick seen)
        self.moves: Counter[str] = Counter()  # the counts of movers replaced by a restart

    # ------------------------------------------------------------ node lifecycle
    def on_start(self, node: str, core: Any) -> None:
        """A core of ``node`` started: a fresh mover beside it, and its contacts."""
        w = self.world
        old = self.movers.get(node)
        if old is not None:
            self.moves.update(old.counts)
        self.movers[node] = self.mover_cls(core, moves_max=self.moves_max,
                                           answer_ticks=self.answer_ticks)
        self.known[node] = set(core.groups)
        core.set_contacts(n for n in w.node_ids if n != node)

    def owns(self, token: Any) -> bool:
        return type(token) is MoveToken or (type(token) is tuple and token[:1] == (TOKEN,))

    def on_reply(self, node: str, reply: Any) -> None:
        w = self.world
        if type(reply.token) is MoveToken:
            mover = self.movers.get(node)
            if mover is not None and w.cores[node] is mover.core:
                mover.on_reply(reply)
            return
        kind = reply.token[1]
        ok = reply.error is None
        if kind == "report":
            self.steps["reports_" + ("ok" if ok else "refused")] += 1
            return
        if self.waiting is not None and self.waiting[0] == reply.token:
            self.waiting = None
        self.steps[f"{kind}_{'done' if ok else 'refused'}"] += 1
        w.trace(w.now, node, "member-reply",
                f"{kind}: {reply.result if ok else reply.error[:2]}")

    # ------------------------------------------------------------ each tick
    def on_tick(self, now: int) -> None:
        w = self.world
        for n in w.node_ids:
            if not w.serving(n):
                continue
            core = w.cores[n]
            self._hosted(n, core)
            mover = self.movers[n]
            for cmd in mover.tick():
                self._propose("report", cmd)
            self._note_asked(n, mover)
            if self.drop_retired:
                self._drop(n, core)
        self._janitor(now)
        if self.issuing:
            self._change(now)
        for g in w.groups:
            epoch = w.checker.conf(g).epoch
            if self.epochs.get(g, (0, 0))[0] != epoch:
                self.epochs[g] = (epoch, now)

    def changed_at(self, groups: list) -> int:
        """The last tick any of ``groups`` was seen to choose a new configuration."""
        return max((self.epochs.get(g, (0, 0))[1] for g in groups), default=0)

    def _hosted(self, node: str, core: Any) -> None:
        """Groups ``node`` started hosting since the last look (a leader's ``Host``)
        apply afresh: the checker's in-order watch restarts for them."""
        known = self.known[node]
        if len(core.groups) == len(known) and all(g in known for g in core.groups):
            return
        for g in core.groups:
            if g not in known:
                self.world.checker.on_host(node, g)
                self.world.trace(self.world.now, node, "host", f"group {g}")
        self.known[node] = set(core.groups)

    def _drop(self, node: str, core: Any) -> None:
        w = self.world
        for g in core.retired_groups():
            epoch = core.group_conf(g).epoch
            core.remove_group(g, drop=True)
            w.pins.dropped(node, str(g), epoch)
            w.checker.dropped(node, str(g), epoch)
            self.known[node].discard(g)
            w.trace(w.now, node, "drop", f"group {g} (epoch {epoch})")

    def _note_asked(self, node: str, mover: CoreMover) -> None:
        """Each configuration change a mover asked for, once: the fault model keeps a
        majority of it until the group's chosen configuration reaches its epoch."""
        core = mover.core
        for gid, (token, _at, step) in mover.running.items():
            if token is None or (node, token) in self.asked_confs:
                continue
            change = CHANGES.get(step.action)
            if change is None or gid not in core.groups:
                continue
            conf = core.group_conf(gid)
            try:
                self.asked_confs[(node, token)] = (gid, change(conf, step.node))
            except ValueError:
                continue

    def asked(self) -> list[GroupConf]:
        """The configurations the movers asked for that may still be chosen."""
        checker = self.world.checker
        out = []
        for key, (gid, conf) in list(self.asked_confs.items()):
            if checker.conf(gid).epoch >= conf.epoch:
                del self.asked_confs[key]
            else:
                out.append(conf)
        return out

    # ------------------------------------------------------------ the metadata group
    def meta_leader(self) -> str | None:
        w = self.world
        meta = w.metadata
        return next((n for n in w.node_ids if w.serving(n) and meta in w.cores[n].groups
                     and w.cores[n].is_leader(meta)), None)

    def _propose(self, kind: str, cmd: Any) -> Any:
        leader = self.meta_leader()
        if leader is None:
            return None
        self.seq += 1
        token = (TOKEN, kind, self.seq)
        self.world.cores[leader].propose(self.world.metadata, token, cmd)
        return token

    def table(self) -> MemberTable | None:
        """The member table as the metadata group's leader (else any live voter of it)
        has applied it."""
        w = self.world
        node = self.meta_leader() or next(
            (n for n in w.checker.conf(w.metadata).voters
             if n not in w.retired and w.cores[n] is not None and w.metadata in w.cores[n].groups),
            None)
        if node is None:
            return None
        return w.cores[node].state_machine(w.metadata).members

    def _janitor(self, now: int) -> None:
        """Members the fault model gave up for good (removed, or refused by the identity
        gate) are removed from the table, asked again until it shows them gone."""
        w = self.world
        if not any(n in w.retired for n in w.node_ids):
            return
        table = self.table()
        if table is None:
            return
        for n in sorted(w.retired):
            state = table.state_of(n)
            if state is None or state in GONE:
                self.removing.discard(n)
                continue
            if n not in self.removing or self.rng.random() < 1 / self.answer_ticks:
                self.removing.add(n)
                self._ask(now, "remove", MemberRemove(n))

    def _change(self, now: int) -> None:
        w, rng = self.world, self.rng
        if self.waiting is not None and now - self.waiting[1] < self.answer_ticks:
            return
        self.waiting = None
        if rng.random() >= self.change_chance:
            return
        table = self.table()
        if table is None:
            return
        leader = self.meta_leader()
        ring = w.cores[leader].ring if leader is not None else None
        busy = ring is None or table.pending() or table.settled < ring.epoch
        if busy and rng.random() < 0.8:
            return  # one change at a time (now and then a join asked anyway: refused)
        on_ring = table.on_ring()
        r = w.cfg.replicas
        options = []
        spares = [n for n in w.node_ids if table.state_of(n) is None and w.serving(n)
                  and n not in w.retired and n in w.admitted]
        if spares:
            options.append(("add", rng.choice(spares)))
        # (a leave or a removal only once settled, and never below R members on the ring)
        if len(on_ring) > r and not busy:
            active = [n for n in on_ring if table.state_of(n) not in (JOINING, LEAVING)]
            if active:
                options.append(("leave", rng.choice(active)))
            down = [n for n in w.node_ids if table.state_of(n) in ON_RING | {LEAVING}
                    and not w.up[n] and n not in w.retired and self._may_lose(n)]
            if down:
                options.append(("remove", rng.choice(down)))
        if not options:
            return
        kind, node = rng.choice(options)
        if kind == "add":
            cmd: Any = MemberAdd(node, f"{node}:7000", w.incarnation[node])
        elif kind == "leave":
            cmd = MemberLeave(node)
        else:
            # gone for good: never restarted with its old data (the fault model counts it
            # lost from now on, whether or not the removal is chosen)
            w.retired.add(node)
            w.lost.add(node)
            self.removing.add(node)
            cmd = MemberRemove(node)
        self._ask(now, kind, cmd)

    def _may_lose(self, node: str) -> bool:
        """Whether the fault model may lose ``node`` (down now) for good: every set of
        nodes it counts that holds ``node`` is within its budget with ``node`` down."""
        w = self.world
        for members, f in w.fault_budget():
            if node in members and sum(1 for m in members
                                       if not w.up[m] or m in w.lost) > f:
                return False
        return True

    def _ask(self, now: int, kind: str, cmd: Any) -> None:
        token = self._propose(kind, cmd)
        if token is None:
            return
        self.waiting = (token, now, cmd)
        self.steps[f"{kind}_asked"] += 1
        w = self.world
        w.trace(now, "-", "member-change", f"{cmd}")

    # ------------------------------------------------------------ once quiet
    def misplaced(self) -> list[str]:
        """Why the cluster is not (yet) where its newest ring says (empty: it is)."""
        w = self.world
        table = self.table()
        if table is None:
            return ["no live replica of the metadata group"]
        meta_node = self.meta_leader()
        if meta_node is None:
            return ["no metadata leader"]
        ring = w.cores[meta_node].ring
        out = []
        if table.pending() or table.settled < ring.epoch:
            moving = {i: m.state for i, m in table.members.items() if m.state in (JOINING, LEAVING)}
            out.append(f"member table not settled at ring epoch {ring.epoch} "
                       f"(settled {table.settled}, {moving})")
        on_ring = set(table.on_ring())
        if on_ring != set(ring.members):
            out.append(f"members on the ring {sorted(on_ring)} but ring {ring!r}")
        for p in range(ring.partitions):
            conf = w.checker.conf(p)
            want = ring.replicas(p)
            if set(conf.voters) != set(want) or conf.learners:
                out.append(f"partition {p}: chose {conf}, the ring of epoch {ring.epoch} "
                           f"places it on {list(want)}")
        meta_conf = w.checker.conf(w.metadata)
        if set(meta_conf.voters + meta_conf.learners) != on_ring:
            out.append(f"metadata group: chose {meta_conf}, members on the ring {sorted(on_ring)}")
        for n in w.node_ids:
            core = w.cores[n]
            if core is None or n in w.retired:
                continue
            for g in sorted(core.groups, key=str):
                holds = n in on_ring if g == w.metadata else n in ring.replicas(g)
                if not holds:
                    out.append(f"{n} keeps the data of group {g}, which it no longer holds "
                               f"(ring epoch {ring.epoch})")
            for g in sorted(w.groups, key=str):
                conf = w.checker.conf(g)
                if not conf.hosts(n):
                    continue
                if g not in core.groups:
                    out.append(f"{n} does not host group {g} of {conf}")
                elif core.group_conf(g) != conf:
                    out.append(f"{n} has {core.group_conf(g)} for group {g}, not {conf}")
        return out

    def stats(self) -> dict:
        out = {f"member_{k}": v for k, v in sorted(self.steps.items())}
        moves = Counter(self.moves)
        for m in self.movers.values():
            moves.update(m.counts)
        out.update({f"moves_{k}": v for k, v in sorted(moves.items())})
        return out
