"""The simulator's replica mover (``SimConfig.reconfig``): replica-set changes of
the world's groups in the middle of faults, through the cores' own API
(``PaxosNode.add_learner``/``promote_learner``/``remove_replica``/
``host_learner``/``retired_groups``, ``core.paxos.reconfig``).

Per group, one step at a time, asked of whichever node leads the group now:
with a learner, promote it (refused until it caught up: asked again later), or
remove it if that fails for long; with more voters than the group started with,
remove a random voter (the leader itself sometimes); else, now and then, add
as a learner a node that does not host the group (one removed earlier too:
remove and re-add). The world plays the part of the runtime's placement: a node
that a chosen configuration lists as a learner and that does not host the group
starts hosting it (``host_learner``), and a node whose group retired drops it.

The configuration each group has chosen is the checker's
(``SafetyChecker.conf``: replayed from the applied log with the cores' own
validation), not any node's view.
"""

from __future__ import annotations

import random
from typing import Any

from dsnode.core.paxos import reconfig
from dsnode.core.paxos.reconfig import GroupConf


class Mover:
    def __init__(self, rng: random.Random, world: Any, step_chance: float = 0.02,
                 answer_ticks: int = 60, learner_ticks_max: int = 300) -> None:
        self.rng = rng
        self.world = world
        self.step_chance = step_chance
        self.answer_ticks = answer_ticks  # a step not answered by then is forgotten
        self.learner_ticks_max = learner_ticks_max  # a learner not promoted by then goes
        self.issuing = True
        self.size = {g: len(m) for g, m in world.groups.items()}  # voters to come back to
        # group -> (token, tick asked, the configuration asked for)
        self.waiting: dict[Any, tuple[Any, int, GroupConf]] = {}
        # changes answered indeterminately (the leader lost its leadership): they may
        # still be chosen, until the group's configuration reaches their epoch
        self.maybe: dict[Any, list[GroupConf]] = {}
        self.learner_since: dict[tuple, int] = {}  # (group, node) -> tick first seen
        self.seq = 0
        self.steps: dict[str, int] = {"asked": 0, "done": 0, "refused": 0}

    def owns(self, token: Any) -> bool:
        return isinstance(token, tuple) and len(token) == 3 and token[0] == "mover"

    def on_reply(self, node: str, reply: Any) -> None:
        g = reply.token[1]
        asked = self.waiting.get(g)
        if asked is not None and asked[0] == reply.token:
            del self.waiting[g]
            if reply.error is not None and reply.error[2]:
                self.maybe.setdefault(g, []).append(asked[2])
        self.steps["done" if reply.error is None else "refused"] += 1
        self.world.trace(self.world.now, node, "conf-reply",
                         f"group {g}: {reply.result or reply.error[:2]}")

    def on_tick(self, now: int) -> None:
        w = self.world
        self._host_and_drop()
        if not self.issuing:
            return
        for g in sorted(w.groups, key=str):
            asked = self.waiting.get(g)
            if asked is not None and now - asked[1] < self.answer_ticks:
                continue
            if asked is not None:  # no answer (lost with a crash): it may still be chosen
                self.maybe.setdefault(g, []).append(self.waiting.pop(g)[2])
            if self.rng.random() >= self.step_chance:
                continue
            leader = next((n for n in w.node_ids if w.serving(n) and g in w.cores[n].groups
                           and w.cores[n].is_leader(g)), None)
            if leader is not None:
                self._step(now, g, leader)

    def _step(self, now: int, g: Any, leader: str) -> None:
        w, rng = self.world, self.rng
        core = w.cores[leader]
        conf = core.group_conf(g)
        self.seq += 1
        token = ("mover", g, self.seq)
        if conf.learners:
            node = conf.learners[0]
            since = self.learner_since.setdefault((g, node), now)
            if now - since < self.learner_ticks_max and node not in w.lost:
                op = ("promote_learner", node)
            else:
                op = ("remove_replica", node)
        elif len(conf.voters) > self.size[g]:
            # a node that lost its data for good goes first (as an operator would
            # remove a dead node), so that the fault model's majority stays
            gone = [v for v in conf.voters if v in w.lost or v in w.retired]
            op = ("remove_replica", gone[0] if gone else rng.choice(conf.voters))
        else:
            hosting = {n for n in w.node_ids if w.cores[n] is not None and g in w.cores[n].groups}
            free = [n for n in w.node_ids
                    if n not in conf.voters and n not in w.retired and n not in hosting]
            if not free:
                return
            op = ("add_learner", rng.choice(free))
        change = {"promote_learner": reconfig.promote, "remove_replica": reconfig.remove,
                  "add_learner": reconfig.add_learner}[op[0]]
        self.waiting[g] = (token, now, change(conf, op[1]))
        self.steps["asked"] += 1
        w.trace(now, leader, "conf-change", f"group {g}: {op[0]} {op[1]} (epoch {conf.epoch})")
        getattr(core, op[0])(g, token, op[1])

    def asked(self) -> list[GroupConf]:
        """The configurations asked for and not answered yet (the fault model keeps a
        majority of each as well: one may be chosen any moment)."""
        out = [c for _t, _at, c in self.waiting.values()]
        for g, confs in self.maybe.items():
            epoch = self.world.checker.conf(g).epoch
            confs[:] = [c for c in confs if c.epoch > epoch]
            out += confs
        return out

    def _host_and_drop(self) -> None:
        """The runtime's placement, played by the world: a node a chosen configuration
        lists as a learner hosts the group; a node whose replica retired drops it."""
        w = self.world
        for n in w.node_ids:
            if not w.serving(n):
                continue
            core = w.cores[n]
            for g in core.retired_groups():
                epoch = core.group_conf(g).epoch
                core.remove_group(g, drop=True)
                w.pins.dropped(n, str(g), epoch)
                w.checker.dropped(n, str(g), epoch)
                w.trace(w.now, n, "drop", f"group {g}")
            for g in sorted(w.groups, key=str):
                conf = w.checker.conf(g)
                if n in conf.learners and g not in core.groups:
                    core.host_learner(g, conf)
                    w.checker.on_host(n, g)
                    w.trace(w.now, n, "host", f"group {g} as a learner (epoch {conf.epoch})")

    def misplaced(self) -> list[str]:
        """Once quiet: per live node, why what it hosts disagrees with each group's last
        chosen configuration (empty: it agrees)."""
        w = self.world
        out = []
        for n in w.node_ids:
            core = w.cores[n]
            if core is None or n in w.retired:
                continue
            for g in sorted(w.groups, key=str):
                conf: GroupConf = w.checker.conf(g)
                if conf.hosts(n):
                    if g not in core.groups:
                        out.append(f"{n} does not host group {g} of {conf}")
                    elif core.group_conf(g) != conf:
                        out.append(f"{n} has {core.group_conf(g)} for group {g}, not {conf}")
                elif g in core.groups:
                    out.append(f"{n} still hosts group {g}, removed by {conf}")
        return out
