"""The sole owner of a node's cores: inputs in, ``Ready`` out, effects carried out in order.

Everything here runs on the event loop thread. Client connections call
:meth:`Driver.submit`, the peer transport calls :meth:`Driver.on_peer_messages`,
the ticker calls the core's ``tick``; once per loop turn :meth:`Driver._flush`
drains the core's ``Ready``:

1. log records are appended to the WAL;
2. messages and replies wait until the WAL is durable up to the last record
   appended before them (effects.py contract), then go out in order;
3. requested snapshots are encoded a piece per loop turn
   (``SNAPSHOT_ENTRIES_PER_STEP``), written to the group's own snapshot file
   off the loop (``runtime/snapshots.py``), then handed back via
   ``snapshot_ready``, which records the file in the WAL;
4. a snapshot received from a peer is decoded into a fresh state machine on a
   worker thread (``SnapshotRestore``), then installed via ``snapshot_restored``.

Checkpoints (every ``checkpoint_every_records`` WAL records) write the core's
checkpoint, which names the snapshot files instead of holding them, as the
WAL's snapshot: captured at once (``checkpoint_writer``), encoded a piece per
loop turn, written off the loop; once it is durable, older segments and older
snapshot files go.

A single flusher task runs the fsyncs: while one fsync is in flight, later
batches accumulate and share the next one (group commit).

Routing (``dsnode.core.router.Router`` decides, the driver carries it out): a
request's key picks its partition on the metadata group's ring; it is proposed
here when this node leads that partition, forwarded to the leader over the peer
connection when another node does, and parked until the deadline while no
leader is known (or before the ring is). ``stale`` reads go to the replica with
the fewest requests in flight from this node, this node's own included. A
``txn`` whose keys span partitions goes to this node's two-phase-commit
coordinator (``core.twopc``), or, when this node is loaded, to a less busy
node's; the commands it (and the recovery duties of the partitions this node
leads) asks for are routed like writes (``TxnSubmit``). A command that meets a
prepared transaction's lock (``locked``) is routed again on the next tick
until its deadline. Leaders of
partitions this node does not host come from their leaders' reports
(``LEADS``, ``core.router.leaders``), sent when the set a node leads changes
and once a second.

A write with a request id (``Pending.dedup``, PROTOCOL.md "Client request ids")
is re-sent, marked as a retry, when its attempt ends without a known outcome
because the leader changed: an indeterminate ``unavailable`` from the proposer
(local or forwarded), or a new leader while its forward to the old one is
unanswered. The state machine applies it at most once, so the client gets its
result instead of ``indeterminate``, as long as the deadline allows. Writes
without an id keep the old answers.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import random
import signal
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from dsnode.core import commands
from dsnode.core.commands import STALE, Command, Get, Txn
from dsnode.core.effects import Reply
from dsnode.core.errors import PeerMisbehaved
from dsnode.core.membership import members as mem
from dsnode.core.membership.detector import ALIVE, DetectorConfig, FailureDetector
from dsnode.core.membership.mover import Mover, MoveToken
from dsnode.core.paxos.messages import Accepted, Promise, from_wire, to_wire
from dsnode.core.paxos.roles import Role
from dsnode.core.ring import Ring
from dsnode.core.router import Forward, Local, OpKind, Overloaded, Router
from dsnode.core.router.leaders import LeaderHints, decode_led, encode_led
from dsnode.core.twopc import records as txrec
from dsnode.core.twopc.coordinator import Coordinator, Submit, TwoPCConfig
from dsnode.core.twopc.recovery import Recovery
from dsnode.runtime.logs import get_logger
from dsnode.wire.errors import CONFLICT, OVERLOADED, TIMEOUT, UNAVAILABLE

if TYPE_CHECKING:
    from dsnode.core.paxos.checkpoint import CheckpointWriter
    from dsnode.core.paxos.node import PaxosNode
    from dsnode.core.paxos.outputs import SnapshotRestore, SnapshotWanted
    from dsnode.runtime.peers import PeerNetwork
    from dsnode.runtime.snapshots import SnapshotStore
    from dsnode.runtime.wal import WriteAheadLog

log = get_logger("dsnode.driver")

META = "meta"  # the metadata group: members, P, R and the ring epoch (core.paxos.metadata)

# Runtime-level peer messages (the Paxos core's own are tagged "px.*").
# [FWD, fwd_id, group, encoded command, timeout_ms] or, for a write with a request id,
# [FWD, fwd_id, group, encoded command, timeout_ms, [client_id, seq(, retry)]]
FWD = "fwd"
FWD_REPLY = "fwdr"  # [FWD_REPLY, fwd_id, result | None, [code, message, indeterminate] | None]
# [HEARTBEAT]: membership liveness from nodes that predate the core's px.node_hb (one per
# node pair per heartbeat interval, sent by the Paxos core); still accepted, no longer sent
HEARTBEAT = "hb"
PINS = "pins"  # [PINS, table]: the sender's member pins (core.membership.incarnations)
# [LEADS, [[pid, round, node], ...]]: the partitions the sender leads, with their ballots
LEADS = "leads"
LEADS_REFRESH_S = 1.0  # a node's report goes out at least this often (and on every change)
NOT_LEADER = "not leader"  # a forward's definite answer: route it again
# A command that met a key locked by a prepared cross-partition transaction (the state
# machine's definite ``locked``, never shown to a client): sent again on the next tick
LOCKED = "locked"
# the recovery duties of the partitions this node leads run every this many ticks
TXN_RECOVERY_SCAN_TICKS = 10
# [FWD, fwd_id, COORDINATE, encoded txn, timeout_ms(, request id)]: a loaded node hands
# a cross-partition txn to a less busy one, which coordinates it (Router.coordinator)
COORDINATE = -1

# KV entries of a requested snapshot encoded per event-loop turn: about 1 ms of
# msgpack for 100-byte values, so a snapshot never stalls the loop as a whole.
SNAPSHOT_ENTRIES_PER_STEP = 1024
# ... and at most about this many bytes of them (large values: fewer entries).
SNAPSHOT_BYTES_PER_STEP = 1 << 20
# Records of a checkpoint (accepted values of the log window) encoded per loop turn,
# and about at most this many bytes of them (each value is copied twice: a few ms).
CHECKPOINT_RECORDS_PER_STEP = 1024
CHECKPOINT_BYTES_PER_STEP = 256 << 10
# Encoded pieces handed to the snapshot file's thread and not yet written, at most.
SNAPSHOT_WRITES_QUEUED_MAX = 16
# Disk and memory bounds (issue 14). Memory: once the chosen values held above the
# snapshots (``PaxosNode.log_bytes``: in memory, and in the WAL until a checkpoint)
# reach SNAPSHOT_LOG_RATIO of the snapshots' size over all groups (at least
# SNAPSHOT_LOG_BYTES_MIN), the node "trims": it snapshots the group holding the most
# log, one at a time, until they are down to half of that, then checkpoints. Disk:
# once the WAL grew by snapshot_wal_ratio of the snapshots' size (at least
# SNAPSHOT_WAL_BYTES_MIN) since the last checkpoint, it trims down to a tenth of the
# snapshots' size, then checkpoints (which removes the covered segments and older
# snapshot files), as it does once the snapshot files replaced since the last one add
# up to the same fraction (each stays until a checkpoint names its successor). One
# checkpoint per trim, not per snapshot: a checkpoint copies the whole log window, and
# with many partitions a snapshot frees only one group's part.
SNAPSHOT_WAL_RATIO = 0.25
SNAPSHOT_WAL_BYTES_MIN = 8 << 20
SNAPSHOT_LOG_RATIO = 0.1
SNAPSHOT_LOG_BYTES_MIN = 16 << 20


class Pending:
    """One client request in flight. ``done`` guards against answering twice."""

    __slots__ = ("conn", "rid", "write", "done", "cmd", "deadline", "sent", "fwd_id", "fwd_to",
                 "bucket", "dedup", "parked", "locked")

    def __init__(self, conn: Any, rid: int, write: bool) -> None:
        self.conn = conn
        self.rid = rid
        self.write = write
        self.done = False
        self.cmd: Command | None = None
        self.deadline = 0
        # True once the command may have reached a proposer (so a failure is indeterminate)
        self.sent = False
        self.fwd_id = 0
        self.fwd_to: str | None = None  # the leader it was forwarded to
        self.bucket: dict | None = None  # its timer-wheel slot, left as soon as it is answered
        # a write's request id, [client_id, seq] or [client_id, seq, True] once re-sent
        self.dedup: list | None = None
        self.parked = False  # waiting in the driver's list to be routed again
        self.locked = False  # last refused by a transaction's lock (it waits, sent again)

    def finish(self) -> None:
        """Answered: drop out of the timer wheel so nothing keeps it (or its value) alive."""
        self.done = True
        self.cmd = None
        if self.bucket is not None:
            self.bucket.pop(self, None)
            self.bucket = None


class TxnSubmit(Pending):
    """A two-phase-commit command this node's coordinator or recovery asked for (a
    ``Submit``): routed to its partition's leader like a client's write; its answer
    goes back to ``owner.on_result(handle, ...)``, not to a connection."""

    __slots__ = ("owner", "handle", "pid", "rearmed")

    def __init__(self, owner: Coordinator | Recovery, s: Submit) -> None:
        super().__init__(None, 0, True)
        self.rearmed = False  # its deadline was pushed back once (a local proposal)
        self.owner = owner
        self.handle = s.handle
        self.pid = s.pid
        self.dedup = s.rid


class MetaSubmit(Pending):
    """A metadata command this node's replica mover asked for (``GroupMoved``): routed to
    the metadata group's leader like a client's request; its answer goes nowhere (the
    mover looks at the member table again)."""

    __slots__ = ("future",)

    def __init__(self, future: asyncio.Future | None = None) -> None:
        super().__init__(None, 0, True)
        self.future = future  # (result, error) for ``submit_internal``


class Forwarded:
    """A request another node forwarded to us; its answer goes back over the peer link."""

    __slots__ = ("origin", "fwd_id", "write", "done")

    def __init__(self, origin: str, fwd_id: int, write: bool) -> None:
        self.origin = origin
        self.fwd_id = fwd_id
        self.write = write
        self.done = False


Deliver = Callable[[list[Reply]], None]


class DriverObserver(Protocol):
    """What the driver tells the metrics (``NodeMetrics``) about."""

    def on_tick(self, core: PaxosNode) -> None: ...

    def on_snapshot(self, kind: str, seconds: float, size: int) -> None: ...


class Driver:
    def __init__(
        self,
        core: PaxosNode,
        wal: WriteAheadLog,
        deliver: Deliver,
        net: PeerNetwork | None,
        *,
        node_id: str,
        tick_seconds: float,
        checkpoint_every_records: int,
        snapshots: SnapshotStore | None = None,
        snapshot_wal_ratio: float = SNAPSHOT_WAL_RATIO,
        inflight_max: int = 1 << 30,
        rng: random.Random | None = None,
        twopc: TwoPCConfig | None = None,
        detector: DetectorConfig | None = None,
        moves_max: int = 4,
        auto_remove_dead_ticks: int = 0,
    ) -> None:
        self.core = core
        # the replica mover (core.membership.mover): with replica-set changes on, it moves
        # the groups this node leads toward the newest ring when membership changed
        meta = getattr(core, "metadata", None)
        self.mover: Mover | None = None
        if meta is not None and core.config.reconfig:
            self.mover = Mover(core, moves_max=moves_max,
                               answer_ticks=4 * core.config.election_timeout_ticks,
                               every_ticks=max(1, core.config.heartbeat_interval_ticks // 2))
        self._conf_changes_seen = 0
        self._auto_remove_ticks = auto_remove_dead_ticks  # 0: never
        self._auto_removed_at: dict[str, int] = {}  # member -> tick its removal was asked
        self._auto_remove_check = 0
        self.dropped_groups: set[Any] = set()  # retired and dropped: files go at a checkpoint
        # told of every group this node dropped (the metadata group: it left the cluster)
        self.on_retired: Callable[[Any], None] | None = None
        # peers' liveness as alive / suspect / dead (core.membership.detector); the router
        # avoids suspects for stale reads and as coordinators
        self.detector = FailureDetector(detector)
        self.peer_states: dict[str, str] = {}
        self._inflight_max = inflight_max
        self._rng = rng or random.Random(0)
        self.router: Router | None = None  # built once the ring is known
        self.hints = LeaderHints()  # leaders of partitions not hosted here
        self._led: tuple = ()  # the (pid, ballot)s last reported in LEADS
        self._role_changes: int | None = -1  # the core's count when `_led` was computed
        self._ticker_wake = asyncio.Event()
        self._ticker_sleeping = False
        self._leads_sent_at = -1e9
        self.wal = wal
        # where state-machine snapshots go; None keeps them in memory only (tests)
        self.snapshots = snapshots
        self._snapshot_wal_ratio = snapshot_wal_ratio
        self.net = net
        self.node_id = node_id
        self._deliver = deliver
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._waiting: collections.deque[tuple[int, list, list[Reply]]] = collections.deque()
        self._kick = asyncio.Event()
        self._tick_seconds = tick_seconds
        # ticks of the monotonic clock since run() started it, all given to the core;
        # ``_ticked``: the last tick whose driver duties (deadlines, heartbeats) are done
        self.tick_count = 0
        self._ticked = 0
        self._clock_start: float | None = None
        # timer wheel: tick -> requests (as dict keys, for O(1) removal) due at that tick
        self._deadlines: dict[int, dict[Pending, None]] = collections.defaultdict(dict)
        self._parked: list[Pending] = []
        self._forwarded: dict[int, Pending] = {}
        self._fwd_ids = itertools.count(1)
        self._checkpoint_every = checkpoint_every_records
        self._records_since_checkpoint = 0
        self._checkpoint_task: asyncio.Task | None = None
        self.stopped = asyncio.Event()
        self._fatal: BaseException | None = None
        self._last_leader: str | None = None
        self.heard: dict[str, int] = {}  # peer -> tick we last heard from it
        self.peer_acked: dict[str, int] = {}  # peer -> highest slot it accepted from us
        # (peer, group) -> [highest slot it said it accepted, highest ballot it promised]:
        # durable at the peer before it answered; pinned by the node (issue 15)
        self.peer_seen: dict[tuple[str, Any], list] = {}
        self.peer_seen_changed: set[tuple[str, Any]] = set()  # raised since the node looked
        self.on_pins: Callable[[str, object], None] | None = None
        self.counters: collections.Counter = collections.Counter()
        # stale reads by the replica the router sent them to (None: parked)
        self.stale_reads_to: collections.Counter = collections.Counter()
        # cross-partition transactions (core.twopc): the ones this node coordinates, and
        # the recovery duties of the partitions it leads. Txids draw on the OS's entropy:
        # they must differ from any a previous run of this node gave out.
        self.twopc = twopc or TwoPCConfig()
        self.coordinator = Coordinator(node_id, random.Random(), self.twopc, self.ring)
        self.recovery = Recovery(self.twopc)
        self._txn_scan_at = 0
        # test-only fault point (tests/cluster): "before_decide" kills this process when
        # its coordinator is about to ask a home partition to commit
        self._txn_fault = os.environ.get("DSNODE_TEST_TXN_FAULT", "")
        # metrics (dsnode/runtime/metrics.py): commands proposed per group, and an observer
        # told about ticks and finished snapshots
        self.proposals: collections.Counter = collections.Counter()
        self.observer: DriverObserver | None = None
        self._snapshot_started: dict[tuple[Any, int], float] = {}
        self._snapshot_tasks: set[asyncio.Task] = set()
        self._snapshot_turn = asyncio.Lock()  # held while a snapshot is being encoded
        self._wal_bytes_at_checkpoint = wal.stats["bytes"] if hasattr(wal, "stats") else 0
        self._trim_to: float | None = None  # trimming the log down to this many bytes
        self._checkpoint_due = False  # a trim ended: checkpoint next
        self.snapshot_sizes: dict[Any, int] = {}  # group -> bytes of its last stored snapshot
        self.snapshot_bytes = 0  # their sum
        self._stored_bytes_since_checkpoint = 0  # snapshot files stored since (to let go)
        self.last_snapshot: dict[str, float] = {}  # seconds and bytes of the last one

    # ------------------------------------------------------------ client input
    def submit(self, pending: Pending, cmd: Command, timeout_s: float) -> None:
        self._advance_clock()
        self._wake_ticker()
        pending.cmd = cmd
        self._arm(pending, self.tick_count + max(1, int(timeout_s / self._tick_seconds) + 1))
        self._dispatch(pending)
        self._schedule_flush()

    def submit_internal(self, cmd: Command, timeout_s: float) -> asyncio.Future:
        """Propose a membership command for this node itself (``--leave-on-stop``);
        the future gets (result, error)."""
        fut = self._loop.create_future()
        self.submit(MetaSubmit(fut), cmd, timeout_s)
        return fut

    # ------------------------------------------------------------ routing
    def ring(self) -> Ring | None:
        """The ring requests are routed by: the metadata group's (None until it is
        known). A core without a metadata group hosts one group, 0, holding every
        key: a ring of one partition over its members."""
        core = self.core
        if getattr(core, "metadata", None) is None:
            router = self.router
            if router is None:
                return Ring(core.groups[0].members, 1, len(core.groups[0].members))
            return router.ring  # type: ignore[return-value]
        return core.ring

    def _router(self) -> Router | None:
        router = self.router
        ring = self.ring()
        if ring is None:
            return None
        if router is None or router.ring is not ring:
            if router is not None and router.ring.placement() == ring.placement():
                router.ring = ring  # same placement (a new epoch only): keep what is counted
                return router
            router = self.router = Router(self.node_id, ring, self._rng, self._inflight_max)
            router.suspects = frozenset(p for p, st in self.peer_states.items() if st != ALIVE)
            self._sync_leaders()
        return router

    def _dispatch(self, p: Pending) -> None:
        cmd = p.cmd
        assert cmd is not None
        router = self._router()
        counters = self.counters
        if router is None:
            counters["route_park"] += 1
            self._park(p)  # no ring yet (a new cluster forming): routed on a tick
            return
        t = type(cmd)
        if t in mem.TYPES:
            self._dispatch_meta(p)
            return
        ring = router.ring
        if t is Txn:
            keys = commands.keys_of(cmd)
            pids = {ring.partition_of(k) for k in keys}
            if len(pids) > 1:
                self._coordinate(p, cmd)  # type: ignore[arg-type]
                return
            pid = pids.pop() if pids else ring.partition_of(b"")
        elif t in txrec.TYPES:
            pid = txrec.partition_of(cmd)  # type: ignore[arg-type]
        else:
            pid = ring.partition_of(cmd.key)  # type: ignore[union-attr]
        if t is Get:
            kind = OpKind.STALE if cmd.consistency == STALE else OpKind.READ  # type: ignore[union-attr]
        else:
            kind = OpKind.WRITE
        if kind is not OpKind.STALE:
            self._refresh_leader(router, pid)
        d = router.route_partition(p, pid, kind)
        dt = type(d)
        if kind is OpKind.STALE and dt is not Overloaded:
            self.stale_reads_to[self.node_id if dt is Local else getattr(d, "node", None)] += 1
        core = self.core
        if dt is Local:
            pid = d.partition
            if kind is OpKind.STALE:
                counters["route_stale_local"] += 1
                core.read(pid, p, cmd)
                return
            counters["route_local"] += 1
            p.sent = True
            if t is Get:
                core.read(pid, p, cmd)
            else:
                self.proposals[pid] += 1
                core.propose(pid, p, cmd, p.dedup)
        elif dt is Forward:
            if self.net is None or not self.net.connected(d.node):
                if d.partition not in core.groups:  # a report from a node we cannot reach
                    self.hints.lost(d.node)
                counters["route_park"] += 1
                self._park(p)
                return
            counters["route_forward"] += 1
            self._forward(p, d.node, d.partition, cmd)
        elif dt is Overloaded:
            counters["route_overloaded"] += 1
            self._deliver_local([Reply(p, error=(
                OVERLOADED, f"{d.inflight} requests in flight on this node; retry later", False))])
        else:  # Park: no leader known; on_leader_change hands it back
            counters["route_park"] += 1

    def _dispatch_meta(self, p: Pending) -> None:
        """A membership command: proposed in the metadata group by its leader (here, or
        forwarded to it); parked while no leader is known or reachable."""
        core = self.core
        meta = core.metadata
        if meta in core.groups and core.is_leader(meta):
            self.counters["route_local"] += 1
            p.sent = True
            core.propose(meta, p, p.cmd, p.dedup)
            return
        leader = core.leader_of(meta) if meta in core.groups else None
        if leader is None or leader == self.node_id or self.net is None \
                or not self.net.connected(leader):
            self.counters["route_park"] += 1
            self._park(p)
            return
        self.counters["route_forward"] += 1
        self._forward(p, leader, meta, p.cmd)

    # ------------------------------------------------------------ transactions
    def _coordinate(self, p: Pending, txn: Txn) -> None:
        """A client's ``txn`` over several partitions: this node's coordinator takes it
        (and its deadline: it leaves the timer wheel, the coordinator answers), or, when
        this node is loaded, a less busy one (``Router.coordinator``)."""
        self.counters["txn_cross_partition"] += 1
        router, net = self.router, self.net
        if router is not None and net is not None and not p.fwd_to and not p.sent:
            target = router.coordinator([n for n in net.links if net.connected(n)])
            if target != self.node_id:
                self.counters["txn_coordinator_elsewhere"] += 1
                self._forward(p, target, COORDINATE, txn)
                return
        if p.bucket is not None:
            p.bucket.pop(p, None)
            p.bucket = None
        self.coordinator.begin(p, txn, int(time.time() * 1000), p.deadline, p.dedup)
        self._pump_twopc()

    def _pump_twopc(self) -> None:
        """Carry out what the coordinator and the recovery asked for: route each
        ``Submit`` to its partition's leader, answer clients."""
        submits, replies = self.coordinator.take()
        if self._txn_fault == "before_decide" and any(
                type(s.cmd) is txrec.TxCommit for s in submits):
            log.warning("test_fault_point", fault=self._txn_fault)
            os.kill(os.getpid(), signal.SIGKILL)
        if replies:
            local = []
            for r in replies:
                if type(r.token) is Forwarded:  # coordinated here for a loaded peer
                    self._reply_remote(r.token, r.result, r.error)
                else:
                    local.append(r)
            if local:
                self._deliver_local(local)
        for owner, batch in ((self.coordinator, submits), (self.recovery, self.recovery.take())):
            for s in batch:
                tp = TxnSubmit(owner, s)
                tp.cmd = s.cmd
                self._arm(tp, max(s.deadline, self.tick_count + 1))
                self.counters["txn_submits"] += 1
                self._dispatch(tp)
        if submits or replies:
            self._schedule_flush()

    def _txn_results(self, replies: list[Reply]) -> list[Reply]:
        """Hand the answers to two-phase-commit submissions back to their cores; the
        other replies are returned."""
        rest = []
        fed = False
        for r in replies:
            tp = r.token
            if type(tp) is TxnSubmit:
                if not tp.done:
                    tp.finish()
                    tp.owner.on_result(tp.handle, r.result, r.error)
                    fed = True
            elif type(tp) is MetaSubmit:
                tp.finish()
                if tp.future is not None and not tp.future.done():
                    tp.future.set_result((r.result, r.error))
                self.counters["move_reports_refused" if r.error else "move_reports"] += 1
            else:
                rest.append(r)
        if fed:
            self._pump_twopc()
        return rest

    def _txn_tick(self) -> None:
        if self.tick_count - self._txn_scan_at >= TXN_RECOVERY_SCAN_TICKS:
            self._txn_scan_at = self.tick_count
            meta = getattr(self.core, "metadata", None)
            led = {pid: g.sm.txns for pid, g in self.core.groups.items()
                   if pid != meta and g.role is Role.LEADER and g.sm.txns}
            if led or self.recovery.pending():
                self.recovery.scan(self.tick_count, led)
        if not self.coordinator.idle():
            self.coordinator.tick(self.tick_count)
        if self.coordinator.submits or self.coordinator.replies or self.recovery.submits:
            self._pump_twopc()

    def _update_peer_states(self) -> None:
        net = self.net
        if net is None:
            return
        states = self.detector.states(list(net.links), self.tick_count)
        if states != self.peer_states:
            changed = {p: s for p, s in states.items() if self.peer_states.get(p) != s}
            if self.peer_states:
                log.info("peer_state_changed", **changed)
            self.peer_states = states
            self.core.suspects = frozenset(p for p, s in states.items() if s != ALIVE)
            if self.router is not None:
                self.router.suspects = frozenset(p for p, s in states.items() if s != ALIVE)

    def _wait_for_lock(self, p: Pending) -> tuple[str, str, bool] | None:
        """``p`` met a key a prepared transaction locks: route it again on the next tick
        (it waits for the transaction's decision) while its deadline allows (None);
        past it, the answer it gets instead (``_deadline_error``)."""
        p.locked = True
        if p.done or p.deadline <= self.tick_count:
            return _deadline_error(p)
        if p.dedup is None:
            p.sent = False  # definitely not applied (a write without an id is sent once)
        p.fwd_id = 0
        p.fwd_to = None
        self.counters["route_locked"] += 1
        self._park(p)
        return None

    def _arm(self, p: Pending, deadline: int) -> None:
        """Put ``p`` in the timer wheel: answered by ``_expire`` at ``deadline``."""
        p.deadline = deadline
        bucket = self._deadlines[deadline]
        bucket[p] = None
        p.bucket = bucket

    def _forward(self, p: Pending, node: str, group: int, cmd: Any) -> None:
        """Send ``p`` to ``node`` over the peer link: to be proposed in ``group`` (or
        coordinated there: ``COORDINATE``); its answer comes back as a ``FWD_REPLY``."""
        assert self.net is not None
        fwd_id = next(self._fwd_ids)
        self._forwarded[fwd_id] = p
        p.sent = True
        p.fwd_id = fwd_id
        p.fwd_to = node
        timeout_ms = max(1, int((p.deadline - self.tick_count) * self._tick_seconds * 1000))
        m = [FWD, fwd_id, group, commands.encode(cmd), timeout_ms]
        if p.dedup is not None:
            m.append(p.dedup)
        self.net.send(node, m)

    def leader_of(self, pid: int) -> str | None:
        """``pid``'s leader as this node knows it: its own group's view for a partition
        it hosts, the leader's report for the others."""
        if pid in self.core.groups:
            return self.core.leader_of(pid)
        return self.hints.leader(pid)

    def _refresh_leader(self, router: Router, pid: int) -> None:
        """Bring the router's view of ``pid``'s leader up to date; send again what a
        change hands back."""
        leader = self.leader_of(pid)
        if router.leader(pid) != leader:
            for p in router.on_leader_change(pid, leader, _movable):
                self._redispatch(p)  # type: ignore[arg-type]

    def _sync_leaders(self) -> None:
        """Bring the router's view of every partition's leader up to date."""
        router = self.router
        if router is None:
            return
        for pid in range(router.ring.partitions):
            self._refresh_leader(router, pid)

    def _redispatch(self, p: Pending) -> None:
        """``p`` was handed back on a leader change: parked, or forwarded to a node
        that no longer leads (movable: a read, a write with a request id, or not
        proposed anywhere yet). Route it again (a forwarded write as a retry)."""
        if p.done:
            return
        if p.fwd_id:
            self._forwarded.pop(p.fwd_id, None)
            if p.write and p.sent:
                self._park_retry(p)
                return
            p.fwd_id = 0
            p.fwd_to = None
        self._park(p)

    def _park(self, p: Pending) -> None:
        """Hold ``p`` to be routed again on the next tick. A request is either counted
        by the router or parked here, never both, and parked at most once: routed
        twice, a write without a request id could be applied twice."""
        if self.router is not None:
            self.router.finish(p)
        if not p.parked:
            p.parked = True
            self._parked.append(p)

    def _deliver_local(self, replies: list[Reply]) -> None:
        """Answer this node's clients (and its two-phase-commit cores); their requests
        leave the router's count."""
        router = self.router
        internal = False
        for r in replies:
            if router is not None:
                router.finish(r.token)
            if type(r.token) is TxnSubmit or type(r.token) is MetaSubmit:
                internal = True
        if internal:
            replies = self._txn_results(replies)
        if replies:
            self._deliver(replies)

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    # ------------------------------------------------------------ peer input
    def on_peer_messages(self, peer: str, batch: list) -> None:
        try:
            self._on_peer_messages(peer, batch)
        except Exception as e:  # the transport then drops the connection: say why
            log.error("peer_messages_failed", peer=peer, error=repr(e), exc_info=True)
            raise

    def _on_peer_messages(self, peer: str, batch: list) -> None:
        self._advance_clock()
        self.heard[peer] = self.tick_count
        self.detector.heard(peer, self.tick_count)
        core = self.core
        for m in batch:
            if not isinstance(m, list) or not m:
                self.counters["malformed_peer_message"] += 1
                continue
            tag = m[0]
            if isinstance(tag, str) and tag.startswith("px."):
                try:
                    msg = from_wire(m)
                except PeerMisbehaved:
                    self.counters["malformed_peer_message"] += 1
                    continue
                t = type(msg)
                if (t is Accepted or t is Promise) and msg.ok:
                    self._saw(peer, msg)
                core.step(peer, msg)
            elif tag == FWD:
                self._on_forward(peer, m)
            elif tag == FWD_REPLY:
                self._on_forward_reply(m)
            elif tag == LEADS:
                self._on_leads(peer, m)
            elif tag == PINS and len(m) == 2:
                if self.on_pins is not None:
                    self.on_pins(peer, m[1])
            elif tag == HEARTBEAT:
                self.counters["heartbeats_received"] += 1  # `heard` above is what counts
            else:
                self.counters["malformed_peer_message"] += 1
        if self._ticker_sleeping and self._idle_ticks() == 1:
            self._wake_ticker()  # the batch gave this node work that the ticker must time
        self._schedule_flush()

    def _saw(self, peer: str, msg: Accepted | Promise) -> None:
        if type(msg) is Accepted:
            top = max(msg.slots) if msg.slots else 0
            if top > self.peer_acked.get(peer, 0):
                self.peer_acked[peer] = top
        else:
            top = msg.accepted[-1][0] if msg.accepted else 0
        key = (peer, msg.group)
        seen = self.peer_seen.get(key)
        if seen is None:
            self.peer_seen[key] = [top, msg.promised]
            self.peer_seen_changed.add(key)
            return
        if top > seen[0]:
            seen[0] = top
            self.peer_seen_changed.add(key)
        if msg.promised > seen[1]:
            seen[1] = msg.promised
            self.peer_seen_changed.add(key)

    def _on_forward(self, peer: str, m: list) -> None:
        try:
            _, fwd_id, group, enc, _timeout_ms, *rest = m
            if type(fwd_id) is not int or len(rest) > 1 or not (
                    type(group) is int or group == getattr(self.core, "metadata", None)):
                raise ValueError("bad forward id or partition")
            if type(_timeout_ms) is not int or _timeout_ms < 1:
                raise ValueError("bad forward timeout")
            cmd = commands.decode_checked(enc)
            if (type(group) is int) == (type(cmd) in mem.TYPES):
                raise ValueError("a membership command goes to the metadata group, only")
            dedup = _checked_dedup(rest[0]) if rest and type(cmd) is not Get else None
        except (ValueError, TypeError, IndexError, KeyError):
            self.counters["malformed_peer_message"] += 1
            return
        if group == COORDINATE and type(cmd) is Txn:
            self.counters["txn_coordinated_for_peer"] += 1
            deadline = self.tick_count + max(1, int(_timeout_ms / 1000 / self._tick_seconds))
            self.coordinator.begin(Forwarded(peer, fwd_id, True), cmd, int(time.time() * 1000),
                                   deadline, dedup)
            self._pump_twopc()
            return
        if group not in self.core.groups:
            # not (or no longer, or not yet) hosted here: definitely not applied
            self._reply_remote(Forwarded(peer, fwd_id, False), None,
                               (UNAVAILABLE, NOT_LEADER, False))
            return
        token = Forwarded(peer, fwd_id, type(cmd) is not Get)
        self.counters["forwarded_in"] += 1
        if type(cmd) is Get and cmd.consistency == STALE:
            self.core.read(group, token, cmd)  # any replica serves a stale read
            return
        if self.core.leader_of(group) != self.node_id:
            # Not proposed here: definitely no effect, so the origin may try again.
            self._reply_remote(token, None, (UNAVAILABLE, NOT_LEADER, False))
            return
        if type(cmd) is Get:
            self.core.read(group, token, cmd)
        else:
            self.proposals[group] += 1
            self.core.propose(group, token, cmd, dedup)

    def _on_forward_reply(self, m: list) -> None:
        try:
            _, fwd_id, result, error = m
            if type(fwd_id) is not int:
                raise ValueError("bad forward id")
            if error is not None:
                code, message, indeterminate = error
                if not (isinstance(code, str) and isinstance(message, str)):
                    raise ValueError("bad error")
            elif not isinstance(result, dict):
                raise ValueError("bad result")
        except (ValueError, TypeError):
            self.counters["malformed_peer_message"] += 1
            return
        p = self._forwarded.pop(fwd_id, None)
        if p is None or p.done:
            return
        if error is not None:
            if code == LOCKED:
                gave_up = self._wait_for_lock(p)
                if gave_up is not None:
                    self._deliver_local([Reply(p, error=gave_up)])
                return
            if code == UNAVAILABLE and not indeterminate and p.deadline > self.tick_count:
                if message == NOT_LEADER and p.fwd_to is not None and p.cmd is not None:
                    self._not_leader(p)
                p.sent = False
                p.fwd_id = 0
                p.fwd_to = None
                self._park(p)  # definitely not applied: route again later
                return
            if self._resend(p, code, bool(indeterminate)):
                return
            self._deliver_local([Reply(p, error=(code, message, bool(indeterminate)))])
        else:
            result["forwarded"] = True  # a fresh dict off the wire (PROTOCOL.md)
            self._deliver_local([Reply(p, result=result)])

    def _not_leader(self, p: Pending) -> None:
        """``p.fwd_to`` said it does not lead ``p``'s partition: stop believing its
        report (a partition hosted here follows the group's own view instead)."""
        router = self.router
        if router is None or type(p.cmd) in mem.TYPES:
            return
        if type(p.cmd) in txrec.TYPES:
            pid = txrec.partition_of(p.cmd)  # type: ignore[arg-type]
        else:
            keys = commands.keys_of(p.cmd)  # type: ignore[arg-type]
            if not keys:
                return
            pid = router.ring.partition_of(keys[0])
        if pid not in self.core.groups:
            self.hints.forget(pid, p.fwd_to)  # type: ignore[arg-type]

    def _resend(self, p: Pending, code: str, indeterminate: bool) -> bool:
        """Park a write with a request id whose attempt failed with an unknown outcome
        because the leader changed, to be sent again as a retry; False: answer as is."""
        if (p.dedup is None or not indeterminate or code != UNAVAILABLE
                or p.deadline <= self.tick_count or p.done):
            return False
        self._park_retry(p)
        return True

    def _park_retry(self, p: Pending) -> None:
        p.locked = False
        if len(p.dedup) == 2:  # type: ignore[arg-type]
            p.dedup = [*p.dedup, True]  # type: ignore[misc]
        p.fwd_id = 0
        p.fwd_to = None
        self.counters["route_resend"] += 1
        self._park(p)  # p.sent stays True: a deadline answer is indeterminate

    def _reply_remote(self, token: Forwarded, result: dict | None, error: tuple | None) -> None:
        if token.done or self.net is None:
            return
        token.done = True
        self.net.send(token.origin, [FWD_REPLY, token.fwd_id, result,
                                     list(error) if error is not None else None])

    # ------------------------------------------------------------ effects
    def _flush(self) -> None:
        """Once per loop turn (``call_soon``): an exception here would only be logged by
        the loop and leave a zombie, so it ends the node instead."""
        self._flush_scheduled = False
        try:
            self._flush_ready()
        except Exception as e:
            self.fail(e)

    def _flush_ready(self) -> None:
        if self.core.conf_changes != self._conf_changes_seen:
            self._drop_retired()
        ready = self.core.ready()
        for restore in ready.restores:
            self._spawn_snapshot_task(self._run_restore(restore))
        for job in ready.snapshots:
            self._snapshot_started[(job.group, job.index)] = time.perf_counter()
            self._spawn_snapshot_task(self._run_snapshot(job))
        if ready.persist:
            self.wal.append_many(ready.persist)
            self._records_since_checkpoint += len(ready.persist)
            self._maybe_request_snapshot()
        if not ready.reply and not ready.send:
            if (self._stored_bytes_since_checkpoint or self._checkpoint_due) and (
                self._checkpoint_task is None and self._trim_to is None
            ):
                self._start_checkpoint()  # nothing else to do: let older files go
            return
        lsn = self.wal.last_lsn
        if lsn <= self.wal.durable_lsn and not self._waiting:
            self._effects(ready.send, ready.reply)
        else:
            self._waiting.append((lsn, ready.send, ready.reply))
            self._kick.set()
        if self._checkpoint_task is None and (
            self._checkpoint_due
            or self._records_since_checkpoint >= self._checkpoint_every
            or (self._trim_to is None and self._older_files_due())
        ):
            self._start_checkpoint()

    def _drop_retired(self) -> None:
        """Groups whose configuration no longer lists this node: dropped for good (a
        ``drop`` record, in this same flush); their snapshot files go once a checkpoint
        (asked for now) no longer names them."""
        core = self.core
        self._conf_changes_seen = core.conf_changes
        for gid in core.retired_groups():
            core.remove_group(gid, drop=True)
            self.dropped_groups.add(gid)
            self._checkpoint_due = True
            log.info("replica_dropped", group=gid)
            if self.on_retired is not None:
                self.on_retired(gid)

    def _maybe_request_snapshot(self) -> None:
        """Start or go on with a trim (see SNAPSHOT_LOG_RATIO), or ask for a checkpoint."""
        stats = getattr(self.wal, "stats", None)
        ratio = self._snapshot_wal_ratio
        if stats is None or self.snapshots is None or not ratio:
            return
        total = self.snapshot_bytes
        if self._trim_to is None:
            budget = max(SNAPSHOT_LOG_BYTES_MIN, SNAPSHOT_LOG_RATIO * total)
            if self.core.log_bytes() >= budget:
                self._trim_to = budget / 2
                self.counters["trims_for_log"] += 1
            elif stats["bytes"] - self._wal_bytes_at_checkpoint >= max(
                SNAPSHOT_WAL_BYTES_MIN, ratio * total
            ):
                self._trim_to = min(budget / 2, SNAPSHOT_LOG_RATIO * total)
                self.counters["trims_for_disk"] += 1
            else:
                return
        if self._snapshot_started:
            return  # one snapshot at a time: each capture shares (then copies) its store
        if self.core.log_bytes() > self._trim_to:
            if self.core.request_largest_snapshot() is not None:
                self.counters["snapshots_for_trim"] += 1
                self._schedule_flush()
                return
        self._trim_to = None  # trimmed (or nothing more can be snapshotted now)
        self._checkpoint_due = True
        self._schedule_flush()

    def _older_files_due(self) -> bool:
        """Snapshot files replaced since the last checkpoint (each kept until one names
        its successor) add up to a quarter of the snapshots' size: time for one."""
        ratio = self._snapshot_wal_ratio or SNAPSHOT_WAL_RATIO
        return self._stored_bytes_since_checkpoint >= max(
            SNAPSHOT_WAL_BYTES_MIN, ratio * self.snapshot_bytes)

    def set_snapshot_sizes(self, sizes: dict[Any, int]) -> None:
        """The groups' stored snapshot sizes found at recovery."""
        self.snapshot_sizes = dict(sizes)
        self.snapshot_bytes = sum(self.snapshot_sizes.values())

    def _effects(self, send: list, replies: list[Reply]) -> None:
        if send and self.net is not None:
            net_send = self.net.send
            for peer, msg in send:
                net_send(peer, to_wire(msg))
        if replies:
            local = []
            for r in replies:
                t = r.token
                if type(t) is Forwarded:
                    self._reply_remote(t, r.result, r.error)
                elif type(t) is MoveToken:
                    self.mover.on_reply(r)  # type: ignore[union-attr]
                else:
                    local.append(r)
            if local:
                local = [r for r in local if r.error is None or not self._retry(r)]
                if local:
                    self._deliver_local(local)

    def _retry(self, r: Reply) -> bool:
        """Whether the failed ``r`` is not the end of its request: sent again (a leader
        change, a lock to wait for); a lock that outlasted the deadline becomes the
        deadline's answer."""
        p, (code, _message, indeterminate) = r.token, r.error  # type: ignore[misc]
        if code == LOCKED:
            gave_up = self._wait_for_lock(p)
            if gave_up is None:
                return True
            r.error = gave_up
            return False
        return self._resend(p, code, indeterminate)

    def _spawn_snapshot_task(self, coro: Any) -> None:
        task = self._loop.create_task(coro)
        self._snapshot_tasks.add(task)
        task.add_done_callback(self._snapshot_tasks.discard)

    async def _run_restore(self, job: SnapshotRestore) -> None:
        """Decode a peer's snapshot into a fresh state machine on a worker thread
        (it touches nothing the core owns; the GIL's switch interval bounds the
        loop's wait), then hand it to the core, which installs it."""
        try:
            sm = await asyncio.to_thread(job.restore, job.blob)
        except Exception as e:  # a peer's snapshot that passed its CRC yet does not decode
            log.warning("snapshot_restore_failed", group=job.group, index=job.index, why=repr(e))
            sm = None
        self.core.snapshot_restored(job.group, job.index, sm)
        self._schedule_flush()

    async def _run_snapshot(self, job: SnapshotWanted) -> None:
        """Encode one piece of a requested snapshot per loop turn (I/O and ticks run
        in between), handing each piece to the group's snapshot file as it comes
        (written on the store's thread, so the encoded state never sits in memory
        whole); once the file is durable, tell the core, which records it in the
        WAL and compacts."""
        w = job.writer
        store = self.snapshots
        stream = store is not None and hasattr(w, "take_kv_parts")
        # One snapshot is encoded at a time: groups whose snapshot-interval triggers
        # fire together would otherwise make a loop turn as long as a piece of each
        # (the captured states wait, copy-on-write). The next one starts while this
        # one is written.
        async with self._snapshot_turn:
            f = store.create(job.group, job.index, w.STREAM_HEAD_BYTES) if stream else None
            try:
                kv_len = await self._encode_pieces(w, f)
            except Exception as e:
                await self._snapshot_failed(e, f)
                return
        try:
            if store is None:
                self._snapshot_stored(job, w.result(), None)
                return
            if f is not None:
                snap = await f.finish(w.stream_head(kv_len), w.tail())
            else:
                snap = await store.write(job.group, job.index, w.pieces())
            self._snapshot_stored(job, snap.blob, snap.crc)
        except Exception as e:
            await self._snapshot_failed(e, f)

    async def _encode_pieces(self, w: Any, f: Any) -> int:
        """Step ``w`` a piece per loop turn, handing the KV bytes to ``f`` as they
        come; the KV blob's length."""
        kv_len = 0
        while True:
            done = w.step(SNAPSHOT_ENTRIES_PER_STEP, SNAPSHOT_BYTES_PER_STEP)
            if f is not None:
                parts = w.take_kv_parts()
                kv_len += sum(map(len, parts))
                f.append(parts)
                if f.backlog > SNAPSHOT_WRITES_QUEUED_MAX:
                    await f.drained()
            if done:
                return kv_len
            await asyncio.sleep(0)

    async def _snapshot_failed(self, error: Exception, f: Any) -> None:
        """A snapshot that cannot be stored: stop, rather than fill the WAL."""
        self.fail(error)
        if f is not None:
            try:
                await f.abandon()
            except Exception as cleanup:  # the store is closing too: recovery removes it
                log.warning("snapshot_file_abandoned", why=repr(cleanup))

    async def cancel_snapshots(self) -> None:
        """Shutdown: stop encoding; a file not finished stays a ``.tmp`` that the next
        start removes."""
        tasks = list(self._snapshot_tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    def fail(self, error: BaseException) -> None:
        """Fail-stop: a broken invariant, a WAL or checkpoint error, a failed tick. The
        driver task ends with ``error`` and the node exits non-zero (``main.run`` logs the
        one critical line); systemd or compose restart it. Never goes on as a zombie."""
        if self._fatal is None:
            self._fatal = error
        self._kick.set()

    def _snapshot_stored(self, job: SnapshotWanted, blob: Any, crc: int | None) -> None:
        self.core.snapshot_ready(job.group, job.index, blob, crc)
        log.debug("snapshot_stored", group=job.group, index=job.index, bytes=len(blob))
        sizes = self.snapshot_sizes
        self.snapshot_bytes += len(blob) - sizes.get(job.group, 0)
        sizes[job.group] = len(blob)
        self._stored_bytes_since_checkpoint += len(blob)  # a checkpoint lets older files go
        started = self._snapshot_started.pop((job.group, job.index), None)
        if started is not None:
            seconds = time.perf_counter() - started
            self.last_snapshot = {"seconds": round(seconds, 3), "bytes": len(blob)}
            if self.observer is not None:
                self.observer.on_snapshot("state_machine", seconds, len(blob))
        self._schedule_flush()

    async def run(self) -> None:
        """The flusher and the ticker; returns when :meth:`stop` is called."""
        ticker = asyncio.create_task(self._ticker(), name="ticker")
        ticker.add_done_callback(self._ticker_done)
        try:
            await self._flusher()
        finally:
            ticker.cancel()
            try:
                await ticker
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise

    def _ticker_done(self, task: asyncio.Task) -> None:
        if not task.cancelled() and task.exception() is not None:
            self.fail(task.exception())  # type: ignore[arg-type]

    async def _flusher(self) -> None:
        waiting = self._waiting
        while True:
            await self._kick.wait()
            self._kick.clear()
            if self._fatal is not None:
                raise self._fatal
            if not waiting:
                if self.stopped.is_set():
                    return
                continue
            await self.wal.sync()
            self._release()

    def _release(self) -> None:
        waiting = self._waiting
        durable = self.wal.durable_lsn
        if waiting and waiting[0][0] <= durable:
            # Everything this fsync made durable goes out in one pass: the messages in
            # the order they were made, then the replies, one write per connection
            # (a reply never waits for a message, nor the other way round).
            sends: list = []
            replies: list[Reply] = []
            while waiting and waiting[0][0] <= durable:
                _, send, answered = waiting.popleft()
                sends += send
                replies += answered
            self._effects(sends, replies)
        if waiting:
            self._kick.set()

    def stop(self) -> None:
        self.stopped.set()
        self._kick.set()

    async def drain(self) -> None:
        """Flush what the core has and wait until every held effect is released."""
        self._flush()
        while self._waiting:
            await self.wal.sync()
            self._release()
        if self._checkpoint_task is not None:
            await self._checkpoint_task

    # ------------------------------------------------------------ checkpoints
    def _start_checkpoint(self) -> None:
        """Write the node's durable state as a WAL snapshot so old segments can go.

        The blob names the snapshot files and holds only the records above them
        (the open slot window), so building it costs no more than the window.
        The core captures it now (``checkpoint_writer``: dict copies, as of
        ``wal.last_lsn``); it is encoded a piece per loop turn
        (``CHECKPOINT_RECORDS_PER_STEP``), then written off the loop.
        """
        started = time.perf_counter()
        writer = self.core.checkpoint_writer()
        if writer is None:
            return  # an installed snapshot is still being stored: try again later
        named = self.core.snapshot_indexes()
        for gid in self.dropped_groups - set(self.core.groups):
            named[gid] = 1 << 62  # dropped for good: every file of it goes
        self.dropped_groups &= set(self.core.groups)  # (hosted again since: theirs stay)
        lsn = self.wal.last_lsn
        self._records_since_checkpoint = 0
        self._stored_bytes_since_checkpoint = 0
        self._checkpoint_due = False
        stats = getattr(self.wal, "stats", None)
        if stats is not None:
            self._wal_bytes_at_checkpoint = stats["bytes"]
        self._checkpoint_task = asyncio.create_task(
            self._write_checkpoint(lsn, writer, named, started)
        )

    async def _write_checkpoint(
        self, lsn: int, writer: CheckpointWriter, named: dict[Any, int], started: float
    ) -> None:
        try:
            while not writer.step(CHECKPOINT_RECORDS_PER_STEP, CHECKPOINT_BYTES_PER_STEP):
                await asyncio.sleep(0)
            # joining the pieces copies the whole window: bytes.join lets the GIL go
            # for large results, so a worker thread keeps that copy off the loop
            blob = await asyncio.to_thread(writer.result)
            await self.wal.write_snapshot(lsn, blob)
            removed = await self.snapshots.prune(named) if self.snapshots is not None else 0
            log.info("checkpoint_written", lsn=lsn, bytes=len(blob), snapshot_files_removed=removed)
            if self.observer is not None:
                self.observer.on_snapshot("wal_checkpoint", time.perf_counter() - started,
                                          len(blob))
        except Exception as e:  # the WAL could not be compacted: stop rather than fill the disk
            self.fail(e)
        finally:
            self._checkpoint_task = None

    # ------------------------------------------------------------ time
    def _advance_clock(self) -> None:
        """Give the core every tick that passed on the monotonic clock, in one call.

        Called by the ticker and before any input is handled, so that the core
        never acts on a stale clock: after the process was stopped (SIGSTOP, a
        long GC pause, a slow loop turn) a leader must see that its lease ran out
        before it answers a read, and a follower must not date a message it reads
        now by the time it last ticked (it would honour a lease for less time than
        the leader counts on)."""
        if self._clock_start is None:
            return
        # time.monotonic(), not loop.time(): uvloop caches the loop's time once per
        # iteration, so a message read late in a long turn would be dated too early and
        # a follower would honour a lease for less real time than the leader counts on
        due = int((time.monotonic() - self._clock_start) / self._tick_seconds) - self.tick_count
        if due > 0:
            self.tick_count += due
            self.core.tick(due)
            self._schedule_flush()

    async def _ticker(self) -> None:
        if self._clock_start is None:
            self._clock_start = time.monotonic()
        while True:
            idle = self._idle_ticks()
            next_at = self._clock_start + (self.tick_count + idle) * self._tick_seconds
            delay = max(0.0, next_at - time.monotonic())
            if idle > 1:  # a long sleep: new work (a request, a peer's message) cuts it short
                self._ticker_wake.clear()
                self._ticker_sleeping = True
                try:
                    await asyncio.wait_for(self._ticker_wake.wait(), delay)
                except TimeoutError:
                    pass
                self._ticker_sleeping = False
            else:
                await asyncio.sleep(delay)
            self._on_tick()

    def _wake_ticker(self) -> None:
        if self._ticker_sleeping:
            self._ticker_sleeping = False
            self._ticker_wake.set()

    def _idle_ticks(self) -> int:
        """How many ticks the ticker may sleep: one while anything is in progress here
        (requests in flight or parked, effects waiting for the disk, work the core
        ticks); when the node is idle, as long as the core allows (its next node
        heartbeat), so an idle node wakes a few times per heartbeat interval, not every
        tick, whatever the number of partitions it hosts."""
        if (self._deadlines or self._parked or self._forwarded or self._waiting
                or self._checkpoint_task is not None or self._snapshot_tasks
                or not self.coordinator.idle() or self.recovery.pending()):
            return 1
        idle = getattr(self.core, "idle_ticks", None)
        return 1 if idle is None else idle()

    def _on_tick(self) -> None:
        self._advance_clock()
        first, last = self._ticked + 1, self.tick_count
        if first <= last:  # the duties of every tick that passed since the last call
            self._ticked = last
            if last - first >= 10:
                log.warning("event_loop_behind",
                            seconds=round((last - first + 1) * self._tick_seconds, 3))
                self.detector.stalled(last - first)  # our stall, not the peers' silence
            self._update_peer_states()
            if self.observer is not None:
                self.observer.on_tick(self.core)
            for t in range(first, last + 1):
                expired = self._deadlines.pop(t, None)
                if expired:
                    self._expire(expired)
        self._leaders_tick()
        self._txn_tick()
        if self.mover is not None:
            self._membership_tick(self.mover)
        if self._parked and self._router() is not None:
            parked, self._parked = self._parked, []
            for p in parked:
                p.parked = False
                if not p.done:
                    self._dispatch(p)
        self._schedule_flush()

    def _membership_tick(self, mover: Mover) -> None:
        """The replica mover's steps (logged) and reports; as the metadata group's leader,
        the automatic removal of a member silent too long (``auto_remove_dead_ms``)."""
        timeout_s = mover.answer_ticks * self._tick_seconds
        for cmd in mover.tick():
            self.submit(MetaSubmit(), cmd, timeout_s)
        if mover.log:
            for epoch, step in mover.log:
                log.info("replica_move", group=step.pid, step=step.action, node=step.node,
                         ring_epoch=epoch)
            mover.log.clear()
        if not self._auto_remove_ticks or self.tick_count - self._auto_remove_check < 50:
            return
        self._auto_remove_check = self.tick_count
        core = self.core
        meta = core.metadata
        if meta not in core.groups or not core.is_leader(meta):
            return
        table = core.groups[meta].sm.members
        silent = {p: self.detector.silence(p, self.tick_count) for p in table.on_ring()}
        for node_id in mover.dead_to_remove(table, self.node_id, silent, self._auto_remove_ticks):
            asked = self._auto_removed_at.get(node_id)
            if asked is not None and self.tick_count - asked < self._auto_remove_ticks:
                continue
            self._auto_removed_at[node_id] = self.tick_count
            log.warning("auto_remove", node=node_id,
                        silent_s=round(silent[node_id] * self._tick_seconds, 1))
            self.submit(MetaSubmit(), mem.MemberRemove(node_id), timeout_s)

    def _leaders_tick(self) -> None:
        """Every tick: follow leader changes (the router re-sends what they strand),
        log this node's own changes, and report the partitions it leads to every
        peer when that set changed or a second passed."""
        core = self.core
        meta = getattr(core, "metadata", None)
        if meta is not None and meta in core.groups:
            leader = core.leader_of(meta)
            if leader != self._last_leader:
                self._last_leader = leader
                log.info("leader_changed", group=meta, leader=leader)
        router = self._router()
        if router is None:
            return
        if router.in_flight:
            self._sync_leaders()  # what a leader change strands is sent again at once
        now = self.tick_count * self._tick_seconds
        changes = getattr(core, "role_changes", None)
        if changes is None or changes != self._role_changes:
            # some group of this node started or stopped leading: look at them all
            self._role_changes = changes
            led = tuple((pid, g.ballot) for pid, g in core.groups.items()
                        if pid != meta and g.role is Role.LEADER)
            if led != self._led:
                gained = sorted({p for p, _ in led} - {p for p, _ in self._led})
                lost = sorted({p for p, _ in self._led} - {p for p, _ in led})
                log.info("leadership_changed", leads=len(led), gained=gained, lost=lost)
                self._led = led
                self._send_leads(now)
                return
        if now - self._leads_sent_at >= LEADS_REFRESH_S:
            self._send_leads(now)

    def _send_leads(self, now: float) -> None:
        self._leads_sent_at = now
        if self.net is not None:
            msg = [LEADS, encode_led(self._led)]
            for peer in self.net.links:
                if self.net.connected(peer):
                    self.net.send(peer, msg)

    def _on_leads(self, peer: str, m: list) -> None:
        router = self._router()
        if router is None:
            return  # the ring is not known yet: the next report (within a second) counts
        try:
            led = decode_led(m[1] if len(m) == 2 else None, router.ring.partitions)
        except ValueError:
            self.counters["malformed_peer_message"] += 1
            return
        self.hints.report(peer, led)

    def _expire(self, expired: dict[Pending, None]) -> None:
        out = []
        for p in list(expired):
            if not p.done:
                if type(p) is TxnSubmit and p.sent and not p.fwd_id and not p.rearmed:
                    # proposed here: the core answers it (a lost answer is a forward's
                    # risk only); failing it now would queue a copy behind it
                    p.rearmed = True
                    self._arm(p, self.tick_count + self.twopc.resolve_horizon_ticks)
                    continue
                if p.fwd_id:
                    self._forwarded.pop(p.fwd_id, None)
                out.append(Reply(p, error=_deadline_error(p)))
        if out:
            self._deliver_local(out)


def _movable(p: object) -> bool:
    """Whether a request may be routed again on a leader change: not while the core
    holds it (a local proposal or read: the core answers it), nor a write without a
    request id that may have reached the old leader (it could apply twice)."""
    assert isinstance(p, Pending)
    if p.sent and not p.fwd_id:
        return False
    return not (p.fwd_id and p.write and p.dedup is None)


def _checked_dedup(v: object) -> list:
    """A forwarded request id, ``[client_id, seq]`` or ``[client_id, seq, retry]``."""
    if (not isinstance(v, list) or len(v) not in (2, 3) or not isinstance(v[0], bytes)
            or type(v[1]) is not int or (len(v) == 3 and type(v[2]) is not bool)):
        raise ValueError("bad request id")
    return v


def _deadline_error(p: Pending) -> tuple[str, str, bool]:
    """The answer to a request whose deadline passed: ``unavailable`` (definite) when it was
    never proposed or forwarded because no leader was reachable the whole time (no quorum,
    as far as this node can tell), else ``timeout``, indeterminate for a write in flight;
    ``conflict`` (definite) when it last met a transaction's lock and no earlier attempt
    of it can still be applied."""
    if p.locked and not (p.dedup is not None and len(p.dedup) == 3):
        return (CONFLICT, "a transaction in progress held the key until the deadline; "
                          "not applied", False)
    if not p.sent:
        return (UNAVAILABLE, "no leader reachable before the deadline (no quorum?)", False)
    return (TIMEOUT, "request deadline passed before it completed", p.write)
