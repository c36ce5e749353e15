"""The load generator: pipelined connections driven by completion callbacks.

Each connection keeps a fixed number of requests outstanding: every completion
records its latency and immediately issues the next request on the same
connection (no task per request). ``--processes`` runs several such event loops
in separate processes and merges their HDR histograms.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import multiprocessing
import os
import queue
import random
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any, TextIO

from dsnode.bench.cpu import Capacity, CpuSample, capacity_figures, sample_cluster
from dsnode.bench.ring_target import RingTarget, RingUnsupported, RingView, fetch_ring
from dsnode.bench.routing import ROUTES, RingMapError, RouteCounts, route_summary
from dsnode.bench.stats import (
    HIST_HIGHEST_US,
    OPS,
    BenchReport,
    ProcessResult,
    encode_histogram,
    new_histogram,
)
from dsnode.bench.targets import (
    CONNECTION_LOST,
    Target,
    TargetError,
    TargetOptions,
    TxnOp,
    get_target,
)
from dsnode.bench.txns import PartitionSpread, SpreadError, Transfer, bank_summary
from dsnode.client.tls import client_ssl_context

CONSISTENCIES = ("linearizable", "stale")

# Phases reported to the progress display.
PHASE_CONNECTING, PHASE_WARMUP, PHASE_MEASURING, PHASE_DRAINING, PHASE_DONE = range(5)
PHASE_NAMES = ("connecting", "warmup", "running", "draining", "done")

#: A connection that cannot reconnect for this long stops trying (the run ends when all have).
RECONNECT_GIVE_UP_S = 30.0


class BenchError(Exception):
    """A user-facing failure (bad configuration, cannot connect, ...)."""


# --------------------------------------------------------------------------- config


def parse_mix(text: str) -> tuple[tuple[str, float], ...]:
    """Parse ``put=1,get=3,txn=0`` into weights; unnamed ops weigh 0."""
    weights = dict.fromkeys(OPS, 0.0)
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        name, sep, val = part.partition("=")
        name = name.strip()
        if not sep or name not in weights:
            raise BenchError(f"bad --mix entry {part!r}: expected OP=WEIGHT with OP in {OPS}")
        try:
            w = float(val)
        except ValueError:
            raise BenchError(f"bad --mix weight {val!r} for {name}") from None
        if w < 0 or not math.isfinite(w):
            raise BenchError(f"--mix weight for {name} must be >= 0")
        weights[name] = w
    if sum(weights.values()) <= 0:
        raise BenchError("--mix needs at least one op with a positive weight")
    return tuple(weights.items())


def parse_endpoint(text: str, default_port: int | None) -> tuple[str, int]:
    """``host:port``, ``[v6addr]:port`` or (with a default port) ``host``."""
    text = text.strip()
    host, port_s = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port_s = text.partition(":")
    if not port_s:
        if default_port is None:
            raise BenchError(f"endpoint {text!r} needs a port (host:port)")
        return host or "127.0.0.1", default_port
    try:
        port = int(port_s)
    except ValueError:
        raise BenchError(f"bad port in endpoint {text!r}") from None
    if not 0 < port < 65536:
        raise BenchError(f"port out of range in endpoint {text!r}")
    return host or "127.0.0.1", port


@dataclass(frozen=True)
class BenchConfig:
    """Everything that defines a bench run. Use :meth:`validated` before running."""

    target: str = "dsnode"
    endpoints: tuple[str, ...] = ()
    connections: int = 16
    inflight: int = 64
    key_size: int = 16
    value_size: int = 100
    keyspace: int = 100_000
    mix: tuple[tuple[str, float], ...] = (("put", 1.0), ("get", 0.0), ("txn", 0.0))
    duration: float | None = None
    requests: int | None = None
    warmup: float = 0.0
    seed: int = 1
    consistency: str = "linearizable"
    txn_ops: int = 2
    token: str | None = None
    cacert: str | None = None  # dsnode with TLS on: trust this CA
    processes: int = 1
    connect_timeout: float = 5.0
    drain_timeout: float = 5.0
    prefix: str = "bench/"
    cleanup: bool = False
    request_ids: bool = False  # dsnode: writes carry client_id/seq (PROTOCOL.md)
    route: str = "auto"  # see dsnode.bench.routing; run_bench resolves "auto"
    cpu: bool = True  # dsnode: read every member's cpu_seconds before and after
    txn_partitions: int = 0  # dsnode: txn keys in exactly this many partitions (0: anywhere)
    hot_keys: int = 0  # dsnode: txns are bank transfers among this many accounts (0: off)

    def validated(self) -> BenchConfig:
        """Check and normalise (default endpoint port, duration default, clamps)."""
        cls = get_target(self.target)
        endpoints = self.endpoints
        if not endpoints:
            if cls.default_port is None:
                raise BenchError(f"--endpoints is required for target {self.target}")
            endpoints = (f"127.0.0.1:{cls.default_port}",)
        eps = tuple(_fmt_ep(*parse_endpoint(e, cls.default_port)) for e in endpoints)
        if self.duration is not None and self.requests is not None:
            raise BenchError("give --duration or --requests, not both")
        duration = self.duration
        if duration is None and self.requests is None:
            duration = 10.0
        if duration is not None and duration <= 0:
            raise BenchError("--duration must be > 0")
        if self.requests is not None and self.requests < 1:
            raise BenchError("--requests must be >= 1")
        for name in ("connections", "inflight", "keyspace", "processes", "txn_ops"):
            if getattr(self, name) < 1:
                raise BenchError(f"--{name.replace('_', '-')} must be >= 1")
        if self.value_size < 0:
            raise BenchError("--value-size must be >= 0")
        if self.warmup < 0:
            raise BenchError("--warmup must be >= 0")
        digits = len(str(self.keyspace - 1))
        need = len(self.prefix.encode()) + digits + 1
        if self.key_size < need:
            raise BenchError(
                f"--key-size {self.key_size} too small for --prefix {self.prefix!r} and "
                f"--keyspace {self.keyspace} (needs >= {need})"
            )
        if self.route not in ROUTES:
            raise BenchError(f"--route must be one of {ROUTES}")
        if self.route == "ring" and self.target != "dsnode":
            raise BenchError("--route ring needs --target dsnode")
        if self.consistency not in CONSISTENCIES:
            raise BenchError(f"--consistency must be one of {CONSISTENCIES}")
        mix = dict(self.mix)
        if mix.get("txn", 0) > 0 and self.txn_ops * 2 > self.keyspace:
            raise BenchError("--keyspace too small for --txn-ops distinct keys")
        self._validate_txn_workload(mix.get("txn", 0) > 0)
        inflight = self.inflight
        connections = min(self.connections, inflight)
        processes = min(self.processes, connections)
        if self.requests is not None:
            processes = min(processes, self.requests)
        return replace(
            self,
            endpoints=eps,
            duration=duration,
            connections=connections,
            processes=processes,
        )

    def _validate_txn_workload(self, txns: bool) -> None:
        """``--txn-partitions`` and ``--hot-keys``: dsnode only, with txns in the mix."""
        for name in ("txn_partitions", "hot_keys"):
            value = getattr(self, name)
            flag = f"--{name.replace('_', '-')}"
            if value < 0:
                raise BenchError(f"{flag} must be >= 0")
            if value and self.target != "dsnode":
                raise BenchError(f"{flag} needs --target dsnode")
            if value and not txns:
                raise BenchError(f"{flag} needs txns in --mix (e.g. --mix txn=1)")
        if self.txn_partitions and self.hot_keys:
            raise BenchError("give --txn-partitions or --hot-keys, not both")
        if self.txn_partitions > self.txn_ops:
            raise BenchError(
                f"--txn-ops {self.txn_ops} cannot span --txn-partitions {self.txn_partitions} "
                "(one key per partition at least)"
            )
        if self.hot_keys:
            if self.txn_ops < 2:
                raise BenchError("--hot-keys: a transfer needs --txn-ops >= 2 accounts")
            if self.txn_ops > self.hot_keys:
                raise BenchError(f"--hot-keys {self.hot_keys} is fewer than --txn-ops accounts")
            need = len(self.prefix.encode()) + len(str(self.hot_keys - 1)) + 1
            if self.key_size < need:
                raise BenchError(f"--key-size {self.key_size} too small for --hot-keys "
                                 f"{self.hot_keys} (needs >= {need})")  # fmt: skip

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form (as it appears in the report)."""
        d = asdict(self)
        d["endpoints"] = list(self.endpoints)
        d["mix"] = dict(self.mix)
        d["duration_s"] = d.pop("duration")
        d["warmup_s"] = d.pop("warmup")
        d.pop("token")
        return d


def _fmt_ep(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Shard:
    """One process's part of the load: ``(host, port, depth)`` per connection."""

    index: int
    conns: tuple[tuple[str, int, int], ...]
    requests: int | None


def plan_shards(config: BenchConfig) -> list[Shard]:
    """Spread connections over endpoints and processes, and in-flight slots over connections."""
    c, p = config.connections, config.processes
    eps = [parse_endpoint(e, None) for e in config.endpoints]
    if config.route == "one-node":
        eps = eps[:1]
    per: list[list[tuple[str, int, int]]] = [[] for _ in range(p)]
    for j in range(c):
        host, port = eps[j % len(eps)]
        depth = config.inflight // c + (1 if j < config.inflight % c else 0)
        per[j % p].append((host, port, depth))
    shards = []
    for i in range(p):
        req = None
        if config.requests is not None:
            req = config.requests // p + (1 if i < config.requests % p else 0)
        shards.append(Shard(i, tuple(per[i]), req))
    return shards


# --------------------------------------------------------------------------- load


class _Load:
    """Per-process shared state of the hot path."""

    def __init__(self, config: BenchConfig, shard: Shard, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ops = [op for op, w in config.mix if w > 0]
        total = sum(w for _, w in config.mix)
        acc = 0.0
        self.cumulative: list[tuple[float, str]] = []
        for op, w in config.mix:
            if w > 0:
                acc += w / total
                self.cumulative.append((acc, op))
        self.single_op: str | None = self.ops[0] if len(self.ops) == 1 else None
        self.hists = {op: new_histogram() for op in self.ops}
        self.ok = dict.fromkeys(self.ops, 0)
        self.errors: dict[str, Counter[str]] = {op: Counter() for op in self.ops}
        self.issuing = True
        self.finished = False
        self.measure_start_ns = math.inf
        self.measure_end_ns = math.inf
        self.last_recorded_ns = 0
        self.remaining = shard.requests
        self.done_total = 0
        self.err_total = 0
        self.phase = PHASE_CONNECTING
        self.stopped: asyncio.Future[None] = loop.create_future()
        self.abort: asyncio.Future[None] = loop.create_future()
        self.interrupted = False
        self.connect_errors = 0
        self.last_connect_error: str | None = None
        rng = random.Random(f"dsnode-bench/{config.seed}/value")
        self.value = rng.randbytes(config.value_size)
        self.key_fmt = key_format(config)
        self.keyspace = config.keyspace
        self.written: bytearray | None = bytearray(config.keyspace) if config.cleanup else None
        self.txn_ops = config.txn_ops
        self.consistency = config.consistency
        #: --txn-partitions: which keys live in which partition (set by run_process)
        self.spread: PartitionSpread | None = None
        self.hot_keys = config.hot_keys
        self.hot_fmt = hot_key_format(config)
        # Every acknowledged request of the whole run (warmup and drain included): the
        # CPU samples of the capacity figure cover all of it.
        self.acked_all = dict.fromkeys(self.ops, 0)
        self.route_counts = RouteCounts()
        self.forwarded_flag = False  # set by the target just before a forwarded answer's done

    def note_forwarded(self) -> None:
        self.forwarded_flag = True

    def take_forwarded(self) -> bool:
        """Read and clear the forwarded flag (a transfer collects it per answer)."""
        flag, self.forwarded_flag = self.forwarded_flag, False
        return flag

    def stop_issuing(self) -> None:
        """No new requests from now on; outstanding ones drain."""
        self.issuing = False
        if self.phase < PHASE_DRAINING:
            self.phase = PHASE_DRAINING
        if not self.stopped.done():
            self.stopped.set_result(None)

    def interrupt(self) -> None:
        """SIGINT: first stops issuing (report what we have); second abandons the drain."""
        if self.interrupted or not self.issuing:
            if not self.abort.done():
                self.abort.set_result(None)
        self.interrupted = True
        self.stop_issuing()


class _Conn:
    """One target connection with ``depth`` requests kept outstanding."""

    def __init__(
        self,
        load: _Load,
        make_target: TargetFactory,
        host: str,
        port: int,
        depth: int,
        options: TargetOptions,
        rng: random.Random,
    ) -> None:
        self.load = load
        self.make_target = make_target
        self.host = host
        self.port = port
        self.depth = depth
        self.options = options
        self.rng = rng
        self.target: Target | None = None
        self.outstanding = 0
        self.idle: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        if self.target is not None:
            self.target.close()  # a composite target may still hold open connections
        target = self.make_target(self.host, self.port, self.options)
        await target.connect()
        self.target = target

    async def run(self) -> None:
        """Keep ``depth`` requests in flight until told to stop; reconnect if dropped."""
        load = self.load
        backoff = 0.05
        failing_since: float | None = None
        while load.issuing:
            if self.target is None or not self.target.is_open:
                try:
                    await self.connect()
                except (OSError, TimeoutError, TargetError) as exc:
                    load.connect_errors += 1
                    load.last_connect_error = f"{self.host}:{self.port}: {exc!r}"
                    now = time.monotonic()
                    failing_since = failing_since or now
                    if now - failing_since > RECONNECT_GIVE_UP_S:
                        return  # this connection is done; the others carry on
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                backoff = 0.05
                failing_since = None
            self.idle = load.loop.create_future()
            for _ in range(self.depth):
                if not load.issuing:
                    break
                self._issue()
            if self.outstanding == 0:
                self.idle.set_result(None)
            await self.idle

    def _issue(self) -> None:
        load = self.load
        target = self.target
        assert target is not None
        rng = self.rng
        op = load.single_op
        if op is None:
            r = rng.random()
            for bound, name in load.cumulative:
                if r < bound:
                    op = name
                    break
            else:
                op = load.cumulative[-1][1]
        t0 = time.perf_counter_ns()
        recorded = t0 >= load.measure_start_ns
        if recorded and load.remaining is not None:
            load.remaining -= 1
            if load.remaining <= 0:
                load.stop_issuing()
        self.outstanding += 1

        def done(code: str | None) -> None:
            self._complete(op, t0, recorded, code)

        idx = int(rng.random() * load.keyspace)
        key = load.key_fmt % idx
        if op == "put":
            if load.written is not None:
                load.written[idx] = 1
            target.start_put(key, load.value, done)
        elif op == "get":
            target.start_get(key, done)
        elif load.hot_keys:
            self._transfer(target, done)
        else:
            target.start_txn(self._txn_ops(idx), done)

    def _transfer(self, target: Target, done: Callable[[str | None], None]) -> None:
        """A bank transfer among --txn-ops hot accounts (dsnode.bench.txns.Transfer)."""
        load = self.load
        rng = self.rng
        accounts = [load.hot_fmt % a for a in rng.sample(range(load.hot_keys), load.txn_ops)]

        def finish(code: str | None, forwarded: bool) -> None:
            load.forwarded_flag = forwarded  # counted once, for the whole transfer
            done(code)

        Transfer(target, accounts, 1 + int(rng.random() * 100), load.consistency,  # type: ignore[arg-type]
                 load.take_forwarded, finish).start()  # fmt: skip

    def _txn_ops(self, first: int) -> list[TxnOp]:
        load = self.load
        if load.spread is not None:
            idxs = load.spread.draw(self.rng)
        else:
            idxs = [first]
            seen = {first}
            while len(idxs) < load.txn_ops:
                i = int(self.rng.random() * load.keyspace)
                if i not in seen:
                    seen.add(i)
                    idxs.append(i)
        written = load.written
        if written is not None:
            for i in idxs[::2]:
                written[i] = 1
        # Alternate put, get, put, ... on distinct keys (each key written at most once).
        fmt = load.key_fmt
        return [
            ("put", fmt % k, load.value) if i % 2 == 0 else ("get", fmt % k, None)
            for i, k in enumerate(idxs)
        ]

    def _complete(self, op: str, t0: int, recorded: bool, code: str | None) -> None:
        t1 = time.perf_counter_ns()
        load = self.load
        if load.finished:
            return
        self.outstanding -= 1
        load.done_total += 1
        forwarded = load.forwarded_flag
        load.forwarded_flag = False
        if recorded and t1 <= load.measure_end_ns and code != CONNECTION_LOST:
            load.route_counts.answers += 1
            load.route_counts.forwarded += forwarded
        if code is None:
            load.acked_all[op] += 1
            if recorded and t1 <= load.measure_end_ns:
                us = (t1 - t0) // 1000
                load.hists[op].record_value(
                    1 if us < 1 else (us if us < HIST_HIGHEST_US else HIST_HIGHEST_US)
                )
                load.ok[op] += 1
                load.last_recorded_ns = t1
        else:
            load.err_total += 1
            if recorded and t1 <= load.measure_end_ns:
                load.errors[op][code] += 1
                load.last_recorded_ns = t1
        target = self.target
        if load.issuing and target is not None and target.is_open:
            self._issue()
        elif self.outstanding == 0 and self.idle is not None and not self.idle.done():
            self.idle.set_result(None)


#: Builds one connection's target from ``(host, port, options)``.
TargetFactory = Callable[[str, int, TargetOptions], Target]

#: ``tick(phase, done_total, err_total)``, called periodically while running.
TickFn = Callable[[int, int, int], None]


async def run_process(
    config: BenchConfig,
    shard: Shard,
    *,
    tick: TickFn | None = None,
    tick_interval: float = 1.0,
    before_start: Callable[[], None] | None = None,
    handle_sigint: bool = False,
) -> ProcessResult:
    """Run one process's share of the load on the running event loop.

    ``before_start`` (blocking, run in a thread) is called once all connections are
    up, to line processes up on a barrier. ``config`` must be :meth:`validated`.
    """
    loop = asyncio.get_running_loop()
    load = _Load(config, shard, loop)
    options = TargetOptions(
        consistency=config.consistency,
        token=config.token,
        connect_timeout=config.connect_timeout,
        ssl=client_ssl_context(config.cacert) if config.cacert else None,
        request_ids=config.request_ids,
        on_forwarded=load.note_forwarded,
    )
    view: RingView | None = None
    make_target: TargetFactory = get_target(config.target)
    if config.route == "ring":
        view = await _ring_view(shard, options, load.route_counts)
        make_target = functools.partial(RingTarget, view=view)
    if config.txn_partitions:
        ring_map = view.map if view is not None else (await _ring_view(
            shard, options, load.route_counts, "--txn-partitions")).map  # fmt: skip
        try:
            load.spread = PartitionSpread(load.key_fmt, config.keyspace, ring_map.partitions,
                                          config.txn_partitions, config.txn_ops)  # fmt: skip
        except SpreadError as exc:
            raise BenchError(str(exc)) from None

    conns = [
        _Conn(
            load,
            make_target,
            host,
            port,
            depth,
            options,
            random.Random(f"{config.seed}/{shard.index}/{j}"),
        )
        for j, (host, port, depth) in enumerate(shard.conns)
    ]
    ticker: asyncio.Task[None] | None = None
    tasks: list[asyncio.Task[None]] = []
    if handle_sigint:
        loop.add_signal_handler(signal.SIGINT, load.interrupt)
    try:
        outcomes = await asyncio.gather(*(c.connect() for c in conns), return_exceptions=True)
        for c, out in zip(conns, outcomes, strict=True):
            if isinstance(out, BaseException):
                raise BenchError(f"cannot connect to {c.host}:{c.port} ({config.target}): {out!r}")
        if before_start is not None:
            await loop.run_in_executor(None, before_start)
        if tick is not None:
            ticker = loop.create_task(_ticker(load, tick, tick_interval))

        start = time.perf_counter_ns()
        load.measure_start_ns = start + int(config.warmup * 1e9)
        load.phase = PHASE_WARMUP if config.warmup > 0 else PHASE_MEASURING
        if config.warmup > 0:
            loop.call_later(config.warmup, _begin_measuring, load)
        if config.duration is not None:
            load.measure_end_ns = load.measure_start_ns + int(config.duration * 1e9)
            loop.call_later(config.warmup + config.duration, load.stop_issuing)
        tasks = [loop.create_task(c.run()) for c in conns]
        drain = asyncio.gather(*tasks, return_exceptions=True)
        # Until told to stop, or until every connection gave up reconnecting.
        await asyncio.wait([load.stopped, drain], return_when=asyncio.FIRST_COMPLETED)
        load.stop_issuing()
        await asyncio.wait(
            [drain, load.abort], timeout=config.drain_timeout, return_when=asyncio.FIRST_COMPLETED
        )
        incomplete = sum(c.outstanding for c in conns)
        load.finished = True
        load.phase = PHASE_DONE
        for t in tasks:
            if t.done() and not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
    finally:
        load.finished = True
        for t in tasks:
            t.cancel()
        if ticker is not None:
            ticker.cancel()
        if view is not None:
            await view.close()
        for c in conns:
            if c.target is not None:
                c.target.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                for c in conns:
                    if c.target is not None:
                        await c.target.wait_closed()
        if handle_sigint:
            loop.remove_signal_handler(signal.SIGINT)
    if tick is not None:
        tick(PHASE_DONE, load.done_total, load.err_total)

    if config.duration is not None:
        window_ns = min(time.perf_counter_ns(), load.measure_end_ns) - load.measure_start_ns
        if load.interrupted:
            window_ns = min(window_ns, max(load.last_recorded_ns - load.measure_start_ns, 0))
    else:
        window_ns = max(load.last_recorded_ns - load.measure_start_ns, 0)
    info = next((c.target.server_info for c in conns if c.target and c.target.server_info), {})
    return ProcessResult(
        window_s=max(window_ns, 0) / 1e9,
        ok=dict(load.ok),
        errors={op: dict(c) for op, c in load.errors.items()},
        histograms={op: encode_histogram(h) for op, h in load.hists.items() if h.get_total_count()},
        incomplete=incomplete,
        connect_errors=load.connect_errors,
        last_connect_error=load.last_connect_error,
        server_info=dict(info),
        interrupted=load.interrupted,
        written=bytes(load.written) if load.written is not None else None,
        acked_all=dict(load.acked_all),
        route_counts=asdict(load.route_counts),
    )


async def _ring_view(
    shard: Shard, options: TargetOptions, counts: RouteCounts, why: str = "--route ring"
) -> RingView:
    """This process's copy of the partition map, from its first connection's endpoint."""
    host, port, _ = shard.conns[0]
    try:
        ring = await fetch_ring(host, port, options)
    except RingUnsupported as exc:
        raise BenchError(f"{why}: {exc}") from None
    except (OSError, TimeoutError, TargetError, RingMapError) as exc:
        raise BenchError(f"{why}: cannot fetch the ring map from {host}:{port}: {exc!r}") from None
    return RingView(ring, counts, asyncio.get_running_loop().time)


def _begin_measuring(load: _Load) -> None:
    if load.phase == PHASE_WARMUP:
        load.phase = PHASE_MEASURING


async def _ticker(load: _Load, tick: TickFn, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        tick(load.phase, load.done_total, load.err_total)


# --------------------------------------------------------------------------- progress


class Progress:
    """A one-line progress display (``\\r``-rewritten on a TTY, plain lines otherwise)."""

    def __init__(self, stream: TextIO, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.t0 = time.monotonic()
        self.last_t = self.t0
        self.last_done = 0
        self.width = 0

    def update(self, phase: int, done_total: int, err_total: int) -> None:
        now = time.monotonic()
        dt = now - self.last_t
        rate = (done_total - self.last_done) / dt if dt > 0 else 0.0
        self.last_t, self.last_done = now, done_total
        line = (
            f"[{now - self.t0:5.0f}s] {PHASE_NAMES[phase]:<10} {rate:>10,.0f} req/s  "
            f"done {done_total:,}  errors {err_total:,}"
        )
        if self.tty:
            pad = max(self.width - len(line), 0)
            self.width = len(line)
            self.stream.write("\r" + line + " " * pad)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


# --------------------------------------------------------------------------- entry points


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def run_bench(config: BenchConfig, progress: Progress | None = None) -> BenchReport:
    """Run a whole bench (one or more processes) and return the merged report.

    For dsnode it also resolves ``--route auto`` (or a ``ring`` route the server does
    not support) and, with ``cpu``, reads every member's CPU seconds before and after.
    """
    config = config.validated()
    dsnode = config.target == "dsnode"
    note: str | None = None
    before: CpuSample | None = None
    cpu_note: str | None = None
    with asyncio.Runner(loop_factory=_new_loop) as runner:
        route, note = runner.run(resolve_route(config))
        config = replace(config, route=route)
        if dsnode and config.cpu:
            before, cpu_note = runner.run(_sample_cpu(config, None))
    shards = plan_shards(config)
    ops = [op for op, w in config.mix if w > 0]
    if len(shards) == 1:
        tick = progress.update if progress is not None else None
        in_main = threading.current_thread() is threading.main_thread()
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            result = runner.run(run_process(config, shards[0], tick=tick, handle_sigint=in_main))
        results = [result]
    else:
        results = _run_multi(config, shards, progress)
    if progress is not None:
        progress.close()
    report = BenchReport.merge(config.to_json(), ops, results)
    if dsnode:
        report.routing = route_summary(config.route, note, report.route_counts)
    txn = report.per_op.get("txn")
    if config.hot_keys and txn is not None:
        report.bank = bank_summary(txn.ok, dict(txn.errors), txn.throughput, config.hot_keys,
                                   config.txn_ops)  # fmt: skip
    if before is not None:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            after, _ = runner.run(_sample_cpu(config, before.members))
        assert after is not None  # the member list was given
        acked = report.acked_all
        others = sum(n for op, n in acked.items() if op != "put")
        report.capacity = capacity_figures(before, after, acked.get("put", 0), others)
    elif cpu_note is not None:
        report.capacity = Capacity({}, report.acked_all.get("put", 0), notes=(cpu_note,))
    if config.cleanup:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            report.cleanup = runner.run(cleanup_written(config, results))
    return report


async def resolve_route(config: BenchConfig) -> tuple[str, str | None]:
    """The route to run with, and a note when it is not the one asked for.

    ``auto`` is ``ring`` when the first endpoint answers the ``ring`` op, else
    ``spread``; an explicit ``ring`` the server does not support falls back to
    ``one-node``. Targets other than dsnode never route by ring.
    """
    if config.route not in ("auto", "ring"):
        return config.route, None
    if config.target != "dsnode":
        return "spread", None
    host, port = parse_endpoint(config.endpoints[0], None)
    options = _control_options(config)
    try:
        await fetch_ring(host, port, options)
    except RingUnsupported:
        fallback = "one-node" if config.route == "ring" else "spread"
        return fallback, (
            f"{host}:{port} answered unknown_op to the ring op (no partition map): "
            f"--route {config.route} ran as --route {fallback}; such a build may also "
            "forward without marking answers forwarded, so the forwarded share can read 0"
        )
    except (OSError, TimeoutError, TargetError) as exc:
        raise BenchError(f"cannot connect to {host}:{port} (dsnode): {exc!r}") from None
    except RingMapError as exc:
        raise BenchError(f"{host}:{port} answered the ring op with a malformed map: {exc}") from None
    return "ring", None


def _control_options(config: BenchConfig) -> TargetOptions:
    """Options of the bench's own one-off connections (ring map, status)."""
    return TargetOptions(
        token=config.token,
        connect_timeout=config.connect_timeout,
        ssl=client_ssl_context(config.cacert) if config.cacert else None,
    )


async def _sample_cpu(
    config: BenchConfig, members: dict[str, str] | None
) -> tuple[CpuSample | None, str | None]:
    host, port = parse_endpoint(config.endpoints[0], None)
    options = _control_options(config)
    return await sample_cluster(host, port, options, members)


def key_format(config: BenchConfig, letter: bytes = b"k") -> bytes:
    """``%`` format of the keys: the prefix, ``letter`` (``k``), the index zero-padded to
    key_size."""
    prefix = config.prefix.encode()
    width = config.key_size - len(prefix) - 1
    return prefix.replace(b"%", b"%%") + letter + b"%0" + str(width).encode() + b"d"


def hot_key_format(config: BenchConfig) -> bytes:
    """``%`` format of the ``--hot-keys`` accounts: as :func:`key_format` with ``h``
    (never one of the keyspace's keys)."""
    return key_format(config, b"h")


CLEANUP_BATCH = 64  # deletes per txn (under the server's default max_txn_ops of 128)
CLEANUP_CONCURRENCY = 16  # txns in flight on the cleanup connection


async def cleanup_written(config: BenchConfig, results: Sequence[ProcessResult]) -> dict[str, int]:
    """Delete every key some process wrote (or may have written), in batched txns over one
    connection to the first endpoint; returns ``{"deleted", "errors"}`` (failed batches)."""
    written = bytearray(config.keyspace)
    for r in results:
        if r.written is not None:
            for i, b in enumerate(r.written):
                if b:
                    written[i] = 1
    fmt = key_format(config)
    keys = [fmt % i for i, b in enumerate(written) if b]
    hot = hot_key_format(config)
    keys.extend(hot % i for i in range(config.hot_keys))
    host, port = parse_endpoint(config.endpoints[0], get_target(config.target).default_port)
    options = TargetOptions(token=config.token, connect_timeout=config.connect_timeout)
    target = get_target(config.target)(host, port, options)
    try:
        await target.connect()
    except (OSError, TimeoutError, TargetError) as exc:
        raise BenchError(f"--cleanup: cannot connect to {host}:{port}: {exc!r}") from None
    batches = [keys[i:i + CLEANUP_BATCH] for i in range(0, len(keys), CLEANUP_BATCH)]
    deleted = errors = 0
    sem = asyncio.Semaphore(CLEANUP_CONCURRENCY)

    async def one(batch: list[bytes]) -> None:
        nonlocal deleted, errors
        async with sem:
            code = await target.txn([("delete", k, None) for k in batch])
        if code is None:
            deleted += len(batch)
        else:
            errors += 1

    try:
        await asyncio.gather(*(one(b) for b in batches))
    finally:
        target.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await target.wait_closed()
    return {"deleted": deleted, "errors": errors}


def _child_main(
    config: BenchConfig,
    shard: Shard,
    barrier: Any,
    counters: Any,
    results: Any,
) -> None:
    """Entry point of a load-generator process (spawned)."""
    with contextlib.suppress(OSError):
        os.setpgrp()  # the parent forwards SIGINT itself, exactly once
    base = shard.index * 3

    def tick(phase: int, done_total: int, err_total: int) -> None:
        counters[base] = done_total
        counters[base + 1] = err_total
        counters[base + 2] = phase

    def wait_barrier() -> None:
        barrier.wait(timeout=config.connect_timeout * 4 + 30)

    try:
        with asyncio.Runner(loop_factory=_new_loop) as runner:
            res = runner.run(
                run_process(
                    config,
                    shard,
                    tick=tick,
                    tick_interval=0.25,
                    before_start=wait_barrier,
                    handle_sigint=True,
                )
            )
        results.put(("ok", shard.index, res))
    except BaseException as exc:  # report everything to the parent
        with contextlib.suppress(Exception):
            barrier.abort()
        msg = str(exc) if isinstance(exc, BenchError) else repr(exc)
        results.put(("error", shard.index, msg))


def _run_multi(
    config: BenchConfig, shards: Sequence[Shard], progress: Progress | None
) -> list[ProcessResult]:
    ctx = multiprocessing.get_context("spawn")
    n = len(shards)
    barrier = ctx.Barrier(n)
    counters = ctx.Array("q", 3 * n, lock=False)
    results_q = ctx.Queue()
    procs = [
        ctx.Process(
            target=_child_main,
            args=(config, s, barrier, counters, results_q),
            name=f"dsnode-bench-{s.index}",
            daemon=True,
        )
        for s in shards
    ]
    sigints = 0

    def on_sigint(signum: int, frame: object) -> None:
        nonlocal sigints
        sigints += 1
        for p in procs:
            if p.pid is not None and p.is_alive():
                with contextlib.suppress(OSError):
                    os.kill(p.pid, signal.SIGINT)

    in_main = threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGINT, on_sigint) if in_main else None
    got: dict[int, ProcessResult] = {}
    errors: list[str] = []
    try:
        for p in procs:
            p.start()
        next_tick = time.monotonic() + 1.0
        while len(got) + len(errors) < n:
            try:
                kind, idx, payload = results_q.get(timeout=max(next_tick - time.monotonic(), 0.05))
                if kind == "ok":
                    got[idx] = payload
                else:
                    errors.append(f"process {idx}: {payload}")
            except queue.Empty:
                pass
            if time.monotonic() >= next_tick:
                next_tick += 1.0
                if progress is not None:
                    phases = [counters[3 * i + 2] for i in range(n)]
                    progress.update(
                        min(phases),
                        sum(counters[3 * i] for i in range(n)),
                        sum(counters[3 * i + 1] for i in range(n)),
                    )
                dead = [p for p in procs if not p.is_alive() and p.exitcode not in (0, None)]
                if dead and results_q.empty():
                    # A child died without reporting (killed); do not wait forever.
                    for p in dead:
                        errors.append(f"process {p.name} exited with {p.exitcode}")
                    break
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        if old is not None:
            signal.signal(signal.SIGINT, old)
    if errors:
        raise BenchError("; ".join(sorted(set(errors))))
    return [got[i] for i in sorted(got)]


def print_report(report: BenchReport, output: str, stream: TextIO | None = None) -> None:
    """Write the report as text or one JSON object."""
    stream = stream or sys.stdout
    stream.write((report.render_json() if output == "json" else report.render_text()) + "\n")


__all__ = [
    "BenchConfig",
    "BenchError",
    "Progress",
    "Shard",
    "parse_endpoint",
    "parse_mix",
    "plan_shards",
    "print_report",
    "run_bench",
    "run_process",
]
