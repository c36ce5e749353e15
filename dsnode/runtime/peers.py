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

Frames between peers may be larger than client frames: the limit is the
cores' ``peer_message_bytes_max`` (every message they build fits, checked
where they build it) plus room for forwarded client requests. A message that
still does not fit is never retried in a loop: it is dropped, counted
(``oversized`` in the link's stats, shown by ``status``) and logged once per
peer.
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import Callable
from typing import Any

import msgpack

from dsnode.core.membership.incarnations import (
    REFUSAL_PREFIX,
    Incarnations,
    check_cluster,
    presented_from_wire,
)
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
        self.oversized = 0
        self.largest_frame = 0  # bytes of the largest frame sent to this peer
        self.connects = 0

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
                self.oversized += 1
                if self.oversized == 1:
                    log.error("peer_message_too_large", peer=self.peer_id, bytes=len(payload),
                              max_frame_bytes=self.net.max_frame_bytes,
                              note="our bug: counted in status, logged once per peer")
                return
            self.queue = batch[:half]
            self.flush()
            self.queue = batch[half:]
            self.flush()
            return
        if len(payload) > self.largest_frame:
            self.largest_frame = len(payload)
        self.transport.write(HEADER.pack(len(payload)) + payload)
        self.sent += len(batch)

    # ------------------------------------------------------------ connection state
    def attach(self, transport: asyncio.Transport) -> None:
        if self.transport is not None and self.transport is not transport:
            self.transport.close()
        self.transport = transport
        self.paused = False
        self.connects += 1
        log.info("peer_connected", peer=self.peer_id)

    def detach(self, transport: asyncio.Transport) -> None:
        if self.transport is transport:
            self.transport = None
            self.dropped += len(self.queue)
            self.queue.clear()
            log.info("peer_disconnected", peer=self.peer_id)

    def deliver(self, batch: object) -> None:
        if not isinstance(batch, list):
            if isinstance(batch, dict) and isinstance(batch.get("refused"), str):
                self.net.refused_by(self.peer_id, batch["refused"])
                return
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
            "oversized": self.oversized,
            "largest_frame": self.largest_frame,
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
                 "cluster_id": self.net.cluster_id, "client": "dsnode-peer",
                 **self.net.identity()}
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
                    reason = self.net.admit(self.link.peer_id, obj)
                    if reason is not None:
                        # It must not vote: tell it why (it exits), and never attach.
                        payload = self.net.packer.pack({"refused": reason})
                        self.transport.write(HEADER.pack(len(payload)) + payload)  # type: ignore[union-attr]
                        self.transport.close()  # type: ignore[union-attr]
                        return
                    self.handshaken = True
                    self.link.attach(self.transport)  # type: ignore[arg-type]
                else:
                    err = obj.get("error") if isinstance(obj, dict) else obj
                    log.warning("peer_handshake_refused", peer=self.link.peer_id, answer=err)
                    message = err.get("message") if isinstance(err, dict) else None
                    if isinstance(message, str) and REFUSAL_PREFIX in message:
                        self.net.refused_by(self.link.peer_id, message)
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
        incarnation: str = "",
        pins: Incarnations | None = None,
        save_pins: Callable[[], None] | None = None,
        summary: Callable[[], tuple[dict, dict]] | None = None,
        on_refused: Callable[[str], None] | None = None,
        dropped: Callable[[], list[str]] | None = None,
        removed_at: Callable[[str, str], int | None] | None = None,
        conf_epochs: Callable[[], dict[str, int]] | None = None,
        member_incarnation: Callable[[str], str | None] | None = None,
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
        self.refusals = 0  # peers we refused as stale (wiped or rolled-back data directories)
        self.refused_by_peers: dict[str, str] = {}  # peers that refused us, and why
        self.cluster_conflicts: dict[str, str] = {}  # peers of another formation: their uuid
        self.incarnation = incarnation
        self.cluster_uuid: str | None = None  # agreed at formation (the Form command)
        self.pins = pins if pins is not None else Incarnations()
        self._save_pins = save_pins
        self._summary = summary
        self._on_refused = on_refused
        self._dropped = dropped  # the groups this node dropped for good (ids as strings)
        self._removed_at = removed_at  # (peer, group) -> epoch that removed it, or None
        self._conf_epochs = conf_epochs  # per group, the configuration epoch applied here
        # a member's data directory as the metadata group's member list has it
        self._member_incarnation = member_incarnation
        self._rng = rng or random.Random(node_id)
        self._tasks: list[asyncio.Task] = []
        self._dialing: dict[str, asyncio.Task] = {}
        self._started = False
        self._closing = False
        self.security: Security | None = None  # TLS for dialing and the dialed node's identity

    # ------------------------------------------------------------ identity
    def identity(self) -> dict:
        """What a hello (or its answer) says about this node's data directory, plus
        the pins it holds (so they spread)."""
        if not self.incarnation:
            return {}
        log_end, promised = self._summary() if self._summary is not None else ({}, {})
        out = {"incarnation": self.incarnation, "log_end": log_end,
               "promised": {g: list(b) for g, b in promised.items()},
               "pins": self.pins.encode()}
        if self.cluster_uuid is not None:
            out["cluster_uuid"] = self.cluster_uuid
        dropped = self._dropped() if self._dropped is not None else []
        if dropped:
            out["dropped"] = dropped
        if self._conf_epochs is not None:
            out["conf_epoch"] = self._conf_epochs()
        return out

    def admit(self, peer_id: str, hello: dict) -> str | None:
        """Check a peer's identity from its hello (or its answer to ours): the reason
        to refuse it, or None. A peer met for the first time is pinned, the pins it
        brings are merged, and both are on disk before its link carries anything."""
        try:
            presented = presented_from_wire(hello)
        except ValueError as e:
            return self._refuse(peer_id, f"{REFUSAL_PREFIX}: {e}")
        if presented is None:
            return None  # a node from before incarnations: nothing to compare
        reason = check_cluster(peer_id, self.cluster_uuid, hello.get("cluster_uuid"))
        if reason is not None:
            self._cluster_conflict(peer_id, hello.get("cluster_uuid"))
            return self._refuse(peer_id, reason)
        changed = self.merge_pins(peer_id, hello.get("pins"), save=False)
        if self._member_incarnation is not None and (
                self._member_incarnation(peer_id) == presented.incarnation):
            changed |= self.pins.rebind(peer_id, presented.incarnation)  # re-added afresh
        if presented.dropped and self._removed_at is not None:
            removed_at = self._removed_at
            changed |= self.pins.note_drops(peer_id, presented, lambda g: removed_at(peer_id, g))
        reason = self.pins.check(peer_id, presented)
        if reason is not None:
            if changed and self._save_pins is not None:
                self._save_pins()
            return self._refuse(peer_id, reason)
        changed |= self.pins.admit(peer_id, presented.incarnation)
        if changed and self._save_pins is not None:
            self._save_pins()
        return None

    def merge_pins(self, peer_id: str, table: object, save: bool = True) -> bool:
        """Merge a peer's pin table (from its hello or a periodic ``pins`` message)."""
        if table is None:
            return False
        try:
            theirs = Incarnations.decode(table)
        except ValueError:
            self.malformed += 1
            return False
        changed = self.pins.merge(theirs, self.node_id)
        if changed and save and self._save_pins is not None:
            self._save_pins()
        return changed

    def _majority_of_peers(self) -> int:
        return min((len(self.links) + 1) // 2 + 1, len(self.links))

    def _cluster_conflict(self, peer_id: str, theirs: object) -> None:
        """A peer belongs to another formation of the cluster. Once a majority of
        the members do, the stranger is this node: it gives up (exit 2)."""
        self.cluster_conflicts[peer_id] = str(theirs)
        if len(self.cluster_conflicts) >= self._majority_of_peers() and self._on_refused:
            self._on_refused(
                f"{REFUSAL_PREFIX}: node {self.node_id!r} holds data of cluster "
                f"{self.cluster_uuid}, but a majority of the members "
                f"({', '.join(sorted(self.cluster_conflicts))}) belong to cluster {theirs} "
                f"(same cluster_id, another formation): this data directory is not this "
                f"cluster's (docs/OPERATIONS.md, 'Replacing a node's disk')"
            )

    def _refuse(self, peer_id: str, reason: str) -> str:
        self.refusals += 1
        log.error("peer_refused", peer=peer_id, reason=reason)
        return reason

    def refused_by(self, peer_id: str, reason: str) -> None:
        """A peer refused us as stale. Once a majority of the cluster has (so one
        confused peer, or a stranger from another formation, cannot stop a healthy
        node), this node gives up: ``on_refused`` (it exits with status 2). Until
        then the refusing peers simply have no link to it."""
        self.refused_by_peers[peer_id] = reason
        log.error("refused_by_peer", peer=peer_id, reason=reason,
                  refusals=len(self.refused_by_peers))
        if len(self.refused_by_peers) >= self._majority_of_peers():
            if self._on_refused is not None:
                self._on_refused(reason)

    def send(self, peer_id: str, msg: Any) -> None:
        link = self.links.get(peer_id)
        if link is not None:
            link.send(msg)

    def connected(self, peer_id: str) -> bool:
        link = self.links.get(peer_id)
        return link is not None and link.transport is not None

    def start(self) -> None:
        self._started = True
        for pid, link in self.links.items():
            if self.node_id < pid:
                self._dial(link)

    def _dial(self, link: PeerLink) -> None:
        task = asyncio.create_task(self._dial_forever(link), name=f"dial-{link.peer_id}")
        self._tasks.append(task)
        self._dialing[link.peer_id] = task

    def set_members(self, peers: dict[str, str]) -> list[str]:
        """The cluster's members changed (the metadata group's member list): links to
        new members (dialed when our id is the smaller), none any more to members that
        are gone, a new address for one that moved. Returns the ids whose link changed."""
        changed = []
        for pid in [p for p in self.links if p not in peers]:
            link = self.links.pop(pid)
            task = self._dialing.pop(pid, None)
            if task is not None:
                task.cancel()
            if link.transport is not None:
                link.transport.close()
            changed.append(pid)
        for pid, addr in peers.items():
            if pid == self.node_id:
                continue
            link = self.links.get(pid)
            if link is not None and link.addr == addr:
                continue
            if link is not None:  # moved: dial the new address
                link.addr = addr
                task = self._dialing.pop(pid, None)
                if task is not None:
                    task.cancel()
            else:
                link = self.links[pid] = PeerLink(self, pid, addr)
            changed.append(pid)
            if self._started and not self._closing and self.node_id < pid:
                self._dial(link)
        if changed:
            log.info("peers_changed", peers=",".join(sorted(self.links)), changed=changed)
        return changed

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
