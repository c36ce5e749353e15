"""Node settings: one pydantic model, four sources.

Precedence (PROTOCOL.md, "Launching a node"): command-line flags, then
``DSNODE_<SETTING>`` environment variables, then the TOML file named by
``--config`` (or ``DSNODE_CONFIG``), then the defaults below. Every setting can
be given all four ways; its flag is ``--<setting with - for _>``.

TOML values must already have the right type (``max_key_bytes = "1"`` is an
error); flag and environment values are text and are parsed per setting.
Any problem raises :class:`ConfigError` with one line naming the setting.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dsnode.core.membership.members import NODE_ID_RE
from dsnode.core.ring.ring import (
    PARTITIONS_DEFAULT,
    PARTITIONS_MAX,
    REPLICATION_DEFAULT,
    REPLICATION_MAX,
)

ENV_PREFIX = "DSNODE_"
DEFAULT_PORT = 7379


class ConfigError(Exception):
    """Bad configuration; the message is one line naming the problem."""


def parse_addr(text: str, what: str = "address") -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> (host, port)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ValueError(f"{what} {text!r} is not HOST:PORT")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"{what} {text!r}: port out of range")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, port


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and addresses in 127.0.0.0/8 or ``::1``."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_peers(text: str) -> dict[str, str]:
    """``ID1=HOST:PORT,ID2=HOST:PORT`` -> {id: "host:port"}, ids validated, no duplicates."""
    peers: dict[str, str] = {}
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        node_id, sep, addr = part.partition("=")
        node_id = node_id.strip()
        if not sep:
            raise ValueError(f"peer {part!r} is not ID=HOST:PORT")
        if not NODE_ID_RE.match(node_id):
            raise ValueError(f"peer id {node_id!r} does not match [a-z0-9][a-z0-9_-]{{0,62}}")
        if node_id in peers:
            raise ValueError(f"peer id {node_id!r} appears twice")
        parse_addr(addr.strip(), f"address of peer {node_id}")
        peers[node_id] = addr.strip()
    if not peers:
        raise ValueError("peers is empty")
    return peers


class NodeConfig(BaseModel):
    """Every setting of a node. Units are in the names; only this module knows ms."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    node_id: str = Field(default="n1", description="this node's id, unique in the cluster")
    listen: str = Field(
        default=f"127.0.0.1:{DEFAULT_PORT}",
        description="HOST:PORT to listen on, for clients and peers alike",
    )
    advertise: str | None = Field(
        default=None, description="address peers use for this node; defaults to its --peers entry"
    )
    peers: dict[str, str] | None = Field(
        default=None, description="initial cluster ID=HOST:PORT,...; defaults to this node alone"
    )
    join: list[str] | None = Field(
        default=None,
        description="join a running cluster through any member's HOST:PORT (repeatable, or "
        "comma-separated); only on a new data directory's first start, without --peers",
    )
    join_token_file: Path | None = Field(
        default=None,
        description="file holding a token with the admin role, sent by --join (default: "
        "auth_token)",
    )
    data_dir: Path | None = Field(default=None, description="defaults to ./dsnode-data/<node_id>")
    cluster_id: str = Field(
        default="dsnode", description="cluster name; nodes of another cluster are refused"
    )
    auth_token: str | None = Field(
        default=None, description="cluster token: peers present it when TLS is off; clients may too"
    )

    # security (docs/SECURITY.md)
    tls_cert_file: Path | None = Field(
        default=None, description="PEM certificate chain of this node; turns TLS on"
    )
    tls_key_file: Path | None = Field(default=None, description="PEM private key of tls_cert_file")
    tls_ca_file: Path | None = Field(
        default=None, description="PEM CA bundle; peers (and client certificates) must chain to it"
    )
    client_cert_auth: bool = Field(
        default=False, description="require every client to present a certificate signed by tls_ca_file"
    )
    auth_tokens_file: Path | None = Field(
        default=None, description="file of 'sha256:HEX ROLE' lines (roles read, readwrite, admin)"
    )
    insecure: bool = Field(
        default=False,
        description="allow listening on a non-loopback address without TLS or tokens",
    )

    # limits
    max_frame_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, le=1 << 30, description="largest frame accepted, bytes"
    )
    max_key_bytes: int = Field(default=1024, ge=1, le=1 << 20, description="longest key, bytes")
    max_value_bytes: int = Field(
        default=1024 * 1024, ge=0, le=1 << 30, description="largest value, bytes"
    )
    max_txn_ops: int = Field(
        default=128, ge=1, le=100_000, description="compares plus sub-ops allowed in one txn"
    )
    inflight_requests_max: int = Field(
        default=4096, ge=1, description="requests in flight per node before load is shed"
    )
    connection_inflight_max: int = Field(
        default=1024, ge=1, description="requests in flight per client connection before it is paused"
    )
    max_connections: int = Field(default=4096, ge=1, description="client connections at once")
    pending_connections_max: int = Field(
        default=256, ge=1,
        description="connections not yet past hello (or their first frame); the oldest is dropped",
    )
    unauthenticated_requests_max: int = Field(
        default=8, ge=1,
        description="requests a connection may send before its hello succeeds; then it is closed",
    )
    handshake_timeout_ms: int = Field(
        default=10_000, ge=10,
        description="deadline for the TLS handshake, and again for the first whole frame",
    )
    connection_buffer_bytes_max: int = Field(
        default=32 * 1024 * 1024, ge=4096,
        description="answers buffered for a client that does not read; past it the connection closes",
    )
    idle_timeout_ms: int = Field(
        default=600_000, ge=0,
        description="close a client connection with nothing in flight after this long; 0: never",
    )

    # durability and storage
    fsync: bool = Field(
        default=True, description="fsync the log before acknowledging a write (false: survives "
        "a killed process, not a power loss)",
    )
    wal_segment_bytes: int = Field(
        default=16 * 1024 * 1024, ge=4096, description="size of one write-ahead log file, bytes"
    )
    snapshot_every_records: int = Field(
        default=100_000, ge=1,
        description="WAL records between checkpoints that let old log segments be deleted",
    )
    snapshot_interval_slots: int = Field(
        default=4096, ge=1, description="Paxos slots between state-machine snapshots"
    )
    snapshot_wal_ratio: float = Field(
        default=0.25, ge=0,
        description="also snapshot once the WAL grew by this fraction of the last snapshot's "
        "size (at least 8 MiB); bounds the data directory at about 2.5x the data; 0: off",
    )

    # partitioning (issue 8)
    partitions: int = Field(
        default=PARTITIONS_DEFAULT, ge=1, le=PARTITIONS_MAX,
        description="partitions of the cluster, fixed when it is created (recorded in the "
        "data directory; a later start that sets another value is refused, one that does "
        "not set it uses the recorded value)",
    )
    replication: int = Field(
        default=REPLICATION_DEFAULT, ge=1, le=REPLICATION_MAX,
        description="replicas of each partition, capped by the cluster size; used when the "
        "cluster is created",
    )

    # time
    tick_interval_ms: int = Field(
        default=10, ge=1, le=10_000, description="timer resolution of the protocol cores, ms"
    )
    heartbeat_interval_ms: int = Field(
        default=50, ge=1, description="leader heartbeat period, ms (below the election timeout)"
    )
    election_timeout_ms: int = Field(
        default=500, ge=1, description="silence from the leader before another node takes over, ms"
    )
    clock_drift_max: float = Field(
        default=0.1, ge=0.0, lt=1.0,
        description="assumed bound on clock rate differences between nodes (0.1 = 10%); "
        "leader leases are shortened by it",
    )
    leader_leases: bool = Field(
        default=True,
        description="a leader holding a lease answers linearizable gets without a "
        "read-index round (false: every linearizable get takes a round)",
    )
    prefer_ring_leaders: bool = Field(
        default=True,
        description="each partition's leader hands leadership over to the first healthy, "
        "caught-up replica in ring order, so leaders stay spread over the nodes (false: "
        "a leader keeps leading until it fails)",
    )
    request_timeout_ms: int = Field(
        default=10_000, ge=1, description="deadline of a request that sends no timeout_ms, ms"
    )
    failure_suspect_phi: float = Field(
        default=8.0, gt=0, le=100,
        description="the failure detector marks a peer suspect once phi (how unlikely its "
        "silence is, given how regularly it was heard: -log10 of the probability) reaches this",
    )
    failure_acceptable_pause_ms: int = Field(
        default=1_000, ge=0, le=600_000,
        description="a silence this long is normal for the failure detector (suspicion "
        "starts after it: about 1.3 s of silence with the defaults), ms",
    )
    failure_dead_after_ms: int = Field(
        default=10_000, ge=10, le=86_400_000,
        description="a peer silent this long is dead as the failure detector reports it, ms",
    )
    txn_prepare_timeout_ms: int = Field(
        default=3_000, ge=10, le=600_000,
        description="a cross-partition transaction prepared this long in a partition this "
        "node leads is asked about at its home partition, which aborts it unless its "
        "coordinator's commit was chosen first, ms",
    )
    txn_decision_timeout_ms: int = Field(
        default=6_000, ge=10, le=600_000,
        description="a transaction decision this long in a home partition this node leads "
        "(its coordinator is gone) is carried to its participants by this node, ms",
    )
    txn_resolve_ride_ms: int = Field(
        default=40, ge=0, le=1_000,
        description="a transaction's resolve proposed in a partition this node leads waits "
        "up to this long for another command to that partition, to go in its slot (0: "
        "proposed at once), ms",
    )
    moves_max: int = Field(
        default=4, ge=1, le=64,
        description="partitions this node moves replicas of at once after a membership change",
    )
    auto_remove_dead_ms: int = Field(
        default=0, ge=0, le=86_400_000 * 30,
        description="remove a member silent for this long automatically, so that every "
        "partition gets its replicas back (0: never; at least failure_dead_after_ms), ms",
    )
    leave_on_stop: bool = Field(
        default=False,
        description="on SIGTERM, leave the cluster first (replicas move away, then the node "
        "is removed), then stop",
    )
    leave_timeout_ms: int = Field(
        default=600_000, ge=1_000, le=86_400_000,
        description="how long --leave-on-stop waits for the replicas to move away, ms",
    )
    shutdown_timeout_ms: int = Field(
        default=8_000, ge=100, le=60_000,
        description="time in-flight requests get to finish on SIGTERM, ms",
    )

    # observability
    metrics_listen: str | None = Field(
        default=None,
        description="HOST:PORT of the admin HTTP listener (/metrics, /livez, /readyz, /status); "
        "loopback only; default off",
    )
    livez_loop_stall_max_ms: int = Field(
        default=5000, ge=200,
        description="/livez fails once the event loop has not turned for this long",
    )

    # logging
    log_format: Literal["auto", "console", "json"] = Field(
        default="auto", description="auto: console on a terminal, else json lines"
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        default="info", description="least severe log level written"
    )

    @field_validator("node_id", "cluster_id")
    @classmethod
    def _check_id(cls, v: str) -> str:
        if not NODE_ID_RE.match(v):
            raise ValueError(f"{v!r} does not match [a-z0-9][a-z0-9_-]{{0,62}}")
        return v

    @field_validator("listen", "advertise")
    @classmethod
    def _check_addr(cls, v: str | None) -> str | None:
        if v is not None:
            parse_addr(v)
        return v

    @field_validator("metrics_listen")
    @classmethod
    def _check_metrics_listen(cls, v: str | None) -> str | None:
        if v is not None:
            host, _ = parse_addr(v, "metrics_listen")
            if not is_loopback(host):
                raise ValueError(
                    f"{v!r} is not a loopback address: the admin listener has no TLS or "
                    "authentication yet, so it binds 127.0.0.1, ::1 or localhost only"
                )
        return v

    @field_validator("join", mode="before")
    @classmethod
    def _join_from_text(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [a.strip() for a in v.split(",") if a.strip()]
        if isinstance(v, list | tuple):
            if not v:
                return None
            for a in v:
                if not isinstance(a, str):
                    raise ValueError(f"{a!r} is not HOST:PORT")
                parse_addr(a, "join address")
            return list(v)
        return v

    @field_validator("peers", mode="before")
    @classmethod
    def _peers_from_text(cls, v: Any) -> Any:
        if isinstance(v, str):
            return parse_peers(v)
        if isinstance(v, Mapping):
            return parse_peers(",".join(f"{k}={a}" for k, a in v.items()))
        return v

    @model_validator(mode="after")
    def _check_cluster(self) -> NodeConfig:
        if self.peers is not None and self.node_id not in self.peers:
            raise ValueError(f"peers: this node ({self.node_id}) is not in the peer list")
        if 0 < self.auto_remove_dead_ms < self.failure_dead_after_ms:
            raise ValueError("auto_remove_dead_ms must be 0 (off) or at least "
                             "failure_dead_after_ms")
        if self.peers is not None and self.join is not None:
            raise ValueError("join: a joining node learns its peers from the cluster; "
                             "give --join or --peers, not both")
        if self.heartbeat_interval_ms >= self.election_timeout_ms:
            raise ValueError("heartbeat_interval_ms must be below election_timeout_ms")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file must be set together")
        if self.tls_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_ca_file needs tls_cert_file and tls_key_file (TLS on)")
        if self.connection_buffer_bytes_max < self.max_frame_bytes:
            raise ValueError("connection_buffer_bytes_max must be at least max_frame_bytes")
        if self.client_cert_auth and self.tls_ca_file is None:
            raise ValueError("client_cert_auth needs tls_ca_file to check client certificates")
        return self

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    # ------------------------------------------------------------ derived
    @property
    def cluster_peers(self) -> dict[str, str]:
        return dict(self.peers) if self.peers is not None else {self.node_id: self.advertise_addr}

    @property
    def advertise_addr(self) -> str:
        if self.advertise is not None:
            return self.advertise
        if self.peers is not None:
            return self.peers[self.node_id]
        return self.listen

    @property
    def data_path(self) -> Path:
        return self.data_dir if self.data_dir is not None else Path("dsnode-data") / self.node_id

    def ticks(self, ms: int) -> int:
        """Milliseconds -> whole ticks (at least 1)."""
        return max(1, round(ms / self.tick_interval_ms))


SETTINGS: tuple[str, ...] = tuple(NodeConfig.model_fields)


def _describe(err: ValidationError, source_of: Mapping[str, str]) -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "configuration"
    setting = str(first["loc"][0]) if first["loc"] else ""
    where = source_of.get(setting, "")
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        return f"unknown setting {loc!r}{where}"
    return f"invalid setting {loc}{where}: {msg}"


def _coerce_text(setting: str, text: str) -> Any:
    """Flag/env text -> a value pydantic (lax) will accept for ``setting``."""
    if NodeConfig.model_fields[setting].annotation is bool:
        low = text.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"invalid setting {setting}: {text!r} is not a boolean (true/false)")
    if text == "" and NodeConfig.model_fields[setting].default is None:
        return None
    return text


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {str(path)!r} is not readable") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {str(path)!r} is a directory") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None


def load_config(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    config_file: str | os.PathLike | None = None,
) -> NodeConfig:
    """Merge the four sources and validate. ``flags`` holds only settings given."""
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    env = os.environ if env is None else env
    if config_file is None:
        config_file = flags.pop("config", None) or env.get(ENV_PREFIX + "CONFIG") or None
    flags.pop("config", None)

    merged: dict[str, Any] = {}
    source_of: dict[str, str] = {}
    if config_file:
        file_values = load_toml(Path(config_file))
        for k, v in file_values.items():
            merged[k] = v
            source_of[k] = f" (from {config_file})"
        # TOML must be typed correctly already: validate it strictly on its own.
        unknown = [k for k in file_values if k not in SETTINGS]
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r} (from {config_file})")
        for k, v in file_values.items():
            _check_toml_type(k, v, config_file)
    for setting in SETTINGS:
        name = ENV_PREFIX + setting.upper()
        if name in env:
            merged[setting] = _coerce_text(setting, env[name])
            source_of[setting] = f" (from ${name})"
    for setting, value in flags.items():
        if setting not in SETTINGS:
            raise ConfigError(f"unknown setting {setting!r}")
        merged[setting] = _coerce_text(setting, value) if isinstance(value, str) else value
        source_of[setting] = f" (from --{setting.replace('_', '-')})"
    try:
        return NodeConfig.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_describe(e, source_of)) from None


_TOML_TYPES: dict[str, tuple[type, ...]] = {}


def _check_toml_type(setting: str, value: Any, config_file: Any) -> None:
    annotation = NodeConfig.model_fields[setting].annotation
    text = str(annotation)
    expected: tuple[type, ...]
    if annotation is bool:
        expected = (bool,)
    elif annotation is int:
        expected = (int,)
    elif annotation is float:
        expected = (int, float)
    elif setting == "peers":
        expected = (str, dict)
    elif setting == "join":
        expected = (str, list)
    else:
        expected = (str,)
    ok = isinstance(value, expected) and not (bool not in expected and isinstance(value, bool))
    if value is None and "None" in text:
        ok = True
    if not ok:
        names = " or ".join(t.__name__ for t in expected)
        raise ConfigError(
            f"invalid setting {setting} (from {config_file}): expected {names}, "
            f"got {type(value).__name__} {value!r}"
        )
