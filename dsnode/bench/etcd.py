"""etcd v3 target for ``dsnode bench --target etcd``: the JSON gateway over HTTP/1.1.

etcd (3.3+) serves its KV API as JSON on the client port (grpc-gateway):
``POST /v3/kv/put``, ``/v3/kv/range`` and ``/v3/kv/txn`` with base64 keys and
values (``/v3beta/`` on 3.3; the prefix is picked from ``GET /version`` at connect).

Concurrency model: **one request in flight per TCP connection**. HTTP/1.1
pipelining is not reliable through the grpc-gateway, so each :class:`EtcdTarget`
keeps a small pool of keep-alive sockets to its endpoint and opens another one
whenever it has more requests outstanding than idle sockets. The number of TCP
connections to etcd is therefore ``--inflight`` (not ``--connections``); pass
``--connections`` equal to ``--inflight`` to get one socket per runner connection,
which is what ``bench/compare_etcd.py`` does.

Mapping: put -> ``kv/put``; get -> ``kv/range`` with ``serializable=false``
(linearizable, etcd's default) or ``serializable=true`` for ``--consistency stale``;
txn -> ``kv/txn`` with no compares and the sub-ops in ``success``. Errors are
accounted under the gRPC status name from the gateway's JSON error body
(``unavailable``, ``deadline_exceeded``, ...), else ``http_<status>``.

``--token user:password`` authenticates (``/v3/auth/authenticate``) once per
connection and sends the token on every request; etcd's simple tokens expire
(5 min by default), so long authenticated runs should use JWT tokens.

This is a lean Python client: it can cap throughput below what etcd's Go
clients reach (compare with ``etcdctl check perf`` / the etcd ``benchmark`` tool).
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import re
from collections.abc import Sequence
from typing import Any, cast

from dsnode.bench.targets import (
    CONNECTION_LOST,
    PROTOCOL_ERROR,
    Done,
    Target,
    TargetError,
    TargetOptions,
    TxnOp,
    register_target,
)

#: gRPC status codes (as carried in the gateway's error body) -> error code names.
GRPC_CODES = {
    1: "cancelled",
    2: "unknown",
    3: "invalid_argument",
    4: "deadline_exceeded",
    5: "not_found",
    6: "already_exists",
    7: "permission_denied",
    8: "resource_exhausted",
    9: "failed_precondition",
    10: "aborted",
    11: "out_of_range",
    12: "unimplemented",
    13: "internal",
    14: "unavailable",
    15: "data_loss",
    16: "unauthenticated",
}

#: Largest response accepted (headers + body); protects against a runaway peer.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


class HttpProtocolError(Exception):
    """The byte stream is not a valid HTTP/1.1 response."""


def parse_response(buf: bytes | bytearray) -> tuple[int, int, bytes, bool] | None:
    """Parse one HTTP/1.1 response at the start of ``buf``.

    Returns ``(consumed, status, body, keep_alive)`` or ``None`` if incomplete.
    Supports ``Content-Length`` and ``Transfer-Encoding: chunked`` bodies.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > 65536:
            raise HttpProtocolError("header too long")
        return None
    head = bytes(buf[:end]).lower()
    if not head.startswith(b"http/1.") or len(head) < 12:
        raise HttpProtocolError(f"bad status line {bytes(buf[:40])!r}")
    try:
        status = int(head[9:12])
    except ValueError:
        raise HttpProtocolError(f"bad status line {bytes(buf[:40])!r}") from None
    keep_alive = b"\r\nconnection: close" not in head and not head.startswith(b"http/1.0")
    start = end + 4
    i = head.find(b"\r\ncontent-length:")
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        try:
            n = int(head[i + 17 : j if j >= 0 else len(head)])
        except ValueError:
            raise HttpProtocolError("bad content-length") from None
        if n < 0 or n > MAX_RESPONSE_BYTES:
            raise HttpProtocolError("bad content-length")
        if len(buf) < start + n:
            return None
        return start + n, status, bytes(buf[start : start + n]), keep_alive
    if b"\r\ntransfer-encoding: chunked" in head:
        parts = []
        pos = start
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            try:
                size = int(bytes(buf[pos:eol]).split(b";", 1)[0], 16)
            except ValueError:
                raise HttpProtocolError("bad chunk size") from None
            if size > MAX_RESPONSE_BYTES:
                raise HttpProtocolError("chunk too large")
            if size == 0:
                # Trailers (normally none) end with an empty line.
                tend = buf.find(b"\r\n\r\n", eol)
                if buf[eol : eol + 4] == b"\r\n\r\n":
                    tend = eol
                if tend < 0:
                    return None
                return tend + 4, status, b"".join(parts), keep_alive
            if len(buf) < eol + 2 + size + 2:
                return None
            parts.append(bytes(buf[eol + 2 : eol + 2 + size]))
            pos = eol + 2 + size + 2
    if status in (204, 304) or 100 <= status < 200:
        return start, status, b"", keep_alive
    raise HttpProtocolError("response without content-length (read-until-close unsupported)")


def error_code(status: int, body: bytes) -> str:
    """Error code for a non-2xx gateway response."""
    try:
        msg = json.loads(body)
        code = msg.get("code")
        if isinstance(code, int) and code in GRPC_CODES:
            return GRPC_CODES[code]
    except (ValueError, AttributeError):
        pass
    return f"http_{status}"


def gateway_prefix(version: str | None) -> str:
    """API prefix for an etcd server version: ``/v3`` (3.4+), ``/v3beta`` (3.3), ``/v3alpha``."""
    if not version:
        return "/v3"
    m = re.match(r"(\d+)\.(\d+)", version)
    if not m:
        return "/v3"
    major, minor = int(m.group(1)), int(m.group(2))
    if (major, minor) >= (3, 4):
        return "/v3"
    if (major, minor) == (3, 3):
        return "/v3beta"
    return "/v3alpha"


def _b64(data: bytes) -> bytes:
    return base64.b64encode(data)


class _HttpConn(asyncio.Protocol):
    """One keep-alive socket with at most one request on the wire."""

    __slots__ = ("owner", "transport", "buf", "done", "kind", "reply", "keep_alive")

    def __init__(self, owner: EtcdTarget) -> None:
        self.owner = owner
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        #: Completion of the request on the wire (hot path), or None.
        self.done: Done | None = None
        #: Future for a control request (version/auth), or None.
        self.reply: asyncio.Future[tuple[int, bytes]] | None = None
        self.keep_alive = True

    @property
    def busy(self) -> bool:
        return self.done is not None or self.reply is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, data: bytes, done: Done) -> None:
        assert self.transport is not None
        self.done = done
        self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        try:
            parsed = parse_response(buf)
        except HttpProtocolError:
            self.owner._conn_failed(self)
            return
        if parsed is None:
            return
        consumed, status, body, keep_alive = parsed
        del buf[:consumed]
        if buf:  # bytes nobody asked for: out of sync
            self.owner._conn_failed(self)
            return
        self.keep_alive = keep_alive
        done, self.done = self.done, None
        reply, self.reply = self.reply, None
        if done is not None:
            self.owner._conn_idle(self)
            done(None if 200 <= status < 300 else error_code(status, body))
        elif reply is not None:
            # A control request (connect time); its caller decides what comes next.
            if not reply.done():
                reply.set_result((status, body))
        else:
            self.owner._conn_failed(self)  # unsolicited response

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.owner._conn_lost(self)

    def fail(self, code: str) -> None:
        done, self.done = self.done, None
        reply, self.reply = self.reply, None
        if done is not None:
            done(code)
        if reply is not None and not reply.done():
            reply.set_exception(TargetError(code, "connection closed"))


@register_target
class EtcdTarget(Target):
    """etcd v3 over its JSON gateway; see the module docstring for the concurrency model."""

    name = "etcd"
    default_port = 2379

    def __init__(self, host: str, port: int, options: TargetOptions | None = None) -> None:
        super().__init__(host, port, options)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._open = False
        self._idle: list[_HttpConn] = []
        self._conns: set[_HttpConn] = set()
        self._connecting = 0
        self._waiting: collections.deque[tuple[bytes, Done]] = collections.deque()
        self._closed: asyncio.Future[None] | None = None
        self._prefix = "/v3"
        self._auth = b""
        self._host_hdr = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        self._heads: dict[str, bytes] = {}
        self._val_src: bytes | None = None
        self._val_b64 = b""
        self._range_tail = (
            b'","serializable":true}' if options and options.consistency == "stale" else b'"}'
        )
        #: Sockets opened over the target's life (for tests and the report).
        self.sockets_opened = 0

    # ------------------------------------------------------------------ lifecycle

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._closed = loop.create_future()
        async with asyncio.timeout(self.options.connect_timeout):
            conn = await self._open_socket()
            self._open = True
            try:
                status, body = await self._control(conn, "GET", "/version", b"")
                version = None
                if status == 200:
                    try:
                        info = json.loads(body)
                        version = info.get("etcdserver")
                        self.server_info = {
                            "server_version": version,
                            "cluster_version": info.get("etcdcluster"),
                        }
                    except (ValueError, AttributeError):
                        pass
                self._prefix = gateway_prefix(version)
                self.server_info["api"] = self._prefix + "/ (JSON gateway, HTTP/1.1)"
                if self.options.token is not None:
                    await self._authenticate(conn, self.options.token)
            except BaseException:
                self.close()
                raise
        self._build_heads()
        self._conn_idle(conn)

    async def _authenticate(self, conn: _HttpConn, token: str) -> None:
        user, sep, password = token.partition(":")
        if not sep:
            self._auth = b"Authorization: " + token.encode() + b"\r\n"
            return
        body = json.dumps({"name": user, "password": password}).encode()
        status, reply = await self._control(conn, "POST", self._prefix + "/auth/authenticate", body)
        if status != 200:
            raise TargetError(error_code(status, reply), "authentication failed")
        try:
            tok = json.loads(reply)["token"]
        except (ValueError, KeyError, TypeError):
            raise TargetError(PROTOCOL_ERROR, "no token in authenticate reply") from None
        self._auth = b"Authorization: " + str(tok).encode() + b"\r\n"

    def _build_heads(self) -> None:
        for op in ("put", "range", "txn"):
            self._heads[op] = (
                b"POST " + self._prefix.encode() + b"/kv/" + op.encode() + b" HTTP/1.1\r\n"
                b"Host: " + self._host_hdr + b"\r\n" + self._auth
                + b"Content-Type: application/json\r\nContent-Length: "
            )  # fmt: skip

    async def _open_socket(self) -> _HttpConn:
        loop = self._loop or asyncio.get_running_loop()
        _, proto = await loop.create_connection(lambda: _HttpConn(self), self.host, self.port)
        conn = cast(_HttpConn, proto)
        self._conns.add(conn)
        self.sockets_opened += 1
        return conn

    async def _control(
        self, conn: _HttpConn, method: str, path: str, body: bytes
    ) -> tuple[int, bytes]:
        assert conn.transport is not None and not conn.busy
        loop = self._loop or asyncio.get_running_loop()
        fut: asyncio.Future[tuple[int, bytes]] = loop.create_future()
        conn.reply = fut
        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self._host_hdr.decode()}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        conn.transport.write(head.encode() + body)
        return await fut

    @property
    def is_open(self) -> bool:
        return self._open

    def close(self) -> None:
        if not self._open and not self._conns:
            self._finish_close()
            return
        self._open = False
        conns = list(self._conns)
        self._idle.clear()
        waiting, self._waiting = self._waiting, collections.deque()
        for conn in conns:
            if conn.transport is not None:
                conn.transport.close()
            else:
                self._conns.discard(conn)
            conn.fail(CONNECTION_LOST)
        for _, done in waiting:
            done(CONNECTION_LOST)
        self._finish_close()

    def _finish_close(self) -> None:
        if (
            not self._conns
            and self._connecting == 0
            and self._closed is not None
            and not self._closed.done()
        ):
            self._closed.set_result(None)

    async def wait_closed(self) -> None:
        if self._closed is not None:
            await asyncio.shield(self._closed)

    # ------------------------------------------------------------------ socket events

    def _conn_idle(self, conn: _HttpConn) -> None:
        if not self._open or conn.transport is None:
            return
        if not conn.keep_alive:
            conn.transport.close()  # the server said close; forget this socket
            return
        if self._waiting:
            data, done = self._waiting.popleft()
            conn.send(data, done)
        else:
            self._idle.append(conn)

    def _conn_failed(self, conn: _HttpConn) -> None:
        """Protocol violation on a socket: outcome of everything pending is unknown."""
        if conn.transport is not None:
            conn.transport.abort()
        self.close()

    def _conn_lost(self, conn: _HttpConn) -> None:
        self._conns.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)
        if conn.busy:
            # A request was on the wire: its outcome is unknown; drop the whole target
            # (like a lost pipelined connection) and let the runner reconnect.
            conn.fail(CONNECTION_LOST)
            self.close()
        elif self._waiting and self._open and self._connecting == 0:
            self._grow()
        self._finish_close()

    # ------------------------------------------------------------------ requests

    def _submit(self, op: str, body: bytes, done: Done) -> None:
        if not self._open:
            loop = self._loop or asyncio.get_running_loop()
            loop.call_soon(done, CONNECTION_LOST)
            return
        data = b"%s%d\r\n\r\n%s" % (self._heads[op], len(body), body)
        if self._idle:
            self._idle.pop().send(data, done)
            return
        self._waiting.append((data, done))
        if len(self._waiting) > self._connecting:
            self._grow()

    def _grow(self) -> None:
        assert self._loop is not None
        self._connecting += 1
        self._loop.create_task(self._grow_one())

    async def _grow_one(self) -> None:
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                conn = await self._open_socket()
        except (OSError, TimeoutError):
            self._connecting -= 1
            self.close()  # cannot add a socket: the runner reconnects with backoff
            return
        self._connecting -= 1
        if not self._open:
            assert conn.transport is not None
            conn.transport.close()
            return
        self._conn_idle(conn)

    def _value_b64(self, value: bytes) -> bytes:
        if value is not self._val_src:
            self._val_src = value
            self._val_b64 = _b64(value)
        return self._val_b64

    def start_put(self, key: bytes, value: bytes, done: Done) -> None:
        body = b'{"key":"%s","value":"%s"}' % (_b64(key), self._value_b64(value))
        self._submit("put", body, done)

    def start_get(self, key: bytes, done: Done) -> None:
        self._submit("range", b'{"key":"' + _b64(key) + self._range_tail, done)

    def start_txn(self, ops: Sequence[TxnOp], done: Done) -> None:
        parts = []
        for op, key, value in ops:
            if op == "put":
                parts.append(
                    b'{"requestPut":{"key":"%s","value":"%s"}}'
                    % (_b64(key), self._value_b64(value or b""))
                )
            elif op == "get":
                parts.append(b'{"requestRange":{"key":"%s"}}' % _b64(key))
            else:
                parts.append(b'{"requestDeleteRange":{"key":"%s"}}' % _b64(key))
        self._submit("txn", b'{"success":[' + b",".join(parts) + b"]}", done)

    # Debug/introspection (not the hot path).

    def stats(self) -> dict[str, Any]:
        return {
            "sockets": len(self._conns),
            "idle": len(self._idle),
            "waiting": len(self._waiting),
            "opened": self.sockets_opened,
        }
