"""SimWorld: N node cores, a virtual tick counter, one seeded random.Random.

Every random choice (network, faults, workload, each node's rng on every
start) derives from ``random.Random(seed)``, so a seed replays exactly. The
world plays the shell: per tick and per node it delivers due messages, ticks
the core, lets clients submit, then drains ``ready()`` in contract order:
append ``persist`` to the simulated disk and request a sync; the drain's sends
and replies wait until that sync completes (a random number of ticks later,
``SimConfig.fsync_ticks_max``) and behind every earlier drain's, as the
runtime driver holds them behind the WAL's fsync.

Each drain may also checkpoint the node, as the runtime's WAL does: the
world keeps the blob and where it stands in the node's records, and every
restart that has one checks that it recovers what the full records do
(``sim/checkpoints.py``).

Two kinds of cluster. By default (``SimConfig.partitions == 0``) the world
draws ``groups`` groups of ``replicas`` members itself and hands each node its
groups. With ``partitions = P`` the world is a partitioned cluster as the
runtime runs one: every node starts with only the metadata group (all nodes,
:data:`META`), whose first chosen value holds the ring (P partitions, R =
``replicas``), and each node's core creates the partition groups the ring
places on it (``PaxosNode.sync_partitions``). The world's own view of the
groups (for the checkers, the faults and the clients) is computed from the
same ring, so it holds before any node has learned it; the placement check
(``checkers.misplaced``) holds every node's hosted partitions to it.

With ``membership`` (partitioned only) the cluster forms with the first nodes
(``formed``) and the rest are spares with no group; ``sim/membership.py`` changes
the membership during the faults (joins, leaves, removals of dead nodes) and runs
every node's core replica mover, so partitions follow each new ring through their
own logs: ``groups`` then follows each group's chosen configuration (as with
``reconfig``), the static placement check gives way to ``Membership.misplaced``
once quiet, and a removed node is retired (never restarted) and lost to the fault
model.

A run is a fault phase (``fault_ticks``) then a heal phase (everything
restarted and reconnected) that must converge within ``heal_ticks_max``:
pending client ops done, final linearizable reads of every key done, a leader
in every group and all replicas at the same applied index (and, partitioned,
every live replica hosting its partitions).
"""

from __future__ import annotations

import collections
import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack

from dsnode.core.errors import InvariantBroken
from dsnode.core.membership.incarnations import Incarnations, Presented
from dsnode.core.membership.mover import Mover as CoreMover
from dsnode.core.paxos import PaxosConfig, PaxosNode
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.acceptor import Acceptor
from dsnode.core.paxos.config import bound_for, lease_ticks_for
from dsnode.core.paxos.group import PaxosGroup
from dsnode.core.paxos.messages import Accepted, Promise
from dsnode.core.paxos.outputs import SnapshotRestore, SnapshotWanted, StoredSnapshot
from dsnode.core.ring import Ring
from dsnode.sim.checkers import SafetyChecker, SafetyViolation, misplaced, unhosted
from dsnode.sim.checkpoints import disagreement
from dsnode.sim.disk import SimDisk
from dsnode.sim.faults import FaultConfig, FaultSchedule
from dsnode.sim.linearizability import check_history
from dsnode.sim.membership import Membership
from dsnode.sim.network import SimNetwork
from dsnode.sim.reconfig import Mover
from dsnode.sim.shell import drain, step_snapshot
from dsnode.sim.trace import Trace
from dsnode.sim.txns import CRASH_POINTS, TX_MESSAGES, TxConfig, TxShell, parse
from dsnode.sim.workload import Workload

SIM_PAXOS = PaxosConfig(
    election_timeout_ticks=10,
    heartbeat_interval_ticks=2,
    snapshot_interval_slots=12,
    snapshot_chunk_bytes=200,
    catchup_entries_max=8,
    leader_quorum_timeout_ticks=20,
    # small byte budgets, so that large values (SimConfig.value_bytes_max) make
    # every bounded message kind (chunked promises, catch-up, accepts) split
    batch_bytes_max=1024,
    message_bytes_max=2048,
    peer_message_bytes_max=bound_for(4096, 2048),
    leader_probe_chance=0.05,
)

META = "meta"  # the metadata group's id, as in the runtime (dsnode.runtime.driver.META)


@dataclass(slots=True)
class SimConfig:
    nodes: int = 3
    groups: int = 2  # groups the world draws (when partitions == 0)
    replicas: int = 3  # members per group; partitioned, the ring's R
    # > 0: a partitioned cluster like the runtime's (a metadata group and a ring of this
    # many partitions, created by the cores); 0: ``groups`` groups drawn by the world
    partitions: int = 0
    fault_ticks: int = 600
    heal_ticks_max: int = 600
    clients: int = 4
    keys: int = 6
    delay_max_ticks: int = 3
    op_timeout_ticks: int = 80
    paxos: PaxosConfig = SIM_PAXOS
    faults: FaultConfig = field(default_factory=FaultConfig)
    acceptor_cls: type = Acceptor
    group_cls: type = PaxosGroup
    node_cls: type = PaxosNode
    check_budget: int = 200_000
    swarm: bool = True  # draw timing and fault parameters per seed
    # KV entries a node's shell encodes per tick for a requested snapshot; 0 = all
    # at once, inside the same drain (so the snapshot is persisted a drain later)
    snapshot_entries_per_tick: int = 0
    # share of puts whose value is large: up to value_bytes_max (the sim's value limit)
    large_value_chance: float = 0.0
    value_bytes_max: int = 1000
    # the network's frame limit; 0: the cores' own bound (paxos.peer_message_bytes_max)
    frame_bytes_max: int = 0
    # after the heal, every group must have a leader within this many ticks
    leader_after_heal_ticks_max: int = 300
    # peers refuse a node whose data directory lost state (core.membership.incarnations);
    # False only for the broken variant that must be caught
    identity_gate: bool = True
    # the direct "amnesiacs never vote" check (off: only the ground-truth checks remain)
    check_amnesiac_votes: bool = True
    # a drain's sync completes 0..fsync_ticks_max ticks after it was requested
    fsync_ticks_max: int = 2
    # chance that a drain which persisted records also checkpoints the node
    checkpoint_chance: float = 0.05
    # each node's clock runs at its own rate, drawn within 1 +- clock_drift of the
    # world's ticks; leases (paxos.lease_ticks) must hold for any such rates
    clock_drift: float = 0.0
    # cross-partition transactions (sim/txns.py): a coordinator and a recovery on every
    # node, a bank workload beside the single-key one, and its checks (partitioned only)
    txns: TxConfig | None = None
    # replica-set changes of the groups during the faults (sim/reconfig.py; not partitioned)
    reconfig: bool = False
    # membership changes of a partitioned cluster during the faults (sim/membership.py):
    # the cluster forms without ``spares`` of its nodes (0: drawn per seed, at least one),
    # which join later; members leave, dead ones are removed
    membership: bool = False
    spares: int = 0
    # the core's replica mover each node runs, and whether the shell drops the groups the
    # core retired (both replaced only by broken variants, sim/broken.py)
    mover_cls: type = CoreMover
    drop_retired: bool = True


def node_ids(n: int) -> list[str]:
    return [f"n{i}" for i in range(1, n + 1)]


def partitioned_config(nodes: int = 5, partitions: int = 16, replication: int = 3,
                       **kw: Any) -> SimConfig:
    """A partitioned cluster (see the module docstring) with a workload sized for it:
    more clients and keys than the default, so that most partitions see traffic."""
    kw.setdefault("clients", 8)
    kw.setdefault("keys", 24)
    return SimConfig(nodes=nodes, partitions=partitions, replicas=replication, **kw)


@dataclass(slots=True)
class RunResult:
    seed: int
    ok: bool
    ticks: int
    error: str = ""
    ops: int = 0
    ops_ok: int = 0
    ops_indeterminate: int = 0
    messages: int = 0
    wall_s: float = 0.0
    lin_inconclusive: bool = False
    trace_tail: str = ""
    stats: dict = field(default_factory=dict)


def swarm(cfg: SimConfig, rng: random.Random) -> SimConfig:
    """Swarm testing: each seed gets its own timing and fault mix."""
    et = rng.randint(6, 16)
    paxos = dataclasses.replace(
        cfg.paxos,
        election_timeout_ticks=et,
        heartbeat_interval_ticks=rng.randint(1, max(1, et // 4)),
        leader_quorum_timeout_ticks=rng.randint(et, 3 * et),
        snapshot_interval_slots=rng.randint(6, 40),
        leader_stickiness=rng.random() < 0.5,
        inflight_slots_max=rng.choice((2, 8, 32)),
        batch_commands_max=rng.choice((1, 4, 64)),
        pre_vote=rng.random() < 0.8,  # the default, with the old direct elections kept in play
        prefer_leader=rng.random() < 0.5,
        quiesce=rng.random() < 0.5,
    )
    paxos = dataclasses.replace(paxos, leader_probe_chance=cfg.paxos.leader_probe_chance)
    faults = dataclasses.replace(
        cfg.faults,
        event_chance=rng.uniform(0.01, 0.1),
        mid_ready_crash_chance=rng.random(),
        crash_after_vote_chance=rng.choice((0.0, 0.05, 0.2)),
        down_ticks_max=rng.choice((10, 40, 150)),
        campaign_weight=rng.choice((1, 3, 8)),
        crash_all_weight=max(cfg.faults.crash_all_weight, rng.choice((0, 0, 1))),
        amnesia_weight=max(cfg.faults.amnesia_weight, rng.choice((0, 0, 1))),
    )
    out = dataclasses.replace(
        cfg,
        paxos=paxos,
        faults=faults,
        delay_max_ticks=rng.randint(1, 5),
        snapshot_entries_per_tick=rng.choice((0, 1, 2)),
        large_value_chance=max(cfg.large_value_chance, rng.choice((0.0, 0.05, 0.3))),
    )
    out = dataclasses.replace(out, fsync_ticks_max=rng.choice((0, 1, 2, 4)))
    drift = max(cfg.clock_drift, rng.choice((0.0, 0.05, 0.1, 0.2)))
    lease = lease_ticks_for(et, drift) if rng.random() < 0.5 else cfg.paxos.lease_ticks
    out = dataclasses.replace(
        out, clock_drift=drift, paxos=dataclasses.replace(out.paxos, lease_ticks=lease)
    )
    # A leader must hear a quorum's answers within its quorum timeout: at least one
    # round trip of the slowest link (delay plus jitter, both ways, and a sync at
    # each end) and a heartbeat.
    rtt = (2 * (out.delay_max_ticks + 1) + 2 * out.fsync_ticks_max
           + out.paxos.heartbeat_interval_ticks + 1)
    if out.paxos.leader_quorum_timeout_ticks < rtt:
        out = dataclasses.replace(
            out, paxos=dataclasses.replace(out.paxos, leader_quorum_timeout_ticks=rtt)
        )
    # Preferred leaders move leadership on purpose, each move a short election; with
    # an election timeout below a round trip every election may fail and they would
    # churn for ever. A deployment that wants them has timeouts far above its RTT.
    if out.paxos.prefer_leader and out.paxos.election_timeout_ticks < rtt:
        out = dataclasses.replace(out, paxos=dataclasses.replace(out.paxos, prefer_leader=False))
    if cfg.txns is not None:
        tx = cfg.txns
        if not tx.crash_point:  # each seed crashes coordinators at its own step
            point = rng.choice(CRASH_POINTS + ("",))
            tx = dataclasses.replace(tx, crash_point=point,
                                     crash_chance=rng.choice((0.003, 0.01, 0.03)) if point else 0.0)
        out = dataclasses.replace(out, txns=tx)
    return out


class SimWorld:
    def __init__(self, seed: int, cfg: SimConfig | None = None, trace: Trace | None = None) -> None:
        self.seed = seed
        self.cfg = cfg = cfg or SimConfig()
        self.rng = random.Random(seed)
        if cfg.swarm:
            cfg = self.cfg = swarm(cfg, self._sub())
        self.trace = trace or Trace()
        self.now = 0
        self.mover: Mover | None = None  # replica-set changes (created last: see the end)
        self.membership: Membership | None = None  # membership changes (likewise)
        self.faulty = False
        self.event_seq = 0
        self.check_config(cfg)
        self.node_ids = node_ids(cfg.nodes)
        # every group and its members in preference order (a partition's replicas in
        # ring order), for the checkers, the faults and the clients
        self.groups: dict[Any, tuple[str, ...]] = {}
        self.ring: Ring | None = None  # partitioned: the ring the metadata group starts with
        self.metadata: Any = None  # partitioned: the metadata group's id
        # the nodes the cluster forms with; the others (membership changes) join later
        self.formed: tuple[str, ...] = tuple(self.node_ids)
        if cfg.membership:
            spares = cfg.spares or self._sub().randint(1, max(1, cfg.nodes - cfg.replicas))
            self.formed = tuple(self.node_ids[:cfg.nodes - spares])
        if cfg.partitions:
            ring = self.ring = Ring(self.formed, cfg.partitions, cfg.replicas, epoch=1)
            self.metadata = META
            self.groups[META] = ring.members
            self.groups.update(enumerate(ring.placement()))
            cfg = self.cfg = dataclasses.replace(cfg, paxos=dataclasses.replace(
                cfg.paxos, formation_group=META,
                formation_ring=(ring.members, cfg.partitions, cfg.replicas)))
        else:
            r = min(cfg.replicas, cfg.nodes)
            for g in range(cfg.groups):
                # in preference order (as the ring lists a partition's replicas)
                self.groups[g] = tuple(self._sub().sample(self.node_ids, r))
        # the groups as the nodes start with them (``groups`` follows each group's chosen
        # configuration, voters then learners, when replica sets change)
        self.genesis = dict(self.groups)
        if cfg.reconfig or cfg.membership:
            cfg = self.cfg = dataclasses.replace(
                cfg, paxos=dataclasses.replace(cfg.paxos, reconfig=True))
        self.net = SimNetwork(
            self._sub(),
            self.node_ids,
            cfg.delay_max_ticks,
            cfg.frame_bytes_max or cfg.paxos.peer_message_bytes_max,
        )
        self.disks = {n: SimDisk() for n in self.node_ids}
        self.up = {n: False for n in self.node_ids}
        # Identity (issue 15). The pins are one table for the whole world: the
        # runtime spreads them by hello and gossip, the simulator assumes that
        # spreading is done. A node presents its incarnation and durable state at
        # its (re)start, like a hello; a refused node exits and stays out (retired).
        self.incarnation = {n: f"{n}.0" for n in self.node_ids}
        self.pins = Incarnations()
        self.presented: dict[str, Presented] = {}
        self.admitted: set[str] = set()
        self.retired: set[str] = set()
        self.lost: set[str] = set()  # came back amnesiac: out of the fault budget for good
        # process pauses (SIGSTOP, a long GC): no ticks, no input until the tick given;
        # messages that arrive meanwhile wait in ``held`` and are read on waking
        self.paused_until: dict[str, int] = {}
        self.held: dict[str, list] = {n: [] for n in self.node_ids}
        self.cores: dict[str, PaxosNode | None] = {n: None for n in self.node_ids}
        # every node's own clock (it keeps running while the node is down or paused,
        # like CLOCK_MONOTONIC) and the ticks its core has been given so far
        clock_rng = self._sub()
        d = cfg.clock_drift
        self.clock_rate = {n: clock_rng.uniform(1.0 - d, 1.0 + d) for n in self.node_ids}
        self.clock = {n: 0.0 for n in self.node_ids}
        self.ticks_given = {n: 0 for n in self.node_ids}
        # snapshots a node's shell is still encoding (SnapshotWanted), per node
        self.snap_jobs: dict[str, list[SnapshotWanted]] = {n: [] for n in self.node_ids}
        # peers' snapshots a node's shell is still decoding (SnapshotRestore), per node:
        # handed back on the node's next tick, as the driver's worker thread would
        self.restore_jobs: dict[str, list[SnapshotRestore]] = {n: [] for n in self.node_ids}
        self.checker = SafetyChecker(self.groups, cfg.check_amnesiac_votes, self.metadata)
        self.faults = FaultSchedule(self._sub(), self, cfg.faults)
        self.crash_rng = self._sub()
        self.workload = Workload(
            self._sub(),
            self,
            cfg.clients,
            cfg.keys,
            op_timeout_ticks=cfg.op_timeout_ticks,
            large_value_chance=cfg.large_value_chance,
            value_bytes_max=cfg.value_bytes_max,
        )
        # sync completion times; per node, the drains' sends and replies held until
        # the disk is durable up to their mark: deque of (records appended, send, reply)
        self.held_out: dict[str, collections.deque] = {
            n: collections.deque() for n in self.node_ids
        }
        self.ckpt: dict[str, tuple[bytes, int] | None] = {n: None for n in self.node_ids}
        self.ckpt_pending: dict[str, tuple[bytes, int] | None] = {n: None for n in self.node_ids}
        self.tx = TxShell(self._sub(), self, cfg.txns) if cfg.txns is not None else None
        if cfg.membership:  # (before the first starts: each gives its core a mover)
            self.membership = Membership(self._sub(), self, mover_cls=cfg.mover_cls,
                                         drop_retired=cfg.drop_retired)
        for n in self.node_ids:
            self.restart(n)
        self.sync_rng = self._sub()  # drawn after the first starts: their rngs stay as they were
        # simulated WAL checkpoints per node: (blob, records before it); ``pending``
        # until the disk is durable up to it (the WAL syncs before it writes one)
        self.ckpt_rng = self._sub()
        self.mover = Mover(self._sub(), self) if cfg.reconfig else None

    @staticmethod
    def check_config(cfg: SimConfig) -> None:
        """Raise ValueError, saying why, for a cluster shape the world cannot build."""
        if cfg.nodes < 2:  # the fault model cuts the network between nodes
            raise ValueError(f"the simulator needs at least two nodes, not {cfg.nodes}")
        if cfg.partitions:
            Ring(node_ids(cfg.nodes), cfg.partitions, cfg.replicas)  # raises if P or R is bad
        elif cfg.groups < 1 or cfg.replicas < 1:
            raise ValueError(f"need at least one group of one replica, not {cfg.groups} "
                             f"of {cfg.replicas}")
        if cfg.txns is not None and not cfg.partitions:
            raise ValueError("cross-partition transactions need a partitioned cluster "
                             "(--partitions P)")
        if cfg.reconfig and cfg.partitions:
            raise ValueError("replica-set changes (--reconfig) run on the world's groups "
                             "(--groups), not on a partitioned cluster")
        if cfg.membership:
            if not cfg.partitions:
                raise ValueError("membership changes (--membership) need a partitioned "
                                 "cluster (--partitions P)")
            if cfg.txns is not None:
                raise ValueError("membership changes do not run with --txns (yet)")
            if not 0 <= cfg.spares < cfg.nodes or cfg.nodes < 2:
                raise ValueError(f"--membership needs at least two nodes, and fewer "
                                 f"spares than nodes, not {cfg.spares} of {cfg.nodes}")

    def _sub(self) -> random.Random:
        return random.Random(self.rng.getrandbits(64))

    def next_event(self) -> int:
        self.event_seq += 1
        return self.event_seq

    # ------------------------------------------------------------ node lifecycle
    def groups_of(self, node: str) -> dict[Any, tuple[str, ...]]:
        """The groups ``node`` is (or, partitioned, will be) a member of."""
        return {g: m for g, m in self.groups.items() if node in m}

    def start_groups(self, node: str) -> dict[Any, tuple[str, ...]]:
        """The groups a core of ``node`` starts with: partitioned, only the metadata
        group (the core creates its partitions from the ring); else all of them."""
        if self.metadata is not None:
            if node not in self.formed:
                return {}  # it joins later: hosted as a learner once invited
            return {self.metadata: self.formed}
        return {g: m for g, m in self.genesis.items() if node in m}

    def new_core(self, node: str, rng: random.Random, real: bool = True) -> PaxosNode:
        """A core for ``node``, before recovery; ``real=False``: a probe with the
        plain classes (not the configured, possibly broken, ones)."""
        cfg = self.cfg
        if not real:
            return PaxosNode(node, self.start_groups(node), rng, cfg.paxos,
                             metadata=self.metadata)
        return cfg.node_cls(node, self.start_groups(node), rng, cfg.paxos, cfg.acceptor_cls,
                            cfg.group_cls, metadata=self.metadata)

    def restart(self, node: str) -> None:
        core = self.new_core(node, self._sub())
        self.checker.on_restart(node)
        self.snap_jobs[node] = []
        self.restore_jobs[node] = []
        records = self.disks[node].records()
        snaps = self.disks[node].newest_snapshots()
        self._check_checkpoint(node, records, snaps)
        core.recover(records, snaps)
        self.cores[node] = core
        self.ticks_given[node] = int(self.clock[node])  # a new process counts from now
        self.up[node] = True
        log_end, promised = core.durable_summary()
        self.presented[node] = Presented(self.incarnation[node], log_end, promised,
                                         core.conf_epochs())
        self.admitted.discard(node)
        self.checker.on_presented(node, self.presented[node])
        if self.membership is not None:
            self.membership.on_start(node, core)
        if self.tx is not None:
            self.tx.on_restart(node)
        self.trace(self.now, node, "restart", f"{len(self.disks[node].durable)} records")

    def crash(self, node: str, mid_ready: bool) -> None:
        core = self.cores[node]
        disk = self.disks[node]
        if mid_ready:
            r = core.ready()
            disk.append(r.persist)
        survived = disk.crash(self.crash_rng)
        self.checker.on_durable(node, survived)
        self._promote_checkpoint(node)
        self.ckpt_pending[node] = None
        self.cores[node] = None
        self.up[node] = False
        self.paused_until.pop(node, None)
        self.held[node] = []  # the connections die with the process
        self.held_out[node].clear()  # so do the effects still waiting for a sync
        self.snap_jobs[node] = []  # the encoding in progress dies with the process
        self.restore_jobs[node] = []  # and so does the decoding
        self.trace(self.now, node, "crash", f"mid_ready={mid_ready} survived={len(survived)}")
        self.workload.on_node_crash(self.now, node)
        if self.tx is not None:
            self.tx.on_crash(self.now, node)

    # ------------------------------------------------------------ the shell
    def _drain(self, node: str) -> None:
        r = drain(
            self.cores[node],
            persist=lambda records: self._persist(node, records),
            applied=lambda notices: self._applied(node, notices),
            out=lambda sends, replies: self._out(node, sends, replies),
            restores=self.restore_jobs[node].extend,
            snapshots=self.snap_jobs[node].extend,
        )
        if (r.restores or r.snapshots) and self.cfg.snapshot_entries_per_tick == 0:
            # the shell with unlimited time: decoded and encoded within this drain
            self._finish_restores(node)
            self._advance_snapshots(node, None)
            self._drain(node)

    def _persist(self, node: str, records: list[bytes]) -> None:
        disk = self.disks[node]
        disk.append(records)
        fmax = self.cfg.fsync_ticks_max
        delay = self.sync_rng.randint(0, fmax) if fmax else 0
        if delay == 0:
            self.checker.on_durable(node, disk.fsync())
        else:
            disk.request_sync(self.now + delay)
        if self.cfg.checkpoint_chance and self.ckpt_rng.random() < self.cfg.checkpoint_chance:
            blob = self.cores[node].checkpoint()
            if blob is not None:  # None: an installed snapshot is not in its file yet
                self.ckpt_pending[node] = (blob, disk.appended)
        self._promote_checkpoint(node)

    def _applied(self, node: str, notices: list) -> None:
        for notice in notices:
            self.checker.on_apply(node, notice)

    def _out(self, node: str, sends: list, replies: list) -> None:
        """Messages and replies leave once the records before them are durable."""
        disk = self.disks[node]
        held = self.held_out[node]
        if held or disk.appended > len(disk.durable):
            held.append((disk.appended, sends, replies))
            self._release(node)
        else:
            self._effects(node, sends, replies)

    def _effects(self, node: str, sends: list, replies: list) -> None:
        now = self.now
        send = self.net.send
        on_sent = self.faults.on_sent if self.faulty else None
        for dst, msg in sends:
            send(now, node, dst, msg)
            if on_sent is not None:
                on_sent(now, node, msg)
        tx = self.tx
        mover = self.mover
        members = self.membership
        for reply in replies:
            if mover is not None and mover.owns(reply.token):
                mover.on_reply(node, reply)
            elif members is not None and members.owns(reply.token):
                members.on_reply(node, reply)
            elif tx is not None and tx.owns(reply.token):
                tx.on_reply(node, reply)
            else:
                self.workload.on_reply(now, node, reply)

    def _sync(self, node: str) -> None:
        """Complete ``node``'s syncs due by now, then release what they held."""
        done = self.disks[node].complete(self.now)
        if done:
            self.checker.on_durable(node, done)
            self._promote_checkpoint(node)
        if self.held_out[node]:
            self._release(node)

    def _release(self, node: str) -> None:
        held = self.held_out[node]
        durable = len(self.disks[node].durable)
        while held and held[0][0] <= durable:
            _, sends, replies = held.popleft()
            self._effects(node, sends, replies)
            if self.cores[node] is None:
                return  # a fault hook (on_sent) crashed it

    def _promote_checkpoint(self, node: str) -> None:
        pending = self.ckpt_pending[node]
        disk = self.disks[node]
        if pending is not None and pending[1] <= len(disk.durable):
            self.ckpt[node] = pending
            self.ckpt_pending[node] = None
            named = {}
            for raw in msgpack.unpackb(pending[0]):
                r = rec.decode(raw)
                if r[0] == rec.SNAPFILE:
                    named[r[1]] = r[2]
            disk.prune_snapshots(named)

    def _check_checkpoint(
        self, node: str, records: list[bytes], snaps: dict[Any, StoredSnapshot]
    ) -> None:
        """The node's last checkpoint plus the records after it must recover what
        all its records do (issue 7.4), from the same snapshot files."""
        ck = self.ckpt[node]
        if ck is None:
            return
        blob, mark = ck
        why = disagreement(node, self.start_groups(node), self.cfg.paxos, records, blob,
                           records[mark:], snaps, metadata=self.metadata)
        if why is not None:
            raise SafetyViolation(f"checkpoint and recovery disagree: {why}")

    def _finish_restores(self, node: str) -> None:
        """Decode the peers' snapshots handed out so far and give them back."""
        core = self.cores[node]
        jobs, self.restore_jobs[node] = self.restore_jobs[node], []
        for job in jobs:
            try:
                sm = job.restore(job.blob)
            except ValueError:
                sm = None
            core.snapshot_restored(job.group, job.index, sm)
            self.trace(self.now, node, "restored", f"group={job.group} index={job.index}")

    def _advance_snapshots(self, node: str, budget: int | None) -> None:
        """Encode each pending snapshot one piece further (``None``: to the end);
        hand finished ones back to the core, as the runtime driver does."""
        core = self.cores[node]
        keep = []
        for job in self.snap_jobs[node]:
            snap = step_snapshot(job, budget)
            if snap is None:
                keep.append(job)
                continue
            self.disks[node].write_snapshot(job.group, snap)
            core.snapshot_ready(job.group, job.index, snap.blob, snap.crc)
            self.trace(self.now, node, "snapshot", f"group={job.group} index={job.index}")
        self.snap_jobs[node] = keep

    def run_tick(self, faulty: bool) -> None:
        self.now += 1
        now = self.now
        self.faulty = faulty
        if faulty:
            self.faults.act(now)
        inbox: dict[str, list] = {}
        for src, dst, msg in self.net.due(now):
            inbox.setdefault(dst, []).append((src, msg))
        for n in self.node_ids:
            self.clock[n] += self.clock_rate[n]
            core = self.cores[n]
            if core is None:
                continue
            if self.paused_until.get(n, 0) > now:
                self.held[n].extend(inbox.get(n, ()))
                continue
            if self.disks[n].syncs:
                self._sync(n)
                if self.cores[n] is None:
                    continue
            # The clock first: a node reads the time before it handles what arrived
            # (after a pause, every tick it missed at once), as the runtime's driver does.
            due = int(self.clock[n]) - self.ticks_given[n]
            if due > 0:
                self.ticks_given[n] += due
                core.tick(due)
            arrived = inbox.get(n, [])
            if self.held[n]:
                arrived = self.held[n] + arrived
                self.held[n] = []
            if arrived and n not in self.admitted and not self._admit(n):
                continue  # a link checks both ends' hellos before it carries anything
            for src, msg in arrived:
                if src not in self.admitted and not self._admit(src):
                    continue
                t = type(msg)
                if (t is Accepted or t is Promise) and msg.ok:
                    self._saw_vote(src, msg)
                if t in TX_MESSAGES:
                    self.tx.on_message(n, src, msg)
                    continue
                core.step(src, msg)
                if self.cores[n] is None:
                    break  # n itself was just refused
            if self.cores[n] is None:
                continue
            if self.restore_jobs[n]:
                self._finish_restores(n)
            if self.snap_jobs[n]:
                self._advance_snapshots(n, self.cfg.snapshot_entries_per_tick or None)
        self.workload.on_tick(now)
        if self.tx is not None:
            self.tx.on_tick(now, faulty)
        if self.membership is not None:
            self.membership.on_tick(now)
        if self.mover is not None or self.membership is not None:
            if self.mover is not None:
                self.mover.on_tick(now)
            for g in self.groups:
                conf = self.checker.conf(g)
                self.groups[g] = conf.voters + conf.learners
        for n in self.node_ids:
            if self.serving(n):
                self._drain(n)
        if self.ring is not None and self.membership is None:
            self._check_placement()

    def _check_placement(self) -> None:
        """Every running core hosts exactly the partitions the ring places on its node,
        each with the ring's replicas in the ring's order."""
        for n in self.node_ids:
            core = self.cores[n]
            if core is not None:
                why = misplaced(n, core, self.ring, self.metadata)
                if why is not None:
                    raise SafetyViolation(f"ring: {why}")

    def serving(self, node: str) -> bool:
        """Up and not paused: takes input and produces output."""
        return self.up[node] and self.paused_until.get(node, 0) <= self.now

    def pause(self, node: str, ticks: int) -> None:
        self.paused_until[node] = self.now + ticks
        self.trace(self.now, node, "pause", f"{ticks} ticks")

    def _admit(self, src: str) -> bool:
        """The receiving side of a hello: may ``src`` take part? A refused node
        exits (it stays down for the rest of the run)."""
        if self.cores[src] is None:
            return False  # crashed since it sent: its messages die with the connection
        p = self.presented[src]
        why = self.pins.check(src, p) if self.cfg.identity_gate else None
        if why is not None:
            self.trace(self.now, src, "refused", why[:60])
            self.crash(src, mid_ready=False)
            self.retired.add(src)
            return False
        self.pins.admit(src, p.incarnation)
        self.admitted.add(src)
        return True

    def _saw_vote(self, src: str, msg) -> None:
        core = self.cores[src]
        if ((self.mover is not None or self.membership is not None)
                and (core is None or msg.group not in core.groups)):
            return  # a vote of a replica dropped since it was sent: nothing to pin
        g = str(msg.group)
        if type(msg) is Accepted:
            top = max(msg.slots) if msg.slots else 0
        else:
            top = msg.accepted[-1][0] if msg.accepted else 0
        self.pins.saw(src, g, top, msg.promised)
        self.checker.on_vote_delivered(src, g, top, msg.promised)

    def amnesia(self, node: str, wipe: bool, rng: random.Random) -> None:
        """Crash ``node`` and give it back an empty data directory (a new
        incarnation) or an old copy of its own (a prefix of its durable records).

        Only for a node its peers have met (pinned). An old copy that lost
        nothing any peer saw it vote cannot be told from the real thing (nor,
        in general, made safe: Paxos counts votes nobody observed), so such a
        draw becomes a wipe; docs/OPERATIONS.md says never to restore an
        acceptor from a backup."""
        self.crash(node, mid_ready=False)
        self.lost.add(node)
        disk = self.disks[node]
        how = "wiped"
        if not wipe and disk.durable:
            keep = rng.randint(0, len(disk.durable) - 1)
            probe = self.new_core(node, random.Random(0), real=False)
            copy = disk.copy()
            copy.roll_back(keep)
            probe.recover(copy.durable, copy.newest_snapshots())
            log_end, promised = probe.durable_summary()
            if self.pins.check(node, Presented(self.incarnation[node], log_end, promised,
                                               probe.conf_epochs())):
                disk.roll_back(keep)
                how = f"rolled back to {keep} records"
        self.ckpt[node] = None  # the data directory's checkpoint went with it
        if how == "wiped":
            self.disks[node] = SimDisk()
            self.incarnation[node] = f"{node}.{self.next_event()}"
        self.trace(self.now, node, "amnesia", how)

    def heal(self) -> None:
        for n in self.node_ids:
            if not self.up[n] and n not in self.retired:
                self.restart(n)
        self.paused_until.clear()
        self.net.heal()
        self.net.loss = 0.0
        self.net.dup = 0.0
        self.trace(self.now, "-", "heal-all")

    def fault_budget(self) -> list[tuple[tuple[str, ...], int]]:
        """Sets of nodes the fault model counts, each with how many of them may be down
        or lost at once: per group, its members and a minority of them. When replica
        sets change, per group and per configuration still in use (from the oldest one
        a running replica has applied to the last chosen one: a majority of each may be
        needed to finish what follows it), its voters and learners (a learner may be
        promoted) and a minority of its voters."""
        if self.mover is None and self.membership is None:
            return [(m, (len(m) - 1) // 2) for m in self.groups.values()]
        out = []
        for g in self.groups:
            history = self.checker.confs[g]
            oldest = min((self.cores[n].group_conf(g).epoch for n in self.node_ids
                          if self.cores[n] is not None and g in self.cores[n].groups),
                         default=history[-1][1].epoch)
            for _slot, conf in history:
                if conf.epoch < oldest:
                    continue
                # a member that dropped the group is as good as lost to this configuration
                gone = tuple(m for m in conf.voters + conf.learners
                             if self.cores[m] is not None and g not in self.cores[m].groups
                             and conf is not history[-1][1])
                members = conf.voters + conf.learners
                out.append((members, (len(conf.voters) - 1) // 2 - len(gone)))
        asked = self.mover.asked() if self.mover is not None else self.membership.asked()
        for conf in asked:
            out.append((conf.voters + conf.learners, (len(conf.voters) - 1) // 2))
        return out

    def live_members(self, g: Any) -> list[str]:
        return [m for m in self.groups[g] if m not in self.retired]

    def _leads(self, node: str, g: Any) -> bool:
        core = self.cores[node]
        return g in core.groups and core.is_leader(g)

    def leaderless_groups(self) -> list:
        return [g for g in self.groups if not any(self._leads(m, g) for m in self.live_members(g))]

    def unhosted(self) -> dict[str, list]:
        """Partitioned: per live node, the partitions the ring places on it that its
        core does not host (yet)."""
        if self.ring is None or self.membership is not None:
            return {}  # (membership changes: ``Membership.misplaced`` instead)
        live = {n: self.cores[n] for n in self.node_ids if n not in self.retired}
        return unhosted(live, self.ring)

    def converged(self) -> bool:
        if not self.workload.idle():
            return False
        if self.tx is not None and self.tx.unsettled():
            return False
        if self.unhosted():
            return False
        if self.mover is not None and self.mover.misplaced():
            return False
        if self.membership is not None and self.membership.misplaced():
            return False
        for g in self.groups:
            cores = [self.cores[m] for m in self.live_members(g)]
            if not any(c.is_leader(g) for c in cores):
                return False
            if len({c.applied_index(g) for c in cores}) != 1:
                return False
        return True

    # ------------------------------------------------------------ a whole run
    def run(self) -> RunResult:
        t0 = time.perf_counter()
        cfg = self.cfg
        res = RunResult(self.seed, False, 0)
        try:
            for _ in range(cfg.fault_ticks):
                self.run_tick(faulty=True)
            self.heal()
            self.workload.issuing = False
            if self.tx is not None:
                self.tx.bank.issuing = False
            if self.mover is not None:
                self.mover.issuing = False
            if self.membership is not None:
                self.membership.issuing = False
            stage = "drain"
            healed_at = self.now
            deadline = self.now + cfg.heal_ticks_max
            leaders_by = self.now + cfg.leader_after_heal_ticks_max
            while True:
                self.run_tick(faulty=False)
                if leaders_by and self.now >= leaders_by:
                    gaps = self.unhosted()
                    if gaps:
                        raise SafetyViolation(
                            f"ring: live replicas do not host their partitions {gaps} "
                            f"{cfg.leader_after_heal_ticks_max} ticks after the heal at {healed_at}"
                        )
                    missing = self.leaderless_groups()
                    late = self.membership.changed_at(missing) if self.membership is not None else 0
                    if missing and late + cfg.leader_after_heal_ticks_max > self.now:
                        # moves go on after the heal, and a change of voters may start an
                        # election (rule R4): the same time to elect, from that change
                        leaders_by = late + cfg.leader_after_heal_ticks_max
                        continue
                    if missing:
                        raise SafetyViolation(
                            f"liveness: no leader in group(s) {missing} within "
                            f"{cfg.leader_after_heal_ticks_max} ticks of the heal at {healed_at}"
                            f" ({self.net.oversized} oversized messages dropped)"
                        )
                    leaders_by = 0
                if self.converged():
                    if stage == "final":
                        break
                    stage = "final"
                    self.workload.start_final_reads()
                    if self.tx is not None:
                        self.tx.bank.start_final()
                if self.now >= deadline:
                    if self.membership is not None and self.workload.idle():
                        wrong = self.membership.misplaced()
                        if wrong:
                            raise SafetyViolation(
                                f"membership: not converged {cfg.heal_ticks_max} ticks after "
                                f"the heal at {healed_at}: " + "; ".join(wrong[:8]))
                    why = self.tx.unsettled() if self.tx is not None else ""
                    raise SafetyViolation(f"no convergence within {cfg.heal_ticks_max} heal ticks"
                                          + (f" (2PC not settled: {why})" if why else ""))
            self._final_checks(res)
            res.ok = True
        except (SafetyViolation, InvariantBroken) as e:
            res.error = f"{type(e).__name__}: {e}"
        res.ticks = self.now
        ops = self.workload.ops
        res.ops = len(ops)
        res.ops_ok = sum(1 for o in ops if o.outcome == "ok")
        res.ops_indeterminate = sum(1 for o in ops if o.outcome == "indeterminate")
        res.messages = self.net.sent
        if self.tx is not None:
            res.stats = self.tx.stats()
        res.wall_s = time.perf_counter() - t0
        if not res.ok:
            res.trace_tail = self.trace.tail()
        return res

    def _final_checks(self, res: RunResult) -> None:
        ck = self.checker
        ck.check_learned_were_chosen()
        if self.mover is not None:
            ck.recount()
            wrong = self.mover.misplaced()
            if wrong:
                raise SafetyViolation("replica sets: " + "; ".join(wrong))
            res.stats = {f"conf_{k}": v for k, v in self.mover.steps.items()}
        if self.membership is not None:
            ck.recount()
            wrong = self.membership.misplaced()
            if wrong:
                raise SafetyViolation("membership: " + "; ".join(wrong[:8]))
            res.stats = self.membership.stats()
        for g in self.groups:
            states = set()
            for m in self.live_members(g):
                sm = self.cores[m].state_machine(g)
                last = repr(sm.dedup_state())
                states.add((sm.kv.revision, tuple(sorted(sm.kv.items())), last))
            if len(states) != 1:
                raise SafetyViolation(f"group {g}: replicas converged to different states")
            revision, items, _ = states.pop()
            if (revision, list(items)) != ck.exactly_once_state(g):
                raise SafetyViolation(f"group {g}: a request id took effect twice or never")
        applied = ck.applied_request_ids()
        for op in self.workload.acknowledged_writes():
            if (op.client, op.seq) not in applied:
                raise SafetyViolation(f"acknowledged write lost: {op.describe()}")
        lin = check_history(self.workload.history(), budget=self.cfg.check_budget)
        if lin.ok is False:
            ops = [o for o in self.workload.ops if o.key == lin.key and o.kind != "sget"]
            lines = "\n".join("  " + o.describe() for o in ops)
            raise SafetyViolation(f"history not linearizable for key {lin.key!r}:\n{lines}")
        res.lin_inconclusive = lin.ok is None
        if self.tx is not None:
            self._check_bank()

    def _check_bank(self) -> None:
        """The bank's checks (``sim/txns.py``) on every partition's replayed log and
        the converged replicas' accounts."""
        bank = self.tx.bank
        histories: dict[bytes, dict[bytes, int]] = {}
        final: dict[bytes, bytes | None] = {}
        for g in sorted({bank.pid(k) for k in bank.accounts}):
            mine = frozenset(k for k in bank.accounts if bank.pid(k) == g)
            _kv, values = self.checker.replay(g, mine)
            sm = self.cores[self.live_members(g)[0]].state_machine(g)
            for k in mine:
                histories[k] = {parse(v)[1]: ver for v, ver in values[k].items()}
                final[k] = sm.kv.get(k)[0]
        why = bank.check(histories, final)
        if why is not None:
            raise SafetyViolation(why)
