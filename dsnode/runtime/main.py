"""`dsnode serve`: build a node from its settings and run it until a signal.

Start-up order: settings -> data directory and cluster identity -> WAL
recovery -> listener -> READY. Shutdown (SIGTERM/SIGINT) is staged: stop
accepting, let in-flight requests finish (bounded by ``shutdown_timeout_ms``),
flush the log, close connections, exit 0. A second signal exits at once.
Any configuration or start-up problem is one line on stderr and exit 2.
"""

from __future__ import annotations

import asyncio
import errno
import gc
import mmap
import os
import random
import signal
import socket
import sys
import threading
import time
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
import msgpack

from dsnode import __version__
from dsnode.config import SETTINGS, ConfigError, NodeConfig, load_config, parse_addr
from dsnode.core.errors import InvariantBroken, StateLost
from dsnode.core.kv.store import shards_for
from dsnode.core.membership.detector import DetectorConfig
from dsnode.core.membership.incarnations import GONE_REFUSAL, Incarnations
from dsnode.core.membership.members import (
    ACTIVE,
    JOINING,
    LEAVING,
    LEFT,
    REMOVED,
    MemberLeave,
)
from dsnode.core.paxos.config import PaxosConfig, bound_for, lease_ticks_for
from dsnode.core.paxos.node import PaxosNode
from dsnode.core.ring import Ring, check_partitions
from dsnode.core.ring.ring import check_partitions_value, check_replication_value
from dsnode.core.twopc.coordinator import TwoPCConfig
from dsnode.runtime import logs, memory, sdnotify
from dsnode.runtime.driver import META, PINS, Driver
from dsnode.runtime.metrics import NodeMetrics, node_registry
from dsnode.runtime.peers import PeerNetwork
from dsnode.runtime.security import Security, SecurityError, check_exposure
from dsnode.runtime.server import ClientServer, ring_answer
from dsnode.runtime.snapshots import RecoveredSnapshots, SnapshotStore
from dsnode.runtime.wal import Recovered, WALCorruptError, WALFailedError, WriteAheadLog

if TYPE_CHECKING:  # the admin listener (aiohttp) is imported only when it is configured
    from dsnode.runtime.admin import AdminServer

EXIT_CONFIG = 2
EXIT_FAILED = 70  # EX_SOFTWARE: the node stopped itself (fail-stop); a supervisor restarts it
# Room beyond one client frame for what wraps it between peers (a forwarded
# request's header, a batch's request ids): peer frames may be this much larger.
PEER_FRAME_SLACK_BYTES = 64 * 1024
IDENTITY_FILE = "cluster.msgpack"
MEMBERS_FILE = "members.msgpack"  # per peer: its incarnation and highest slot seen accepted


class StartupError(Exception):
    """A problem that stops the node from starting; exit status 2."""


# ---------------------------------------------------------------- identity
def write_atomically(path: Path, obj: object) -> None:
    """Replace ``path`` with msgpack ``obj``: temp file, fsync, rename, fsync the directory.
    The temp file is the calling thread's own: writes from the event loop and from a
    worker thread must never share one (one would rename the other's away)."""
    tmp = path.with_name(f"{path.stem}.{threading.get_ident()}.tmp")
    with open(tmp, "wb") as f:
        f.write(msgpack.packb(obj, use_bin_type=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def record_cluster_uuid(data_dir: Path, uuid: str) -> None:
    """Add the cluster's UUID (agreed at formation) to the identity file."""
    path = data_dir / IDENTITY_FILE
    have = msgpack.unpackb(path.read_bytes(), raw=False)
    write_atomically(path, {**have, "cluster_uuid": uuid})


def stored_cluster_uuid(data_dir: Path) -> str | None:
    have = msgpack.unpackb((data_dir / IDENTITY_FILE).read_bytes(), raw=False)
    uuid = have.get("cluster_uuid")
    if uuid is not None and not isinstance(uuid, str):
        raise StartupError(f"data dir {data_dir}: {IDENTITY_FILE} is corrupt (cluster_uuid)")
    return uuid


def check_identity(config: NodeConfig, data_dir: Path) -> tuple[dict[str, str], str]:
    """Bind the data directory to this node and its cluster on first start.

    Afterwards membership comes from the data directory: the same ``--peers``
    is fine, no ``--peers`` means the stored ones, a different node id,
    cluster id or peer list is an error. Returns the cluster's members and
    the data directory's incarnation (made when the directory was first
    bound; a directory from before incarnations gets one now).
    """
    path = data_dir / IDENTITY_FILE
    want = {
        "node_id": config.node_id,
        "cluster_id": config.cluster_id,
        "peers": config.cluster_peers,
    }
    if path.exists():
        try:
            have = msgpack.unpackb(path.read_bytes(), raw=False)
        except Exception as e:
            raise StartupError(f"data dir {data_dir}: {IDENTITY_FILE} is corrupt ({e})") from None
        if not isinstance(have, dict):
            raise StartupError(f"data dir {data_dir}: {IDENTITY_FILE} is corrupt")
        for field in ("node_id", "cluster_id"):
            if have.get(field) != want[field]:
                raise StartupError(
                    f"data dir {data_dir} belongs to {field}={have.get(field)!r}, "
                    f"not {want[field]!r}"
                )
        if have.get("peers") != want["peers"] and config.peers is not None:
            raise StartupError(
                f"--peers differs from the membership stored in {data_dir} "
                f"({_fmt_peers(have.get('peers'))}); membership changes go through the cluster, "
                "not the command line"
            )
        stored = have.get("peers")
        if not isinstance(stored, dict) or config.node_id not in stored:
            raise StartupError(f"data dir {data_dir}: {IDENTITY_FILE} is corrupt (peers)")
        incarnation = have.get("incarnation")
        if incarnation is None:
            incarnation = os.urandom(16).hex()
            write_atomically(path, {**have, "incarnation": incarnation})
        elif not isinstance(incarnation, str):
            raise StartupError(f"data dir {data_dir}: {IDENTITY_FILE} is corrupt (incarnation)")
        return dict(stored), incarnation
    incarnation = os.urandom(16).hex()
    write_atomically(path, {**want, "incarnation": incarnation})
    return dict(want["peers"]), incarnation


def read_identity(data_dir: Path) -> dict:
    have = msgpack.unpackb((data_dir / IDENTITY_FILE).read_bytes(), raw=False)
    if not isinstance(have, dict):
        raise StartupError(f"data dir {data_dir}: {IDENTITY_FILE} is corrupt")
    return have


JOIN_ATTEMPT_TIMEOUT_S = 10.0
JOIN_TIMEOUT_S = 300.0  # a node that cannot join within this gives up (exit 2)


async def join_cluster(config: NodeConfig, incarnation: str, log: Any) -> tuple[dict, dict]:
    """Ask the cluster, through any of the ``--join`` addresses, to add this node
    (the ``member_join`` op, answered once the metadata group chose it), then read the
    answering member's ``status`` (the members' addresses, P, R, the cluster's uuid).
    Tries the addresses in turn until one answers; a definite refusal (the id is
    another data directory's, an earlier change still moving, a bad token) is final."""
    from dsnode.client import Client
    from dsnode.client.errors import DsnodeError

    tls: dict[str, Any] = {}
    if config.tls:
        tls = {"cacert": str(config.tls_ca_file) if config.tls_ca_file else None,
               "cert": str(config.tls_cert_file), "key": str(config.tls_key_file)}
    fields = {"node_id": config.node_id, "address": config.advertise_addr,
              "incarnation": incarnation}
    token = config.auth_token
    if config.join_token_file is not None:
        try:
            token = config.join_token_file.read_text().strip()
        except OSError as e:
            raise StartupError(f"join_token_file {str(config.join_token_file)!r}: "
                               f"{e.strerror or e}") from None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + JOIN_TIMEOUT_S
    last = ""
    while loop.time() < deadline:
        # (systemd: a join may take a while, e.g. behind another membership change)
        sdnotify.notify("STATUS=joining the cluster\nEXTEND_TIMEOUT_USEC=60000000")
        for addr in config.join or ():
            try:
                async with Client(addr, timeout=JOIN_ATTEMPT_TIMEOUT_S, token=token,
                                  ring_aware=False, discover=False, **tls) as c:
                    before = await c.status()
                    theirs = (before.get("ring") or {}).get("partitions")
                    if ("partitions" in config.model_fields_set and theirs is not None
                            and theirs != config.partitions):
                        raise StartupError(
                            f"the cluster at {addr} has partitions = {theirs}, this node is "
                            f"set to {config.partitions}: drop the setting (a joining node "
                            "takes the cluster's) or set it to the cluster's")
                    answer = await c.request("member_join", fields)
                    return answer, await c.status()
            except DsnodeError as e:
                last = f"{addr}: {e}"
                if e.code in ("refused", "bad_request", "unauthenticated", "unknown_op") and (
                        "one membership change at a time" not in e.message):
                    raise StartupError(f"the cluster refused to add {config.node_id}: "
                                       f"{e.message or e.code}") from None
                log.warning("join_retry", via=addr, error=str(e))
            except ValueError as e:  # the TLS files
                raise StartupError(f"join: {e}") from None
        await asyncio.sleep(1.0)
    raise StartupError(f"could not join the cluster within {JOIN_TIMEOUT_S:.0f} s ({last})")


def record_partitions(config: NodeConfig, data_dir: Path, peers: dict[str, str]) -> tuple[int, int]:
    """P and R of the cluster this data directory belongs to (issue 8): recorded in
    the identity file when the directory is first bound (from the settings
    ``partitions`` and ``replication``); a later start that sets ``partitions`` to
    another value is refused (changing P would move nearly every key), one that
    does not set it uses the recorded value. A directory bound before partitions
    existed holds one group with every key on every member: P = 1, R = all."""
    path = data_dir / IDENTITY_FILE
    have = msgpack.unpackb(path.read_bytes(), raw=False)
    recorded, replication = have.get("partitions"), have.get("replication")
    if recorded is None:
        fresh = have.get("cluster_uuid") is None and not (data_dir / "wal").exists()
        if fresh:
            recorded, replication = config.partitions, config.replication
        else:
            recorded, replication = 1, len(peers)
        write_atomically(path, {**have, "partitions": recorded, "replication": replication})
    elif "partitions" in config.model_fields_set:
        why = check_partitions(recorded, config.partitions)
        if why is not None:
            raise StartupError(f"data dir {data_dir}: {why}")
    try:
        check_partitions_value(recorded)
        check_replication_value(replication)
    except ValueError as e:
        raise StartupError(f"data dir {data_dir}: {IDENTITY_FILE} is corrupt ({e})") from None
    return recorded, replication


def load_pins(data_dir: Path) -> Incarnations:
    """The peers' pinned incarnations (``MEMBERS_FILE``); none yet on a new directory."""
    path = data_dir / MEMBERS_FILE
    if not path.exists():
        return Incarnations()
    try:
        return Incarnations.decode(msgpack.unpackb(path.read_bytes(), raw=False))
    except Exception as e:
        raise StartupError(f"data dir {data_dir}: {MEMBERS_FILE} is corrupt ({e})") from None


def _fmt_peers(peers: object) -> str:
    if isinstance(peers, dict):
        return ",".join(f"{k}={v}" for k, v in peers.items())
    return repr(peers)


def prepare_data_dir(config: NodeConfig) -> Path:
    data_dir = config.data_path
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        probe = data_dir / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise StartupError(f"data dir {str(data_dir)!r} is not usable: {e.strerror or e}") from None
    return data_dir


# ---------------------------------------------------------------- the node
class Node:
    """One running node: WAL, Paxos core, driver, peers and listener, with staged shutdown."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.log = logs.get_logger("dsnode.node")
        self.server_handle: asyncio.AbstractServer | None = None
        self.wal: WriteAheadLog | None = None
        self.snapshots: SnapshotStore | None = None
        self.client_server: ClientServer | None = None
        self.driver: Driver | None = None
        self.net: PeerNetwork | None = None
        self.core: PaxosNode | None = None
        self.bound: tuple[str, int] | None = None
        self.peers: dict[str, str] = config.cluster_peers  # replaced by the data dir's record
        self.pins = Incarnations()
        # the pins file is written from the loop and from worker threads: one at a time,
        # and never an older table over a newer one
        self._pins_lock = threading.Lock()
        self._pins_seq = 0
        self._pins_written = 0
        self.data_dir: Path | None = None
        self.refused: str | None = None  # why the cluster refused this node as a member
        self.cluster_uuid: str | None = None  # recorded in the identity file once formed
        self.stop_event: asyncio.Event | None = None
        self.metrics = NodeMetrics()
        self.admin: AdminServer | None = None
        self.security: Security | None = None
        self.joined = False  # this node joined a running cluster (it did not form it)
        self.left = False  # it left the cluster (or was removed): it stops

    def paxos_config(self) -> PaxosConfig:
        cfg = self.config
        return PaxosConfig(
            election_timeout_ticks=cfg.ticks(cfg.election_timeout_ms),
            heartbeat_interval_ticks=cfg.ticks(cfg.heartbeat_interval_ms),
            # A leader steps down after an election timeout without a quorum's acks: long
            # enough to ride out a pause of the followers' event loops (a snapshot, a GC).
            leader_quorum_timeout_ticks=cfg.ticks(cfg.election_timeout_ms),
            quiesce=True,
            # partition leaders spread: each hands over to its first healthy ring replica
            prefer_leader=cfg.prefer_ring_leaders,
            formation_group=META,
            formation_ring=None if self.joined else self.formation_ring,
            # replica-set changes through each group's log: membership changes (issue 10)
            reconfig=True,
            formation_uuid=self.formation_uuid,
            lease_ticks=lease_ticks_for(cfg.ticks(cfg.election_timeout_ms), cfg.clock_drift_max)
            if cfg.leader_leases else 0,
            snapshot_interval_slots=cfg.snapshot_interval_slots,
            kv_shards=shards_for(self.partitions),
            # one slot value holds at most one client frame's command (plus its request id)
            peer_message_bytes_max=bound_for(cfg.max_frame_bytes + PEER_FRAME_SLACK_BYTES),
        )

    async def start(self) -> None:
        cfg = self.config
        # The port first: a port in use fails before anything is created or logged.
        listener = bind_listener(cfg.listen)
        collecting = gc.isenabled()
        try:
            await self._start(listener)
        except BaseException:
            if self.server_handle is None:
                listener.close()
            raise
        finally:
            if collecting:
                gc.enable()  # _start turned it off for the recovery

    async def _start(self, listener: socket.socket) -> None:
        cfg = self.config
        memory.fix_mmap_threshold()
        self.security = load_security(cfg, self.log)
        data_dir = prepare_data_dir(cfg)
        self.data_dir = data_dir
        fresh = not (data_dir / IDENTITY_FILE).exists()
        self.peers, incarnation = check_identity(cfg, data_dir)
        self.joined = await self._join(data_dir, incarnation, fresh)
        if self.joined:
            self.peers = dict(read_identity(data_dir)["peers"])
        self.partitions, self.replication = record_partitions(cfg, data_dir, self.peers)
        self.formation_ring = (tuple(sorted(self.peers)), self.partitions, self.replication)
        self.formation_uuid = stored_cluster_uuid(data_dir)
        self.pins = load_pins(data_dir)
        wal = WriteAheadLog(data_dir / "wal", fsync=cfg.fsync, segment_bytes=cfg.wal_segment_bytes)
        # Recovery builds millions of objects that all live on: a collection while it
        # runs finds nothing, and the young-object ones add up (~15% of a 10M-key restart)
        gc.disable()
        took = Stopwatch()
        snapshots = SnapshotStore(data_dir / "snapshots", fsync=cfg.fsync)
        self.snapshots = snapshots
        try:  # the snapshot files are read and checked on worker threads during the WAL scan
            reading = snapshots.start_recovery([META, *range(self.partitions)])
        except OSError as e:
            raise StartupError(f"snapshot files cannot be read: {e}") from None
        try:
            recovered = wal.recover()
        except BaseException as e:
            reading.cancel()  # no thread left reading a file
            if isinstance(e, WALCorruptError):
                raise StartupError(f"write-ahead log is corrupt: {e}") from None
            if isinstance(e, OSError):
                raise StartupError(f"write-ahead log cannot be opened: {e}") from None
            raise
        self.wal = wal
        wal.on_fsync = self.metrics.on_fsync
        took.lap("wal")
        for repair in recovered.repairs:
            self.log.warning("wal_repaired", what=repair)
        try:
            found = reading.result()
        except OSError as e:
            raise StartupError(f"snapshot files cannot be read: {e}") from None
        took.lap("snapshot_files_after_wal")
        peers = self.peers
        seed = int.from_bytes(os.urandom(8), "big")
        # a node that joined starts with no group: the metadata group's leader invites it
        # (and its WAL brings back what it hosts since)
        core = PaxosNode(cfg.node_id, {} if self.joined else {META: tuple(peers)},
                         random.Random(seed), self.paxos_config(), metadata=META)
        core.set_contacts(peers)
        for repair in found.repairs:
            self.log.warning("snapshots_repaired", what=repair)
        recover_core(core, recovered, found, self.log)
        took.lap("restore_and_replay")
        if self.check_ring(core):
            raise StartupError(self.refused or "ring mismatch")
        if META not in core.groups and str(META) in core.dropped_groups():
            raise StartupError(
                f"node {cfg.node_id} left the cluster (or was removed from it): its data "
                f"directory {data_dir} holds nothing any more; to add it again, start it on a "
                "new data directory with --join")
        if len(peers) == 1 and META in core.groups:  # no one else can lead: take over now
            self.metrics.on_tick(core)  # the ballot before it, so the election is counted
            for gid in list(core.groups):
                core.campaign(gid)
        self.core = core
        stored = self.formation_uuid
        formed = core.state_machine(META).cluster_uuid if META in core.groups else None
        if stored is not None and formed is not None and stored != formed:
            raise StartupError(
                f"data dir {data_dir}: {IDENTITY_FILE} names cluster {stored} but the log "
                f"belongs to cluster {formed}"
            )
        self.cluster_uuid = stored or formed
        took.lap("ring_and_campaign")
        # What recovery built lives long: keep the cyclic GC from rescanning it forever.
        gc.collect()
        gc.freeze()
        took.lap("gc")
        memory.trim()  # recovery's transient buffers (the restored snapshot) go back
        took.lap("trim")
        self.log.info(
            "recovered",
            snapshot_lsn=recovered.snapshot_lsn,
            records=len(recovered.records),
            partitions=sorted(g for g in core.groups if g != META),
            peers=",".join(peers),
            rng_seed=seed,
            seconds=took.laps,
        )
        server = ClientServer(cfg, self.metrics, security=self.security)
        self.client_server = server
        if True:  # (a cluster of one may grow: members join)
            self.net = PeerNetwork(
                cfg.node_id, peers, cluster_id=cfg.cluster_id, token=cfg.auth_token,
                on_messages=self._on_peer_messages,
                max_frame_bytes=self.core.config.peer_message_bytes_max + PEER_FRAME_SLACK_BYTES,
                rng=random.Random(seed ^ 0x5EED),
                incarnation=incarnation, pins=self.pins, save_pins=self.save_pins,
                summary=core.durable_summary, on_refused=self.on_refused,
                dropped=core.dropped_groups, removed_at=core.removed_at,
                conf_epochs=core.conf_epochs, member_incarnation=self.member_incarnation,
            )
            self.net.cluster_uuid = self.cluster_uuid
            self.net.security = self.security
        core.resolve_ride_ticks = cfg.ticks(cfg.txn_resolve_ride_ms) if cfg.txn_resolve_ride_ms else 0
        self.driver = Driver(
            core, wal, server.deliver, self.net,
            node_id=cfg.node_id,
            tick_seconds=cfg.tick_interval_ms / 1000,
            checkpoint_every_records=cfg.snapshot_every_records,
            snapshots=snapshots,
            snapshot_wal_ratio=cfg.snapshot_wal_ratio,
            inflight_max=cfg.inflight_requests_max,
            rng=random.Random(seed ^ 0xA11CE),
            twopc=TwoPCConfig(prepare_timeout_ticks=cfg.ticks(cfg.txn_prepare_timeout_ms),
                              decision_timeout_ticks=cfg.ticks(cfg.txn_decision_timeout_ms),
                              resolve_horizon_ticks=cfg.ticks(cfg.request_timeout_ms),
                              submit_timeout_ticks=cfg.ticks(4 * cfg.election_timeout_ms)),
            detector=DetectorConfig(
                suspect_phi=cfg.failure_suspect_phi,
                acceptable_pause_ticks=cfg.failure_acceptable_pause_ms // cfg.tick_interval_ms,
                min_std_ticks=max(1.0, cfg.heartbeat_interval_ms / cfg.tick_interval_ms),
                dead_after_ticks=cfg.ticks(cfg.failure_dead_after_ms)),
            moves_max=cfg.moves_max,
            auto_remove_dead_ticks=cfg.ticks(cfg.auto_remove_dead_ms) if cfg.auto_remove_dead_ms
            else 0,
        )
        self.driver.on_retired = self._on_retired
        self.driver.set_snapshot_sizes({g: len(s.blob) for g, s in found.snapshots.items()})
        self.driver.observer = self.metrics
        self.driver.on_pins = self._on_pins
        server.driver = self.driver
        server.peer_network = self.net
        server.status_provider = self.status
        server.ring_provider = self.ring_map
        server.gone_provider = self.member_gone
        loop = asyncio.get_running_loop()
        self.server_handle = await loop.create_server(
            server.protocol_factory, sock=listener, backlog=1024,
            **tls_server_args(self.security),
        )
        sock = self.server_handle.sockets[0].getsockname()
        self.bound = (sock[0], sock[1])
        if cfg.metrics_listen is not None:
            await self.start_admin(cfg.metrics_listen)
        if self.net is not None:
            self.net.start()

    async def _join(self, data_dir: Path, incarnation: str, fresh: bool) -> bool:
        """With ``--join`` on a new data directory (or one whose earlier join did not get
        through: bound to no cluster yet): be added to the cluster (the metadata group
        chooses it) and bind the directory to it (its members' addresses, P, R, uuid).
        Returns whether this node joined (now or on an earlier start) rather than
        formed the cluster; a node that joined starts with no group."""
        cfg = self.config
        have = read_identity(data_dir)
        if have.get("joined"):
            return True  # (later starts ignore --join)
        if cfg.join and not fresh and ("partitions" in have or (data_dir / "wal").exists()):
            raise StartupError(
                f"data dir {data_dir} belongs to a node of cluster {cfg.cluster_id} already: "
                "--join only on a new data directory (start without --join to rejoin)")
        if not cfg.join:
            return False
        self.log.info("joining", via=",".join(cfg.join))
        answer, status = await join_cluster(cfg, incarnation, self.log)
        ring = status.get("ring") or {}
        peers = {m["node_id"]: m["addr"] for m in status.get("members") or []
                 if isinstance(m, dict) and m.get("state") != LEFT and m.get("addr")}
        peers[cfg.node_id] = cfg.advertise_addr
        write_atomically(data_dir / IDENTITY_FILE, {
            **have, "joined": True, "peers": peers,
            "partitions": ring.get("partitions"), "replication": ring.get("replication"),
            **({"cluster_uuid": status["cluster_uuid"]} if status.get("cluster_uuid") else {}),
        })
        self.log.info("joined", epoch=answer.get("epoch"), state=answer.get("state"),
                      members=",".join(sorted(peers)))
        return True

    def _on_retired(self, gid: Any) -> None:
        """A group this node hosted no longer lists it. The metadata group: this node is
        off the ring for good (it left, or was removed): it stops (exit 0)."""
        if gid != META:
            return
        self.left = True
        self.log.warning("left_cluster", note="the metadata group no longer lists this node: "
                         "it left or was removed; stopping")
        if self.stop_event is not None:
            self.stop_event.set()

    async def _track_members(self) -> None:
        """A few times a second: the address book and the peer links follow the metadata
        group's member list (members joining get a link, gone ones lose it); the
        identity file keeps the addresses for the next start."""
        assert self.core is not None
        seen = None
        while True:
            await asyncio.sleep(0.2)
            meta = self.core.groups.get(META)
            if meta is None:
                continue
            table = meta.sm.members
            key = table.encode()
            if key == seen:
                continue
            seen = key
            book = dict(self.peers)
            for m in table.members.values():
                if m.address:
                    book[m.node_id] = m.address
            live = {i: a for i, a in book.items()
                    if table.state_of(i) not in (LEFT, REMOVED)}
            if self.net is not None:
                self.net.set_members(live)
                rebound = False
                for m in table.members.values():
                    if m.state in (JOINING, ACTIVE):
                        rebound |= self.pins.rebind(m.node_id, m.incarnation)
                if rebound:
                    self.save_pins()
            self.core.set_contacts(live)
            if book != self.peers:
                self.peers = book
                assert self.data_dir is not None
                have = await asyncio.to_thread(read_identity, self.data_dir)
                await asyncio.to_thread(write_atomically, self.data_dir / IDENTITY_FILE,
                                        {**have, "peers": book})

    def member_gone(self, node_id: str) -> bool:
        """The metadata group's member list has ``node_id`` as left or removed."""
        meta = self.core.groups.get(META) if self.core is not None else None
        return meta is not None and meta.sm.members.state_of(node_id) in (LEFT, REMOVED)

    def member_incarnation(self, node_id: str) -> str | None:
        """``node_id``'s data directory as the metadata group's member list has it (None:
        not known there, or a member from the cluster's formation)."""
        meta = self.core.groups.get(META) if self.core is not None else None
        if meta is None:
            return None
        m = meta.sm.members.members.get(node_id)
        return m.incarnation if m is not None and m.state in (JOINING, ACTIVE) else None

    async def leave(self) -> bool:
        """``--leave-on-stop``: ask the cluster to take this node off the ring
        (``member_leave``) and wait, at most ``leave_timeout_ms``, until its replicas
        moved away and the metadata group let it go. True once it has left."""
        assert self.driver is not None and self.core is not None
        cfg = self.config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.leave_timeout_ms / 1000
        self.log.info("leaving", timeout_ms=cfg.leave_timeout_ms)
        while not self.left and loop.time() < deadline:
            meta = self.core.groups.get(META)
            state = meta.sm.members.state_of(cfg.node_id) if meta is not None else None
            if state in (JOINING, ACTIVE):
                fut = self.driver.submit_internal(MemberLeave(cfg.node_id), 10.0)
                result, error = await fut
                if error is not None:
                    self.log.warning("leave_retry", error=error[1])
            await asyncio.sleep(0.5)
        if not self.left:
            self.log.error("leave_timed_out", note="stopping without having left")
        return self.left

    def check_ring(self, core: PaxosNode) -> bool:
        """The metadata group's ring must have the P this data directory recorded (a
        node configured for another cluster shape must not serve): otherwise stop,
        exit status 2, naming both. True when it stopped."""
        ring = core.ring
        if ring is None or ring.partitions == self.partitions:
            return False
        self.on_refused(
            f"the cluster's ring has {ring.partitions} partitions but this node's data "
            f"directory recorded partitions = {self.partitions}: start it with the "
            "cluster's value on a new data directory"
        )
        return True

    def save_pins(self) -> None:
        """Persist the pins now (before a newly pinned peer's link carries anything)."""
        self._write_pins(*self._pins_table())

    def _pins_table(self) -> tuple[int, object]:
        """The pins as they are now (encoded on the loop's thread, which changes them)."""
        self._pins_seq += 1
        return self._pins_seq, self.pins.encode()

    def _write_pins(self, seq: int, table: object) -> None:
        assert self.data_dir is not None
        with self._pins_lock:
            if seq <= self._pins_written:
                return  # a newer table is on disk already
            write_atomically(self.data_dir / MEMBERS_FILE, table)
            self._pins_written = seq

    def on_refused(self, reason: str) -> None:
        """A peer refused us as a member (a wiped or rolled-back data directory): stop,
        and exit with status 2 naming the reason, instead of ever voting. A node that is
        leaving the cluster by its own request, told by the others that it is no member
        any more before it applied that itself, has simply left (exit 0)."""
        if self.left:
            return  # it left already (it applied its own removal): stopping, exit 0
        meta = self.core.groups.get(META) if self.core is not None else None
        mine = meta.sm.members.state_of(self.config.node_id) if meta is not None else None
        if mine in (LEAVING, LEFT) and GONE_REFUSAL in reason:
            self._on_retired(META)
            return
        if self.refused is None:
            self.refused = reason
            self.log.critical("refused_by_cluster", reason=reason)
            if self.stop_event is not None:
                self.stop_event.set()

    async def _track_pins(self) -> None:
        """Every second: raise the pinned watermarks from what peers answered (slots
        accepted, ballots promised), persist them off the event loop, and send the
        table to every connected peer so the pins spread."""
        assert self.driver is not None and self.core is not None
        while True:
            await asyncio.sleep(1.0)
            if self.check_ring(self.core):
                return
            meta = self.core.groups.get(META)
            formed = meta.sm.cluster_uuid if meta is not None else None
            if formed is not None and formed != self.cluster_uuid:
                assert self.data_dir is not None
                await asyncio.to_thread(record_cluster_uuid, self.data_dir, formed)
                self.cluster_uuid = formed
                if self.net is not None:
                    self.net.cluster_uuid = formed
                self.log.info("cluster_formed", cluster_uuid=formed)
            changed = False
            raised, self.driver.peer_seen_changed = self.driver.peer_seen_changed, set()
            for key in raised:
                slot, ballot = self.driver.peer_seen[key]
                changed |= self.pins.saw(key[0], str(key[1]), slot, ballot)
            if changed:
                seq, table = self._pins_table()
                await asyncio.to_thread(self._write_pins, seq, table)
                if self.net is not None:
                    for peer in self.net.links:
                        self.net.send(peer, [PINS, table])

    def _on_pins(self, peer: str, table: object) -> None:
        if self.net is not None:
            self.net.merge_pins(peer, table)

    async def start_admin(self, listen: str) -> None:
        """The admin HTTP listener (dsnode/runtime/admin.py), in a thread of its own."""
        from dsnode.runtime.admin import AdminError, AdminServer  # aiohttp: ~0.1 s to import

        assert self.client_server is not None
        host, port = parse_addr(listen, "metrics_listen")
        admin = AdminServer(
            host, port,
            node_loop=asyncio.get_running_loop(),
            registry=node_registry(self),
            ready=self.readiness,
            status=self.client_server.status,
            heartbeat=lambda: self.metrics.heartbeat,
            stall_max_s=self.config.livez_loop_stall_max_ms / 1000,
        )
        try:
            await admin.start()
        except AdminError as e:
            raise StartupError(f"metrics_listen: {e}") from None
        self.admin = admin

    def _on_peer_messages(self, peer: str, batch: list) -> None:
        assert self.driver is not None
        self.driver.on_peer_messages(peer, batch)

    # ------------------------------------------------------------ status
    def members_info(self, ring: Ring | None, leaders: list[str | None]) -> list[dict]:
        """``status.members``: each member's address, state as this node's failure detector
        sees it (``silence_ms``: since it last heard from it), and the replicas and
        leaderships it holds on the ring (leaderships as this node knows them)."""
        assert self.driver is not None
        driver, tick_ms = self.driver, self.config.tick_interval_ms
        out = []
        for nid, addr in self.peers.items():
            silence = (0 if nid == self.config.node_id
                       else driver.detector.silence(nid, driver.tick_count))
            out.append({
                "node_id": nid, "addr": addr, "state": self.member_state(nid),
                "silence_ms": None if silence is None else silence * tick_ms,
                "replicas": len(ring.partitions_of(nid)) if ring is not None
                and nid in ring.members else 0,
                "leads": sum(1 for leader in leaders if leader == nid),
            })
        return out

    def member_state(self, peer: str) -> str:
        """``joining``, ``leaving`` or ``left`` as the metadata group decided (a removed
        member has left too); for an active member, ``alive``, ``suspect`` or ``dead``
        as this node's failure detector sees it."""
        assert self.driver is not None and self.core is not None
        meta = self.core.groups.get(META)
        decided = meta.sm.members.state_of(peer) if meta is not None else None
        if decided in (JOINING, LEAVING, LEFT, REMOVED):
            return LEFT if decided == REMOVED else decided
        if peer == self.config.node_id:
            return "alive"
        return self.driver.detector.state(peer, self.driver.tick_count)

    def readiness(self) -> tuple[bool, str]:
        """(ready, reason): ready when this node can serve linearizable requests for every
        partition it holds, i.e. each has a leader that is this node or one it is connected
        to, and the node is not shutting down. ``status``'s ``ready`` and /readyz."""
        if self.core is None or self.client_server is None:
            return False, "starting"
        if not self.client_server.accepting:
            return False, "shutting down"
        me = self.config.node_id
        ring = self.driver.ring() if self.driver is not None else None
        if ring is None:
            return False, "the partition map is not known yet (cluster forming)"
        leaders = self.leaders(ring)
        for pid, leader in enumerate(leaders):
            if leader is None:
                return False, f"partition {pid}: no leader known"
            if leader != me and (self.net is None or not self.net.connected(leader)):
                return False, f"partition {pid}: leader {leader} is not reachable"
        return True, "ready"

    def leaders(self, ring: Ring) -> list[str | None]:
        """Every partition's leader as this node knows it (``Driver.leader_of``)."""
        assert self.driver is not None
        return [self.driver.leader_of(pid) for pid in range(ring.partitions)]

    def ring_map(self) -> dict | None:
        """The ``ring`` op's answer (docs/PROTOCOL.md): P, R, epoch, members and every
        partition's replicas (ring order) and leader; None before the ring is known."""
        if self.driver is None:
            return None
        ring = self.driver.ring()
        if ring is None:
            return None
        leaders = self.leaders(ring)
        return ring_answer(ring, self.peers, leaders.__getitem__)

    def status(self) -> dict:
        """The ``status`` op's answer. ``partitions`` lists every partition of the ring;
        ``paxos`` (and ``keys``, ``revision``) describe the lowest-numbered partition
        this node hosts (the metadata group on a node that hosts none), plus
        node-wide counters: with ``partitions = 1`` that is the cluster's one group."""
        assert self.driver is not None and self.wal is not None and self.core is not None
        cfg = self.config
        core, driver = self.core, self.driver
        peers = self.peers
        hosted = sorted(g for g in core.groups if g != META)
        gid = hosted[0] if hosted else META
        if gid not in core.groups:
            return self.status_hosting_nothing()
        leader = core.leader_of(gid)
        group = core.groups[gid]
        commit = group.log.chosen_through
        peer_info = {}
        for pid in peers:
            if pid == cfg.node_id:
                continue
            heard = driver.heard.get(pid)
            info: dict = {
                "state": self.member_state(pid),
                "last_heard_ms": None if heard is None
                else (driver.tick_count - heard) * cfg.tick_interval_ms,
            }
            if leader == cfg.node_id:
                acked = driver.peer_acked.get(pid, 0)
                info["acked_slot"] = acked
                info["lag"] = max(0, commit - acked)
            link = self.net.links.get(pid) if self.net is not None else None
            if link is not None:
                info["link"] = link.stats()
            peer_info[pid] = info
        ring = driver.ring()
        leaders: list[str | None] = []
        meta = core.groups.get(META)
        table = meta.sm.members if meta is not None else None
        if ring is not None:
            leaders = self.leaders(ring)
            reached = table.reached if table is not None else {}
            partitions = [
                {"id": p, "replicas": list(ring.replicas(p)), "leader": leaders[p],
                 "applied": core.groups[p].log.applied if p in core.groups else None,
                 # the ring epoch its replicas were last reported to match
                 "epoch": reached.get(str(p), 1),
                 # its configuration as this node applied it (hosted partitions only)
                 **({"voters": list(core.groups[p].conf.voters),
                     "learners": list(core.groups[p].conf.learners)}
                    if p in core.groups else {})}
                for p in range(ring.partitions)
            ]
            ring_info = {"partitions": ring.partitions, "replication": ring.replication,
                         "epoch": ring.epoch}
        else:
            partitions = []
            ring_info = {"partitions": self.partitions, "replication": None, "epoch": 0}
        led = sum(1 for g in hosted if core.groups[g].role.value == "leader")
        mover = driver.mover
        moves = {
            # the ring epoch whose moves are done, and whether a newer one's are pending
            "settled": table.settled if table is not None else 0,
            "pending": ring is not None and table is not None and table.settled < ring.epoch
            and ring.epoch > 1,
            **(mover.status() if mover is not None else {}),
            "moves_max": cfg.moves_max,
        }
        return {
            "node_id": cfg.node_id,
            "cluster_id": cfg.cluster_id,
            "cluster_uuid": self.cluster_uuid,
            # user + system CPU of this process since start (capacity per core, bench)
            "cpu_seconds": round(time.process_time(), 3),
            "ready": self.readiness()[0],
            "members": self.members_info(ring, leaders),
            "partitions": partitions,
            "ring": ring_info,
            "moves": moves,
            "hosted": len(hosted),
            "leads": led,
            "paxos": {
                "group": gid,
                "role": group.role.value,
                "ballot": list(group.ballot) if group.role.value == "leader"
                else list(group.acceptor.promised),
                "commit": commit,
                "applied": group.log.applied,
                "snapshot_index": group.log.snap_index,
                "peers": peer_info,
                "dropped": dict(core.dropped),
                "largest_message_bytes": core.largest_message,
                "lease": {
                    "enabled": core.config.lease_ticks > 0,
                    "held": core.lease_held(gid),
                    "duration_ms": core.config.lease_ticks * cfg.tick_interval_ms,
                },
                "quiesced": group.quiesced,
                "quiet_groups": core.quiet_groups,
                "reads": {"lease": core.reads["lease"],
                          "read_index": core.reads["read_index"]},
                "malformed_peer_messages": driver.counters["malformed_peer_message"]
                + (self.net.malformed if self.net is not None else 0),
                "routes": {k[6:]: v for k, v in driver.counters.items()
                           if k.startswith("route_")},
                "stale_reads_to": {str(k): v for k, v in driver.stale_reads_to.items()},
            },
            "txns": self.txn_status(hosted),
            # the failure detector's state changes (alive -> suspect/dead: suspicions)
            "detector": {"suspicions": driver.detector.suspicions,
                         "transitions": driver.detector.transitions},
            "keys": sum(len(core.groups[g].sm.kv) for g in hosted),
            "revision": group.sm.kv.revision,
            "wal": {"last_lsn": self.wal.last_lsn, "durable_lsn": self.wal.durable_lsn,
                    **self.wal.stats},
            "snapshot_files": {
                "current": group.snap_file_index,
                "on_disk": sum(len(self.snapshots.files(g)) for g in core.groups)
                if self.snapshots else 0,
                "last": driver.last_snapshot,
                **(self.snapshots.stats if self.snapshots else {}),
            },
            "fsync": cfg.fsync,
        }

    def status_hosting_nothing(self) -> dict:
        """``status`` of a node that hosts no group: one that joined and was not invited
        into the metadata group yet, or one that left."""
        assert self.driver is not None and self.wal is not None
        cfg = self.config
        return {
            "node_id": cfg.node_id, "cluster_id": cfg.cluster_id,
            "cluster_uuid": self.cluster_uuid,
            "cpu_seconds": round(time.process_time(), 3), "ready": False,
            "members": self.members_info(None, []), "partitions": [],
            "ring": {"partitions": self.partitions, "replication": self.replication, "epoch": 0},
            "moves": {"settled": 0, "pending": False, "moves_max": cfg.moves_max},
            "hosted": 0, "leads": 0,
            "paxos": {"group": None, "role": "none", "peers": {}},
            "membership": "left" if self.left else "joining",
            "wal": {"last_lsn": self.wal.last_lsn, "durable_lsn": self.wal.durable_lsn,
                    **self.wal.stats},
            "fsync": cfg.fsync,
        }

    def txn_status(self, hosted: list[int]) -> dict:
        """Cross-partition transactions as this node sees them: the ones it coordinates,
        those prepared (in doubt) and the locks held in the partitions it hosts, the
        decisions its home partitions keep, and what its recovery is finishing."""
        assert self.driver is not None and self.core is not None
        driver, core = self.driver, self.core
        in_doubt = []
        locks = decisions = 0
        for pid in hosted:
            txns = core.groups[pid].sm.txns
            locks += txns.locks_held()
            decisions += len(txns.decisions)
            in_doubt.extend({"partition": pid, "txid": t.hex(), "home": p.home,
                             "locks": len(p.exclusive) + len(p.shared)}
                            for t, p in txns.prepared.items())
        return {
            "coordinating": driver.coordinator.in_progress()[:100],
            "prepared": len(in_doubt),
            "in_doubt": in_doubt[:100],
            "locks_held": locks,
            "decisions": decisions,
            "recovering": driver.recovery.pending(),
            # cross-partition txns clients sent here; handed to a less busy node to
            # coordinate (this node was loaded); coordinated here for a loaded peer
            "received": driver.counters["txn_cross_partition"],
            "handed_off": driver.counters["txn_coordinator_elsewhere"],
            "coordinated_for_peers": driver.counters["txn_coordinated_for_peer"],
            # resolves proposed here: in another command's slot, or alone after waiting
            "resolves": dict(getattr(driver.core, "resolves", {})),
            "counters": {**driver.coordinator.counters,
                         **{f"recovery_{k}": v for k, v in driver.recovery.counters.items()}},
        }

    async def run(self, stop: asyncio.Event) -> None:
        assert self.driver is not None and self.client_server is not None
        self.stop_event = stop
        driver_task = asyncio.create_task(self.driver.run(), name="driver")
        watchdog = asyncio.create_task(sdnotify.watchdog_loop(), name="watchdog")
        tracker = asyncio.create_task(self._track_pins(), name="pins")
        members = asyncio.create_task(self._track_members(), name="members")
        monitor = asyncio.create_task(self.metrics.loop_monitor(), name="loop-monitor")
        sdnotify.notify(f"READY=1\nSTATUS=serving on {self.config.listen}")
        self.log.info("serving", listen=self.config.listen, version=__version__)
        stop_task = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({driver_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if (driver_task not in done and self.config.leave_on_stop and not self.left
                and self.refused is None):
            leaving = asyncio.create_task(self.leave())
            done, _ = await asyncio.wait({driver_task, leaving},
                                         return_when=asyncio.FIRST_COMPLETED)
            leaving.cancel()
        tracker.cancel()
        members.cancel()
        if driver_task in done:
            stop_task.cancel()
            watchdog.cancel()
            monitor.cancel()
            if self.admin is not None:
                await self.admin.close()
            driver_task.result()  # re-raises a fatal driver error (e.g. fsync failed)
            return
        await self.shutdown(driver_task)
        watchdog.cancel()
        monitor.cancel()

    async def shutdown(self, driver_task: asyncio.Task) -> None:
        """Stop accepting, finish in-flight work within the deadline, flush, close."""
        assert self.client_server is not None and self.driver is not None
        sdnotify.notify("STOPPING=1\nSTATUS=shutting down")
        self.log.info("shutting_down", inflight=self.client_server.inflight)
        deadline = self.config.shutdown_timeout_ms / 1000
        srv = self.client_server
        srv.accepting = False
        if self.server_handle is not None:
            self.server_handle.close()
        for conn in list(srv.connections):
            conn.stop_reading()
        try:
            async with asyncio.timeout(deadline * 0.8):
                await self.driver.drain()
                await srv.idle.wait()
        except TimeoutError:
            self.log.warning("shutdown_deadline_passed", inflight=srv.inflight)
        self.driver.stop()
        try:
            async with asyncio.timeout(1.0):
                await driver_task
        except TimeoutError:
            driver_task.cancel()
        for conn in list(srv.connections):
            conn.close()
        if self.net is not None:
            await self.net.close()
        if self.wal is not None:
            await self.wal.close()
        await self.driver.cancel_snapshots()  # an unfinished file is a leftover .tmp
        if self.snapshots is not None:
            self.snapshots.close()
        if self.admin is not None:  # last: /readyz says "shutting down" until here
            await self.admin.close()
        self.log.info("stopped")


def bind_listener(listen: str) -> socket.socket:
    """A socket bound to ``listen`` (HOST:PORT), not yet listening; StartupError if the
    address is in use or cannot be bound."""
    host, port = parse_addr(listen, "listen")
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
    except OSError as e:
        raise StartupError(f"cannot listen on {listen}: {e.strerror or e}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError as e:
        sock.close()
        reason = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
        raise StartupError(f"cannot listen on {listen}: {reason}") from None
    return sock


def load_security(cfg: NodeConfig, log: object) -> Security:
    """TLS contexts and tokens, after the safe-defaults check; warnings go to the log."""
    try:
        security = Security(cfg)
        warnings = check_exposure(cfg)
    except SecurityError as e:
        raise StartupError(str(e)) from None
    for text in warnings:
        log.warning("security_warning", message=text)  # type: ignore[attr-defined]
    return security


def tls_server_args(security: Security | None) -> dict:
    if security is None or security.server_context is None:
        return {}
    return {"ssl": security.server_context,
            "ssl_handshake_timeout": security.config.handshake_timeout_ms / 1000}


class Stopwatch:
    """Seconds spent in each named step of recovery (logged with ``recovered``)."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._last, 3)
        self._last = now


def recover_core(
    core: PaxosNode, recovered: Recovered, found: RecoveredSnapshots, log: Any
) -> None:
    """Rebuild a fresh ``core`` from the newest valid snapshot file of each group
    plus the WAL (its checkpoint, then the records after it); StartupError if
    that state is incomplete."""
    try:
        records = unpack_checkpoint(recovered.snapshot)
        records.extend(payload for _, payload in recovered.records)
        core.recover(records, found.snapshots)
    except StateLost as e:
        raise StartupError(f"snapshot file missing or corrupt: {e}") from None
    except Exception as e:
        raise StartupError(f"cannot replay the write-ahead log: {e}") from None
    check_corrupt_snapshots(core, found, log)
    for snap in found.snapshots.values():
        release_pages(snap.blob)


def check_corrupt_snapshots(core: PaxosNode, found: RecoveredSnapshots, log: Any) -> None:
    """A corrupt snapshot file is a startup error unless an older valid one plus
    the log reach past it (the replayed log proves its slots chosen)."""
    for group, index, err in found.corrupt:
        if group not in core.groups:  # a partition the ring does not place here
            log.warning("snapshot_ignored", why=str(err), hosted=False)
            continue
        reached = core.groups[group].log.chosen_through
        if index > reached:
            raise StartupError(
                f"snapshot file is corrupt: {err}; no valid older snapshot plus the log "
                f"covers it (they reach slot {reached} of group {group})"
            )
        log.warning("snapshot_ignored", why=str(err), covered_through=reached)


def release_pages(blob: Any) -> None:
    """Recovery read a mapped snapshot file through: hand its pages back (they stay in
    the page cache; catch-up reads fault them in again)."""
    if isinstance(blob, mmap.mmap) and len(blob):
        blob.madvise(mmap.MADV_DONTNEED)


def unpack_checkpoint(blob: bytes | None) -> list[bytes]:
    """The records a WAL snapshot (``PaxosNode.checkpoint``) holds."""
    if blob is None:
        return []
    records = msgpack.unpackb(blob, raw=False)
    if not isinstance(records, list) or not all(isinstance(r, bytes) for r in records):
        raise ValueError("WAL snapshot is not a list of records")
    return records


async def _serve(config: NodeConfig) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals_seen = 0

    def on_signal(signame: str) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            logs.get_logger("dsnode.node").warning("forced_exit", signal=signame)
            os._exit(1)
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig.name)
    node = Node(config)
    loop.set_exception_handler(fail_stop_handler(node))
    # SIGHUP: re-read certificates and tokens; open connections are not touched.
    loop.add_signal_handler(signal.SIGHUP, lambda: node.security and node.security.reload())
    try:
        await node.start()
    except StartupError:
        if node.admin is not None:
            await node.admin.close()
        if node.wal is not None:
            await node.wal.close()
        if node.snapshots is not None:
            node.snapshots.close()
        raise
    await node.run(stop)
    if node.refused is not None:
        raise StartupError(node.refused)
    return 0


def run(config: NodeConfig) -> int:
    """Run a node in this process until it is told to stop; returns the exit status."""
    import uvloop

    logs.configure(config.log_format, config.log_level, node_id=config.node_id)
    try:
        return uvloop.run(_serve(config))
    except StartupError as e:
        print(f"dsnode: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as e:
        # Fail-stop (issue 7): one critical line naming the cause, a non-zero status, and
        # the supervisor (systemd Restart=, compose restart:) starts the node again.
        logs.get_logger("dsnode.node").critical(
            "node_failed", cause=f"{type(e).__name__}: {e}", exit_status=EXIT_FAILED
        )
        return EXIT_FAILED


def fail_stop_handler(node: Node) -> typing.Callable[[asyncio.AbstractEventLoop, dict], None]:
    """The loop's exception handler: a broken invariant raised in any callback (a peer's
    or a client's ``data_received``, a timer) ends the node through its driver, instead
    of merely closing that connection. Anything else goes to the default handler."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, InvariantBroken | WALFailedError) and node.driver is not None:
            node.driver.fail(exc)
            return
        loop.default_exception_handler(context)

    return handler


# ---------------------------------------------------------------- click command
def _flag_type(name: str) -> click.ParamType:
    """The click type of a setting's flag, from the pydantic field's annotation: INTEGER,
    FLOAT, BOOLEAN, a Choice for a Literal, else TEXT. Values still go through
    load_config (flags over env over TOML), which checks ranges."""
    annotation = NodeConfig.model_fields[name].annotation
    if annotation is bool:
        return click.BOOL
    if annotation is int:
        return click.INT
    if annotation is float:
        return click.FLOAT
    if typing.get_origin(annotation) is typing.Literal:
        return click.Choice([str(a) for a in typing.get_args(annotation)])
    return click.STRING


def _settings_options(f):
    for name in reversed(SETTINGS):
        field = NodeConfig.model_fields[name]
        flag = "--" + name.replace("_", "-")
        default = field.default
        if isinstance(default, bool):
            default = str(default).lower()
        help_text = (field.description or "") + (
            f" [default: {default}]" if default is not None else ""
        )
        help_text += f" [env: DSNODE_{name.upper()}]"
        if name == "join":  # repeatable
            f = click.option(flag, name, type=click.STRING, multiple=True,
                             help=help_text.strip())(f)
            continue
        f = click.option(flag, name, type=_flag_type(name), default=None,
                         help=help_text.strip())(f)
    return f


class _ServeCommand(click.Command):
    """A bad flag is bad configuration like any other: one line ``dsnode: ...`` naming the
    setting on stderr, exit 2 (PROTOCOL.md), not click's usage text."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except click.BadParameter as e:
            if e.param is not None and e.param.name in SETTINGS:
                where = f"{e.param.name} (from {e.param.opts[0]})"
            else:
                where = e.param.opts[0] if e.param is not None else "flag"
            message = e.message.split(" Recognized values:")[0]
            if isinstance(e.param.type if e.param is not None else None, click.types.BoolParamType):
                message += " (use true or false)"
            print(f"dsnode: invalid setting {where}: {message}", file=sys.stderr)
        except click.UsageError as e:
            print(f"dsnode: {e.format_message()} (see 'dsnode serve --help')", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


@click.command("serve", cls=_ServeCommand, context_settings={"max_content_width": 100})
@click.option("--config", "config_file", type=str, default=None,
              help="TOML file with settings [env: DSNODE_CONFIG]")
@_settings_options
def serve_command(config_file: str | None, **flags: str | None) -> None:
    """Run a node (PROTOCOL.md "Launching a node").

    Every setting comes from a flag, a DSNODE_<SETTING> environment variable,
    the TOML file given by --config, or its default, in that order.
    """
    flags["join"] = ",".join(flags["join"]) if flags.get("join") else None  # type: ignore[arg-type]
    try:
        config = load_config(flags, os.environ, config_file)
    except ConfigError as e:
        print(f"dsnode: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    sys.exit(run(config))
