"""Fault schedule inside the fault model: at most f = (len(members)-1)//2
replicas of any group down at once; partitions, one-way cuts, loss and
duplication arbitrary. Every choice comes from the rng handed in.

A crash, a pause or a crash of every node hits every group on the node at once
(in a partitioned cluster the metadata group and several partitions); the crash
budget counts every group the world knows of, whether the node has created it
yet or not. Campaigns and leadership transfers pick among the groups a core hosts."""

from __future__ import annotations

import random
from dataclasses import dataclass

from dsnode.core.paxos.messages import Promise


@dataclass(frozen=True, slots=True)
class FaultConfig:
    event_chance: float = 0.03  # per tick
    crash_weight: int = 3
    restart_weight: int = 3
    partition_weight: int = 2
    one_way_weight: int = 1
    heal_weight: int = 2
    # every node crashes at once (power cut, `docker compose restart`): outside the
    # "at most f down" model, so only liveness after the restarts is at stake
    crash_all_weight: int = 0  # the swarm turns it on for a third of the seeds
    # a node comes back with an empty or an old data directory (within the crash budget)
    amnesia_weight: int = 0
    # a node stops (SIGSTOP, a long GC) for up to pause_ticks_max ticks, then goes on
    # with a stale view: a leader that has not noticed it was deposed, say
    pause_weight: int = 2
    pause_ticks_max: int = 60
    weather_weight: int = 1
    # a node starts phase 1 at once, skipping pre-vote: safety must not rest on
    # pre-vote, and without this contested elections become too rare to test
    campaign_weight: int = 1
    # a group's leader hands leadership over (TimeoutNow) to a random member
    transfer_weight: int = 1
    loss_max: float = 0.1
    dup_max: float = 0.1
    mid_ready_crash_chance: float = 0.5  # crash between a Ready's append and fsync
    # a crashed node comes back after this many ticks (drawn), or by a restart event
    down_ticks_max: int = 120
    # chance that a node which just granted a promise crashes a few ticks later
    crash_after_vote_chance: float = 0.05


class FaultSchedule:
    def __init__(self, rng: random.Random, world, cfg: FaultConfig) -> None:
        self.rng = rng
        self.world = world
        self.cfg = cfg
        self.events = 0
        self.scheduled: list[tuple[int, str, str]] = []  # (tick, action, node)

    def on_sent(self, now: int, node: str, msg) -> None:
        """Buggify: sometimes crash a node shortly after it voted."""
        if type(msg) is Promise and msg.ok and self.rng.random() < self.cfg.crash_after_vote_chance:
            self.scheduled.append((now + self.rng.randint(1, 6), "crash", node))

    def _run_scheduled(self, now: int) -> None:
        if not self.scheduled:
            return
        due = [e for e in self.scheduled if e[0] <= now]
        self.scheduled = [e for e in self.scheduled if e[0] > now]
        w = self.world
        for _, action, node in due:
            if action == "crash" and w.up[node] and self.can_crash(node):
                self._crash(node)
            elif action == "restart" and not w.up[node] and node not in w.retired:
                w.restart(node)

    def crash_node(self, node: str) -> None:
        """Crash ``node`` now (a targeted fault), back after a drawn delay."""
        self._crash(node)

    def _crash(self, node: str) -> None:
        rng, w = self.rng, self.world
        w.crash(node, mid_ready=rng.random() < self.cfg.mid_ready_crash_chance)
        down = rng.choice((rng.randint(1, 10), rng.randint(1, self.cfg.down_ticks_max)))
        self.scheduled.append((w.now + down, "restart", node))

    def can_crash(self, node: str) -> bool:
        w = self.world
        for members, f in w.fault_budget():
            if node in members:
                down = sum(1 for m in members if not w.up[m] or m in w.lost)
                if down + 1 > f:
                    return False
        return True

    def act(self, now: int) -> None:
        rng, cfg, w = self.rng, self.cfg, self.world
        self._run_scheduled(now)
        if rng.random() >= cfg.event_chance:
            return
        kinds = [
            "crash", "restart", "partition", "one_way", "heal", "weather", "campaign", "crash_all",
            "amnesia", "pause", "transfer",
        ]
        weights = [
            cfg.crash_weight,
            cfg.restart_weight,
            cfg.partition_weight,
            cfg.one_way_weight,
            cfg.heal_weight,
            cfg.weather_weight,
            cfg.campaign_weight,
            cfg.crash_all_weight,
            cfg.amnesia_weight,
            cfg.pause_weight,
            cfg.transfer_weight,
        ]
        kind = rng.choices(kinds, weights)[0]
        self.events += 1
        if kind == "crash":
            candidates = [n for n in w.node_ids if w.up[n] and self.can_crash(n)]
            if candidates:
                self._crash(rng.choice(candidates))
        elif kind == "pause":
            candidates = [n for n in w.node_ids if w.serving(n)]
            if candidates:
                w.pause(rng.choice(candidates), rng.randint(1, cfg.pause_ticks_max))
        elif kind == "amnesia":
            candidates = [
                n for n in w.node_ids if w.up[n] and self.can_crash(n) and n in w.pins.pins
            ]
            if candidates:
                node = rng.choice(candidates)
                w.amnesia(node, wipe=rng.random() < 0.5, rng=rng)
                self.scheduled.append((w.now + rng.randint(1, 20), "restart", node))
        elif kind == "crash_all":
            w.trace(now, "-", "crash-all")
            for n in w.node_ids:
                if w.up[n]:
                    self._crash(n)
        elif kind == "restart":
            down = [n for n in w.node_ids if not w.up[n] and n not in w.retired]
            if down:
                w.restart(rng.choice(down))
        elif kind == "partition":
            nodes = list(w.node_ids)
            rng.shuffle(nodes)
            cut = rng.randint(1, len(nodes) - 1)
            w.net.partition([nodes[:cut], nodes[cut:]])
            w.trace(now, "-", "partition", f"{nodes[:cut]}|{nodes[cut:]}")
        elif kind == "one_way":
            a, b = rng.sample(list(w.node_ids), 2)
            w.net.cut_one_way(a, b)
            w.trace(now, "-", "cut", f"{a}->{b}")
        elif kind == "heal":
            w.net.heal()
            w.trace(now, "-", "heal")
        elif kind == "transfer":
            # the groups each core hosts (partitioned: the metadata group, and the
            # partitions it has created so far)
            leading = [(n, g) for n in w.node_ids if w.serving(n)
                       for g in sorted(w.cores[n].groups, key=str) if w.cores[n].is_leader(g)]
            if leading:
                node, group = rng.choice(leading)
                target = rng.choice([m for m in w.groups[group] if m != node])
                w.cores[node].transfer_leadership(group, target)
                w.trace(now, node, "transfer", f"group {group} to {target}")
        elif kind == "campaign":
            up = [n for n in w.node_ids if w.up[n] and w.cores[n].groups]
            if up:
                node = rng.choice(up)
                group = rng.choice(sorted(w.cores[node].groups, key=str))
                w.cores[node].campaign(group)
                w.trace(now, node, "campaign", f"group {group}")
        else:
            w.net.loss = rng.uniform(0, cfg.loss_max)
            w.net.dup = rng.uniform(0, cfg.dup_max)
            w.trace(now, "-", "weather", f"loss={w.net.loss:.2f} dup={w.net.dup:.2f}")
