"""Cross-partition transactions in the simulator (issue 9): the shell around the
two-phase-commit cores, a bank workload, and its checks.

Every node runs a ``Coordinator`` and a ``Recovery`` (``dsnode.core.twopc``),
both lost when the node crashes (a restarted node gets fresh ones, with a new
txid nonce). ``TxShell`` plays the runtime's part around them and decides
nothing itself: each ``Submit`` is proposed into partition ``pid``'s log at the
node this one believes leads it (itself, its core's leader hint, the last hint
an answer carried, else a replica drawn at random); the proposal's ``Reply``
comes back to the submitting node's core with the same handle. A forward to
another node and its answer (``TxForward``, ``TxAnswer``) are messages of the
simulated network: lost, cut, delayed, duplicated, dropped by a crash like any
other. A submission whose answer did not come by its ``Submit.deadline`` (a
forwarded one: within ``rpc_timeout_ticks``) is answered ``timeout``,
indeterminate; a refusal by a node that does not lead is ``unavailable`` and
the core submits again. ``Recovery.scan`` runs every ``scan_every_ticks`` with
the transaction tables of the partitions the node leads at that moment.

Targeted faults (``TxConfig.crash_point``, drawn per seed): the coordinator's
node crashes when one of its attempts is at a given step: preparing with no
prepare chosen yet, or some but not all; after the commit was decided but
before every participant resolved; between two submissions of one batch (two
prepares, two resolves); with forgets still unsent.

The bank (``Bank``): ``accounts`` keys spread over the partitions, absent at
first (a balance of ``START``). A transfer reads both balances with a
read-only cross-partition transaction, then commits a transaction comparing
both versions and putting both new balances, each value tagged with the
transfer (``balance|tag``). A read-all transaction gets every account; a
linearizable single-key get reads one (answered ``locked`` while a prepared
transaction may write it, and asked again). The world's single-key workload
keeps to its own keys.

Checks (``Bank.check``), from the partitions' applied logs replayed
(``checkers.SafetyChecker.replay``) and the replicas' state:

- atomicity: every transfer's tag is in both accounts' histories or in neither;
  in both if its client heard commit, in neither if it heard a definite no;
- the bank total: in every read-all that succeeded, and in the final state;
- no fractured read: a read-all that saw one side of a transfer saw the other
  side at least as new;
- real time: a read (read-all or single-key get) that began after a commit was
  acknowledged sees each account it reads at least at that commit's version;
- settled: after the heal, no replica holds a prepared transaction, a lock or a
  decision not forgotten (``unsettled``, a convergence condition).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from dsnode.core.commands import LINEARIZABLE, Get, SubGet, SubPut, Txn
from dsnode.core.twopc.coordinator import Coordinator, State, Submit, TwoPCConfig
from dsnode.core.twopc.recovery import Recovery

START = 100  # every account's balance before its first write

# the steps of a coordinator at which a targeted fault may crash its node
CRASH_POINTS = (
    "preparing-none",  # an attempt has submitted prepares, none chosen yet
    "preparing-some",  # some prepares chosen, not all
    "deciding",  # every prepare chosen, the decision submitted
    "resolving-commit",  # commit decided, not every participant resolved
    "resolving-abort",
    "mid-batch",  # between two submissions of one batch
    "forgets",  # decisions to forget not yet sent
)

# the sim's 2PC timings, in ticks (an election takes about 10-30)
SIM_TWOPC = TwoPCConfig(retry_ticks=1, retry_ticks_max=8, resolve_horizon_ticks=100,
                        forget_delay_ticks=5, prepare_timeout_ticks=50,
                        decision_timeout_ticks=100)


@dataclass(frozen=True, slots=True)
class TxConfig:
    accounts: int = 8
    clients: int = 3
    start_chance: float = 0.3  # per idle client per tick
    twopc: TwoPCConfig = SIM_TWOPC
    txn_timeout_ticks: int = 120  # a transaction's deadline, from its begin
    # a forwarded submission unanswered this long is a timeout (0: only at its
    # Submit.deadline); a local one waits for its deadline, as the local core answers
    # every proposal (leadership lost included): resubmitting it sooner would pile
    # copies into a slow leader's queue, each answered in turn
    rpc_timeout_ticks: int = 100
    scan_every_ticks: int = 3
    get_timeout_ticks: int = 150  # a single-key get on an account, with its retries
    crash_point: str = ""  # one of CRASH_POINTS ("": none)
    crash_chance: float = 0.0  # per tick while the point holds (fault phase only)
    coordinator_cls: type = Coordinator
    recovery_cls: type = Recovery


@dataclass(frozen=True, slots=True)
class TxForward:
    """Propose ``cmd`` into ``pid``'s log here; answer to the node in ``token``."""

    token: tuple  # ("tx", origin, epoch, seq)
    pid: int
    cmd: Any


@dataclass(frozen=True, slots=True)
class TxAnswer:
    token: tuple
    result: dict | None
    error: tuple | None


TX_MESSAGES = (TxForward, TxAnswer)


@dataclass(slots=True)
class NodeTx:
    """One node's transaction machinery: lost whole when the node crashes."""

    coord: Coordinator
    recovery: Recovery
    epoch: int
    # seq -> (who: "c" | "r", handle, pid, expiry tick)
    outstanding: dict[int, tuple] = field(default_factory=dict)
    hints: dict[int, str] = field(default_factory=dict)  # pid -> the leader last named
    next_scan: int = 0
    seq: int = 0


def _hint(message: str) -> str:
    return message.rpartition("leader=")[2].strip()


class TxShell:
    def __init__(self, rng: random.Random, world, cfg: TxConfig) -> None:
        self.rng = rng
        self.world = world
        self.cfg = cfg
        self.nodes: dict[str, NodeTx | None] = {n: None for n in world.node_ids}
        self.epochs = 0
        self.bank = Bank(random.Random(rng.getrandbits(64)), world, self, cfg)
        self.crashes = 0  # targeted crashes done
        self.forwards = 0
        self.timeouts = 0

    # ------------------------------------------------------------ node lifecycle
    def on_restart(self, node: str) -> None:
        core = self.world.cores[node]
        self.epochs += 1
        cfg = self.cfg
        coord = cfg.coordinator_cls(node, random.Random(self.rng.getrandbits(64)), cfg.twopc,
                                    lambda: core.ring)
        self.nodes[node] = NodeTx(coord, cfg.recovery_cls(cfg.twopc), self.epochs)

    def on_crash(self, now: int, node: str) -> None:
        self.nodes[node] = None
        self.bank.on_node_crash(now, node)

    def now_of(self, node: str) -> int:
        """The node's own clock (its core's ticks): deadlines and timeouts use it."""
        return self.world.ticks_given[node]

    # ------------------------------------------------------------ per tick
    def on_tick(self, now: int, faulty: bool) -> None:
        w = self.world
        self.bank.on_tick(now)
        for n in w.node_ids:
            if w.serving(n) and self.nodes[n] is not None:
                self._step(n, faulty)

    def _step(self, node: str, faulty: bool) -> None:
        t = self.nodes[node]
        now = self.now_of(node)
        for seq in [s for s, e in t.outstanding.items() if now >= e[3]]:
            who, handle, pid, _exp = t.outstanding.pop(seq)
            self.timeouts += 1
            t.hints.pop(pid, None)
            self._give(t, who, handle, None, ("timeout", "no answer from the partition", True))
        t.coord.tick(now)
        if now >= t.next_scan:
            t.next_scan = now + self.cfg.scan_every_ticks
            core = self.world.cores[node]
            led = {}
            for gid in core.groups:
                if gid != self.world.metadata and core.is_leader(gid):
                    led[gid] = core.state_machine(gid).txns
            t.recovery.scan(now, led)
        submits, replies = t.coord.take()
        for r in replies:
            self.bank.on_tx_reply(self.world.now, node, r)
        crash = faulty and self._crash_point_holds(t)
        cut = None
        if (faulty and self.cfg.crash_point == "mid-batch" and len(submits) > 1
                and self.rng.random() < self.cfg.crash_chance):
            cut = self.rng.randint(1, len(submits) - 1)
        for i, s in enumerate(submits):
            if cut is not None and i == cut:
                if self._crash(node, "mid-batch"):
                    return
            self._route(node, t, "c", s)
        for s in t.recovery.take():
            self._route(node, t, "r", s)
        if crash:
            self._crash(node, self.cfg.crash_point)

    def _crash_point_holds(self, t: NodeTx) -> bool:
        point = self.cfg.crash_point
        if not point or point == "mid-batch" or self.rng.random() >= self.cfg.crash_chance:
            return False
        if point == "forgets":
            return any(t.coord._forgets.values())
        for a in t.coord.attempts.values():
            if a.state is State.PREPARING:
                some = 0 < len(a.prepared) < len(a.plan.prepares)
                if point == ("preparing-some" if some else "preparing-none"):
                    return True
            elif a.state is State.DECIDING:
                if point == "deciding":
                    return True
            elif a.state is State.RESOLVING and point == (
                    "resolving-commit" if a.commit else "resolving-abort"):
                return True
        return False

    def _crash(self, node: str, why: str) -> bool:
        w = self.world
        if not w.faults.can_crash(node):
            return False
        self.crashes += 1
        w.trace(w.now, node, "tx-crash", why)
        w.faults.crash_node(node)
        return True

    # ------------------------------------------------------------ submissions
    def _route(self, origin: str, t: NodeTx, who: str, s: Submit) -> None:
        w = self.world
        now = self.now_of(origin)
        t.seq += 1
        token = ("tx", origin, t.epoch, t.seq)
        target = self._target(origin, t, s.pid)
        expiry = s.deadline
        if target != origin and self.cfg.rpc_timeout_ticks:
            expiry = min(expiry, now + self.cfg.rpc_timeout_ticks)
        t.outstanding[t.seq] = (who, s.handle, s.pid, expiry)
        if target == origin:
            w.cores[origin].propose(s.pid, token, s.cmd)
        else:
            self.forwards += 1
            w.net.send(w.now, origin, target, TxForward(token, s.pid, s.cmd))

    def _target(self, origin: str, t: NodeTx, pid: int) -> str:
        core = self.world.cores[origin]
        members = self.world.groups[pid]
        if pid in core.groups:
            if core.is_leader(pid):
                return origin
            hint = core.leader_of(pid)
            if hint in members:
                return hint
        hint = t.hints.get(pid)
        if hint in members:
            return hint
        alive = [m for m in members if core.peer_alive(m)]  # heard from lately
        return self.rng.choice(alive or members)

    def on_message(self, node: str, src: str, msg: Any) -> None:
        """A ``TxForward`` or ``TxAnswer`` delivered to ``node`` (up, admitted)."""
        if type(msg) is TxForward:
            self.world.cores[node].propose(msg.pid, msg.token, msg.cmd)
        else:
            self._answer(node, msg.token, msg.result, msg.error)

    def owns(self, token: Any) -> bool:
        return type(token) is tuple and bool(token) and token[0] in ("tx", "bank")

    def on_reply(self, node: str, reply) -> None:
        """A reply of ``node``'s core to a token of ours."""
        token = reply.token
        if token[0] == "bank":
            self.bank.on_core_reply(self.world.now, node, reply)
            return
        origin = token[1]
        if origin == node:
            self._answer(node, token, reply.result, reply.error)
        else:
            self.world.net.send(self.world.now, node, origin,
                                TxAnswer(token, reply.result, reply.error))

    def _answer(self, node: str, token: tuple, result: dict | None, error: tuple | None) -> None:
        t = self.nodes[node]
        if t is None or token[2] != t.epoch:
            return  # for a process of this node that crashed since
        entry = t.outstanding.pop(token[3], None)
        if entry is None:
            return  # timed out already, or a duplicate
        who, handle, pid, _exp = entry
        if error is not None and error[0] == "unavailable":
            hint = _hint(error[1])
            if hint in self.world.groups[pid]:
                t.hints[pid] = hint
            else:
                t.hints.pop(pid, None)
        self._give(t, who, handle, result, error)

    @staticmethod
    def _give(t: NodeTx, who: str, handle: Any, result: dict | None, error: tuple | None) -> None:
        if who == "c":
            t.coord.on_result(handle, result, error)
        else:
            t.recovery.on_result(handle, result, error)

    # ------------------------------------------------------------ quiescence
    def unsettled(self) -> str:
        """Why the transactions are not settled yet ("": they are): a client op
        pending, a coordinator or recovery busy, or a replica holding a prepared
        transaction, a lock or a decision."""
        if not self.bank.idle():
            return "bank clients busy"
        w = self.world
        for n, t in self.nodes.items():
            if t is not None and (not t.coord.idle() or t.recovery.pending()):
                return f"{n}: coordinator or recovery busy"
        for g in w.groups:
            if g == w.metadata:
                continue
            for m in w.live_members(g):
                core = w.cores[m]
                if core is None or g not in core.groups:
                    continue
                tx = core.state_machine(g).txns
                if tx.prepared or tx.decisions or tx.xlocks or tx.slocks:
                    return (f"partition {g} on {m}: {len(tx.prepared)} prepared, "
                            f"{len(tx.decisions)} decisions, {tx.locks_held()} locks")
        return ""

    def stats(self) -> dict[str, int]:
        out = {"tx_crashes": self.crashes, "tx_forwards": self.forwards,
               "tx_timeouts": self.timeouts}
        out.update(self.bank.stats())
        return out


# ---------------------------------------------------------------- the bank

@dataclass(slots=True)
class BankOp:
    id: int
    client: str
    kind: str  # transfer | readall | aget
    keys: tuple[bytes, ...]
    invoke_seq: int = 0
    complete_seq: int | None = None
    outcome: str | None = None  # commit | nochange | fail | indeterminate | ok
    tag: bytes = b""
    amount: int = 0
    written: bool = False  # (transfer) its write transaction was begun
    error: str = ""  # the error code it ended with
    versions: dict = field(default_factory=dict)  # key -> version (reads; a commit's puts)
    values: dict = field(default_factory=dict)  # key -> value read


@dataclass(slots=True)
class BankClient:
    name: str
    op: BankOp | None = None
    node: str | None = None  # the node coordinating (or reading) for it now
    token: Any = None
    deadline: int = 0
    retry_at: int | None = None
    reads_until: int = 0  # a read failing is tried again until then
    final: bool = False  # the closing read-all (must succeed)


def parse(value: bytes | None) -> tuple[int, bytes]:
    """An account's (balance, tag) from its value (absent: START, no tag)."""
    if value is None:
        return START, b""
    bal, _, tag = value.partition(b"|")
    return int(bal), tag


class Bank:
    def __init__(self, rng: random.Random, world, shell: TxShell, cfg: TxConfig) -> None:
        self.rng = rng
        self.world = world
        self.shell = shell
        self.cfg = cfg
        self.accounts = [b"acct%d" % i for i in range(cfg.accounts)]
        self.total = START * len(self.accounts)
        self.clients = [BankClient(f"b{i}") for i in range(cfg.clients)]
        self.by_name = {c.name: c for c in self.clients}
        self.ops: list[BankOp] = []
        self.issuing = True
        self.final_wanted = False
        self.locked = 0  # single-key gets answered locked (and asked again)

    def pid(self, key: bytes) -> int:
        return self.world.ring.partition_of(key)

    def idle(self) -> bool:
        return not self.final_wanted and all(c.op is None for c in self.clients)

    def start_final(self) -> None:
        self.final_wanted = True

    # ------------------------------------------------------------ driving
    def on_tick(self, now: int) -> None:
        for c in self.clients:
            if c.op is None:
                if self.final_wanted:
                    self.final_wanted = False
                    c.final = True
                    self._begin(c, now, "readall", tuple(self.accounts))
                elif self.issuing and self.rng.random() < self.cfg.start_chance:
                    self._begin_random(c, now)
                continue
            if now >= c.deadline:
                self._give_up(c, now)
            elif c.retry_at is not None and now >= c.retry_at:
                c.retry_at = None
                self._send(c, now)

    def _begin_random(self, c: BankClient, now: int) -> None:
        r = self.rng.random()
        if r < 0.55:
            pair = self._cross_pair()
            if pair is not None:
                self._begin(c, now, "transfer", pair)
        elif r < 0.8:
            self._begin(c, now, "readall", tuple(self.accounts))
        else:
            self._begin(c, now, "aget", (self.rng.choice(self.accounts),))

    def _cross_pair(self) -> tuple[bytes, bytes] | None:
        for _ in range(10):
            a, b = self.rng.sample(self.accounts, 2)
            if self.pid(a) != self.pid(b):
                return a, b
        return None

    def _begin(self, c: BankClient, now: int, kind: str, keys: tuple) -> None:
        op = BankOp(len(self.ops), c.name, kind, keys)
        op.invoke_seq = self.world.next_event()
        self.ops.append(op)
        c.op = op
        c.deadline = now + self.cfg.get_timeout_ticks
        c.reads_until = now + 2 * self.cfg.txn_timeout_ticks
        self._send(c, now)

    def _send(self, c: BankClient, now: int) -> None:
        op = c.op
        w = self.world
        if op.kind == "aget":
            members = w.groups[self.pid(op.keys[0])]
            up = [m for m in members if w.serving(m)]
            if not up:
                c.retry_at = now + 1
                return
            node = c.node if c.node in up else self.rng.choice(up)
            c.node = node
            c.token = ("bank", c.name, op.id, self.rng.getrandbits(32))
            w.cores[node].read(self.pid(op.keys[0]), c.token, Get(op.keys[0], LINEARIZABLE))
            return
        up = [n for n in w.node_ids if w.serving(n) and self.shell.nodes[n] is not None]
        if not up:
            c.retry_at = now + 1
            return
        node = c.node = self.rng.choice(up)
        if op.kind == "readall" or not op.versions:
            txn = Txn((), tuple(SubGet(k) for k in op.keys))
        else:
            a, b = op.keys
            (ba, _), (bb, _) = parse(op.values[a]), parse(op.values[b])
            op.tag = b"t%d" % op.id
            op.amount = self.rng.randint(1, 30)
            op.written = True
            txn = Txn(((a, op.versions[a]), (b, op.versions[b])),
                      (SubPut(a, b"%d|%s" % (ba - op.amount, op.tag)),
                       SubPut(b, b"%d|%s" % (bb + op.amount, op.tag))))
        c.token = ("bank", c.name, op.id, self.rng.getrandbits(32))
        c.deadline = now + self.cfg.txn_timeout_ticks + 60  # the answer comes by then
        t = self.shell.nodes[node]
        node_now = self.shell.now_of(node)
        ms = int(w.clock[node] * 10)
        t.coord.begin(c.token, txn, ms, node_now + self.cfg.txn_timeout_ticks)

    # ------------------------------------------------------------ answers
    def _waiting(self, reply) -> BankClient | None:
        """The client waiting for ``reply`` (None: it answers an abandoned attempt)."""
        c = self.by_name[reply.token[1]]
        return c if c.op is not None and reply.token == c.token else None

    def on_tx_reply(self, now: int, node: str, reply) -> None:
        """A coordinator's answer to a transaction a client began."""
        c = self._waiting(reply)
        if c is None:
            return
        op = c.op
        if reply.error is not None:
            code, _msg, indeterminate = reply.error
            op.error = code
            if c.final or (not op.written and now < c.reads_until):
                c.retry_at = now + 3  # a read (of a transfer, or all): again
                c.deadline = now + 3 + self.cfg.txn_timeout_ticks + 60
                return
            self._finish(c, now, "indeterminate" if op.written and indeterminate else "fail")
            return
        results = reply.result["results"]
        if op.kind == "transfer" and not op.written:
            for k, r in zip(op.keys, results, strict=True):
                op.values[k], op.versions[k] = r["value"], r["version"]
            self._send(c, now)  # the transfer itself
            return
        if op.kind == "transfer":
            if not reply.result["succeeded"]:
                self._finish(c, now, "nochange")
                return
            op.versions = {k: r["version"] for k, r in zip(op.keys, results, strict=True)}
            self._finish(c, now, "commit")
            return
        for k, r in zip(op.keys, results, strict=True):
            op.values[k], op.versions[k] = r["value"], r["version"]
        self._finish(c, now, "ok")

    def on_core_reply(self, now: int, node: str, reply) -> None:
        """A core's answer to a single-key linearizable get on an account."""
        c = self._waiting(reply)
        if c is None:
            return
        op = c.op
        if reply.error is not None:
            if reply.error[0] == "locked":
                self.locked += 1  # a prepared transaction may write it: wait
            hint = _hint(reply.error[1])
            c.node = hint if hint in self.world.groups[self.pid(op.keys[0])] else None
            c.retry_at = now + (1 if c.node else 3)
            return
        k = op.keys[0]
        op.values[k], op.versions[k] = reply.result["value"], reply.result["version"]
        self._finish(c, now, "ok")

    def on_node_crash(self, now: int, node: str) -> None:
        """A client whose transaction's coordinator (or get's node) crashed hears
        nothing more: its connection is gone."""
        for c in self.clients:
            if c.op is not None and c.node == node:
                if c.final or (not c.op.written and now < c.reads_until):
                    c.node = None  # a read: again, elsewhere
                    c.retry_at = now + 1
                else:
                    self._give_up(c, now)

    def _give_up(self, c: BankClient, now: int) -> None:
        self._finish(c, now, "indeterminate" if c.op.written else "fail")

    def _finish(self, c: BankClient, now: int, outcome: str) -> None:
        op = c.op
        op.outcome = outcome
        op.complete_seq = self.world.next_event()
        c.op = None
        c.token = None
        c.retry_at = None
        c.final = False

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = {"aget_locked": self.locked}
        for op in self.ops:
            name = f"{op.kind}_{op.outcome}" + (f"_{op.error}" if op.error else "")
            out[name] = out.get(name, 0) + 1
        return out

    # ------------------------------------------------------------ checks
    def check(self, histories: dict[bytes, dict[bytes, int]],
              final: dict[bytes, bytes | None]) -> str | None:
        """Why the bank's history is wrong (None: it is right). ``histories``: per
        account, every tag its applied log ever wrote -> the version written;
        ``final``: each account's value in the converged replicas."""
        transfers = {op.tag: op for op in self.ops if op.kind == "transfer" and op.written}
        for tag, op in transfers.items():
            a, b = op.keys
            ina, inb = tag in histories[a], tag in histories[b]
            if ina != inb:
                return (f"atomicity: transfer {tag!r} ({op.outcome}) wrote "
                        f"{a if ina else b!r} but not {b if ina else a!r}")
            if op.outcome == "commit" and not ina:
                return f"atomicity: transfer {tag!r} was acknowledged but is in neither account"
            if op.outcome in ("nochange", "fail") and ina:
                return f"atomicity: transfer {tag!r} failed ({op.outcome}) but was applied"
        total = sum(parse(v)[0] for v in final.values())
        if total != self.total:
            return f"bank: the final balances sum to {total}, not {self.total}: {final}"
        acked = sorted(((op.complete_seq, op) for op in transfers.values()
                        if op.outcome == "commit"), key=lambda x: x[0])
        closing = [op for op in self.ops if op.kind == "readall"][-1:]
        if not closing or closing[0].outcome != "ok":
            return "bank: the closing read-all transaction did not succeed"
        for op in self.ops:
            if op.outcome != "ok":
                continue
            if op.kind == "readall":
                seen = sum(parse(op.values[k])[0] for k in op.keys)
                if seen != self.total:
                    return f"bank: read-all op{op.id} saw a total of {seen}: {op.values}"
                why = self._fractured(op, transfers, histories)
                if why:
                    return why
            for seq, w in acked:
                if seq > op.invoke_seq:
                    break
                for k in op.keys:
                    if k in w.versions and op.versions[k] < w.versions[k]:
                        return (f"real time: op{op.id} ({op.kind}) read {k!r} at version "
                                f"{op.versions[k]}, older than transfer {w.tag!r} "
                                f"acknowledged before it began ({w.versions[k]})")
        return None

    @staticmethod
    def _fractured(op: BankOp, transfers: dict, histories: dict) -> str | None:
        for k in op.keys:
            _bal, tag = parse(op.values[k])
            t = transfers.get(tag)
            if t is None:
                continue
            other = t.keys[1] if t.keys[0] == k else t.keys[0]
            need = histories[other].get(tag)
            if need is not None and op.versions[other] < need:
                return (f"fractured read: read-all op{op.id} saw {tag!r} on {k!r} but "
                        f"{other!r} at version {op.versions[other]}, before {need}")
        return None
