"""Node-to-node transport: one TCP connection per pair of nodes, all groups multiplexed.

The node with the smaller id dials; the other accepts on its ordinary port and
the connection is told apart from client traffic by its first request,
``hello`` with a ``peer`` field (and the cluster's token when one is set).
After the handshake both directions carry frames holding a msgpack array of
encoded messages: everything queued for a peer during one event-loop turn
goes out as one frame.

Queues are bounded: when a peer is unreachable or slow, messages beyond
``queue_max`` are dropped and counted. The protocols above (Paxos) treat the
network as lossy and retransmit, so dropping is safe, while queueing without
bound is not.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from typing import Any

import msgpack

from dsnode.runtime.logs import get_logger
from dsnode.runtime.security import Security
from dsnode.wire.framing import HEADER, FrameDecoder, FrameError, unpack_payload

log = get_logger("dsnode.peers")

OnMessages = Callable[[str, list], None]


class PeerLink:
    """The one connection to one peer; whichever side dialed, messages flow both ways."""

    def __init__(self, net: PeerNetwork, peer_id: str, addr: str) -> None:
        self.net = net
        self.peer_id = peer_id
        self.addr = addr
        self.transport: asyncio.Transport | None = None
        self.queue: list[Any] = []
        self.flush_scheduled = False
        self.paused = False
        self.sent = 0
        self.received = 0
        self.dropped = 0
        self.connects = 0
        self.connected = asyncio.Event()
        self.lost = asyncio.Event()

    # ------------------------------------------------------------ sending
    def send(self, msg: Any) -> None:
        if self.transport is None or len(self.queue) >= self.net.queue_max:
            self.dropped += 1
            return
        self.queue.append(msg)
        if not self.flush_scheduled:
            self.flush_scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        if not self.queue:
            return
        if self.transport is None or self.paused:
            if self.transport is None:
                self.dropped += len(self.queue)
                self.queue.clear()
            return
        batch, self.queue = self.queue, []
        payload = self.net.packer.pack(batch)
        if len(payload) > self.net.max_frame_bytes:
            # Split rather than exceed the peer's frame limit.
            half = len(batch) // 2
            if half == 0:
                self.dropped += 1
                log.error("peer_message_too_large", peer=self.peer_id, bytes=len(payload))
                return
            self.queue = batch[:half]
            self.flush()
            self.queue = batch[half:]
            self.flush()
            return
        self.transport.write(HEADER.pack(len(payload)) + payload)
        self.sent += len(batch)

    # ------------------------------------------------------------ connection state
    def attach(self, transport: asyncio.Transport) -> None:
        if self.transport is not None and self.transport is not transport:
            self.transport.close()
        self.transport = transport
        self.paused = False
        self.connects += 1
        self.lost.clear()
        self.connected.set()
        log.info("peer_connected", peer=self.peer_id)

    def detach(self, transport: asyncio.Transport) -> None:
        if self.transport is transport:
            self.transport = None
            self.dropped += len(self.queue)
            self.queue.clear()
            self.connected.clear()
            self.lost.set()
            log.info("peer_disconnected", peer=self.peer_id)

    def deliver(self, batch: object) -> None:
        if not isinstance(batch, list):
            self.net.malformed += 1
            return
        self.received += len(batch)
        self.net.on_messages(self.peer_id, batch)

    def stats(self) -> dict:
        return {
            "connected": self.transport is not None,
            "sent": self.sent,
            "received": self.received,
            "dropped": self.dropped,
            "connects": self.connects,
        }


class PeerProtocol(asyncio.Protocol):
    """A peer connection we dialed: send hello, await its answer, then carry batches."""

    def __init__(self, net: PeerNetwork, link: PeerLink) -> None:
        self.net = net
        self.link = link
        self.decoder = FrameDecoder(net.max_frame_bytes)
        self.transport: asyncio.Transport | None = None
        self.handshaken = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.net.security is not None:
            why = self.net.security.check_peer_identity(self.link.peer_id, transport)
            if why is not None:
                transport.close()
                return
        hello = {"id": 1, "op": "hello", "peer": self.net.node_id,
                 "cluster_id": self.net.cluster_id, "client": "dsnode-peer"}
        if self.net.token is not None:
            hello["token"] = self.net.token
        payload = self.net.packer.pack(hello)
        self.transport.write(HEADER.pack(len(payload)) + payload)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        try:
            frames = self.decoder.feed(data)
        except FrameError as e:
            log.warning("peer_bad_frame", peer=self.link.peer_id, error=e.message)
            self.transport.close()  # type: ignore[union-attr]
            return
        for payload in frames:
            try:
                obj = unpack_payload(payload, self.net.max_frame_bytes)
            except Exception:
                self.net.malformed += 1
                continue
            if not self.handshaken:
                if isinstance(obj, dict) and obj.get("ok") is True and obj.get("id") == 1:
                    self.handshaken = True
                    self.link.attach(self.transport)  # type: ignore[arg-type]
                else:
                    err = obj.get("error") if isinstance(obj, dict) else obj
                    log.warning("peer_handshake_refused", peer=self.link.peer_id, answer=err)
                    self.transport.close()  # type: ignore[union-attr]
                    return
                continue
            self.link.deliver(obj)

    def pause_writing(self) -> None:
        self.link.paused = True

    def resume_writing(self) -> None:
        self.link.paused = False
        self.link.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.link.detach(self.transport)
        if not self.done.done():
            self.done.set_result(None)


class PeerNetwork:
    def __init__(
        self,
        node_id: str,
        peers: dict[str, str],
        *,
        cluster_id: str,
        token: str | None,
        on_messages: OnMessages,
        max_frame_bytes: int,
        queue_max: int = 10_000,
        rng: random.Random | None = None,
    ) -> None:
        self.node_id = node_id
        self.cluster_id = cluster_id
        self.token = token
        self.on_messages = on_messages
        self.max_frame_bytes = max_frame_bytes
        self.queue_max = queue_max
        self.packer = msgpack.Packer(use_bin_type=True)
        self.links = {pid: PeerLink(self, pid, addr) for pid, addr in peers.items() if pid != node_id}
        self.malformed = 0
        self._rng = rng or random.Random(node_id)
        self._tasks: list[asyncio.Task] = []
        self._closing = False
        self.security: Security | None = None  # TLS for dialing and the dialed node's identity

    def send(self, peer_id: str, msg: Any) -> None:
        link = self.links.get(peer_id)
        if link is not None:
            link.send(msg)

    def connected(self, peer_id: str) -> bool:
        link = self.links.get(peer_id)
        return link is not None and link.transport is not None

    def start(self) -> None:
        for pid, link in self.links.items():
            if self.node_id < pid:
                self._tasks.append(asyncio.create_task(self._dial_forever(link), name=f"dial-{pid}"))

    async def _dial_forever(self, link: PeerLink) -> None:
        loop = asyncio.get_running_loop()
        host, _, port = link.addr.rpartition(":")
        host = host.strip("[]")
        backoff = 0.05
        while not self._closing:
            try:
                _, proto = await asyncio.wait_for(
                    loop.create_connection(lambda: PeerProtocol(self, link), host, int(port),
                                           **dial_tls_args(self.security, link.peer_id)),
                    timeout=2.0,
                )
            except (OSError, TimeoutError, ssl.SSLError):
                await asyncio.sleep(backoff * (0.5 + self._rng.random()))
                backoff = min(backoff * 2, 1.0)
                continue
            await proto.done
            if proto.handshaken:
                backoff = 0.05
            await asyncio.sleep(backoff * (0.5 + self._rng.random()))
            backoff = min(backoff * 2, 1.0)

    def accept(self, peer_id: str, transport: asyncio.Transport) -> PeerLink | None:
        """An inbound connection said hello as ``peer_id``; returns its link or None."""
        link = self.links.get(peer_id)
        if link is None:
            return None
        link.attach(transport)
        return link

    async def close(self) -> None:
        self._closing = True
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for link in self.links.values():
            if link.transport is not None:
                link.transport.close()

    def stats(self) -> dict:
        return {pid: link.stats() for pid, link in self.links.items()}


def dial_tls_args(security: Security | None, peer_id: str) -> dict:
    """``create_connection`` arguments for TLS to a peer (none without TLS)."""
    if security is None or security.dial_context is None:
        return {}
    return {"ssl": security.dial_context, "server_hostname": peer_id,
            "ssl_handshake_timeout": security.config.handshake_timeout_ms / 1000}
