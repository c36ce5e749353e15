"""The dsnode client: asyncio :class:`Client` and its blocking twin :class:`SyncClient`.

Wire contract: /work/shared/PROTOCOL.md (msgpack maps in length-prefixed frames, requests
matched to responses by ``id``).

Connections and pipelining
    A client holds ``pool_size`` TCP connections (default 1). Each carries any number of
    concurrent requests; ids are client-wide increasing ints starting at 1, and the
    connection's protocol object resolves the waiting futures by id as frames arrive, in any
    order. A request goes to the open connection with the fewest requests in flight; a dead
    pool slot is reconnected in the background (with backoff) while the others carry on.
    Frames queued during one event-loop turn are written with one syscall.

Endpoints
    ``endpoints`` is a list of ``host:port`` (or one comma-separated string). The client
    connects to the first reachable one; when a connection is lost, the next connect starts
    at the next endpoint (round-robin). After a full round of failed connects it backs off
    exponentially (50 ms doubling to 1 s, with jitter). Waiting for a connection is bounded
    by ``dial_timeout`` (default 2 s, and never past the call's deadline): a call that gets
    no connection in that time fails with :class:`ConnectFailed` (definite, nothing sent),
    and so does a round in which every endpoint refused the connection outright (nothing
    listening there), at once. If ``token`` is set, ``hello`` with it is the first request on
    every new connection. With ``discover=True`` the client asks the first node that answers
    for its ``status`` and adds the other members' addresses to its endpoints (as etcd's
    client does), so a later failover can reach nodes it was not told about.

Ring-aware routing (on by default; ``ring_aware=False`` turns it off)
    The keyspace is split into partitions, each led by one node. The client asks a node of
    its pool for the partition map (the ``ring`` op) on the first keyed call, and sends each
    ``get``/``put``/``delete`` (a ``txn``: the partition of its first key) straight to its
    partition's leader, connecting to that member if needed (with TLS and the token, like
    any connection), so the node need not forward it. A ``stale`` get goes to any replica
    of the partition. Among equally eligible endpoints the client picks the one with the
    fewest of its requests in flight, ties broken by a ``random.Random`` seeded with
    ``seed`` (default: from ``os.urandom``). An answer with ``forwarded: true`` (the node
    sent the request on), an ``unavailable`` answer or a lost connection makes it fetch
    the map again, at most once per ``RING_REFRESH_MIN_S``. A request takes the usual
    route (the pool, below) when the map is not known, names no leader or no address, or
    the leader cannot be connected (then it is left alone for ``DIRECT_RETRY_S``); a
    server without the op (``unknown_op``) is not asked again. ``stats`` counts requests
    ``sent`` and answers ``forwarded``, so a bench can report the forwarded share.

Deadlines
    Every call has a deadline, ``timeout`` seconds (per call, else the client default) from
    the call's start. It bounds connecting, retries and waiting, and is sent to the server as
    ``timeout_ms``: the time left when the frame is sent, less a margin (10%, at most
    200 ms) so that the server's own answer at its deadline (``timeout``, or ``unavailable``
    when it never found a leader) reaches the client before the client gives up. With no
    answer at all by the deadline the call raises :class:`DeadlineExceeded`.

Retry rule (the important one)
    Reads (``get``, ``status``, ``hello``) are retried within the deadline after a lost
    connection, ``unavailable`` or ``overloaded``. Writes are retried when they provably had
    no effect: never written to a socket (no connection yet, connection already closed), or
    answered ``unavailable``/``overloaded`` with ``indeterminate=false``. ``conflict`` is
    never retried automatically (the caller usually wants to re-read first).

Request ids (idempotent write retries)
    ``put``, ``delete`` and ``txn`` carry a request id: ``client_id`` (16 random bytes per
    client instance) and ``seq`` (1, 2, ... per client instance; PROTOCOL.md, "Client
    request ids"). The server applies one id at most once and answers a repeat with the
    first result, so a write whose connection dropped after it was written, or that was
    answered ``unavailable`` with ``indeterminate=true``, is sent again with the same id and
    ``retry=true`` (on the next endpoint, as a lost connection moves there) until the
    deadline. If the server no longer knows the id it answers ``expired``
    (:class:`Expired`, indeterminate). With ``request_ids=False``, or against a server that
    refuses the fields (an older version: ``bad_request``, unknown field, which the client
    then remembers), writes carry no id and are NEVER sent again once they may have reached
    the server: a drop or a deadline after the write raises :class:`ConnectionLost` or a
    :class:`Timeout` with ``indeterminate=True``. Other ops sent through
    :meth:`Client.request` that are not known reads are treated like writes without an id.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import ssl as _ssl
import threading
from collections.abc import Awaitable, Callable, Iterable, Sequence
from concurrent.futures import Future as ConcurrentFuture
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar, cast

import msgpack

from dsnode.client.endpoints import fmt_endpoint as _fmt_endpoint
from dsnode.client.endpoints import parse_endpoints
from dsnode.client.errors import (
    CONNECTION_LOST,
    ConnectFailed,
    ConnectionLost,
    DeadlineExceeded,
    DsnodeError,
    Internal,
    TooLarge,
    Unavailable,
    UnknownOp,
    error_from_wire,
)
from dsnode.client.ring import RingMap
from dsnode.client.tls import client_ssl_context
from dsnode.core.router.least_conn import InFlight, pick
from dsnode.wire import errors as codes
from dsnode.wire.framing import (
    DEFAULT_MAX_FRAME_BYTES,
    HEADER,
    FrameDecoder,
    FrameError,
    unpack_payload,
)

__all__ = [
    "Client",
    "SyncClient",
    "Op",
    "GetResult",
    "PutResult",
    "DeleteResult",
    "TxnResult",
    "Compare",
    "parse_endpoints",
    "READ_OPS",
    "DEFAULT_TIMEOUT",
    "DEFAULT_DIAL_TIMEOUT",
]

DEFAULT_TIMEOUT = 5.0
DEFAULT_DIAL_TIMEOUT = 2.0
_SERVER_MARGIN_MAX_S = 0.2  # timeout_ms is sent this much (or 10%) below the client deadline
CLIENT_NAME = "dsnode-py/0.1"

READ_OPS = frozenset({"get", "status", "hello", "ring"})
"""Ops that never change state, so the client may send them again."""

_RETRY_CODES = frozenset({codes.UNAVAILABLE, codes.OVERLOADED, CONNECTION_LOST})
# failures with an unknown outcome that a write with a request id may retry (same id)
_ID_RETRY_CODES = frozenset({codes.UNAVAILABLE, CONNECTION_LOST})
ID_WRITE_OPS = frozenset({"put", "delete", "txn"})
"""Ops that carry a request id (``client_id``, ``seq``) unless ``request_ids=False``."""
CLIENT_ID_BYTES = 16
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0
RING_REFRESH_MIN_S = 0.5
"""The partition map is fetched again at most this often (seconds)."""
DIRECT_RETRY_S = 1.0
"""A member endpoint that could not be connected is not tried again for this long."""

KeyLike = str | bytes | bytearray | memoryview
T = TypeVar("T")


# --------------------------------------------------------------------------- results


class GetResult(NamedTuple):
    """``value`` is ``None`` when the key is absent (then ``version`` is 0)."""

    value: bytes | None
    version: int


class PutResult(NamedTuple):
    """``version`` is the new version on success, else the key's current version."""

    succeeded: bool
    version: int


class DeleteResult(NamedTuple):
    """``version`` is the version just before the request (0 if absent); on a failed
    ``if_version``, the current version."""

    succeeded: bool
    existed: bool
    version: int


class TxnResult(NamedTuple):
    """``succeeded`` says which branch ran; ``results`` answers its sub-ops in order.

    Each result is the server's map with bytes values: ``{"value", "version"}`` for a get,
    ``{"version"}`` for a put, ``{"existed"}`` for a delete.
    """

    succeeded: bool
    results: list[dict[str, Any]]


class Compare(NamedTuple):
    """Transaction guard: holds when ``key``'s current version equals ``version`` (0: absent)."""

    key: KeyLike
    version: int


@dataclass(frozen=True, slots=True)
class Op:
    """One transaction sub-op; build with :meth:`Op.get`, :meth:`Op.put`, :meth:`Op.delete`."""

    op: str
    key: bytes
    value: bytes | None = None

    @staticmethod
    def get(key: KeyLike) -> Op:
        return Op("get", _to_bytes(key, "key"))

    @staticmethod
    def put(key: KeyLike, value: KeyLike) -> Op:
        return Op("put", _to_bytes(key, "key"), _to_bytes(value, "value"))

    @staticmethod
    def delete(key: KeyLike) -> Op:
        return Op("delete", _to_bytes(key, "key"))

    def to_wire(self) -> dict[str, Any]:
        if self.op == "put":
            return {"op": "put", "key": self.key, "value": self.value}
        return {"op": self.op, "key": self.key}


def _to_bytes(data: object, what: str) -> bytes:
    """str -> UTF-8 bytes; bytes-like -> bytes; anything else is a TypeError."""
    if type(data) is bytes:
        return data
    if isinstance(data, str):
        return data.encode()
    if isinstance(data, bytes | bytearray | memoryview):
        return bytes(data)
    raise TypeError(f"{what} must be str or bytes, not {type(data).__name__}")


# --------------------------------------------------------------------------- connection


class _Closed(Exception):
    """Internal: the connection closed while a request waited; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Expired(Exception):
    """Internal: the call's deadline passed while waiting on a future."""


def _expire(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())


class _Connection(asyncio.Protocol):
    """One TCP connection: writes frames, resolves pending futures by response id.

    Invariants: ``pending`` holds only futures whose caller is still waiting (callers remove
    their own entry when they stop waiting); once ``open`` is False it never becomes True
    again, and every future still pending has been failed with :class:`_Closed`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        endpoint_index: int,
        endpoint: tuple[str, int],
        max_frame_bytes: int,
        on_lost: Callable[[_Connection], None],
    ) -> None:
        self.loop = loop
        self.endpoint_index = endpoint_index  # in the client's endpoints; -1: a member's
        self.endpoint = endpoint
        self.name = _fmt_endpoint(*endpoint)  # the key of the client's in-flight counts
        self.max_frame_bytes = max_frame_bytes
        self.on_lost = on_lost
        self.transport: asyncio.Transport | None = None
        self.pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.open = False
        self.paused = False
        self.close_reason = "connection closed"
        self.closed: asyncio.Future[None] = loop.create_future()
        self._decoder = FrameDecoder(max_frame_bytes)
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._out: list[bytes] = []  # frames queued for the next flush (write coalescing)

    # -- asyncio.Protocol callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence the cast.
        self.transport = cast(asyncio.Transport, transport)
        self.open = True

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FrameError as exc:
            self.abort(f"server sent a bad frame ({exc.code}: {exc.message})")
            return
        pending = self.pending
        limit = self.max_frame_bytes
        for payload in frames:
            try:
                msg = unpack_payload(payload, limit)
            except Exception as exc:  # msgpack raises a family of ValueErrors
                self.abort(f"server sent an undecodable frame: {exc}")
                return
            if type(msg) is not dict:
                self.abort("server sent a frame that is not a map")
                return
            rid = msg.get("id")
            if type(rid) is not int:
                self.abort(f"server sent a response without an integer id: {rid!r:.40}")
                return
            fut = pending.pop(rid, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(msg)
            elif rid == 0:
                # Connection-level error; the server closes the connection next.
                err = error_from_wire(msg.get("error"), True)
                self.close_reason = f"server closed the connection ({err.code}: {err.message})"
            # Otherwise: a late answer to a request whose caller gave up. Ignore it.

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.close_reason == "connection closed":
            self.close_reason = f"connection lost: {exc}"
        self.open = False
        pending, self.pending = self.pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(_Closed(self.close_reason))
        self._wake_writers(_Closed(self.close_reason))
        if not self.closed.done():
            self.closed.set_result(None)
        self.on_lost(self)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._wake_writers(None)

    # -- used by the client

    def write(self, frame: bytes) -> None:
        """Queue ``frame``; all frames queued in one loop iteration go out in one write.

        Coalescing turns N pipelined requests into one syscall instead of N; a lone request
        (nothing else in flight) is written at once to keep latency low. A frame queued
        on a connection that is lost before the flush is never sent, but its caller still
        treats it as possibly sent (conservative, never wrong).
        """
        out = self._out
        if not out:
            if len(self.pending) <= 1 and self.transport is not None:
                # Nothing else in flight: no batch to join, so skip the extra loop turn.
                self.transport.write(frame)
                return
            self.loop.call_soon(self._flush)
        out.append(frame)

    def _flush(self) -> None:
        out = self._out
        if not out:
            return
        self._out = []
        if self.open and self.transport is not None:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _wake_writers(self, exc: Exception | None) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for w in waiters:
            if not w.done():
                if exc is None:
                    w.set_result(None)
                else:
                    w.set_exception(exc)

    async def wait_writable(self) -> None:
        """Wait until the transport's write buffer drains below its high-water mark.

        Raises :class:`_Closed` if the connection closes first.
        """
        while self.paused and self.open:
            w: asyncio.Future[None] = self.loop.create_future()
            self._drain_waiters.append(w)
            await w
        if not self.open:
            raise _Closed(self.close_reason)

    def abort(self, reason: str) -> None:
        if self.open:
            self.close_reason = reason
        if self.transport is not None:
            self.transport.abort()

    def close(self, reason: str) -> None:
        if self.open:
            self.close_reason = reason
        if self.transport is not None:
            self.transport.close()


# --------------------------------------------------------------------------- client


class Client:
    """Asyncio dsnode client. See the module docstring for connections, deadlines, retries.

    Use ``async with Client("h1:7379,h2:7379") as c: ...`` or ``await c.connect()`` and
    ``await c.close()``. Calls connect lazily too. Keys and values accept ``str`` (sent as
    UTF-8) or bytes; responses carry bytes. A client is bound to the event loop it first runs
    on and must only be used from that loop.

    Errors are subclasses of :class:`dsnode.client.errors.DsnodeError`; bad argument types
    raise ``TypeError``/``ValueError``.
    """

    def __init__(
        self,
        endpoints: str | Sequence[str],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        token: str | None = None,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        pool_size: int = 1,
        client_name: str = CLIENT_NAME,
        dial_timeout: float = DEFAULT_DIAL_TIMEOUT,
        discover: bool = False,
        cacert: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        ssl: _ssl.SSLContext | None = None,
        request_ids: bool = True,
        ring_aware: bool = True,
        seed: int | None = None,
    ) -> None:
        if timeout <= 0:
            raise ValueError("timeout must be > 0")
        if dial_timeout <= 0:
            raise ValueError("dial_timeout must be > 0")
        if pool_size < 1:
            raise ValueError("pool_size must be >= 1")
        if max_frame_bytes < 1:
            raise ValueError("max_frame_bytes must be >= 1")
        self._endpoints = parse_endpoints(endpoints)
        # TLS: an explicit context, or one built from cacert/cert/key (dsnode.client.tls).
        self._ssl = ssl if ssl is not None else client_ssl_context(cacert, cert, key)
        self.timeout = float(timeout)
        self.dial_timeout = float(dial_timeout)
        self._discover = discover
        self._discovered = False
        self._token = token
        self._client_name = client_name
        self._max_frame_bytes = max_frame_bytes
        self._slots: list[_Connection | None] = [None] * pool_size
        self._connecting: dict[int, asyncio.Task[_Connection]] = {}
        self._slot_retry_at: dict[int, float] = {}  # no background reconnect before this time
        self._preferred = 0  # index of the endpoint the next connect tries first
        self._failed_rounds = 0  # consecutive connect rounds in which every endpoint failed
        self._ids = itertools.count(1)
        self.request_ids = request_ids
        """Whether writes carry ``client_id``/``seq`` (turned off if the server refuses them)."""
        self.client_id = os.urandom(CLIENT_ID_BYTES)
        self._seqs = itertools.count(1)
        self.write_retries = 0
        """Writes sent again with their request id after an unknown outcome."""
        self._packer = msgpack.Packer(use_bin_type=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self.server_info: dict[str, Any] | None = None
        """The last ``hello`` answer received on a new connection (only with a token)."""
        self.ring_aware = ring_aware
        """Whether keyed requests go straight to their partition's leader (see above)."""
        self._ring_on = ring_aware  # turned off for good by a server without the ring op
        self._ring: RingMap | None = None
        self._ring_dirty = ring_aware  # a (re)fetch of the map is wanted
        self._ring_next_at = 0.0  # loop time before which no fetch starts
        self._ring_task: asyncio.Task[None] | None = None
        # Connections to members chosen from the map, by endpoint, beside the pool's.
        self._direct: dict[tuple[str, int], _Connection] = {}
        self._direct_connecting: dict[tuple[str, int], asyncio.Task[_Connection]] = {}
        self._direct_retry_at: dict[tuple[str, int], float] = {}
        self._inflight = InFlight()  # requests awaiting an answer, per endpoint name
        self._rng = random.Random(
            seed if seed is not None else int.from_bytes(os.urandom(8), "big")
        )
        self.stats: dict[str, int] = dict.fromkeys(
            ("sent", "forwarded", "routed", "ring_fetches", "ring_errors"), 0
        )
        """Counters: ``sent`` request frames written (every attempt, internal ``ring`` and
        ``hello`` included); ``forwarded`` answers carrying ``forwarded: true`` (the node
        sent the request on to another node); ``routed`` attempts sent to an endpoint chosen
        from the partition map; ``ring_fetches`` maps received; ``ring_errors`` fetches that
        failed (other than a server without the op)."""

    # -- lifecycle

    @property
    def endpoints(self) -> list[str]:
        """The endpoints the client may connect to (with discovered members, if any)."""
        return [_fmt_endpoint(h, p) for h, p in self._endpoints]

    async def connect(self) -> None:
        """Open every pool connection (first reachable endpoint, round-robin on failure).

        Raises :class:`ConnectFailed` if no endpoint is reachable within ``dial_timeout``
        (or ``timeout``, if shorter), or the ``hello`` error (e.g. :class:`Unauthenticated`)
        if the token is refused.
        """
        self._check_open()
        deadline = self._bind_loop().time() + self.timeout
        for i in range(len(self._slots)):
            conn = self._slots[i]
            if conn is None or not conn.open:
                await self._await_slot(i, deadline)

    async def close(self) -> None:
        """Close all connections; requests still waiting fail with :class:`ConnectionLost`.

        Idempotent. Waits (briefly, at most 1 s) for the transports to finish closing.
        """
        self._closed = True
        tasks: list[asyncio.Task[Any]] = [*self._connecting.values(),
                                          *self._direct_connecting.values()]
        if self._ring_task is not None:
            tasks.append(self._ring_task)
        for task in tasks:
            task.cancel()
        self._connecting.clear()
        self._direct_connecting.clear()
        conns = [c for c in self._slots if c is not None] + list(self._direct.values())
        self._slots = [None] * len(self._slots)
        self._direct.clear()
        for c in conns:
            c.close("client closed")
        waits = [c.closed for c in conns if not c.closed.done()]
        if waits:
            await asyncio.wait(waits, timeout=1.0)

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def in_flight(self) -> int:
        """Requests currently awaiting an answer, over all connections."""
        conns = [c for c in self._slots if c is not None] + list(self._direct.values())
        return sum(len(c.pending) for c in conns)

    @property
    def partition_map(self) -> RingMap | None:
        """The partition map requests are routed by (None: not known, or not ring-aware)."""
        return self._ring

    # -- public API

    async def get(
        self, key: KeyLike, consistency: str = "linearizable", *, timeout: float | None = None
    ) -> GetResult:
        """Read ``key``. ``consistency``: ``"linearizable"`` (default) or ``"stale"``."""
        kb = _to_bytes(key, "key")
        msg: dict[str, Any] = {"op": "get", "key": kb}
        if consistency != "linearizable":
            msg["consistency"] = consistency
        resp = await self._call(msg, timeout, False, kb, consistency == "stale")
        return GetResult(resp.get("value"), resp.get("version", 0))

    async def put(
        self,
        key: KeyLike,
        value: KeyLike,
        if_version: int | None = None,
        *,
        timeout: float | None = None,
    ) -> PutResult:
        """Write ``key`` = ``value``; with ``if_version``, only if the current version equals
        it (0: only if absent). A failed condition is a result (``succeeded=False``), not an
        error. Sent again after an unknown outcome only with its request id (see the retry
        rule and request ids above)."""
        kb = _to_bytes(key, "key")
        msg: dict[str, Any] = {"op": "put", "key": kb, "value": _to_bytes(value, "value")}
        if if_version is not None:
            msg["if_version"] = _check_version(if_version, "if_version")
        resp = await self._call(msg, timeout, True, kb)
        return PutResult(resp["succeeded"], resp["version"])

    async def delete(
        self, key: KeyLike, if_version: int | None = None, *, timeout: float | None = None
    ) -> DeleteResult:
        """Delete ``key``; with ``if_version``, only if the current version equals it."""
        kb = _to_bytes(key, "key")
        msg: dict[str, Any] = {"op": "delete", "key": kb}
        if if_version is not None:
            msg["if_version"] = _check_version(if_version, "if_version")
        resp = await self._call(msg, timeout, True, kb)
        return DeleteResult(resp["succeeded"], resp.get("existed", False), resp["version"])

    async def txn(
        self,
        compares: Iterable[tuple[KeyLike, int] | Compare] = (),
        then: Iterable[Op] = (),
        else_: Iterable[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        """Atomically: if every ``(key, version)`` compare holds run ``then``, else ``else_``.

        Build sub-ops with :meth:`Op.get`, :meth:`Op.put`, :meth:`Op.delete`. A ring-aware
        client sends it to the leader of its first written key's partition (its first key's
        when it writes none: for a txn across partitions, the home partition); keys
        may span partitions (the node runs two-phase commit; a conflict with another
        transaction is :class:`Conflict`, definite and retryable).
        """
        msg: dict[str, Any] = {"op": "txn"}
        ifs = [
            {"key": _to_bytes(k, "key"), "version": _check_version(v, "version")}
            for k, v in compares
        ]
        if ifs:
            msg["if"] = ifs
        then_w = [_op_to_wire(o) for o in then]
        if then_w:
            msg["then"] = then_w
        else_w = [_op_to_wire(o) for o in else_]
        if else_w:
            msg["else"] = else_w
        # the leader of the partition of its first written key (a cross-partition txn's
        # home, where the node coordinating it commits), else of its first key
        written = [o["key"] for o in (*then_w, *else_w) if o.get("op") != "get"]
        first = written or [o["key"] for o in (*ifs, *then_w, *else_w)]
        resp = await self._call(msg, timeout, True, first[0] if first else None)
        return TxnResult(resp["succeeded"], resp.get("results", []))

    async def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The node's status map (``node_id``, ``ready``, ``members``, ``partitions``...)."""
        return _strip(await self._call({"op": "status"}, timeout, False))

    async def ring(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The contacted node's partition map, as sent (``partitions``, ``replication``,
        ``epoch``, ``members``, ``map``); :meth:`RingMap.from_wire` checks it. Raises
        :class:`Unavailable` while the node does not know it yet, :class:`UnknownOp` from
        a server without the op."""
        return _strip(await self._call({"op": "ring"}, timeout, False))

    async def hello(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Send ``hello`` (with the token, if any); returns ``node_id``, ``protocol``..."""
        return _strip(await self._call(self._hello_msg(), timeout, False))

    async def request(
        self, op: str, fields: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """Send any op with ``fields`` (must not contain ``id``/``op``/``timeout_ms``).

        Returns the success map without ``id`` and ``ok``; raises the mapped error otherwise.
        Ops in :data:`READ_OPS` are retried like reads; every other op is treated as a write.
        """
        msg: dict[str, Any] = {"op": op}
        if fields:
            for name in ("id", "op", "timeout_ms"):
                if name in fields:
                    raise ValueError(f"fields must not contain {name!r}")
            msg.update(fields)
        return _strip(await self._call(msg, timeout, op not in READ_OPS))

    # -- the request path

    async def _call(
        self,
        msg: dict[str, Any],
        timeout: float | None,
        write: bool,
        key: bytes | None = None,
        stale: bool = False,
    ) -> dict:
        """Send ``msg`` with retries per the retry rule; return the ``ok`` response map.

        ``key`` (with ``stale`` for a stale get) routes it by the partition map."""
        loop = self._loop
        if loop is None:
            loop = self._bind_loop()
        if self._closed:
            self._check_open()
        budget = self.timeout if timeout is None else timeout
        deadline = loop.time() + budget
        with_id = write and self.request_ids and msg.get("op") in ID_WRITE_OPS
        if with_id:
            msg["client_id"] = self.client_id
            msg["seq"] = next(self._seqs)
        attempt = 0
        maybe_applied = False  # an earlier attempt may have reached the server
        while True:
            try:
                return await self._attempt(loop, msg, deadline, budget, write, key, stale)
            except DsnodeError as exc:
                if with_id and _refuses_ids(exc):
                    # an older server: nothing was applied; go on without ids from now on
                    self.request_ids = with_id = False
                    for name in ("client_id", "seq", "retry"):
                        msg.pop(name, None)
                    continue
                if exc.indeterminate:
                    maybe_applied = True
                    if not (with_id and exc.code in _ID_RETRY_CODES):
                        raise
                    msg["retry"] = True  # the same id again: applied at most once
                    self.write_retries += 1
                elif not exc.retryable or exc.code not in _RETRY_CODES or self._closed:
                    exc.indeterminate = maybe_applied
                    raise
                delay = _backoff(attempt)
                attempt += 1
                if self._closed or loop.time() + delay >= deadline:
                    exc.indeterminate = maybe_applied
                    raise
                await asyncio.sleep(delay)

    async def _attempt(
        self,
        loop: asyncio.AbstractEventLoop,
        msg: dict[str, Any],
        deadline: float,
        budget: float,
        write: bool,
        key: bytes | None = None,
        stale: bool = False,
    ) -> dict:
        conn = None
        if key is not None and self._ring_on:
            conn = await self._route(loop, key, stale, deadline)
        if conn is None:
            # The usual choice: the open pool connection with the fewest requests in flight
            # (fast path: one slot).
            slots = self._slots
            conn = slots[0]
            if len(slots) > 1:
                conn = self._pick()
            if conn is None or not conn.open:
                conn = await self._acquire(deadline)
        else:
            self.stats["routed"] += 1
        return await self._send(loop, conn, msg, deadline, budget, write)

    async def _send(
        self,
        loop: asyncio.AbstractEventLoop,
        conn: _Connection,
        msg: dict[str, Any],
        deadline: float,
        budget: float,
        write: bool,
    ) -> dict:
        """One attempt on one connection. Indeterminate only once the frame was written."""
        remaining = deadline - loop.time()
        if remaining <= 0:
            raise DeadlineExceeded(f"deadline of {budget:g}s passed before the request was sent")
        rid = next(self._ids)
        msg["id"] = rid
        server_s = remaining - min(remaining * 0.1, _SERVER_MARGIN_MAX_S)
        msg["timeout_ms"] = int(server_s * 1000) or 1
        payload = self._packer.pack(msg)
        if len(payload) > self._max_frame_bytes:
            raise TooLarge(
                f"request frame of {len(payload)} bytes exceeds "
                f"max_frame_bytes={self._max_frame_bytes}; not sent"
            )
        if conn.paused:
            # Wait for the socket buffer to drain *before* writing, so that a timeout or a
            # loss here is still definite (the request was not sent).
            try:
                async with asyncio.timeout_at(deadline):
                    await conn.wait_writable()
            except _Closed as exc:
                raise ConnectionLost(exc.reason + "; not sent") from None
            except TimeoutError:
                raise DeadlineExceeded(
                    f"deadline of {budget:g}s passed waiting to send; not sent"
                ) from None
        if not conn.open:
            raise ConnectionLost(conn.close_reason + "; not sent")
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        conn.pending[rid] = fut
        inflight = self._inflight
        inflight.start(conn.name)
        self.stats["sent"] += 1
        conn.write(HEADER.pack(len(payload)) + payload)
        # From here on a write may reach the server: it is never sent again.
        handle = loop.call_at(deadline, _expire, fut)
        try:
            resp = await fut
        except _Closed as exc:
            raise ConnectionLost(exc.reason, indeterminate=write) from None
        except _Expired:
            raise DeadlineExceeded(
                f"no answer from the server within {budget:g}s", indeterminate=write
            ) from None
        finally:
            handle.cancel()
            conn.pending.pop(rid, None)
            inflight.finish(conn.name)
        if resp.get("forwarded") is True:
            # The node sent it on: the map this client routed by is stale (or unknown).
            self.stats["forwarded"] += 1
            self._want_ring()
        if resp.get("ok") is True:
            return resp
        if resp.get("ok") is False:
            err = error_from_wire(resp.get("error"), write)
            if err.code == codes.UNAVAILABLE:
                self._want_ring()
            raise err
        raise Internal(f"malformed response (no ok field): {resp!r:.200}", indeterminate=write)

    # -- connection management

    def _pick(self) -> _Connection | None:
        """The open connection with the fewest in-flight requests; starts background
        reconnects for dead slots when some other slot is still usable."""
        best: _Connection | None = None
        dead: list[int] = []
        for i, c in enumerate(self._slots):
            if c is None or not c.open:
                dead.append(i)
            elif best is None or len(c.pending) < len(best.pending):
                best = c
        if best is not None and dead:
            now = self._loop.time() if self._loop is not None else 0.0
            for i in dead:
                if i not in self._connecting and now >= self._slot_retry_at.get(i, 0.0):
                    self._start_connect(i)
        return best

    async def _acquire(self, deadline: float) -> _Connection:
        """Return an open connection, connecting (with round-robin and backoff) if needed.

        Raises :class:`ConnectFailed` (definite) when the dial timeout or the deadline passes
        without one, or at once when every endpoint refused the connection.
        """
        self._check_open()
        conn = self._pick() if len(self._slots) > 1 else None
        if conn is not None:
            return conn
        return await self._await_slot(0, deadline)

    async def _await_slot(self, slot: int, deadline: float) -> _Connection:
        loop = self._bind_loop()
        last: DsnodeError | None = None
        deadline = min(deadline, loop.time() + self.dial_timeout)
        while True:
            conn = self._slots[slot]
            if conn is not None and conn.open:
                return conn
            self._check_open()
            task = self._connecting.get(slot) or self._start_connect(slot)
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                return await asyncio.wait_for(asyncio.shield(task), remaining)
            except TimeoutError:
                break
            except _AllRefused as exc:
                raise self._connect_failed(exc.tried, "nothing listening") from None
            except DsnodeError as exc:
                if not exc.retryable:
                    raise
                last = exc
            delay = _backoff(self._failed_rounds - 1)
            if loop.time() + delay >= deadline:
                break
            await asyncio.sleep(delay)
        tried = last.tried if isinstance(last, _RoundFailed) else [
            f"{_fmt_endpoint(h, p)}: no answer yet" for h, p in self._endpoints
        ]
        raise self._connect_failed(tried, f"no connection within {self._dial_budget():g}s")

    def _dial_budget(self) -> float:
        return min(self.dial_timeout, self.timeout)

    def _connect_failed(self, tried: list[str], why: str) -> ConnectFailed:
        return ConnectFailed(f"could not connect ({why}): {'; '.join(tried)}", tried=tried)

    def _start_connect(self, slot: int) -> asyncio.Task[_Connection]:
        task = self._bind_loop().create_task(self._connect_round(slot))
        self._connecting[slot] = task

        def done(t: asyncio.Task[_Connection]) -> None:
            if self._connecting.get(slot) is t:
                del self._connecting[slot]
            if not t.cancelled() and t.exception() is not None:
                # Consumed here (waiters get it through shield()); background reconnects of
                # this slot back off instead of hammering a dead endpoint per request.
                self._slot_retry_at[slot] = t.get_loop().time() + _backoff(self._failed_rounds)

        task.add_done_callback(done)
        return task

    async def _connect_round(self, slot: int) -> _Connection:
        """Try each endpoint once, starting at the preferred one; install the first that
        connects (and accepts the token) in ``slot``."""
        loop = self._bind_loop()
        n = len(self._endpoints)
        errors: list[str] = []
        refused = 0
        start = self._preferred
        for k in range(n):
            idx = (start + k) % n
            host, port = self._endpoints[idx]
            try:
                conn = await self._dial(loop, idx, (host, port))
            except ConnectionRefusedError:
                refused += 1
                errors.append(f"{_fmt_endpoint(host, port)}: connection refused")
                continue
            except TimeoutError:
                errors.append(
                    f"{_fmt_endpoint(host, port)}: no answer within {self._dial_budget():g}s"
                )
                continue
            except OSError as exc:
                errors.append(f"{_fmt_endpoint(host, port)}: {exc.strerror or exc}")
                continue
            except DsnodeError as exc:
                if not exc.retryable:
                    raise
                errors.append(f"{host}:{port}: hello: {exc}")
                continue
            self._preferred = idx
            self._failed_rounds = 0
            self._slots[slot] = conn
            if self._discover and not self._discovered:
                self._discovered = True
                await self._learn_members(loop, conn)
            return conn
        self._failed_rounds += 1
        if refused == n:
            raise _AllRefused(errors)
        raise _RoundFailed(errors)

    async def _dial(
        self, loop: asyncio.AbstractEventLoop, idx: int, endpoint: tuple[str, int]
    ) -> _Connection:
        """Connect to one endpoint (within the dial budget) and, with a token, say hello.

        Raises OSError or TimeoutError if the connection fails, the hello's DsnodeError if
        the node refuses it (the connection is then closed)."""
        host, port = endpoint
        async with asyncio.timeout(self._dial_budget()):
            _, conn = await loop.create_connection(
                lambda: _Connection(loop, idx, endpoint, self._max_frame_bytes, self._on_lost),
                host,
                port,
                ssl=self._ssl,
            )
        if self._token is not None:
            try:
                hello = await self._send(
                    loop, conn, self._hello_msg(), loop.time() + self.timeout, self.timeout,
                    False,
                )
            except DsnodeError as exc:
                conn.close(f"hello failed: {exc}")
                raise
            except BaseException:
                conn.close("connect cancelled")
                raise
            self.server_info = _strip(hello)
        if self._closed:
            conn.close("client closed")
            raise ConnectionLost("client is closed", retryable=False)
        return conn

    # -- the partition map

    async def _route(
        self, loop: asyncio.AbstractEventLoop, key: bytes, stale: bool, deadline: float
    ) -> _Connection | None:
        """The connection to send a request for ``key`` on, chosen by the partition map:
        its partition's leader, or for a stale get the least busy of its replicas. None:
        take the usual route (no map, leader unknown, or no member connectable now)."""
        now = loop.time()
        if self._ring_dirty and now >= self._ring_next_at and self._ring_task is None:
            self._start_ring_fetch(loop)  # the first fetch, or one wanted too soon before
        ring = self._ring
        if ring is None:
            task = self._ring_task
            if task is None:
                return None
            # Before the first map (or while none could be had): wait for the fetch, but
            # leave the request at least half of its time.
            await asyncio.wait((task,), timeout=min(self._dial_budget(), (deadline - now) / 2))
            ring = self._ring
            if ring is None:
                return None
        pid = ring.partition_of(key)
        retry_at = self._direct_retry_at
        if stale:
            eligible = ring.replica_addrs[pid]
            if retry_at:
                eligible = {n: ep for n, ep in eligible.items() if retry_at.get(ep, 0.0) <= now}
            if not eligible:
                return None
            ep = eligible[pick(eligible, self._inflight, self._rng)]
        else:
            leader = ring.leader_addrs[pid]
            if leader is None or (retry_at and retry_at.get(leader, 0.0) > now):
                return None
            ep = leader
        conn = self._direct.get(ep)
        if conn is not None and conn.open:
            return conn
        return await self._conn_to(loop, ep, deadline)

    async def _conn_to(
        self, loop: asyncio.AbstractEventLoop, ep: tuple[str, int], deadline: float
    ) -> _Connection | None:
        """An open connection to ``ep``: a pool connection already there, else a member
        connection of this client's, connected now if needed. None if that fails in time
        (the endpoint is then left alone for a while)."""
        best: _Connection | None = None
        for c in self._slots:
            if c is not None and c.open and c.endpoint == ep:
                if best is None or len(c.pending) < len(best.pending):
                    best = c
        if best is not None:
            return best
        conn = self._direct.get(ep)
        if conn is not None and conn.open:
            return conn
        task = self._direct_connecting.get(ep) or self._start_direct(loop, ep)
        await asyncio.wait((task,), timeout=deadline - loop.time())
        if not task.done() or task.cancelled():
            return None
        exc = task.exception()
        if isinstance(exc, DsnodeError) and not exc.retryable:
            raise exc  # the token was refused, or the client closed: as on the usual route
        return None if exc is not None else task.result()

    def _start_direct(
        self, loop: asyncio.AbstractEventLoop, ep: tuple[str, int]
    ) -> asyncio.Task[_Connection]:
        async def connect() -> _Connection:
            conn = await self._dial(loop, -1, ep)
            self._direct[ep] = conn
            return conn

        task = loop.create_task(connect())
        self._direct_connecting[ep] = task

        def done(t: asyncio.Task[_Connection]) -> None:
            if self._direct_connecting.get(ep) is t:
                del self._direct_connecting[ep]
            if not t.cancelled() and t.exception() is not None:
                self._direct_retry_at[ep] = loop.time() + DIRECT_RETRY_S

        task.add_done_callback(done)
        return task

    def _want_ring(self) -> None:
        """The map may be stale: fetch it now, or (within RING_REFRESH_MIN_S of the last
        fetch) with the first keyed request after that."""
        if not self._ring_on:
            return
        self._ring_dirty = True
        loop = self._loop
        if (loop is not None and self._ring_task is None and not self._closed
                and loop.time() >= self._ring_next_at):
            self._start_ring_fetch(loop)

    def _start_ring_fetch(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ring_dirty = False
        self._ring_next_at = loop.time() + RING_REFRESH_MIN_S
        self._ring_task = loop.create_task(self._fetch_ring(loop))

    async def _fetch_ring(self, loop: asyncio.AbstractEventLoop) -> None:
        """Ask a node of the pool for the map, once (a failure is retried by a later
        request, rate-limited); a server without the op turns routing off for good."""
        try:
            budget = self._dial_budget()
            try:
                resp = await self._attempt(loop, {"op": "ring"}, loop.time() + budget, budget,
                                           False)
                ring = RingMap.from_wire(resp)
            except UnknownOp:
                self._ring_on = False
                self._ring_dirty = False
                return
            except (DsnodeError, ValueError):
                self.stats["ring_errors"] += 1
                self._ring_dirty = self._ring_on
                return
            self._ring = ring
            self.stats["ring_fetches"] += 1
        finally:
            self._ring_task = None

    async def _learn_members(self, loop: asyncio.AbstractEventLoop, conn: _Connection) -> None:
        """Add the addresses of the members the node reports to the endpoints (best effort:
        a node that does not answer ``status`` in time just teaches nothing)."""
        budget = self._dial_budget()
        try:
            st = await self._send(loop, conn, {"op": "status"}, loop.time() + budget, budget,
                                  False)
        except DsnodeError:
            return
        members = st.get("members")
        if not isinstance(members, list):
            return
        known = set(self._endpoints)
        for m in members:
            addr = m.get("addr") if isinstance(m, dict) else None
            if not isinstance(addr, str):
                continue
            try:
                (ep,) = parse_endpoints(addr)
            except ValueError:
                continue
            if ep not in known:
                known.add(ep)
                self._endpoints.append(ep)

    def _on_lost(self, conn: _Connection) -> None:
        """A connection closed: the next connect starts at the next endpoint; the partition
        map may be stale (a node went away)."""
        if self._closed:
            return
        if self._ring_on:
            self._ring_dirty = True  # fetched again with the next keyed request
        if conn.endpoint_index < 0:
            if self._direct.get(conn.endpoint) is conn:
                del self._direct[conn.endpoint]
        elif conn.endpoint_index == self._preferred:
            self._preferred = (conn.endpoint_index + 1) % len(self._endpoints)

    # -- helpers

    def _hello_msg(self) -> dict[str, Any]:
        msg: dict[str, Any] = {"op": "hello", "client": self._client_name}
        if self._token is not None:
            msg["token"] = self._token
        return msg

    def _bind_loop(self) -> asyncio.AbstractEventLoop:
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        elif self._loop is not loop:
            raise RuntimeError("this Client is bound to another event loop")
        return loop

    def _check_open(self) -> None:
        if self._closed:
            raise ConnectionLost("client is closed", retryable=False)


class _RoundFailed(Unavailable):
    """Internal: one connect round failed on every endpoint; ``tried`` says how."""

    def __init__(self, tried: list[str]) -> None:
        super().__init__("; ".join(tried))
        self.tried = tried


class _AllRefused(_RoundFailed):
    """Internal: every endpoint of the round refused the connection (nothing listening)."""


def _refuses_ids(exc: DsnodeError) -> bool:
    """An older server's answer to a write carrying request ids."""
    return exc.code == codes.BAD_REQUEST and "unknown field 'client_id'" in exc.message


def _backoff(attempt: int) -> float:
    """Exponential backoff with jitter: ~50 ms, 100 ms, ... capped at 1 s."""
    base = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * (2 ** max(attempt, 0)))
    return base * (0.5 + random.random() / 2)


def _check_version(v: object, what: str) -> int:
    if type(v) is not int or v < 0:
        raise ValueError(f"{what} must be an int >= 0, got {v!r}")
    return v


def _op_to_wire(op: object) -> dict[str, Any]:
    if isinstance(op, Op):
        return op.to_wire()
    raise TypeError(f"txn sub-ops must be built with Op.get/put/delete, not {op!r:.80}")


def _strip(resp: dict[str, Any]) -> dict[str, Any]:
    out = dict(resp)
    out.pop("id", None)
    out.pop("ok", None)
    return out


# --------------------------------------------------------------------------- sync wrapper


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class SyncClient:
    """Blocking wrapper around :class:`Client` with the same methods and arguments.

    It runs a private event loop in a daemon thread and hands each call to it, so it works
    from any thread, including one that already runs its own event loop. Thread-safe: many
    threads may call one SyncClient at once (their requests pipeline on its connections).
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, endpoints: str | Sequence[str], **kwargs: Any) -> None:
        self._client = Client(endpoints, **kwargs)
        self.timeout = self._client.timeout
        self._loop = _new_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="dsnode-sync-client", daemon=True
        )
        self._thread.start()
        self._lock = threading.Lock()
        self._closed = False

    def _run(self, coro: Awaitable[T], timeout: float | None = None) -> T:
        if self._closed:
            if asyncio.iscoroutine(coro):
                coro.close()
            raise ConnectionLost("client is closed", retryable=False)
        fut: ConcurrentFuture[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        # The coroutine enforces its own deadline; this outer bound only guards against bugs.
        guard = (self.timeout if timeout is None else timeout) + 30.0
        try:
            return fut.result(guard)
        except BaseException:
            fut.cancel()
            raise

    def connect(self) -> None:
        self._run(self._client.connect())

    def close(self) -> None:
        """Close the connections and stop the loop thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            asyncio.run_coroutine_threadsafe(self._client.close(), self._loop).result(5.0)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5.0)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> SyncClient:
        self.connect()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def get(
        self, key: KeyLike, consistency: str = "linearizable", *, timeout: float | None = None
    ) -> GetResult:
        return self._run(self._client.get(key, consistency, timeout=timeout), timeout)

    def put(
        self,
        key: KeyLike,
        value: KeyLike,
        if_version: int | None = None,
        *,
        timeout: float | None = None,
    ) -> PutResult:
        return self._run(self._client.put(key, value, if_version, timeout=timeout), timeout)

    def delete(
        self, key: KeyLike, if_version: int | None = None, *, timeout: float | None = None
    ) -> DeleteResult:
        return self._run(self._client.delete(key, if_version, timeout=timeout), timeout)

    def txn(
        self,
        compares: Iterable[tuple[KeyLike, int] | Compare] = (),
        then: Iterable[Op] = (),
        else_: Iterable[Op] = (),
        *,
        timeout: float | None = None,
    ) -> TxnResult:
        return self._run(
            self._client.txn(list(compares), list(then), list(else_), timeout=timeout), timeout
        )

    def status(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.status(timeout=timeout), timeout)

    def hello(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.hello(timeout=timeout), timeout)

    def ring(self, *, timeout: float | None = None) -> dict[str, Any]:
        return self._run(self._client.ring(timeout=timeout), timeout)

    @property
    def stats(self) -> dict[str, int]:
        """The client's counters (see :attr:`Client.stats`)."""
        return self._client.stats

    @property
    def partition_map(self) -> RingMap | None:
        return self._client.partition_map

    def request(
        self, op: str, fields: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        return self._run(self._client.request(op, fields, timeout), timeout)
