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
import os
import random
import signal
import sys
from pathlib import Path

import click
import msgpack

from dsnode import __version__
from dsnode.config import SETTINGS, ConfigError, NodeConfig, load_config, parse_addr
from dsnode.core.paxos.config import PaxosConfig
from dsnode.core.paxos.node import PaxosNode
from dsnode.runtime import logs, sdnotify
from dsnode.runtime.driver import GROUP, Driver
from dsnode.runtime.peers import PeerNetwork
from dsnode.runtime.security import Security, SecurityError, check_exposure
from dsnode.runtime.server import ClientServer
from dsnode.runtime.wal import WALCorruptError, WriteAheadLog

EXIT_CONFIG = 2
IDENTITY_FILE = "cluster.msgpack"


class StartupError(Exception):
    """A problem that stops the node from starting; exit status 2."""


# ---------------------------------------------------------------- identity
def check_identity(config: NodeConfig, data_dir: Path) -> dict[str, str]:
    """Bind the data directory to this node and its cluster on first start.

    Afterwards membership comes from the data directory: the same ``--peers``
    is fine, no ``--peers`` means the stored ones, a different node id,
    cluster id or peer list is an error. Returns the cluster's members.
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
        return dict(stored)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(msgpack.packb(want, use_bin_type=True))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dfd = os.open(data_dir, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return dict(want["peers"])


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
        self.client_server: ClientServer | None = None
        self.driver: Driver | None = None
        self.net: PeerNetwork | None = None
        self.core: PaxosNode | None = None
        self.bound: tuple[str, int] | None = None
        self.peers: dict[str, str] = config.cluster_peers  # replaced by the data dir's record
        self.security: Security | None = None

    def paxos_config(self) -> PaxosConfig:
        cfg = self.config
        return PaxosConfig(
            election_timeout_ticks=cfg.ticks(cfg.election_timeout_ms),
            heartbeat_interval_ticks=cfg.ticks(cfg.heartbeat_interval_ms),
            # A leader steps down after an election timeout without a quorum's acks: long
            # enough to ride out a pause of the followers' event loops (a snapshot, a GC).
            leader_quorum_timeout_ticks=cfg.ticks(cfg.election_timeout_ms),
            snapshot_interval_slots=cfg.snapshot_interval_slots,
        )

    async def start(self) -> None:
        cfg = self.config
        self.security = load_security(cfg, self.log)
        data_dir = prepare_data_dir(cfg)
        self.peers = check_identity(cfg, data_dir)
        wal = WriteAheadLog(data_dir / "wal", fsync=cfg.fsync, segment_bytes=cfg.wal_segment_bytes)
        try:
            recovered = wal.recover()
        except WALCorruptError as e:
            raise StartupError(f"write-ahead log is corrupt: {e}") from None
        except OSError as e:
            raise StartupError(f"write-ahead log cannot be opened: {e}") from None
        self.wal = wal
        for repair in recovered.repairs:
            self.log.warning("wal_repaired", what=repair)
        peers = self.peers
        seed = int.from_bytes(os.urandom(8), "big")
        core = PaxosNode(cfg.node_id, {GROUP: tuple(peers)}, random.Random(seed),
                         self.paxos_config())
        try:
            records = unpack_checkpoint(recovered.snapshot)
            records.extend(payload for _, payload in recovered.records)
            core.recover(records)
        except Exception as e:
            raise StartupError(f"cannot replay the write-ahead log: {e}") from None
        self.core = core
        # What recovery built lives long: keep the cyclic GC from rescanning it forever.
        gc.collect()
        gc.freeze()
        self.log.info(
            "recovered",
            snapshot_lsn=recovered.snapshot_lsn,
            records=len(recovered.records),
            applied=core.applied_index(GROUP),
            peers=",".join(peers),
            rng_seed=seed,
        )
        server = ClientServer(cfg, self.security)
        self.client_server = server
        if len(peers) > 1:
            self.net = PeerNetwork(
                cfg.node_id, peers, cluster_id=cfg.cluster_id, token=cfg.auth_token,
                on_messages=self._on_peer_messages, max_frame_bytes=cfg.max_frame_bytes,
                rng=random.Random(seed ^ 0x5EED),
            )
            self.net.security = self.security
        self.driver = Driver(
            core, wal, server.deliver, self.net,
            node_id=cfg.node_id,
            tick_seconds=cfg.tick_interval_ms / 1000,
            checkpoint_every_records=cfg.snapshot_every_records,
            heartbeat_ticks=cfg.ticks(cfg.heartbeat_interval_ms),
        )
        server.driver = self.driver
        server.peer_network = self.net
        server.status_provider = self.status
        host, port = parse_addr(cfg.listen, "listen")
        loop = asyncio.get_running_loop()
        try:
            self.server_handle = await loop.create_server(
                server.protocol_factory, host, port, reuse_address=True, backlog=1024,
                **tls_server_args(self.security),
            )
        except OSError as e:
            reason = "address already in use" if e.errno == errno.EADDRINUSE else (e.strerror or str(e))
            raise StartupError(f"cannot listen on {cfg.listen}: {reason}") from None
        sock = self.server_handle.sockets[0].getsockname()
        self.bound = (sock[0], sock[1])
        if self.net is not None:
            self.net.start()

    def _on_peer_messages(self, peer: str, batch: list) -> None:
        assert self.driver is not None
        self.driver.on_peer_messages(peer, batch)

    # ------------------------------------------------------------ status
    def member_state(self, peer: str) -> str:
        assert self.driver is not None
        if peer == self.config.node_id:
            return "alive"
        heard = self.driver.heard.get(peer)
        if heard is None:
            return "suspect"
        age = self.driver.tick_count - heard
        timeout = self.config.ticks(self.config.election_timeout_ms)
        if age <= timeout:
            return "alive"
        return "suspect" if age <= 4 * timeout else "dead"

    def status(self) -> dict:
        assert self.driver is not None and self.wal is not None and self.core is not None
        cfg = self.config
        core, driver = self.core, self.driver
        peers = self.peers
        leader = core.leader_of(GROUP)
        group = core.groups[GROUP]
        commit = group.log.chosen_through
        ready = leader is not None and (
            leader == cfg.node_id or (self.net is not None and self.net.connected(leader))
        )
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
            if self.net is not None:
                info["link"] = self.net.links[pid].stats()
            peer_info[pid] = info
        return {
            "node_id": cfg.node_id,
            "cluster_id": cfg.cluster_id,
            "ready": ready and self.client_server is not None and self.client_server.accepting,
            "members": [
                {"node_id": nid, "addr": addr, "state": self.member_state(nid)}
                for nid, addr in peers.items()
            ],
            "partitions": [{"id": GROUP, "replicas": list(group.members), "leader": leader}],
            "paxos": {
                "role": group.role.value,
                "ballot": list(group.ballot) if group.role.value == "leader"
                else list(group.acceptor.promised),
                "commit": commit,
                "applied": group.log.applied,
                "snapshot_index": group.log.snap_index,
                "peers": peer_info,
                "dropped": dict(core.dropped),
                "malformed_peer_messages": driver.counters["malformed_peer_message"]
                + (self.net.malformed if self.net is not None else 0),
            },
            "keys": len(group.sm.kv),
            "revision": group.sm.kv.revision,
            "wal": {"last_lsn": self.wal.last_lsn, "durable_lsn": self.wal.durable_lsn,
                    **self.wal.stats},
            "fsync": cfg.fsync,
        }

    async def run(self, stop: asyncio.Event) -> None:
        assert self.driver is not None and self.client_server is not None
        driver_task = asyncio.create_task(self.driver.run(), name="driver")
        watchdog = asyncio.create_task(sdnotify.watchdog_loop(), name="watchdog")
        sdnotify.notify(f"READY=1\nSTATUS=serving on {self.config.listen}")
        self.log.info("serving", listen=self.config.listen, version=__version__)
        stop_task = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({driver_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        if driver_task in done:
            stop_task.cancel()
            watchdog.cancel()
            driver_task.result()  # re-raises a fatal driver error (e.g. fsync failed)
            return
        await self.shutdown(driver_task)
        watchdog.cancel()

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
        self.log.info("stopped")


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
    # SIGHUP: re-read certificates and tokens; open connections are not touched.
    loop.add_signal_handler(signal.SIGHUP, lambda: node.security and node.security.reload())
    try:
        await node.start()
    except StartupError:
        if node.wal is not None:
            await node.wal.close()
        raise
    await node.run(stop)
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


# ---------------------------------------------------------------- click command
def _settings_options(f):
    for name in reversed(SETTINGS):
        field = NodeConfig.model_fields[name]
        flag = "--" + name.replace("_", "-")
        default = field.default
        help_text = (field.description or "") + (
            f" [default: {default}]" if default is not None else ""
        )
        help_text += f" [env: DSNODE_{name.upper()}]"
        f = click.option(flag, name, type=str, default=None, help=help_text.strip())(f)
    return f


@click.command("serve", context_settings={"max_content_width": 100})
@click.option("--config", "config_file", type=str, default=None,
              help="TOML file with settings [env: DSNODE_CONFIG]")
@_settings_options
def serve_command(config_file: str | None, **flags: str | None) -> None:
    """Run a node (PROTOCOL.md "Launching a node").

    Every setting comes from a flag, a DSNODE_<SETTING> environment variable,
    the TOML file given by --config, or its default, in that order.
    """
    try:
        config = load_config(flags, os.environ, config_file)
    except ConfigError as e:
        print(f"dsnode: {e}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    sys.exit(run(config))
