"""Where each partition's replicas live: rendezvous affinities, loads bounded
on both sides, and preferred leaders spread evenly. A pure function of
(sorted members, P, R): no state from earlier placements, no randomness.

1. Natural placement: every partition takes the R members with the highest
   score (rendezvous hashing). A pair's score is the rank of the partition
   among all P by the member's affinity for it (then the affinity itself), so
   every member brings the same scores. Rendezvous moves the minimum on a
   membership change, but a member's share is random: with raw affinities at
   P = 64 and N = 20 some members hold 1.5x their fair share R*P/N and others
   0.4x; ranks halve that spread.
2. Bounded loads (after Mirrokni, Thorup and Zadimoghaddam's consistent
   hashing with bounded loads, solved as a min-cost flow instead of by walking
   a ring): while a member holds more than ``upper`` replicas (1.25x fair),
   the replica whose move costs the least score goes to a member under
   ``upper``, along the cheapest chain of moves (Bellman-Ford over members);
   then, while one holds fewer than ``lower`` (0.5x fair), the cheapest chain
   brings it one from a member above ``lower``. Starting from the
   unconstrained optimum and augmenting along cheapest paths keeps the
   placement close to the highest-score one within the bounds, and that
   changes little when a member comes or goes: mostly the newcomer's own
   share, or the leaver's. Each augmentation removes one replica of excess
   or deficit and creates none, so the loop ends.
3. Leaders: each partition's first replica is its preferred leader. Start
   from the replica with the highest score; while a member leads more than
   ceil(P/N) partitions, hand one lead over along a breadth-first chain of
   partitions to a member under the cap (cap + 1 only if no chain exists).
   The other replicas follow in score order.
"""

from __future__ import annotations

from collections import deque

from dsnode.core.errors import InvariantBroken
from dsnode.core.ring.hashing import affinity_row, node_hash, partition_hash

UPPER_NUM, UPPER_DEN = 5, 4  # at most 1.25x the fair share
LOWER_NUM, LOWER_DEN = 1, 2  # at least 0.5x
# Moves considered per partition: to its most attracted members only (all of them up to this
# cluster size), which keeps large clusters fast; if no chain exists among them, all members.
CANDIDATES = 24


def load_bounds(members: int, partitions: int, replication: int) -> tuple[int, int]:
    """(lower, upper) replicas per member; widened to floor/ceil of the fair
    share when the fair share is too small for the ratios (R*P/N < 4)."""
    total = replication * partitions
    floor_fair, ceil_fair = total // members, -(-total // members)
    upper = (UPPER_NUM * total) // (UPPER_DEN * members)
    lower = -(-(LOWER_NUM * total) // (LOWER_DEN * members))
    return min(lower, floor_fair), max(upper, ceil_fair)


def place(members: tuple[str, ...], partitions: int, replication: int) -> tuple[tuple[str, ...], ...]:
    """Replica lists, preferred leader first, for members sorted and unique."""
    n = len(members)
    r = min(replication, n)
    node_h = [node_hash(m) for m in members]
    raw = [affinity_row(partition_hash(p), node_h) for p in range(partitions)]
    # Each member ranks the partitions by affinity and a pair's score leads with
    # that rank: every member then has the same spread of scores (0 .. P-1), which
    # halves the spread of the natural loads, so the bounds bind for few members.
    # A pair's score still depends only on (partition, member, P).
    scores = [[0] * n for _ in range(partitions)]
    for i in range(n):
        column = [row[i] for row in raw]
        for rank, p in enumerate(sorted(range(partitions), key=column.__getitem__)):
            scores[p][i] = (rank << 53) | column[p]
    everyone = range(n)
    # highest score first; equal scores (never seen) keep member order: sorted is stable
    ranked = [sorted(everyone, key=row.__getitem__, reverse=True) for row in scores]
    holders = [set(order[:r]) for order in ranked]
    if r < n:
        candidates = [order[:CANDIDATES] for order in ranked]
        _bound_loads(holders, scores, candidates, n, *load_bounds(n, partitions, r))
    leaders = _spread_leaders(holders, scores, n)
    return tuple(
        (members[leaders[p]],)
        + tuple(members[i] for i in sorted(h - {leaders[p]}, key=lambda i: (-scores[p][i], i)))
        for p, h in enumerate(holders)
    )


def _bound_loads(holders: list[set[int]], scores: list[list[int]], candidates: list[list[int]],
                 n: int, lower: int, upper: int) -> None:
    load = [0] * n
    for h in holders:
        for i in h:
            load[i] += 1
    while True:
        over = [i for i in range(n) if load[i] > upper]
        if over:
            sources, sink_ok = set(over), (lambda b: load[b] < upper)
        else:
            if all(x >= lower for x in load):
                return
            sources = {i for i in range(n) if load[i] > lower}
            sink_ok = lambda b: load[b] < lower  # noqa: E731
        path = _cheapest_chain(holders, scores, candidates, n, sources, sink_ok)
        if not path and n > CANDIDATES:
            path = _cheapest_chain(holders, scores, None, n, sources, sink_ok)
        if not path:
            raise InvariantBroken(f"no chain of moves balances loads {load}")
        for p, a, b in path:
            holders[p].remove(a)
            holders[p].add(b)
        load[path[0][1]] -= 1
        load[path[-1][2]] += 1


def _cheapest_chain(holders, scores, candidates, n, sources, sink_ok) -> list[tuple[int, int, int]]:
    """Moves (partition, from, to) forming the cheapest chain from a source
    member to a member ``sink_ok`` accepts; each move's cost is the affinity
    the partition loses, and goes to one of the partition's ``candidates``
    (None: any member). Members in the middle keep their load."""
    edge: dict[tuple[int, int], tuple[int, int]] = {}  # (a, b) -> (cost, partition)
    everyone = range(n)
    for p, h in enumerate(holders):
        row = scores[p]
        targets = everyone if candidates is None else candidates[p]
        for a in h:
            sa = row[a]
            for b in targets:
                if b in h:
                    continue
                cost = sa - row[b]
                best = edge.get((a, b))
                if best is None or cost < best[0]:
                    edge[(a, b)] = (cost, p)
    out: dict[int, list[tuple[int, int, int]]] = {}  # a -> [(b, cost, partition)]
    for (a, b), (cost, p) in sorted(edge.items()):
        if b not in sources:
            out.setdefault(a, []).append((b, cost, p))
    # Bellman-Ford with a queue (only members whose distance fell are rescanned)
    dist = dict.fromkeys(sorted(sources), 0)
    came: dict[int, tuple[int, int]] = {}
    queue = deque(dist)
    queued = set(queue)
    scans = 0
    while queue and scans <= n * n:
        a = queue.popleft()
        queued.discard(a)
        scans += 1
        for b, cost, p in out.get(a, ()):
            d = dist[a] + cost
            if b not in dist or d < dist[b]:
                dist[b] = d
                came[b] = (a, p)
                if b not in queued:
                    queue.append(b)
                    queued.add(b)
    sinks = [b for b in dist if b not in sources and sink_ok(b)]
    if not sinks:
        return []
    t = min(sinks, key=lambda b: (dist[b], b))
    path = []
    seen = set()
    while t in came and t not in seen:
        seen.add(t)
        a, p = came[t]
        path.append((p, a, t))
        t = a
    if t not in sources:
        raise InvariantBroken("a chain of moves does not start at a source")
    return path[::-1]


def _spread_leaders(holders: list[set[int]], scores: list[list[int]], n: int) -> list[int]:
    partitions = len(holders)
    leader = [max(h, key=lambda i, row=scores[p]: (row[i], -i)) for p, h in enumerate(holders)]
    led: list[set[int]] = [set() for _ in range(n)]
    for p, i in enumerate(leader):
        led[i].add(p)
    cap = -(-partitions // n)
    while True:
        over = [i for i in range(n) if len(led[i]) > cap]
        if not over:
            return leader
        start = max(over, key=lambda i: (len(led[i]), -i))
        path = _lead_chain(start, holders, scores, led, cap)
        if path is None:
            cap += 1
            continue
        for p, a, b in path:
            led[a].remove(p)
            led[b].add(p)
            leader[p] = b


def _lead_chain(start, holders, scores, led, cap) -> list[tuple[int, int, int]] | None:
    """Shortest chain of lead hand-overs from ``start`` to a member under ``cap``."""
    came: dict[int, tuple[int, int]] = {}
    queue = deque([start])
    seen = {start}
    while queue:
        a = queue.popleft()
        for p in sorted(led[a]):
            for b in sorted(holders[p] - {a}, key=lambda i, row=scores[p]: (-row[i], i)):
                if b in seen:
                    continue
                seen.add(b)
                came[b] = (a, p)
                if len(led[b]) < cap:
                    path = []
                    t = b
                    while t != start:
                        a2, p2 = came[t]
                        path.append((p2, a2, t))
                        t = a2
                    return path[::-1]
                queue.append(b)
    return None
