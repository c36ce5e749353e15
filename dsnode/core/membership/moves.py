"""Which replica move each partition makes next toward the ring (issue 10, part 2).

Pure: from a partition's target replicas (the newest ring's placement, in ring
order) and its current configuration (voters, learners, which learners have
caught up, its leader), ``next_step`` names the one change its leader proposes
next through the partition's own log; ``schedule`` picks which partitions may
move now. The runtime carries steps out and calls again once each is applied.

A partition reaches its target one voter change at a time, never falling below
the replicas it has: first every missing replica is added as a learner (it
receives a snapshot and the log, and votes on nothing); a learner that has
caught up is promoted to voter; only then is a voter the ring no longer places
there removed, as soon as a promotion made the voters one more than the target
(so a partition never has more than one extra voter), the leader last (it hands
leadership to the first target voter in ring order first). So a move of one
replica is 3 voters -> 3 voters + 1 learner -> 4 voters -> 3 voters, and every
voting set on the way differs from the one before by one member: any majority
of the one meets any majority of the next.
Learners the ring does not place there any more are dropped whenever they are
seen.

``minimum_moves`` is the least number of replicas a ring change must move
(the replicas placed on a node that did not hold them), against which the
balance bound and a rebalance are measured.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

# a partition's replica configuration as its log last applied it (voters, learners)
from dsnode.core.paxos.reconfig import GroupConf as Config

ADD_LEARNER = "add_learner"
PROMOTE = "promote"
REMOVE = "remove"
TRANSFER = "transfer"  # hand leadership to ``node`` before the leader removes itself


@dataclass(frozen=True, slots=True)
class Step:
    pid: int
    action: str
    node: str


def matches(target: Iterable[str], config: Config) -> bool:
    """The partition's voters are exactly the target replicas, and it has no learner."""
    return set(config.voters) == set(target) and not config.learners


def next_step(pid: int, target: tuple[str, ...], config: Config, caught_up: Iterable[str],
              leader: str | None, dead: Iterable[str] = ()) -> Step | None:
    """The next change toward ``target`` (None: nothing to do, or nothing possible
    until a learner catches up). ``caught_up``: learners whose log reached the
    leader's commit point; ``leader``: the partition's leader (the node that
    would propose the step); ``dead``: nodes removed from the cluster while dead,
    removed from the voters before any other (while the voters shrink, a live one
    removed first may leave a dead one half of them)."""
    voters, learners = set(config.voters), set(config.learners)
    want = set(target)
    for n in config.learners:
        if n not in want:
            return Step(pid, REMOVE, n)  # a learner of an older ring
    gone = set(dead)
    extra = [n for n in sorted(voters - want, key=lambda n: (n not in gone, n)) if n != leader]
    if extra and len(voters) > len(want):
        return Step(pid, REMOVE, extra[0])  # one in, one out: at most one voter more
    ready = set(caught_up)
    for n in target:  # in ring order: the preferred leader first
        if n in learners and n in ready:
            return Step(pid, PROMOTE, n)
    for n in target:
        if n not in voters and n not in learners:
            return Step(pid, ADD_LEARNER, n)
    if learners:
        return None  # wait for them to catch up before anyone leaves
    if extra:
        return Step(pid, REMOVE, extra[0])
    if leader is not None and leader in voters - want:
        successor = next((n for n in target if n in voters), None)
        if successor is not None:
            return Step(pid, TRANSFER, successor)
    return None


def schedule(targets: Mapping[int, tuple[str, ...]], configs: Mapping[int, Config],
             running: Iterable[int], moves_max: int) -> list[int]:
    """The partitions that may move now: those already moving, then, in partition
    order, those that do not match their target, up to ``moves_max`` at once."""
    if moves_max < 1:
        raise ValueError("moves_max must be >= 1")
    out = [p for p in sorted(set(running)) if not matches(targets[p], configs[p])]
    for p in sorted(targets):
        if len(out) >= moves_max:
            break
        if p not in out and not matches(targets[p], configs[p]):
            out.append(p)
    return out


def minimum_moves(before: Mapping[int, Iterable[str]], after: Mapping[int, Iterable[str]]) -> int:
    """Replicas the change from ``before`` to ``after`` places on a node that did not
    hold them (each must be copied there at least once)."""
    return sum(len(set(after[p]) - set(before.get(p, ()))) for p in after)


def settled(targets: Mapping[int, tuple[str, ...]], configs: Mapping[int, Config]) -> bool:
    """Every partition's configuration matches its target: the ring's moves are done."""
    return all(p in configs and matches(t, configs[p]) for p, t in targets.items())
