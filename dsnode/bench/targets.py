"""Load-generator targets: one :class:`Target` instance is one lean, pipelined connection.

A target exposes a callback API used by the runner's hot path
(``start_put(key, value, done)`` ...; ``done`` receives ``None`` on success or an
error code string) and awaitable conveniences built on it (``await t.put(k, v)``).

Adding a system (etcd, say):

* Byte-stream protocol spoken by hand: subclass :class:`StreamTarget` (see
  :class:`DsnodeTarget` and :class:`RedisTarget`), implement ``handshake``,
  ``start_put``/``start_get``/``start_txn`` (encode, then ``self._send``) and
  ``data_received`` (decode, then call the ``done`` callbacks), and
  ``_fail_pending``.
* Coroutine-based client library (e.g. a gRPC client): subclass
  :class:`AsyncTarget` and implement ``connect``, ``put``, ``get``, ``txn`` and
  ``close`` as coroutines raising :class:`TargetError` with a code on failure.

Then decorate the class with :func:`register_target`; ``--target NAME`` picks it up.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import itertools
import os
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import msgpack

from dsnode.wire.framing import DEFAULT_MAX_FRAME_BYTES, FrameDecoder, FrameError, unpack_payload

#: Completion callback: ``None`` on success, else an error code.
Done = Callable[[str | None], None]

#: One transaction sub-op: ``("put", key, value)`` or ``("get", key, None)``.
TxnOp = tuple[str, bytes, bytes | None]

#: Reply callback of :meth:`DsnodeTarget.start_call`: ``(answer, None)`` on success,
#: ``(answer or None, code)`` on failure (``None`` when no answer came).
Reply = Callable[[dict[str, Any] | None, str | None], None]

#: Client-side error codes (server codes are passed through unchanged).
CONNECTION_LOST = "connection_lost"
PROTOCOL_ERROR = "protocol_error"
UNSUPPORTED = "unsupported"


class TargetError(Exception):
    """A request or connection attempt failed; ``code`` is the error code to account it under."""

    def __init__(self, code: str, message: str = "") -> None:
        super().__init__(f"{code}: {message}" if message else code)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class TargetOptions:
    """Per-connection settings shared by every target."""

    consistency: str = "linearizable"
    token: str | None = None
    connect_timeout: float = 5.0
    client_name: str = "dsnode-bench"
    ssl: Any = None  # an ssl.SSLContext for TLS, else plain TCP
    request_ids: bool = False  # dsnode: puts and txns carry client_id/seq, as the client's do
    #: dsnode: called just before the ``done`` callback of an answer that carries
    #: ``"forwarded": true`` (the node forwarded the request to another node).
    on_forwarded: Callable[[], None] | None = None


class Target(abc.ABC):
    """One connection to a system under test.

    Contract for implementers: ``start_*`` must never invoke ``done`` synchronously
    (the runner re-issues from inside ``done``); every started request gets exactly
    one ``done`` call, with :data:`CONNECTION_LOST` if the connection dies first.
    """

    #: Name used by ``--target``.
    name: ClassVar[str]
    #: Port used when an endpoint omits one; ``None`` means endpoints must be given.
    default_port: ClassVar[int | None] = None

    def __init__(self, host: str, port: int, options: TargetOptions | None = None) -> None:
        self.host = host
        self.port = port
        self.options = options or TargetOptions()
        #: Whatever the server told us about itself at connect time (for the report).
        self.server_info: dict[str, Any] = {}

    @abc.abstractmethod
    async def connect(self) -> None:
        """Open the connection and do any handshake; raise OSError/TargetError on failure."""

    @property
    @abc.abstractmethod
    def is_open(self) -> bool:
        """True while requests can be started."""

    @abc.abstractmethod
    def start_put(self, key: bytes, value: bytes, done: Done) -> None:
        """Send a put; ``done`` is called once with the outcome."""

    @abc.abstractmethod
    def start_get(self, key: bytes, done: Done) -> None:
        """Send a get (honouring ``options.consistency`` where meaningful)."""

    @abc.abstractmethod
    def start_txn(self, ops: Sequence[TxnOp], done: Done) -> None:
        """Send an unconditional atomic transaction of the given sub-ops."""

    @abc.abstractmethod
    def close(self) -> None:
        """Close the connection; pending requests complete with :data:`CONNECTION_LOST`."""

    @abc.abstractmethod
    async def wait_closed(self) -> None:
        """Wait until the connection is fully closed."""

    # Awaitable conveniences (not used by the hot path).

    async def put(self, key: bytes, value: bytes) -> str | None:
        """Put and wait; returns ``None`` or the error code."""
        return await _await_done(lambda done: self.start_put(key, value, done))

    async def get(self, key: bytes) -> str | None:
        """Get and wait; returns ``None`` or the error code."""
        return await _await_done(lambda done: self.start_get(key, done))

    async def txn(self, ops: Sequence[TxnOp]) -> str | None:
        """Run a transaction and wait; returns ``None`` or the error code."""
        return await _await_done(lambda done: self.start_txn(ops, done))


async def _await_done(start: Callable[[Done], None]) -> str | None:
    fut: asyncio.Future[str | None] = asyncio.get_running_loop().create_future()

    def done(code: str | None) -> None:
        if not fut.done():
            fut.set_result(code)

    start(done)
    return await fut


class AsyncTarget(Target):
    """Base for targets built on a coroutine-based client library.

    Implement ``connect``, ``put``, ``get``, ``txn`` (raising :class:`TargetError` on
    failure) and ``close``; the callback API is derived from them with one task per
    request, which is slower than a hand-written :class:`StreamTarget` but simple.
    """

    def __init__(self, host: str, port: int, options: TargetOptions | None = None) -> None:
        super().__init__(host, port, options)
        self._tasks: set[asyncio.Task[Any]] = set()

    @abc.abstractmethod
    async def put(self, key: bytes, value: bytes) -> str | None:
        """Put; raise :class:`TargetError` (or return its code) on failure."""

    @abc.abstractmethod
    async def get(self, key: bytes) -> str | None:
        """Get; raise :class:`TargetError` (or return its code) on failure."""

    @abc.abstractmethod
    async def txn(self, ops: Sequence[TxnOp]) -> str | None:
        """Transaction; raise :class:`TargetError` (or return its code) on failure."""

    async def wait_closed(self) -> None:
        """Wait for requests still running (``close`` should have made them fail)."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: Any, done: Done) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)

        def finished(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                done(CONNECTION_LOST)
                return
            exc = t.exception()
            if exc is None:
                done(t.result())
            elif isinstance(exc, TargetError):
                done(exc.code)
            elif isinstance(exc, OSError | ConnectionError):
                done(CONNECTION_LOST)
            else:
                done(type(exc).__name__)

        task.add_done_callback(finished)

    def start_put(self, key: bytes, value: bytes, done: Done) -> None:
        self._spawn(self.put(key, value), done)

    def start_get(self, key: bytes, done: Done) -> None:
        self._spawn(self.get(key), done)

    def start_txn(self, ops: Sequence[TxnOp], done: Done) -> None:
        self._spawn(self.txn(ops), done)


class StreamTarget(Target, asyncio.Protocol):
    """Base for hand-written protocols over one TCP connection.

    Outgoing requests are buffered and written with one ``transport.write`` per
    event-loop iteration, so a burst of pipelined requests costs one syscall.
    """

    def __init__(self, host: str, port: int, options: TargetOptions | None = None) -> None:
        super().__init__(host, port, options)
        self._transport: asyncio.Transport | None = None
        self._out: list[bytes] = []
        self._flush_pending = False
        self._closed: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # Lifecycle

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._closed = loop.create_future()
        async with asyncio.timeout(self.options.connect_timeout):
            await loop.create_connection(lambda: self, self.host, self.port, ssl=self.options.ssl)
            try:
                await self.handshake()
            except BaseException:
                self.close()
                raise

    async def handshake(self) -> None:
        """Exchange whatever the protocol needs before load starts (default: nothing)."""

    @property
    def is_open(self) -> bool:
        return self._transport is not None

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        """Drop the connection at once (protocol violation)."""
        if self._transport is not None:
            self._transport.abort()

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._out.clear()
        self._fail_pending(CONNECTION_LOST)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    @abc.abstractmethod
    def _fail_pending(self, code: str) -> None:
        """Complete every outstanding request with ``code``."""

    # Sending

    def _send(self, data: bytes) -> None:
        self._out.append(data)
        if not self._flush_pending:
            self._flush_pending = True
            assert self._loop is not None
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._transport is None or not self._out:
            self._out.clear()
            return
        out = self._out
        self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _closed_done(self, done: Done) -> None:
        """Complete a request started on a closed connection (asynchronously)."""
        loop = self._loop or asyncio.get_running_loop()
        loop.call_soon(done, CONNECTION_LOST)


_TARGETS: dict[str, type[Target]] = {}


def register_target(cls: type[Target]) -> type[Target]:
    """Class decorator: make ``cls`` selectable with ``--target cls.name``."""
    _TARGETS[cls.name] = cls
    return cls


def target_names() -> list[str]:
    """Registered target names, sorted."""
    return sorted(_TARGETS)


def get_target(name: str) -> type[Target]:
    """The target class registered under ``name``."""
    try:
        return _TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; known: {', '.join(target_names())}") from None


# --------------------------------------------------------------------------- dsnode

_HEADER = struct.Struct(">I")


@register_target
class DsnodeTarget(StreamTarget):
    """dsnode's wire protocol (PROTOCOL.md): length-prefixed msgpack maps, matched by ``id``."""

    name = "dsnode"
    default_port = 7379  # the dsnode CLI's default endpoint

    def __init__(self, host: str, port: int, options: TargetOptions | None = None) -> None:
        super().__init__(host, port, options)
        self._decoder = FrameDecoder(DEFAULT_MAX_FRAME_BYTES)
        self._packer = msgpack.Packer(use_bin_type=True)
        self._ids = itertools.count(1)
        self._pending: dict[int, Done] = {}
        self._replies: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._calls: dict[int, Reply] = {}
        self._get_extra: dict[str, Any] = (
            {"consistency": self.options.consistency} if self.options.consistency else {}
        )
        # a request id per write (one client id per connection), as dsnode's client sends
        self._client_id = os.urandom(16) if self.options.request_ids else None
        self._seqs = itertools.count(1)
        #: Called before ``done`` for answers with ``"forwarded": true`` (the owner may
        #: replace it, as the ring router does).
        self.on_forwarded: Callable[[], None] | None = self.options.on_forwarded

    async def handshake(self) -> None:
        hello: dict[str, Any] = {"op": "hello", "client": self.options.client_name}
        if self.options.token is not None:
            hello["token"] = self.options.token
        reply = await self.request(hello)
        if reply.get("ok"):
            self.server_info = {
                k: reply[k]
                for k in ("node_id", "cluster_id", "protocol", "server_version")
                if k in reply
            }
            return
        code = _error_code(reply)
        if code != "unknown_op":  # hello is optional without authentication
            raise TargetError(code, str(reply.get("error", {}).get("message", "")))

    async def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one arbitrary request (``id`` is assigned) and return the whole response map."""
        if self._transport is None:
            raise TargetError(CONNECTION_LOST, "not connected")
        req_id = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._replies[req_id] = fut
        self._write({**msg, "id": req_id})
        return await fut

    def _write(self, msg: dict[str, Any]) -> None:
        payload = self._packer.pack(msg)
        self._send(_HEADER.pack(len(payload)) + payload)

    def _start(self, msg: dict[str, Any], done: Done) -> None:
        if self._transport is None:
            self._closed_done(done)
            return
        req_id = next(self._ids)
        msg["id"] = req_id
        self._pending[req_id] = done
        payload = self._packer.pack(msg)
        self._send(_HEADER.pack(len(payload)) + payload)

    def _write_msg(self, msg: dict[str, Any]) -> dict[str, Any]:
        if self._client_id is not None:
            msg["client_id"] = self._client_id
            msg["seq"] = next(self._seqs)
        return msg

    def start_put(self, key: bytes, value: bytes, done: Done) -> None:
        self._start(self._write_msg({"op": "put", "key": key, "value": value}), done)

    def start_get(self, key: bytes, done: Done) -> None:
        self._start({"op": "get", "key": key, **self._get_extra}, done)

    def start_txn(self, ops: Sequence[TxnOp], done: Done) -> None:
        then = [
            {"op": "put", "key": k, "value": v} if op == "put" else {"op": op, "key": k}
            for op, k, v in ops
        ]
        self._start(self._write_msg({"op": "txn", "then": then}), done)

    def start_call(self, key: bytes, msg: dict[str, Any], reply: Reply) -> None:
        """Send ``msg`` (a put, delete or txn gets a request id when the options ask for
        them) and hand the whole answer to ``reply``, never synchronously. ``key`` picks
        the connection in :class:`~dsnode.bench.ring_target.RingTarget`; unused here."""
        if self._transport is None:
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(reply, None, CONNECTION_LOST)
            return
        if msg["op"] in ("put", "delete", "txn"):
            msg = self._write_msg(msg)
        req_id = next(self._ids)
        msg["id"] = req_id
        self._calls[req_id] = reply
        self._write(msg)

    def data_received(self, data: bytes) -> None:
        try:
            frames = self._decoder.feed(data)
        except FrameError:
            self.abort()
            return
        pending = self._pending
        for payload in frames:
            try:
                msg = unpack_payload(payload)
                req_id = msg["id"]  # type: ignore[index]
            except Exception:
                self.abort()
                return
            done = pending.pop(req_id, None)
            if done is not None:
                if self.on_forwarded is not None and msg.get("forwarded") is True:  # type: ignore[union-attr]
                    self.on_forwarded()
                done(None if msg.get("ok") is True else _error_code(msg))  # type: ignore[union-attr]
                continue
            call = self._calls.pop(req_id, None)
            if call is not None:
                if self.on_forwarded is not None and msg.get("forwarded") is True:  # type: ignore[union-attr]
                    self.on_forwarded()
                call(msg, None if msg.get("ok") is True else _error_code(msg))  # type: ignore[arg-type,union-attr]
                continue
            fut = self._replies.pop(req_id, None)
            if fut is not None:
                if not fut.done():
                    fut.set_result(msg)  # type: ignore[arg-type]
            elif req_id == 0:
                # The server reports a fatal connection error and will close;
                # everything pending on this connection has an unknown outcome.
                self.abort()
                return

    def _fail_pending(self, code: str) -> None:
        pending, self._pending = self._pending, {}
        for done in pending.values():
            done(code)
        calls, self._calls = self._calls, {}
        for call in calls.values():
            call(None, code)
        replies, self._replies = self._replies, {}
        for fut in replies.values():
            if not fut.done():
                fut.set_exception(TargetError(code, "connection closed"))


def _error_code(msg: Any) -> str:
    try:
        code = msg["error"]["code"]
    except (KeyError, TypeError):
        return PROTOCOL_ERROR
    return code if isinstance(code, str) else PROTOCOL_ERROR


# --------------------------------------------------------------------------- redis


def _resp_command(*parts: bytes) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for p in parts:
        out.append(b"$%d\r\n%s\r\n" % (len(p), p))
    return b"".join(out)


class RespProtocolError(Exception):
    """The byte stream is not RESP2."""


def resp_skip(buf: bytes | bytearray, pos: int) -> tuple[int, str | None]:
    """Parse one RESP2 reply at ``pos`` without materialising it.

    Returns ``(end, error)``: ``end`` is the offset just past the reply (``-1`` if
    incomplete) and ``error`` the lower-cased first word of an error reply found in
    it (``"err"``, ``"wrongtype"``, ...), else ``None``.
    """
    eol = buf.find(b"\r\n", pos)
    if eol < 0:
        return -1, None
    t = buf[pos]
    if t == 43 or t == 58:  # '+' simple string, ':' integer
        return eol + 2, None
    if t == 36:  # '$' bulk string
        n = int(buf[pos + 1 : eol])
        if n < 0:
            return eol + 2, None
        end = eol + 4 + n
        return (end, None) if end <= len(buf) else (-1, None)
    if t == 45:  # '-' error
        word = bytes(buf[pos + 1 : eol]).split(b" ", 1)[0]
        return eol + 2, word.decode("ascii", "replace").lower() or "err"
    if t == 42:  # '*' array
        n = int(buf[pos + 1 : eol])
        p = eol + 2
        err: str | None = None
        for _ in range(max(n, 0)):
            p, e = resp_skip(buf, p)
            if p < 0:
                return -1, None
            err = err or e
        return p, err
    raise RespProtocolError(f"unexpected RESP type byte {t!r}")


@register_target
class RedisTarget(StreamTarget):
    """Redis over RESP2: ``SET``/``GET``, ``MULTI``..``EXEC`` for transactions; replies in order."""

    name = "redis"
    default_port = 6379

    def __init__(self, host: str, port: int, options: TargetOptions | None = None) -> None:
        super().__init__(host, port, options)
        self._buf = bytearray()
        # Each entry: [done, replies still expected, first error seen].
        self._pending: collections.deque[list[Any]] = collections.deque()

    async def handshake(self) -> None:
        token = self.options.token
        if token is not None:
            auth = _resp_command(b"AUTH", token.encode())
            code = await _await_done(lambda done: self._start(auth, 1, done))
            if code is not None:
                raise TargetError(code, "AUTH failed")
        code = await _await_done(lambda done: self._start(_resp_command(b"PING"), 1, done))
        if code is not None:
            raise TargetError(code, "PING failed")
        self.server_info = {"protocol": "resp2"}

    def _start(self, data: bytes, replies: int, done: Done) -> None:
        if self._transport is None:
            self._closed_done(done)
            return
        self._pending.append([done, replies, None])
        self._send(data)

    def start_put(self, key: bytes, value: bytes, done: Done) -> None:
        self._start(
            b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(key), key, len(value), value),
            1,
            done,
        )

    def start_get(self, key: bytes, done: Done) -> None:
        self._start(b"*2\r\n$3\r\nGET\r\n$%d\r\n%s\r\n" % (len(key), key), 1, done)

    def start_txn(self, ops: Sequence[TxnOp], done: Done) -> None:
        parts = [_resp_command(b"MULTI")]
        for op, key, value in ops:
            if op == "put":
                parts.append(_resp_command(b"SET", key, value or b""))
            elif op == "get":
                parts.append(_resp_command(b"GET", key))
            else:
                parts.append(_resp_command(b"DEL", key))
        parts.append(_resp_command(b"EXEC"))
        self._start(b"".join(parts), len(ops) + 2, done)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        pending = self._pending
        try:
            while pos < len(buf):
                end, err = resp_skip(buf, pos)
                if end < 0:
                    break
                pos = end
                if not pending:
                    raise RespProtocolError("reply without a request")
                entry = pending[0]
                if err is not None and entry[2] is None:
                    entry[2] = err
                entry[1] -= 1
                if entry[1] == 0:
                    pending.popleft()
                    entry[0](entry[2])
        except (RespProtocolError, ValueError):
            self.abort()
            return
        if pos:
            del buf[:pos]

    def _fail_pending(self, code: str) -> None:
        pending, self._pending = self._pending, collections.deque()
        for entry in pending:
            entry[0](code)
from dsnode.bench import etcd as _etcd  # noqa: E402,F401  (registers --target etcd)
