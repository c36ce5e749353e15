"""The client listener: one asyncio Protocol per connection.

Frames are decoded as bytes arrive; each request is validated and handed to
the driver in the same loop turn. Answers go back by request id, in whatever
order they complete. Backpressure: a connection with too many requests in
flight, or whose peer stops reading our answers, is paused until it drains;
past the node-wide in-flight cap new requests are shed with ``overloaded``.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import msgpack

from dsnode import __version__
from dsnode.core.effects import Reply
from dsnode.core.membership.incarnations import GONE_REFUSAL, REFUSAL_PREFIX
from dsnode.runtime.driver import Driver, Pending
from dsnode.runtime.logs import get_logger
from dsnode.runtime.metrics import NodeMetrics, op_label
from dsnode.runtime.security import ADMIN, Security, required_role, role_allows
from dsnode.wire import errors
from dsnode.wire.framing import HEADER, FrameDecoder, FrameError, unpack_payload
from dsnode.wire.requests import Limits, RequestError, parse_request, request_id

if TYPE_CHECKING:
    from dsnode.config import NodeConfig
    from dsnode.core.ring import Ring
    from dsnode.runtime.peers import PeerLink, PeerNetwork

log = get_logger("dsnode.server")

PROTOCOL_VERSION = 1
_now = time.perf_counter


class Request(Pending):
    """A client's request in flight, with what its metrics need: its op and arrival time."""

    __slots__ = ("op", "t0")

    def __init__(self, conn: ClientConnection, rid: int, op: str, t0: float) -> None:
        super().__init__(conn, rid, op != "get")
        self.op = op
        self.t0 = t0


def oversized_answer(rid: int, write: bool, size: int, limit: int) -> dict:
    """The error sent instead of an answer larger than a frame: ``too_large`` for a read
    (it had no effect), ``internal`` with an unknown outcome for a write (it happened,
    but its answer cannot be delivered)."""
    text = f"the answer of {size} bytes exceeds max_frame_bytes={limit}"
    if not write:
        return errors.error_response(rid, errors.TOO_LARGE, text)
    return errors.error_response(rid, errors.INTERNAL, text + "; it may have taken effect",
                                 indeterminate=True)


def ring_answer(
    ring: Ring, addrs: Mapping[str, str], leader_of: Callable[[int], str | None]
) -> dict:
    """The body of a ``ring`` answer (PROTOCOL.md) for ``ring_provider``: ``addrs`` maps
    member ids to their client ``host:port``; ``leader_of(pid)`` is the leader this node
    knows of (None: none). Every member of the ring needs an address (KeyError if not).
    Set it as ``server.ring_provider = lambda: ring_answer(ring, addrs, leader_of)``."""
    return {
        "partitions": ring.partitions,
        "replication": ring.replication,
        "epoch": ring.epoch,
        "members": [{"node_id": m, "addr": addrs[m]} for m in ring.members],
        "map": [
            {"id": pid, "replicas": list(replicas), "leader": leader_of(pid)}
            for pid, replicas in enumerate(ring.placement())
        ],
    }


# Largest frame a connection may send before it has authenticated: a hello is tiny, and an
# unauthenticated client must not make the node buffer max_frame_bytes per connection.
PRE_AUTH_FRAME_MAX = 64 * 1024
LIMIT_COUNTERS = (
    "connections_refused", "pending_evicted", "first_frame_timeouts", "unauthenticated_requests",
    "unauthenticated_closed", "buffer_overflows", "idle_closed",
)


class ClientServer:
    """Shared state of all client connections of one node."""

    def __init__(
        self, config: NodeConfig, metrics: NodeMetrics | None = None,
        security: Security | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else NodeMetrics()
        self.security = security if security is not None else Security(config)
        # Connections not yet past their first frame (or, with authentication, their hello),
        # oldest first, each with its deadline; see ``admit`` and ``sweep``.
        self.pending: dict[ClientConnection, float] = {}
        self.counters = dict.fromkeys(LIMIT_COUNTERS, 0)
        self._sweeper: asyncio.TimerHandle | None = None
        self.limits = Limits(config.max_key_bytes, config.max_value_bytes, config.max_txn_ops)
        self.driver: Driver | None = None
        self.connections: set[ClientConnection] = set()
        self.inflight = 0
        self.accepting = True
        self.status_provider: Callable[[], dict] | None = None
        # The partition map for the ``ring`` op, set by the node like ``status_provider``:
        # {"partitions", "replication", "epoch", "members": [{"node_id", "addr"}],
        #  "map": [{"id", "replicas", "leader"}]}, or None while the ring is not known yet.
        self.ring_provider: Callable[[], dict | None] | None = None
        # whether a node id left the cluster or was removed (the metadata group's list)
        self.gone_provider: Callable[[str], bool] | None = None
        self.peer_network: PeerNetwork | None = None
        self.default_timeout_s = config.request_timeout_ms / 1000
        self._packer = msgpack.Packer(use_bin_type=True)
        self.idle = asyncio.Event()
        self.idle.set()

    def protocol_factory(self) -> ClientConnection:
        return ClientConnection(self)

    # ------------------------------------------------------------ replies
    def deliver(self, replies: list[Reply]) -> None:
        """Send answers, one write per connection per batch."""
        pack = self._packer.pack
        header = HEADER.pack
        out: dict[ClientConnection, list[bytes]] = {}
        finished = 0
        metrics = self.metrics
        counts, latency = metrics.requests, metrics.latency
        sent = 0
        now = _now()
        active = asyncio.get_running_loop().time() if replies else 0.0  # idle timeouts
        for r in replies:
            p: Request = r.token
            if p.done:
                continue
            p.finish()
            finished += 1
            if r.error is None:
                # a new dict: the result may be the one the dedup table keeps
                body = {"id": p.rid, "ok": True, **r.result}
                counts[(p.op, "ok")] += 1
            else:
                code, message, indeterminate = r.error
                body = errors.error_response(p.rid, code, message, indeterminate=indeterminate)
                counts[(p.op, code)] += 1
            latency[p.op].observe(now - p.t0)
            payload = pack(body)
            if len(payload) > self.config.max_frame_bytes:
                payload = pack(oversized_answer(p.rid, p.write, len(payload),
                                                self.config.max_frame_bytes))
            sent += len(payload) + 4
            conn = p.conn
            frames = out.get(conn)
            if frames is None:
                frames = out[conn] = []
            frames.append(header(len(payload)))
            frames.append(payload)
            conn.inflight -= 1
        self.inflight -= finished
        metrics.sent_bytes += sent
        for conn, frames in out.items():
            conn.last_active = active
            conn.write_frames(frames)
            conn.maybe_resume()
        if self.inflight == 0:
            self.idle.set()

    def status(self) -> dict:
        assert self.status_provider is not None
        body = self.status_provider()
        body.update(
            protocol=PROTOCOL_VERSION,
            server_version=__version__,
            inflight=self.inflight,
            connections=len(self.connections),
            event_loop=self.metrics.loop_status(),
            metrics=self.metrics.summary(),
            limits={"pending_connections": len(self.pending), **self.counters},
            security=self.security_status(),
        )
        return body

    def security_status(self) -> dict:
        sec = self.security
        return {
            "tls": self.config.tls,
            "peer_mtls": self.config.tls_ca_file is not None,
            "client_cert_auth": self.config.client_cert_auth,
            "auth_required": sec.auth_required,
            "tokens": len(sec.tokens),
            **sec.counters,
        }

    # ------------------------------------------------------------ resource caps
    def admit(self, conn: ClientConnection) -> None:
        """A new connection waits for its first frame (or hello); drop the oldest if full."""
        loop = asyncio.get_running_loop()
        while len(self.pending) >= self.config.pending_connections_max:
            oldest = next(iter(self.pending))
            self.counters["pending_evicted"] += 1
            oldest._fatal(errors.OVERLOADED, "too many connections waiting for their first "
                          "request; this one was the oldest")
        self.pending[conn] = loop.time() + self.config.handshake_timeout_ms / 1000
        if self._sweeper is None:
            self._sweeper = loop.call_later(self._sweep_interval(), self.sweep)

    def _sweep_interval(self) -> float:
        cfg = self.config
        spans = [cfg.handshake_timeout_ms / 4000, 1.0]
        if cfg.idle_timeout_ms:
            spans.append(cfg.idle_timeout_ms / 4000)
        return max(0.01, min(spans))

    def sweep(self) -> None:
        """Close connections past their first-frame deadline or idle too long."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        for conn, deadline in list(self.pending.items()):
            if deadline > now:
                break  # deadlines grow with insertion order
            self.counters["first_frame_timeouts"] += 1
            conn._fatal(errors.TIMEOUT, "no request (or no successful hello) within "
                        f"handshake_timeout_ms={self.config.handshake_timeout_ms}")
        idle_s = self.config.idle_timeout_ms / 1000
        if idle_s:
            for conn in list(self.connections):
                if conn.inflight == 0 and now - conn.last_active > idle_s and not conn.closed:
                    self.counters["idle_closed"] += 1
                    conn._fatal(errors.TIMEOUT, f"idle for idle_timeout_ms="
                                f"{self.config.idle_timeout_ms}; closing")
        if self.connections or self.pending:
            self._sweeper = loop.call_later(self._sweep_interval(), self.sweep)


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "server", "transport", "decoder", "inflight", "authenticated", "closed",
        "_paused_reading", "_paused_writing", "peer", "peer_link",
        "role", "unauth_requests", "last_active",
    )

    def __init__(self, server: ClientServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.decoder = FrameDecoder(server.config.max_frame_bytes)
        self.inflight = 0
        self.role: str | None = None  # set from the TLS handshake and hello
        self.authenticated = False
        self.unauth_requests = 0
        self.last_active = 0.0
        self.closed = False
        self._paused_reading = False
        self._paused_writing = False
        self.peer = ""
        self.peer_link: PeerLink | None = None  # set once a node says hello as a peer

    # ------------------------------------------------------------ asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        srv = self.server
        srv.metrics.connections_accepted += 1
        if len(srv.connections) >= srv.config.max_connections or not srv.accepting:
            if srv.accepting:
                srv.metrics.load_shed["max_connections"] += 1
                srv.counters["connections_refused"] += 1
            self._fatal(errors.OVERLOADED if srv.accepting else errors.UNAVAILABLE,
                        "too many connections" if srv.accepting else "node is shutting down")
            return
        srv.connections.add(self)
        self.role = srv.security.initial_role()
        self.authenticated = self.role is not None
        if not self.authenticated:
            self.decoder.max_frame_bytes = min(PRE_AUTH_FRAME_MAX, srv.config.max_frame_bytes)
        self.last_active = asyncio.get_running_loop().time()
        srv.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        self.server.pending.pop(self, None)
        if self.peer_link is not None and self.transport is not None:
            self.peer_link.detach(self.transport)

    def pause_writing(self) -> None:
        if self.peer_link is not None:
            self.peer_link.paused = True
            return
        self._paused_writing = True
        self._pause_reading()

    def resume_writing(self) -> None:
        if self.peer_link is not None:
            self.peer_link.paused = False
            self.peer_link.flush()
            return
        self._paused_writing = False
        self.maybe_resume()

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self.peer_link is None:
            self.server.metrics.received_bytes += len(data)
        try:
            frames = self.decoder.feed(data)
        except FrameError as e:
            self._fatal(e.code, e.message)
            return
        max_frame = self.decoder.max_frame_bytes
        for payload in frames:
            try:
                obj = unpack_payload(payload, max_frame)
            except Exception as e:  # any decode failure of client bytes
                self._fatal(errors.BAD_REQUEST, f"frame is not valid msgpack: {e}")
                return
            if self.peer_link is not None:
                self.peer_link.deliver(obj)
                continue
            if not isinstance(obj, dict):
                self._fatal(errors.BAD_REQUEST, "frame must hold one msgpack map")
                return
            rid = request_id(obj)
            if rid is None:
                # A missing or malformed field, like any other: answered (with id 0, as
                # there is no id to echo) and the connection stays open.
                self._send(errors.error_response(
                    0, errors.BAD_REQUEST, "missing or invalid field 'id' (int 1..2^63-1)"))
                continue
            self._handle(rid, obj)
            if self.closed:
                return
        if frames and self.peer_link is None:
            self.last_active = asyncio.get_running_loop().time()
            if self.authenticated:
                self.server.pending.pop(self, None)

    # ------------------------------------------------------------ requests
    def _handle(self, rid: int, obj: dict) -> None:
        srv = self.server
        counts = srv.metrics.requests
        try:
            req = parse_request(obj, srv.limits)
        except RequestError as e:
            counts[(op_label(obj.get("op")), e.code)] += 1
            self._send(errors.error_response(rid, e.code, e.message))
            return
        op = req.op
        if op == "hello":
            self._hello(rid, obj)
            return
        if not self.authenticated:
            self.server.metrics.requests[(op, errors.UNAUTHENTICATED)] += 1
            self._refuse_unauthenticated(rid, "send hello with a valid token first")
            return
        if self.role != ADMIN:
            needed = required_role(req.op, req.command)
            if not role_allows(self.role, needed):
                self._refuse(rid, op, errors.UNAUTHENTICATED,
                             f"role {self.role!r} may not {req.op}: it needs {needed!r}")
                return
        if op == "status":
            counts[(op, "ok")] += 1
            self._send({"id": rid, "ok": True, **srv.status()})
            return
        if op == "ring":
            self._ring(rid)
            return
        if not srv.accepting:
            self._refuse(rid, op, errors.UNAVAILABLE, "node is shutting down")
            return
        if srv.inflight >= srv.config.inflight_requests_max:
            srv.metrics.load_shed["inflight_requests_max"] += 1
            self._refuse(rid, op, errors.OVERLOADED,
                         "node has too many requests in flight; retry later")
            return
        cmd = req.command
        assert cmd is not None and srv.driver is not None
        pending = Request(self, rid, op, _now())
        pending.dedup = req.dedup
        self.inflight += 1
        srv.inflight += 1
        srv.idle.clear()
        timeout_s = req.timeout_ms / 1000 if req.timeout_ms is not None else srv.default_timeout_s
        srv.driver.submit(pending, cmd, timeout_s)
        if self.inflight >= srv.config.connection_inflight_max:
            self._pause_reading()

    def _ring(self, rid: int) -> None:
        """The partition map (PROTOCOL.md, "ring"), or ``unavailable`` (definite) while the
        node does not know it yet."""
        provider = self.server.ring_provider
        body = provider() if provider is not None else None
        if body is None:
            self._refuse(rid, "ring", errors.UNAVAILABLE, "partition map not known yet")
            return
        self.server.metrics.requests[("ring", "ok")] += 1
        self._send({"id": rid, "ok": True, **body})

    def _refuse(self, rid: int, op: str, code: str, message: str) -> None:
        """Answer a request with an error before it reaches the driver, and count it."""
        self.server.metrics.requests[(op, code)] += 1
        self._send(errors.error_response(rid, code, message))

    def _hello(self, rid: int, obj: dict) -> None:
        cfg = self.server.config
        token = obj.get("token")
        if "peer" in obj:
            self._peer_hello(rid, obj)
            return
        sec = self.server.security
        if sec.uses_tokens:
            role = sec.token_role(token)
            if role is None:
                self.server.metrics.requests[("hello", errors.UNAUTHENTICATED)] += 1
                self._refuse_unauthenticated(rid, "bad or missing token")
                return
            self.role = role
            self.authenticated = True
            self.decoder.max_frame_bytes = cfg.max_frame_bytes
            self.server.pending.pop(self, None)
        self.server.metrics.requests[("hello", "ok")] += 1
        self._send({
            "id": rid, "ok": True, "node_id": cfg.node_id, "cluster_id": cfg.cluster_id,
            "protocol": PROTOCOL_VERSION, "server_version": __version__, "role": self.role,
        })

    def _refuse_unauthenticated(self, rid: int, message: str) -> None:
        """Answer ``unauthenticated``; past the cap of such answers, close the connection."""
        srv = self.server
        srv.counters["unauthenticated_requests"] += 1
        self.unauth_requests += 1
        if self.unauth_requests > srv.config.unauthenticated_requests_max:
            srv.counters["unauthenticated_closed"] += 1
            self._fatal(errors.UNAUTHENTICATED, f"{message}; too many requests without "
                        "authenticating, closing")
            return
        self._send(errors.error_response(rid, errors.UNAUTHENTICATED, message))

    def _peer_hello(self, rid: int, obj: dict) -> None:
        """Another node of the cluster: check who it is, then switch to peer framing."""
        cfg = self.server.config
        net = self.server.peer_network
        token = obj.get("token")
        peer_id = obj["peer"]
        if cfg.auth_token is not None and not (
            isinstance(token, str) and hmac.compare_digest(token.encode(), cfg.auth_token.encode())
        ):
            self._fatal(errors.UNAUTHENTICATED, "peer hello: bad or missing cluster token")
            return
        if obj.get("cluster_id") != cfg.cluster_id:
            self._fatal(errors.UNAUTHENTICATED,
                        f"peer hello: cluster_id {obj.get('cluster_id')!r} is not {cfg.cluster_id!r}")
            return
        if net is None or peer_id not in net.links:
            gone = self.server.gone_provider
            if gone is not None and gone(peer_id):
                # it left or was removed: tell it in words it acts on (it stops, exit 2)
                self._fatal(errors.UNAUTHENTICATED, (
                    f"peer hello: {REFUSAL_PREFIX}: node {peer_id!r} {GONE_REFUSAL} (it left "
                    "or was removed); to add it again, start it on a new data directory "
                    "with --join"))
                return
            self._fatal(errors.UNAUTHENTICATED, f"peer hello: {peer_id!r} is not a cluster member")
            return
        why = self.server.security.check_peer_identity(peer_id, self.transport)
        if why is not None:
            self._fatal(errors.UNAUTHENTICATED, f"peer hello: {why}")
            return
        reason = net.admit(peer_id, obj)
        if reason is not None:
            self._fatal(errors.UNAUTHENTICATED, f"peer hello: {reason}")
            return
        self.server.pending.pop(self, None)
        self.decoder.max_frame_bytes = cfg.max_frame_bytes
        self._send({"id": rid, "ok": True, "node_id": cfg.node_id, "cluster_id": cfg.cluster_id,
                    "protocol": PROTOCOL_VERSION, "server_version": __version__,
                    **net.identity()})
        self.server.connections.discard(self)  # not a client: no client limits or shutdown
        self.decoder.raise_limit(net.max_frame_bytes)
        self.peer_link = net.accept(peer_id, self.transport)  # type: ignore[arg-type]

    # ------------------------------------------------------------ output
    def _send(self, body: dict) -> None:
        if self.closed or self.transport is None:
            return
        payload = self.server._packer.pack(body)
        if self.peer_link is None:
            self.server.metrics.sent_bytes += len(payload) + 4
        self.transport.write(HEADER.pack(len(payload)) + payload)
        self._check_buffered()

    def write_frames(self, frames: list[bytes]) -> None:
        if not self.closed and self.transport is not None:
            self.transport.write(b"".join(frames))
            self._check_buffered()

    def _check_buffered(self) -> None:
        """A client that does not read its answers cannot make the node hold them forever."""
        assert self.transport is not None
        cap = self.server.config.connection_buffer_bytes_max
        if self.transport.get_write_buffer_size() > cap and self.peer_link is None:
            self.server.counters["buffer_overflows"] += 1
            log.info("client_buffer_overflow", peer=self.peer, cap=cap)
            self.closed = True
            self.server.connections.discard(self)
            self.server.pending.pop(self, None)
            self.transport.abort()

    def _fatal(self, code: str, message: str) -> None:
        """Answer with id 0 and close: the stream cannot be trusted any more."""
        log.info("client_protocol_error", peer=self.peer, code=code, message=message)
        self._send(errors.error_response(0, code, message))
        self.closed = True
        self.server.connections.discard(self)
        self.server.pending.pop(self, None)
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------ flow control
    def _pause_reading(self) -> None:
        if not self._paused_reading and self.transport is not None and not self.closed:
            self._paused_reading = True
            self.server.metrics.connection_pauses += 1
            self.transport.pause_reading()

    def maybe_resume(self) -> None:
        if (
            self._paused_reading
            and not self._paused_writing
            and not self.closed
            and self.server.accepting
            and self.inflight <= self.server.config.connection_inflight_max // 2
            and self.transport is not None
        ):
            self._paused_reading = False
            self.transport.resume_reading()

    def stop_reading(self) -> None:
        self._pause_reading()

    def close(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.transport.close()
