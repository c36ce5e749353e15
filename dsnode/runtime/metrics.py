"""A node's Prometheus metrics: cheap counts on the hot path, everything else read at scrape time.

Two kinds of numbers feed ``/metrics``:

* **Events** that only the data path sees (a request answered, an fsync round, a snapshot
  finished, a leader change noticed on a tick) are counted here, in :class:`NodeMetrics`, with
  plain integer additions and :class:`Histogram`, a list of bucket counts indexed by
  ``bisect``: no locks, no label lookups, no allocation per event. Only the event-loop thread
  writes them.
* **State** that the node already keeps (in-flight requests, connections, Paxos role, ballot,
  commit and applied index, the failure detector's view, WAL positions, peer link counters) is
  read when Prometheus scrapes, by :class:`NodeCollector`.

Both are turned into metric families by :class:`NodeCollector`, registered in one
``prometheus_client.CollectorRegistry`` per node (never the process-global one), which the
admin listener (``dsnode/runtime/admin.py``) encodes in the Prometheus text format.
``collect()`` reads live node state, so it must run on the node's event loop; the admin
listener arranges that.

Series stay bounded: labels are ops, outcomes (wire error codes), roles, snapshot kinds,
peers (cluster members) and partitions, one series per partition per metric at most; never
keys or clients.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from dsnode import __version__

if TYPE_CHECKING:
    from dsnode.runtime.main import Node

# Bucket upper bounds (seconds, or a count), chosen for what each measures on this store.
REQUEST_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
FSYNC_BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256,
    0.512, 1.024, 2.048,
)
RECORDS_PER_FSYNC_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
LOOP_LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SNAPSHOT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

# requests timed: data requests, and membership changes (proposed in the metadata group)
TIMED_OPS = ("get", "put", "delete", "txn", "member_join", "member_leave", "member_remove")
OPS = (*TIMED_OPS, "hello", "status", "ring")
OTHER_OP = "other"  # an op name the server does not know (answered unknown_op or bad_request)
SNAPSHOT_KINDS = ("state_machine", "wal_checkpoint")
SHED_REASONS = ("inflight_requests_max", "max_connections")
ROUTER_CHOICES = ("local", "forward", "park", "stale_local")
PEER_STATES = ("alive", "suspect", "dead")
ROLES = ("follower", "precandidate", "candidate", "leader")

LOOP_MONITOR_INTERVAL_S = 0.1


def op_label(op: object) -> str:
    """The ``op`` label of a request: its op when it is one of ours, else ``other``."""
    return op if isinstance(op, str) and op in OPS else OTHER_OP


class Histogram:
    """Bucket counts for one series: ``observe`` is a bisect and two additions.

    ``counts[i]`` holds observations ``<= bounds[i]`` and ``> bounds[i-1]``; the last slot
    is ``+Inf``. Prometheus buckets (cumulative, ``le`` inclusive) are derived at scrape time.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError("histogram bounds must be increasing and not empty")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def buckets(self) -> list[tuple[str, int]]:
        """Cumulative ``(le, count)`` pairs as Prometheus wants them, ``+Inf`` last."""
        out = []
        total = 0
        for bound, n in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += n
            out.append((_le(bound), total))
        return out

    def export(self) -> dict[str, Any]:
        """For ``status``: the bounds and the (non-cumulative) bucket counts."""
        return {"le": list(self.bounds), "counts": list(self.counts), "sum": self.sum}


def _le(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(float(bound))


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The ``q``-quantile of bucketed observations, interpolated inside its bucket as
    Prometheus's ``histogram_quantile`` does; None when there are none. ``counts`` are
    per bucket (not cumulative), one more than ``bounds`` (the ``+Inf`` bucket, which
    answers with the highest finite bound)."""
    total = sum(counts)
    if total <= 0 or not 0.0 <= q <= 1.0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n > 0 and seen + n >= rank:
            if i >= len(bounds):
                return float(bounds[-1])
            lower = float(bounds[i - 1]) if i > 0 else 0.0
            return lower + (float(bounds[i]) - lower) * (rank - seen) / n
        seen += n
    return float(bounds[-1])


class NodeMetrics:
    """The event counts of one node. Written only from the event loop thread."""

    def __init__(self) -> None:
        self.requests: defaultdict[tuple[str, str], int] = defaultdict(int)  # (op, outcome)
        self.latency = {op: Histogram(REQUEST_BUCKETS_S) for op in TIMED_OPS}
        self.received_bytes = 0
        self.sent_bytes = 0
        self.connections_accepted = 0
        self.connection_pauses = 0
        self.load_shed = dict.fromkeys(SHED_REASONS, 0)
        self.fsync = Histogram(FSYNC_BUCKETS_S)
        self.records_per_fsync = Histogram(RECORDS_PER_FSYNC_BUCKETS)
        self.snapshot_duration = {k: Histogram(SNAPSHOT_BUCKETS_S) for k in SNAPSHOT_KINDS}
        self.snapshot_bytes = dict.fromkeys(SNAPSHOT_KINDS, 0)
        self.loop_lag = Histogram(LOOP_LAG_BUCKETS_S)
        self.loop_lag_last = 0.0
        self.loop_lag_max = 0.0
        self.heartbeat = time.monotonic()  # last turn of the loop monitor; read by /livez
        # Paxos events, per group, noticed on ticks (on_tick)
        self.elections: defaultdict[Any, int] = defaultdict(int)
        self.leader_changes: defaultdict[Any, int] = defaultdict(int)
        self._ballots: dict[Any, tuple] = {}
        self._leaders: dict[Any, str | None] = {}

    # ------------------------------------------------------------ hooks
    def on_fsync(self, seconds: float, records: int) -> None:
        """The WAL finished a group-commit round (``WriteAheadLog.on_fsync``)."""
        self.fsync.observe(seconds)
        self.records_per_fsync.observe(records)

    def on_snapshot(self, kind: str, seconds: float, size: int) -> None:
        """A snapshot of ``kind`` (``SNAPSHOT_KINDS``) was encoded/written."""
        self.snapshot_duration[kind].observe(seconds)
        self.snapshot_bytes[kind] = size

    def on_tick(self, core: Any) -> None:
        """Called by the driver after every core tick: notice elections and leader changes.

        An election is a ballot of this node's own that it has not been seen with before
        (``become_candidate`` takes a fresh round each time, and no two candidacies fit in
        one tick: each waits an election timeout). A leader change is a leader becoming
        known that differs from the last one known (the first one counts; a spell without
        a leader that ends with the same one does not), as etcd's leader_changes_seen."""
        me = core.node_id
        ballots, leaders = self._ballots, self._leaders
        # a quiet group changes nothing until an input wakes it (and a woken group is
        # ticked, hence seen here, before it can quiesce again)
        awake = getattr(core, "awake_groups", None)
        for gid, g in (awake() if awake is not None else core.groups.items()):
            ballot = g.ballot
            last = ballots.get(gid)
            if last != ballot:
                if last is not None and ballot[1] == me:
                    self.elections[gid] += 1
                ballots[gid] = ballot
            leader = g.leader_hint
            if leader is not None and leaders.get(gid) != leader:
                leaders[gid] = leader
                self.leader_changes[gid] += 1

    async def loop_monitor(self, interval: float = LOOP_MONITOR_INTERVAL_S) -> None:
        """Measure event-loop lag: how late a ``sleep(interval)`` wakes up. Also the heartbeat
        that ``/livez`` checks from the admin thread. Runs until cancelled."""
        mono = time.monotonic
        self.heartbeat = mono()
        while True:
            start = mono()
            await asyncio.sleep(interval)
            now = mono()
            lag = max(0.0, now - start - interval)
            self.heartbeat = now
            self.loop_lag_last = lag
            if lag > self.loop_lag_max:
                self.loop_lag_max = lag
            self.loop_lag.observe(lag)

    # ------------------------------------------------------------ for status
    def summary(self) -> dict[str, Any]:
        """The part of the counts ``dsnode top`` needs, carried in ``status``."""
        merged = [0] * (len(REQUEST_BUCKETS_S) + 1)
        for h in self.latency.values():
            for i, n in enumerate(h.counts):
                merged[i] += n
        return {
            "requests": sum(merged),  # data requests (get, put, delete, txn) answered
            "request_latency": {"le": list(REQUEST_BUCKETS_S), "counts": merged},
            "fsync_latency": self.fsync.export(),
        }

    def loop_status(self) -> dict[str, float]:
        return {
            "lag_ms": round(self.loop_lag_last * 1000, 3),
            "lag_ms_max": round(self.loop_lag_max * 1000, 3),
        }


# ====================================================================== the collector
def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Sequence[str] = ()) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _histogram(name: str, doc: str, labels: Sequence[str] = ()) -> HistogramMetricFamily:
    return HistogramMetricFamily(name, doc, labels=list(labels))


class NodeCollector(Collector):
    """Builds every ``dsnode_*`` family from a :class:`~dsnode.runtime.main.Node` and its
    :class:`NodeMetrics`. Call ``collect`` on the node's event loop only."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        if node.driver is None or node.client_server is None or node.core is None:
            return
        yield from self._server(node)
        yield from self._wal(node)
        yield from self._paxos(node)
        yield from self._peers(node)
        yield from self._runtime(node)

    # ------------------------------------------------------------ client side
    def _server(self, node: Node) -> Iterator[Metric]:
        srv = node.client_server
        m = srv.metrics
        cfg = node.config
        info = _gauge("dsnode_node_info", "Identity of this node (always 1).",
                      ["node_id", "cluster_id", "version"])
        info.add_metric([cfg.node_id, cfg.cluster_id, __version__], 1)
        yield info
        ready, _ = node.readiness()
        g = _gauge("dsnode_ready", "1 when this node can serve linearizable requests for "
                   "every partition it holds (status `ready`, /readyz).")
        g.add_metric([], 1 if ready else 0)
        yield g

        c = _counter("dsnode_requests", "Client requests answered, by op and outcome "
                     "(ok, or the wire error code).", ["op", "outcome"])
        for (op, outcome), n in sorted(m.requests.items()):
            c.add_metric([op, outcome], n)
        yield c
        h = _histogram("dsnode_request_duration_seconds",
                       "Time from a data request's arrival to its answer.", ["op"])
        for op, hist in m.latency.items():
            h.add_metric([op], hist.buckets(), hist.sum)
        yield h
        g = _gauge("dsnode_requests_in_flight", "Client requests accepted and not yet answered.")
        g.add_metric([], srv.inflight)
        yield g
        g = _gauge("dsnode_client_connections", "Open client connections.")
        g.add_metric([], len(srv.connections))
        yield g
        c = _counter("dsnode_client_connections_accepted",
                     "Client and peer connections accepted on the node's port.")
        c.add_metric([], m.connections_accepted)
        yield c
        c = _counter("dsnode_client_received_bytes", "Bytes received on client connections.")
        c.add_metric([], m.received_bytes)
        yield c
        c = _counter("dsnode_client_sent_bytes", "Bytes sent on client connections.")
        c.add_metric([], m.sent_bytes)
        yield c
        c = _counter("dsnode_load_shed", "Requests or connections refused to shed load "
                     "(answered `overloaded`), by the limit that was reached.", ["reason"])
        for reason, n in m.load_shed.items():
            c.add_metric([reason], n)
        yield c
        c = _counter("dsnode_client_connection_pauses", "Times a client connection stopped "
                     "being read (connection_inflight_max reached, or it did not read answers).")
        c.add_metric([], m.connection_pauses)
        yield c

    # ------------------------------------------------------------ storage
    def _wal(self, node: Node) -> Iterator[Metric]:
        wal = node.wal
        m = node.client_server.metrics
        stats = wal.stats
        c = _counter("dsnode_wal_appended_records", "Records appended to the write-ahead log.")
        c.add_metric([], stats["records"])
        yield c
        c = _counter("dsnode_wal_appended_bytes", "Bytes written to the write-ahead log.")
        c.add_metric([], stats["bytes"])
        yield c
        h = _histogram("dsnode_wal_fsync_duration_seconds",
                       "Duration of one group-commit fsync round of the write-ahead log.")
        h.add_metric([], m.fsync.buckets(), m.fsync.sum)
        yield h
        h = _histogram("dsnode_wal_records_per_fsync",
                       "Records made durable by one group-commit fsync round.")
        h.add_metric([], m.records_per_fsync.buckets(), m.records_per_fsync.sum)
        yield h
        g = _gauge("dsnode_wal_last_lsn", "Sequence number of the last record appended.")
        g.add_metric([], wal.last_lsn)
        yield g
        g = _gauge("dsnode_wal_durable_lsn", "Sequence number of the last record known durable.")
        g.add_metric([], wal.durable_lsn)
        yield g
        h = _histogram("dsnode_snapshot_duration_seconds",
                       "Time to take a snapshot: state_machine (a Paxos group's store, encoded "
                       "a piece per loop turn) or wal_checkpoint (written so old log segments "
                       "can go).", ["kind"])
        for kind, hist in m.snapshot_duration.items():
            h.add_metric([kind], hist.buckets(), hist.sum)
        yield h
        g = _gauge("dsnode_snapshot_size_bytes", "Size of the last snapshot of each kind.",
                   ["kind"])
        for kind, size in m.snapshot_bytes.items():
            g.add_metric([kind], size)
        yield g

    # ------------------------------------------------------------ consensus
    def _paxos(self, node: Node) -> Iterator[Metric]:
        core, driver, m = node.core, node.driver, node.client_server.metrics
        me = node.config.node_id
        fams = {
            "is_leader": _gauge("dsnode_paxos_is_leader",
                                "1 when this node leads the partition's Paxos group.",
                                ["partition"]),
            "role": _gauge("dsnode_paxos_role", "This node's role in the partition's group: "
                           + ", ".join(f"{i} {r}" for i, r in enumerate(ROLES)) + ".",
                           ["partition"]),
            "round": _gauge("dsnode_paxos_ballot_round", "Round of the highest ballot this node "
                            "leads with (leader) or has promised (others).", ["partition"]),
            "commit": _gauge("dsnode_paxos_commit_index",
                             "Highest slot known chosen, with every slot below it.",
                             ["partition"]),
            "applied": _gauge("dsnode_paxos_applied_index",
                              "Highest slot applied to the state machine.", ["partition"]),
            "snapshot": _gauge("dsnode_paxos_snapshot_index",
                               "Slot of the state-machine snapshot the log is compacted to.",
                               ["partition"]),
            "lag": _gauge("dsnode_paxos_replication_lag_slots",
                          "On the leader: chosen slots the slowest replica has not accepted.",
                          ["partition"]),
            "keys": _gauge("dsnode_kv_keys", "Keys stored in the partition's replica.",
                           ["partition"]),
            "proposals": _counter("dsnode_paxos_proposals",
                                  "Commands proposed to the partition's group by this node "
                                  "(as leader, its own and forwarded ones).", ["partition"]),
            "elections": _counter("dsnode_paxos_elections",
                                  "Elections (phase 1 with a new ballot) this node started.",
                                  ["partition"]),
            "changes": _counter("dsnode_paxos_leader_changes",
                                "Times this node saw the partition's leader change.",
                                ["partition"]),
        }
        roles = dict.fromkeys(ROLES, 0)
        for gid, g in core.groups.items():
            p = [str(gid)]
            role = g.role.value
            roles[role] = roles.get(role, 0) + 1
            leading = role == "leader"
            fams["is_leader"].add_metric(p, 1 if leading else 0)
            fams["role"].add_metric(p, ROLES.index(role) if role in ROLES else -1)
            fams["round"].add_metric(p, g.ballot[0] if leading else g.acceptor.promised[0])
            fams["commit"].add_metric(p, g.log.chosen_through)
            fams["applied"].add_metric(p, g.log.applied)
            fams["snapshot"].add_metric(p, g.log.snap_index)
            fams["keys"].add_metric(p, len(g.sm.kv))
            if leading:
                commit = g.log.chosen_through
                lags = [max(0, commit - driver.peer_acked.get(peer, 0))
                        for peer in g.members if peer != me]
                fams["lag"].add_metric(p, max(lags, default=0))
            fams["proposals"].add_metric(p, driver.proposals.get(gid, 0))
            fams["elections"].add_metric(p, m.elections.get(gid, 0))
            fams["changes"].add_metric(p, m.leader_changes.get(gid, 0))
        yield from fams.values()
        g = _gauge("dsnode_paxos_groups", "Paxos groups on this node by this node's role in "
                   "them.", ["role"])
        for role, n in roles.items():
            g.add_metric([role], n)
        yield g
        c = _counter("dsnode_paxos_dropped_messages", "Peer messages the Paxos core dropped "
                     "(stale, or for an unknown group), by reason.", ["reason"])
        for reason, n in sorted(core.dropped.items()):
            c.add_metric([str(reason)], n)
        yield c

    # ------------------------------------------------------------ peers and routing
    def _peers(self, node: Node) -> Iterator[Metric]:
        driver, net, cfg = node.driver, node.net, node.config
        state = _gauge("dsnode_peer_state", "Failure detector's state of each peer: 1 for the "
                       "current one of alive, suspect, dead.", ["peer", "state"])
        heard = _gauge("dsnode_peer_last_heard_seconds",
                       "Time since anything was last heard from the peer.", ["peer"])
        up = _gauge("dsnode_peer_connected", "1 while the connection to the peer is up.",
                    ["peer"])
        sent = _counter("dsnode_peer_sent_messages", "Messages sent to the peer.", ["peer"])
        recv = _counter("dsnode_peer_received_messages", "Messages received from the peer.",
                        ["peer"])
        dropped = _counter("dsnode_peer_dropped_messages", "Messages to the peer dropped (link "
                           "down or its queue full; the protocols retransmit).", ["peer"])
        tick_s = cfg.tick_interval_ms / 1000
        for pid in node.peers:
            if pid == cfg.node_id:
                continue
            current = node.member_state(pid)
            for s in PEER_STATES:
                state.add_metric([pid, s], 1 if s == current else 0)
            last = driver.heard.get(pid)
            if last is not None:
                heard.add_metric([pid], (driver.tick_count - last) * tick_s)
            if net is not None and pid in net.links:
                st = net.links[pid].stats()
                up.add_metric([pid], 1 if st["connected"] else 0)
                sent.add_metric([pid], st["sent"])
                recv.add_metric([pid], st["received"])
                dropped.add_metric([pid], st["dropped"])
        yield from (state, heard, up, sent, recv, dropped)
        c = _counter("dsnode_peer_malformed_messages",
                     "Peer messages dropped because they did not decode or validate.")
        c.add_metric([], driver.counters["malformed_peer_message"]
                     + (net.malformed if net is not None else 0))
        yield c
        counters = driver.counters
        c = _counter("dsnode_router_choices", "Where the router sent client requests: "
                     "local (this node leads), forward (to the leader), park (no leader yet; "
                     "routed again later), stale_local (stale get from the local replica).",
                     ["choice"])
        for choice in ROUTER_CHOICES:
            c.add_metric([choice], counters["route_" + choice])
        yield c
        c = _counter("dsnode_forwarded_requests", "Requests forwarded to the leader (out) and "
                     "received from other nodes to lead (in).", ["direction"])
        c.add_metric(["out"], counters["route_forward"])
        c.add_metric(["in"], counters["forwarded_in"])
        yield c
        c = _counter("dsnode_router_resends", "Writes with a request id sent again, as a "
                     "retry, after their leader changed with the outcome unknown.")
        c.add_metric([], counters["route_resend"])
        yield c

    # ------------------------------------------------------------ the process
    def _runtime(self, node: Node) -> Iterator[Metric]:
        m = node.client_server.metrics
        h = _histogram("dsnode_event_loop_lag_seconds",
                       "How late the event loop runs a timer (sampled every 100 ms).")
        h.add_metric([], m.loop_lag.buckets(), m.loop_lag.sum)
        yield h
        g = _gauge("dsnode_event_loop_lag_max_seconds",
                   "Largest event-loop lag seen since the node started.")
        g.add_metric([], m.loop_lag_max)
        yield g


def node_registry(node: Node) -> CollectorRegistry:
    """A registry of its own for one node: its ``dsnode_*`` families plus the standard
    process, platform and garbage-collector ones."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(NodeCollector(node))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry
