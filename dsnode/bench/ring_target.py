"""``--route ring``: one load-generator connection that sends each request to its
partition's leader.

A :class:`RingTarget` holds one :class:`~dsnode.bench.targets.DsnodeTarget` per
cluster member (plus its home endpoint if that is not a member address) and picks,
per request, the one leading the key's partition in the process's shared
:class:`RingView`. Requests whose partition has no known leader go to the home
endpoint, which forwards them. An answer carrying ``"forwarded": true`` asks the
view to fetch the map again, at most once per :data:`~dsnode.bench.routing.RING_REFRESH_MIN_S`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from dsnode.bench.routing import (
    RefreshLimiter,
    RingMap,
    RingMapError,
    RouteCounts,
    split_addr,
)
from dsnode.bench.targets import (
    Done,
    DsnodeTarget,
    Reply,
    Target,
    TargetError,
    TargetOptions,
    TxnOp,
    _error_code,
)

#: Seconds allowed for one ``ring`` request.
RING_REQUEST_TIMEOUT_S = 5.0


class RingUnsupported(Exception):
    """The server answered ``unknown_op`` to ``ring`` (a build without partitions)."""


async def request_ring(target: DsnodeTarget) -> RingMap:
    """Ask a connected node for the partition map.

    Raises :class:`RingUnsupported` on ``unknown_op``, :class:`TargetError` on another
    error answer, :class:`~dsnode.bench.routing.RingMapError` on a malformed one.
    """
    async with asyncio.timeout(RING_REQUEST_TIMEOUT_S):
        reply = await target.request({"op": "ring"})
    if reply.get("ok") is not True:
        code = _error_code(reply)
        if code == "unknown_op":
            raise RingUnsupported(f"{target.host}:{target.port} does not know the ring op")
        raise TargetError(code, "ring request failed")
    return RingMap.from_reply(reply)


async def fetch_ring(host: str, port: int, options: TargetOptions) -> RingMap:
    """Connect to ``host:port``, fetch the partition map and disconnect."""
    t = DsnodeTarget(host, port, options)
    await t.connect()
    try:
        return await request_ring(t)
    finally:
        t.close()


class RingView:
    """The partition map of one load-generator process, shared by its connections."""

    def __init__(
        self,
        ring: RingMap,
        counts: RouteCounts,
        clock: Callable[[], float],
        limiter: RefreshLimiter | None = None,
    ) -> None:
        self.map = ring
        self.counts = counts
        self.clock = clock
        self.limiter = limiter or RefreshLimiter()
        self._tasks: set[asyncio.Task[None]] = set()

    def forwarded(self, via: DsnodeTarget) -> None:
        """An answer came back forwarded: our map may be stale; refresh it if allowed."""
        if not self.limiter.try_start(self.clock()):
            return
        task = asyncio.get_running_loop().create_task(self._refresh(via))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, via: DsnodeTarget) -> None:
        try:
            self.map = await request_ring(via)
            self.counts.ring_refreshes += 1
        except (TargetError, RingMapError, RingUnsupported, OSError, TimeoutError):
            self.counts.ring_refresh_errors += 1
        finally:
            self.limiter.finished()

    async def close(self) -> None:
        """Cancel map fetches still running."""
        for t in list(self._tasks):
            t.cancel()
        for t in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await t


def _fmt_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class RingTarget(Target):
    """Connections to every member; each request goes to its partition's leader.

    The whole target counts as closed once any of its open connections closes: the
    runner then lets the rest drain and reconnects all of them.
    """

    name = "dsnode-ring"

    def __init__(
        self, host: str, port: int, options: TargetOptions | None, view: RingView
    ) -> None:
        super().__init__(host, port, options)
        self.view = view
        self.home_addr = _fmt_addr(host, port)
        self._subs: dict[str, DsnodeTarget] = {}
        #: Member addresses that could not be connected at the last connect (-> why).
        self.unreachable: dict[str, str] = {}

    async def connect(self) -> None:
        """Connect to every member; only the home endpoint is required. A member that
        cannot be reached gets no connection: its partitions go to the home endpoint,
        which forwards them (:attr:`unreachable` lists it)."""
        addrs = dict.fromkeys([*self.view.map.addrs.values(), self.home_addr])
        subs = {a: DsnodeTarget(*split_addr(a), self.options) for a in addrs}
        for sub in subs.values():
            sub.on_forwarded = self._forwarded
        got = await asyncio.gather(*(s.connect() for s in subs.values()), return_exceptions=True)
        outcome = dict(zip(subs, got, strict=True))
        home_failed = outcome[self.home_addr]
        if isinstance(home_failed, BaseException):
            for s in subs.values():
                s.close()
            raise home_failed
        self.unreachable = {a: repr(r) for a, r in outcome.items() if isinstance(r, BaseException)}
        self._subs = {a: s for a, s in subs.items() if a not in self.unreachable}
        self.server_info = dict(subs[self.home_addr].server_info)

    def _forwarded(self) -> None:
        home = self._subs.get(self.home_addr)
        if home is not None:
            self.view.forwarded(home)
        hook = self.options.on_forwarded
        if hook is not None:
            hook()

    def pick(self, key: bytes) -> DsnodeTarget:
        """The connection for ``key``: its partition leader's, else the home endpoint's."""
        ring = self.view.map
        leader = ring.leaders[ring.partition(key)]
        if leader is not None:
            sub = self._subs.get(ring.addrs[leader])
            if sub is not None and sub.is_open:
                return sub
        return self._subs[self.home_addr]

    @property
    def is_open(self) -> bool:
        return bool(self._subs) and all(s.is_open for s in self._subs.values())

    def start_put(self, key: bytes, value: bytes, done: Done) -> None:
        self.pick(key).start_put(key, value, done)

    def start_get(self, key: bytes, done: Done) -> None:
        self.pick(key).start_get(key, done)

    def start_txn(self, ops: Sequence[TxnOp], done: Done) -> None:
        self.pick(ops[0][1]).start_txn(ops, done)

    def start_call(self, key: bytes, msg: dict[str, Any], reply: Reply) -> None:
        """Send ``msg`` to the leader of ``key``'s partition (see :meth:`pick`)."""
        self.pick(key).start_call(key, msg, reply)

    def close(self) -> None:
        for s in self._subs.values():
            s.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*(s.wait_closed() for s in self._subs.values()))
