"""Helpers for multi-node tests: a 3-node cluster, a recording client workload, history checks.

Built on ``harness.py`` (processes, raw protocol) and on the linearizability
checker in ``dsnode.sim.linearizability``.

* :class:`Cluster` starts N ``dsnode serve`` processes that know each other
  (``--peers``), reads their ``status`` and waits, always against a deadline,
  for a leader everyone agrees on or for a node to catch up.
* :class:`History` records every client op: invoke and completion as positions
  in one global event order (all clients share one event loop, so that order is
  real time) plus monotonic timestamps, and the outcome ``ok``, ``fail``
  (definite: no effect) or ``indeterminate`` (a write that may or may not take
  effect: the server said so, the deadline passed, or the connection dropped).
* :class:`Workload` runs several asyncio clients, each with its own connection
  to a preferred node (falling back to the others when it is down), doing puts,
  conditional puts, deletes and linearizable gets on a small keyspace with
  unique values, until told to stop.
* :func:`check_linearizable` and :func:`check_acked_writes_survive` judge the
  history at the end of a test.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from harness import (
    ConnectionClosed,
    HarnessError,
    RawConn,
    ServerPool,
    ServerProcess,
    free_port,
    sync_call,
)
from polling import async_wait_until, wait_until

from dsnode.sim.linearizability import HOp, check_history

WRITE_KINDS = ("put", "delete")
# Errors a healthy cluster may answer under faults; anything else fails the test.
FAULT_CODES = frozenset({"unavailable", "timeout", "overloaded"})
# harness.ServerPool defaults to fast elections for one-node tests; the cluster tests run
# (and the failover time is measured) with the documented defaults unless a test says so.
DEFAULT_TIMING = (
    "--tick-interval-ms", "10", "--election-timeout-ms", "500", "--heartbeat-interval-ms", "50",
)


# ====================================================================== cluster
def node_status(srv: ServerProcess, timeout: float = 1.0) -> dict | None:
    """``status`` of one node, or None when it does not answer (down, paused, starting)."""
    if not srv.running:
        return None
    try:
        answer = sync_call(srv.addr, [{"id": 1, "op": "status"}], timeout=timeout)[0]
    except (OSError, TimeoutError, ValueError):
        return None
    return answer if answer.get("ok") else None


async_wait = async_wait_until  # (cond, timeout, what): the one poll helper, async


async def async_status(srv: ServerProcess, timeout: float = 1.0) -> dict | None:
    """``status`` over an async connection (does not block the workload's loop)."""
    if not srv.running:
        return None
    try:
        async with await RawConn.open(srv.addr, timeout=timeout) as c:
            answer = await c.call("status", timeout=timeout)
    except (OSError, TimeoutError, ConnectionClosed, ValueError):
        return None
    return answer if answer.get("ok") else None


class Cluster:
    """N nodes started with the same ``--peers``; ``nodes`` maps node id -> ServerProcess."""

    def __init__(
        self,
        pool: ServerPool,
        n: int = 3,
        args: Sequence[str] = (),
        *,
        make_server: Callable[..., ServerProcess] | None = None,
        addrs: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        ids = [f"n{i}" for i in range(1, n + 1)]
        if addrs is None:
            addrs = {nid: ("127.0.0.1", free_port()) for nid in ids}
        peers = ",".join(f"{nid}={h}:{p}" for nid, (h, p) in addrs.items())
        self.peers = peers
        self.nodes: dict[str, ServerProcess] = {}
        for nid in ids:
            flags = ("--peers", peers, *DEFAULT_TIMING, *args)
            if make_server is None:
                self.nodes[nid] = pool.new(*flags, node_id=nid, port=addrs[nid][1])
            else:
                self.nodes[nid] = make_server(nid, addrs[nid], flags)

    # ------------------------------------------------------------ lifecycle
    def start(self, timeout: float = 30.0) -> Cluster:
        for srv in self.nodes.values():
            srv.spawn()
        self.wait_ready(list(self.nodes), timeout)
        return self

    def wait_ready(self, ids: Iterable[str], timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        for nid in ids:
            self.nodes[nid].wait_ready(max(0.1, deadline - time.monotonic()))

    def running(self) -> list[str]:
        return [nid for nid, s in self.nodes.items() if s.running]

    def endpoints(self) -> dict[str, tuple[str, int]]:
        return {nid: s.addr for nid, s in self.nodes.items()}

    def output_tails(self) -> str:
        return "".join(s.output_tail(25) for s in self.nodes.values())

    # ------------------------------------------------------------ status
    def statuses(self, ids: Iterable[str] | None = None) -> dict[str, dict | None]:
        ids = list(self.nodes) if ids is None else list(ids)
        return {nid: node_status(self.nodes[nid]) for nid in ids}

    def agreed_leader(self, among: Iterable[str]) -> str | None:
        """The leader every node of ``among`` reports, if they all answer, agree, and it
        is one of them and says role leader itself."""
        return _agreed(self.statuses(among))

    def wait_leader(
        self, among: Iterable[str] | None = None, timeout: float = 20.0, exclude: str | None = None
    ) -> str:
        among = self.running() if among is None else list(among)

        def cond() -> str | None:
            leader = self.agreed_leader(among)
            return leader if leader is not None and leader != exclude else None

        return wait_until(
            cond, timeout, f"an agreed leader among {among} (not {exclude})",
            lambda: f": {self.describe(among)}" + self.output_tails(),
        )

    async def async_wait_leader(
        self, among: Iterable[str], timeout: float = 20.0, exclude: str | None = None
    ) -> str:
        """:meth:`wait_leader` without blocking the event loop (a workload may be running)."""
        among = list(among)
        sts: dict[str, dict | None] = {}

        async def cond() -> str | None:
            sts.update({nid: await async_status(self.nodes[nid]) for nid in among})
            leader = _agreed(sts)
            return leader if leader != exclude else None

        return await async_wait_until(
            cond, timeout, f"an agreed leader among {among} (not {exclude})",
            lambda: f": {_brief(sts)}" + self.output_tails(),
        )

    def describe(self, ids: Iterable[str] | None = None) -> str:
        return _brief(self.statuses(ids))

    def wait_caught_up(self, nid: str, timeout: float = 30.0) -> tuple[int, int]:
        """Wait until ``nid`` has applied everything the leader had committed when we
        started waiting (and the leader is still the leader); returns (target, applied)."""
        leader = self.wait_leader(timeout=timeout)
        st = node_status(self.nodes[leader])
        assert st is not None, f"leader {leader} stopped answering"
        target = st["paxos"]["commit"]

        def cond() -> int | None:
            s = node_status(self.nodes[nid])
            if s is not None and s["paxos"]["applied"] >= target:
                return s["paxos"]["applied"]
            return None

        applied = wait_until(
            cond, timeout, f"{nid} to reach the leader's commit {target}",
            lambda: f": {self.describe()}" + self.output_tails(),
        )
        return target, applied

    def check_single_leader(self) -> str:
        """After convergence: exactly one node says role leader, everyone names it, and its
        ballot is the highest any node reports."""
        sts = self.statuses()
        assert all(st is not None for st in sts.values()), _brief(sts)
        leaders = [nid for nid, st in sts.items() if st["paxos"]["role"] == "leader"]
        assert len(leaders) == 1, f"leaders: {leaders}: {_brief(sts)}"
        (leader,) = leaders
        named = {st["partitions"][0]["leader"] for st in sts.values()}
        assert named == {leader}, f"nodes name leaders {named}: {_brief(sts)}"
        top = max(tuple(st["paxos"]["ballot"]) for st in sts.values())
        assert tuple(sts[leader]["paxos"]["ballot"]) == top, _brief(sts)
        return leader


def _agreed(sts: dict[str, dict | None]) -> str | None:
    """The leader all these statuses name, if all answered, agree, are ready, and the
    named node is one of them and says role leader itself."""
    if any(st is None for st in sts.values()):
        return None
    leaders = {st["partitions"][0]["leader"] for st in sts.values()}
    if len(leaders) != 1:
        return None
    (leader,) = leaders
    if leader not in sts or sts[leader]["paxos"]["role"] != "leader":
        return None
    if not all(st["ready"] for st in sts.values()):
        return None
    return leader


def _brief(sts: dict[str, dict | None]) -> str:
    parts = []
    for nid, st in sts.items():
        if st is None:
            parts.append(f"{nid}=down")
            continue
        px = st["paxos"]
        parts.append(
            f"{nid}={{role={px['role']} ballot={px['ballot']} leader="
            f"{st['partitions'][0]['leader']} ready={st['ready']} commit={px['commit']} "
            f"applied={px['applied']} snap={px['snapshot_index']}}}"
        )
    return " ".join(parts)


# ====================================================================== history
@dataclass
class Rec:
    """One client op as the clients saw it."""

    client: int
    node: str
    kind: str  # get | put | delete
    key: bytes
    value: bytes | None
    if_version: int | None
    call: int
    t_call: float
    ret: int | None = None
    t_ret: float | None = None
    outcome: str = "pending"  # ok | fail | indeterminate
    result: dict | None = None
    error: dict | None = None

    @property
    def is_write(self) -> bool:
        return self.kind in WRITE_KINDS

    @property
    def acked(self) -> bool:
        """An acknowledged write that took effect (a put/delete that succeeded)."""
        return self.is_write and self.outcome == "ok" and bool(self.result["succeeded"])


class History:
    def __init__(self) -> None:
        self._events = itertools.count(1)
        self.recs: list[Rec] = []
        self.unexpected: list[str] = []

    def invoke(self, client: int, node: str, req: dict) -> Rec:
        rec = Rec(
            client=client,
            node=node,
            kind=req["op"],
            key=req["key"],
            value=req.get("value"),
            if_version=req.get("if_version"),
            call=next(self._events),
            t_call=time.monotonic(),
        )
        self.recs.append(rec)
        return rec

    def complete(self, rec: Rec, resp: dict) -> None:
        rec.ret = next(self._events)
        rec.t_ret = time.monotonic()
        if resp.get("ok") is True:
            rec.outcome = "ok"
            rec.result = resp
            return
        err = resp.get("error") or {}
        rec.error = err
        code = err.get("code")
        if code not in FAULT_CODES:
            self.unexpected.append(f"{rec.kind} via {rec.node}: {resp!r}")
        if not rec.is_write and err.get("indeterminate"):
            self.unexpected.append(f"read answered indeterminate: {resp!r}")
        if rec.is_write and err.get("indeterminate"):
            rec.ret = None
            rec.outcome = "indeterminate"
        else:
            rec.outcome = "fail"

    def lost(self, rec: Rec, why: str) -> None:
        """No answer (deadline passed, connection lost): a write's outcome is unknown."""
        rec.t_ret = time.monotonic()
        rec.error = {"code": why}
        if rec.is_write:
            rec.ret = None
            rec.outcome = "indeterminate"
        else:
            rec.ret = next(self._events)
            rec.outcome = "fail"

    # ------------------------------------------------------------ queries
    def writes(self) -> list[Rec]:
        return [r for r in self.recs if r.is_write]

    def acked_writes(self) -> list[Rec]:
        return [r for r in self.recs if r.acked]

    def count(self, pred: Callable[[Rec], bool]) -> int:
        return sum(1 for r in self.recs if pred(r))

    def summary(self) -> str:
        by: dict[str, int] = {}
        for r in self.recs:
            k = f"{r.kind}:{r.outcome}"
            by[k] = by.get(k, 0) + 1
        return " ".join(f"{k}={v}" for k, v in sorted(by.items()))

    def to_hops(self) -> list[HOp]:
        """The ops the checker sees: definite failures and lost reads had no effect."""
        out = []
        for i, r in enumerate(self.recs):
            if r.outcome in ("fail", "pending"):
                continue
            out.append(
                HOp(
                    call=r.call,
                    ret=r.ret,
                    kind=r.kind,
                    key=r.key,
                    value=r.value,
                    if_version=r.if_version,
                    result=r.result,
                    id=i,
                )
            )
        return out


def check_linearizable(history: History, budget: int = 2_000_000) -> None:
    assert not history.unexpected, "unexpected answers:\n" + "\n".join(history.unexpected[:20])
    assert not any(r.outcome == "pending" for r in history.recs), "ops still pending"
    ops = history.to_hops()
    t0 = time.monotonic()
    res = check_history(ops, budget=budget)
    took = time.monotonic() - t0
    print(f"linearizability: {len(ops)} ops ({history.summary()}), {res.steps} steps, "
          f"{took:.2f}s -> {res.ok}")
    if res.ok is not True:
        key_ops = sorted((r for r in history.recs if r.key == res.key), key=lambda r: r.call)
        lines = [
            f"  [{r.call}->{r.ret}] c{r.client}@{r.node} {r.kind} v={r.value!r} "
            f"if={r.if_version} -> {r.outcome} {r.result or r.error}"
            for r in key_ops
        ]
        dump = os.environ.get("DSNODE_TEST_HISTORY_DUMP")
        if dump:  # the whole history of the key, for a closer look
            with open(dump, "w") as f:
                f.write("\n".join(lines) + "\n")
        lines = lines[-60:]
        raise AssertionError(
            f"history not linearizable ({res.detail}) on key {res.key!r}:\n" + "\n".join(lines)
        )


def check_acked_writes_survive(history: History, final: dict[bytes, tuple[bytes | None, int]]):
    """Each key's final value must come from a write that may still be the latest one.

    A write ``w`` is *superseded* once some acknowledged write was invoked after ``w``
    returned. The final value of a key must be the value of a write that took effect or may
    have (acknowledged or indeterminate) and is not superseded, or absent if the last
    such write is a delete or nothing was acknowledged. This is weaker than the
    linearizability check (which also runs) but names the lost acknowledged write.
    """
    by_key: dict[bytes, list[Rec]] = {}
    for r in history.writes():
        if r.acked or r.outcome == "indeterminate":
            by_key.setdefault(r.key, []).append(r)
    for key, (value, _version) in final.items():
        ws = by_key.get(key, [])
        acked = [w for w in ws if w.acked]
        candidates = [
            w for w in ws
            if not any(a.call > w.ret for a in acked if w.ret is not None)
        ]
        allowed = {w.value if w.kind == "put" else None for w in candidates}
        if not acked:
            allowed.add(None)
        if value not in allowed:
            last = max(acked, key=lambda w: w.ret) if acked else None
            raise AssertionError(
                f"key {key!r}: final value {value!r} is none of the writes that may be the "
                f"latest ({sorted(map(repr, allowed))}); last acknowledged write: "
                f"{last.kind if last else None} {last.value if last else None!r} "
                f"acked at event {last.ret if last else None}"
            )


# ====================================================================== workload
@dataclass
class WorkloadConfig:
    clients: int = 6
    keys: int = 8
    timeout_ms: int = 1000
    # op mix (weights): put, conditional put, delete, conditional delete, get
    mix: tuple[int, int, int, int, int] = (35, 15, 6, 4, 40)
    # pause between a client's ops (seconds): keeps histories checkable in seconds
    think_s: float = 0.005


@dataclass
class _ClientState:
    idx: int
    prefer: list[str]
    versions: dict[bytes, int] = field(default_factory=dict)
    seq: int = 0
    node: str | None = None


class Workload:
    """Concurrent clients recording into a :class:`History` until :meth:`stop`."""

    def __init__(
        self,
        endpoints: Callable[[], dict[str, tuple[str, int]]] | dict[str, tuple[str, int]],
        seed: int,
        cfg: WorkloadConfig | None = None,
        history: History | None = None,
    ) -> None:
        self._endpoints = endpoints if callable(endpoints) else (lambda: endpoints)
        self.cfg = cfg or WorkloadConfig()
        self.history = history if history is not None else History()
        self.rng = random.Random(seed)
        self.keys = [f"k{i}".encode() for i in range(self.cfg.keys)]
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> Workload:
        ids = sorted(self._endpoints())
        for i in range(self.cfg.clients):
            # client i prefers node i mod N, then the others in order
            first = i % len(ids)
            prefer = ids[first:] + ids[:first]
            st = _ClientState(i, prefer)
            rng = random.Random(self.rng.getrandbits(64))
            self._tasks.append(asyncio.create_task(self._client(st, rng), name=f"client{i}"))
        return self

    async def stop(self, timeout: float = 15.0) -> History:
        """Stop issuing ops; wait (bounded) for every in-flight op to finish or expire."""
        self._stop.set()
        if self._tasks:
            done, pending = await asyncio.wait(self._tasks, timeout=timeout)
            for t in pending:
                t.cancel()
            for t in done:
                t.result()  # re-raise a client bug
            assert not pending, f"{len(pending)} workload clients did not stop in {timeout}s"
        self._tasks = []
        return self.history

    async def wait_acked(self, n: int, timeout: float, after: float = 0.0,
                         via: Iterable[str] | None = None) -> Rec:
        """Wait until ``n`` writes invoked at or after monotonic time ``after`` (and through
        one of the nodes ``via``) are acknowledged; returns the n-th by ack time."""
        via = set(via) if via is not None else None

        def cond() -> Rec | None:
            acks = [
                r for r in self.history.recs
                if r.is_write and r.outcome == "ok" and r.t_call >= after
                and (via is None or r.node in via)
            ]
            if len(acks) >= n:
                return sorted(acks, key=lambda r: r.t_ret)[n - 1]
            return None

        try:
            return await async_wait(cond, timeout, f"{n} acknowledged writes")
        except HarnessError:
            raise HarnessError(f"fewer than {n} acknowledged writes after {after} via {via} "
                               f"within {timeout}s: {self.history.summary()}") from None

    # ------------------------------------------------------------ one client
    def _next_request(self, st: _ClientState, rng: random.Random) -> dict:
        key = rng.choice(self.keys)
        kind = rng.choices(range(5), weights=self.cfg.mix)[0]
        st.seq += 1
        value = f"c{st.idx}-{st.seq}".encode()
        known = st.versions.get(key, 0)
        if kind == 0:
            return {"op": "put", "key": key, "value": value}
        if kind == 1:
            guess = known if rng.random() < 0.8 else rng.randint(0, known + 2)
            return {"op": "put", "key": key, "value": value, "if_version": guess}
        if kind == 2:
            return {"op": "delete", "key": key}
        if kind == 3:
            return {"op": "delete", "key": key, "if_version": known}
        return {"op": "get", "key": key, "consistency": "linearizable"}

    async def _connect(self, st: _ClientState) -> RawConn | None:
        eps = self._endpoints()
        for nid in st.prefer:
            if nid not in eps:
                continue
            try:
                conn = await RawConn.open(eps[nid], timeout=1.0)
            except (OSError, TimeoutError):
                continue
            st.node = nid
            return conn
        return None

    async def _client(self, st: _ClientState, rng: random.Random) -> None:
        cfg = self.cfg
        conn: RawConn | None = None
        client_deadline = cfg.timeout_ms / 1000 + 1.0  # the server's own timeout comes first
        try:
            while not self._stop.is_set():
                if conn is None:
                    conn = await self._connect(st)
                    if conn is None:
                        await asyncio.sleep(0.05)  # every node refused: pace the retries
                        continue
                req = self._next_request(st, rng)
                rec = self.history.invoke(st.idx, st.node, req)
                try:
                    rid = conn.send({**req, "timeout_ms": cfg.timeout_ms})
                    resp = await conn.recv_id(rid, timeout=client_deadline)
                except TimeoutError:
                    self.history.lost(rec, "client_deadline")
                    await conn.close()
                    conn = None
                    continue
                except (ConnectionClosed, OSError) as e:
                    self.history.lost(rec, f"connection_lost: {e}")
                    await conn.close()
                    conn = None
                    continue
                self.history.complete(rec, resp)
                if resp.get("ok"):
                    self._learn_version(st, rec, resp)
                if cfg.think_s:
                    await asyncio.sleep(rng.uniform(0, 2 * cfg.think_s))
        finally:
            if conn is not None:
                await conn.close()

    @staticmethod
    def _learn_version(st: _ClientState, rec: Rec, resp: dict) -> None:
        if rec.kind == "get" or (rec.kind == "put"):
            st.versions[rec.key] = resp["version"]
        elif rec.kind == "delete":
            st.versions[rec.key] = 0 if resp["succeeded"] else resp["version"]


async def final_reads(
    history: History, addr: tuple[str, int], node: str, keys: Iterable[bytes],
    timeout: float = 20.0,
) -> dict[bytes, tuple[bytes | None, int]]:
    """Linearizable gets of ``keys`` (recorded in ``history`` as client -1); retried on
    ``unavailable`` until ``timeout``."""
    out: dict[bytes, tuple[bytes | None, int]] = {}
    deadline = time.monotonic() + timeout
    async with await RawConn.open(addr) as c:
        for key in keys:
            while True:
                req = {"op": "get", "key": key, "consistency": "linearizable"}
                rec = history.invoke(-1, node, req)
                resp = await c.request({**req, "timeout_ms": 2000}, timeout=5)
                history.complete(rec, resp)
                if resp.get("ok"):
                    out[key] = (resp["value"], resp["version"])
                    break
                if time.monotonic() >= deadline:
                    raise HarnessError(f"final read of {key!r} via {node} kept failing: {resp}")
                await asyncio.sleep(0.05)
    return out


async def put_once(addr: tuple[str, int], key: bytes, value: bytes, timeout: float = 20.0) -> dict:
    """One unconditional put, retried only on a *definite* failure, until ``timeout``."""
    deadline = time.monotonic() + timeout
    async with await RawConn.open(addr) as c:
        while True:
            resp = await c.request({"op": "put", "key": key, "value": value, "timeout_ms": 3000},
                                   timeout=6)
            if resp.get("ok"):
                return resp
            if resp["error"].get("indeterminate") or time.monotonic() >= deadline:
                raise HarnessError(f"put {key!r} failed: {resp}")
            await asyncio.sleep(0.05)


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    return s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2


async def kill_leader_and_time_failover(
    cluster: Cluster, work: Workload, timeout: float = 20.0
) -> tuple[str, float, Rec]:
    """SIGKILL the current leader under load; returns (old leader, seconds from the SIGKILL
    to the first acknowledged write invoked after it through a surviving node, that write)."""
    leader = await cluster.async_wait_leader(cluster.running(), timeout=timeout)
    survivors = [n for n in cluster.running() if n != leader]
    srv = cluster.nodes[leader]
    t_kill = time.monotonic()
    srv.send_signal(signal.SIGKILL)
    await asyncio.to_thread(srv.wait_exit, 10)
    first = await work.wait_acked(1, timeout, after=t_kill, via=survivors)
    return leader, first.t_ret - t_kill, first


async def repeated_failover(cluster: Cluster, work: Workload, rounds: int) -> list[float]:
    """``rounds`` times: SIGKILL the leader under load, time the failover, restart the node
    and wait until it has caught up. Returns the failover times in seconds."""
    times: list[float] = []
    for i in range(rounds):
        # run a while with all nodes up, so each round starts from a settled cluster
        await work.wait_acked(50, timeout=30, after=time.monotonic())
        old, took, first = await kill_leader_and_time_failover(cluster, work)
        times.append(took)
        print(f"round {i + 1}: killed leader {old}; first write acknowledged via "
              f"{first.node} after {took * 1000:.0f} ms", flush=True)
        await asyncio.to_thread(cluster.nodes[old].restart)
        await asyncio.to_thread(cluster.wait_caught_up, old, 30.0)
    return times
