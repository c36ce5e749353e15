"""Who may talk to a node, and over what: TLS contexts, client tokens with roles, peer identity.

The policy (docs/SECURITY.md):

- TLS (``tls_cert_file``/``tls_key_file``) covers clients and peers on the one port; only
  TLS 1.2 or later. With TLS on, a plain-text connection fails the handshake and is closed
  before anything is served.
- With ``tls_ca_file`` set, a peer must present a certificate chaining to that CA whose name
  (a DNS SAN or the CN) is the node id it claims in its ``hello``; the dialing node checks the
  same of the node it dialed. Without TLS, peers present the cluster token (``auth_token``).
- Clients authenticate with a token from ``auth_tokens_file`` (stored as SHA-256 hashes, each
  with a role) or the cluster token (role ``admin``), and, with ``client_cert_auth``, must
  also present a certificate signed by the CA (enough on its own when no tokens are set).
- A node that would listen on a non-loopback address with neither TLS nor tokens refuses to
  start unless ``insecure = true``.

:meth:`Security.reload` (SIGHUP) re-reads certificates and tokens into the same contexts, so
connections already open are untouched and new handshakes use the new files.
"""

from __future__ import annotations

import hashlib
import hmac
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dsnode.config import is_loopback
from dsnode.core.commands import Txn
from dsnode.runtime.logs import get_logger

if TYPE_CHECKING:
    from dsnode.config import NodeConfig

log = get_logger("dsnode.security")

READ, READWRITE, ADMIN = "read", "readwrite", "admin"
ROLES = (READ, READWRITE, ADMIN)
_RANK = {READ: 0, READWRITE: 1, ADMIN: 2}
HASH_PREFIX = "sha256:"

# The role each op needs; any op not listed (membership changes and other administration)
# needs ``admin``. ``hello`` needs nothing: it is how a connection authenticates.
OP_ROLES: dict[str, str | None] = {
    "hello": None,
    "status": READ,
    "ring": READ,
    "get": READ,
    "put": READWRITE,
    "delete": READWRITE,
    "txn": READWRITE,
}


class SecurityError(Exception):
    """A certificate, key or token file cannot be used, or the settings are unsafe."""


def hash_token(token: str) -> str:
    """The form a token is stored in: ``sha256:<hex>``."""
    return HASH_PREFIX + hashlib.sha256(token.encode()).hexdigest()


def required_role(op: str, command: object = None) -> str:
    """The least role allowed to run ``op``; a txn of gets only is a read."""
    role = OP_ROLES.get(op, ADMIN)
    if role is None:
        return READ
    if op == "txn" and isinstance(command, Txn) and command.is_read_only:
        return READ
    return role


def role_allows(role: str | None, needed: str) -> bool:
    return role is not None and _RANK[role] >= _RANK[needed]


def parse_tokens(text: str, where: str = "tokens file") -> dict[str, str]:
    """``sha256:HEX ROLE [NAME]`` lines (``#`` comments, blank lines) -> {hash: role}."""
    tokens: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3):
            raise SecurityError(f"{where} line {n}: expected 'sha256:HEX ROLE [NAME]'")
        digest, role = parts[0], parts[1]
        hexpart = digest[len(HASH_PREFIX):]
        if not digest.startswith(HASH_PREFIX) or len(hexpart) != 64 or not _is_hex(hexpart):
            raise SecurityError(
                f"{where} line {n}: a token is stored as its hash 'sha256:<64 hex digits>' "
                "(make one with `dsnode certs` or `dsnode token-hash`), not in clear"
            )
        if role not in ROLES:
            raise SecurityError(f"{where} line {n}: role {role!r} is not read, readwrite or admin")
        if digest.lower() in tokens:
            raise SecurityError(f"{where} line {n}: the same token appears twice")
        tokens[digest.lower()] = role
    return tokens


def _is_hex(s: str) -> bool:
    try:
        int(s, 16)
    except ValueError:
        return False
    return True


def cert_names(cert: Mapping[str, Any] | None) -> set[str]:
    """The DNS subjectAltNames and common names of a certificate from ``getpeercert()``."""
    if not cert:
        return set()
    names = {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                names.add(value)
    return names



class Security:
    """The TLS contexts and token table of one node; shared by its listener and peer dialer."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.server_context: ssl.SSLContext | None = None
        self.dial_context: ssl.SSLContext | None = None
        self.tokens: dict[str, str] = {}
        self.counters = {"reloads": 0, "reload_failures": 0, "peer_auth_failures": 0}
        if config.tls:
            self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.dial_context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            for ctx in (self.server_context, self.dial_context):
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self.dial_context.check_hostname = False  # names are checked against node ids
            if config.tls_ca_file is None:
                self.dial_context.verify_mode = ssl.CERT_NONE
            else:
                self.dial_context.verify_mode = ssl.CERT_REQUIRED
                self.server_context.verify_mode = (
                    ssl.CERT_REQUIRED if config.client_cert_auth else ssl.CERT_OPTIONAL
                )
        self._load()

    # ------------------------------------------------------------ files
    def _load(self) -> None:
        cfg = self.config
        if cfg.tls:
            assert cfg.tls_cert_file is not None and cfg.tls_key_file is not None
            for ctx in (self.server_context, self.dial_context):
                assert ctx is not None
                try:
                    ctx.load_cert_chain(cfg.tls_cert_file, cfg.tls_key_file)
                except (OSError, ssl.SSLError) as e:
                    raise SecurityError(
                        f"tls_cert_file {str(cfg.tls_cert_file)!r} / tls_key_file "
                        f"{str(cfg.tls_key_file)!r}: {_reason(e)}"
                    ) from None
                if cfg.tls_ca_file is not None:
                    try:
                        ctx.load_verify_locations(cafile=cfg.tls_ca_file)
                    except (OSError, ssl.SSLError) as e:
                        raise SecurityError(
                            f"tls_ca_file {str(cfg.tls_ca_file)!r}: {_reason(e)}"
                        ) from None
        if cfg.auth_tokens_file is not None:
            path = Path(cfg.auth_tokens_file)
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError) as e:
                raise SecurityError(f"auth_tokens_file {str(path)!r}: {_reason(e)}") from None
            tokens = parse_tokens(text, f"auth_tokens_file {str(path)!r}")
            if not tokens:
                raise SecurityError(f"auth_tokens_file {str(path)!r} holds no tokens")
            self.tokens = tokens

    def reload(self) -> bool:
        """Re-read certificates, CA and tokens (SIGHUP). On error keep the old ones."""
        try:
            self._load()
        except SecurityError as e:
            self.counters["reload_failures"] += 1
            log.error("security_reload_failed", error=str(e))
            return False
        self.counters["reloads"] += 1
        log.info("security_reloaded", tls=self.config.tls, tokens=len(self.tokens))
        return True

    # ------------------------------------------------------------ clients
    @property
    def auth_required(self) -> bool:
        cfg = self.config
        return cfg.auth_token is not None or cfg.auth_tokens_file is not None or cfg.client_cert_auth

    @property
    def uses_tokens(self) -> bool:
        return self.config.auth_token is not None or self.config.auth_tokens_file is not None

    def initial_role(self) -> str | None:
        """The role of a connection that has not said hello (after the TLS handshake)."""
        if not self.auth_required:
            return ADMIN
        if self.config.client_cert_auth and not self.uses_tokens:
            return ADMIN  # the handshake already demanded a certificate signed by the CA
        return None

    def token_role(self, token: object) -> str | None:
        """The role ``token`` grants, or None. Every comparison runs in constant time."""
        if not isinstance(token, str):
            return None
        role = None
        cluster = self.config.auth_token
        if cluster is not None and hmac.compare_digest(token.encode(), cluster.encode()):
            role = ADMIN
        digest = hash_token(token)
        for stored, stored_role in self.tokens.items():
            if hmac.compare_digest(digest, stored) and role is None:
                role = stored_role
        return role

    # ------------------------------------------------------------ peers
    def check_peer_identity(self, peer_id: str, transport: Any) -> str | None:
        """Why a connection claiming to be node ``peer_id`` is refused, or None.

        Only certificates are checked here (the cluster token is checked with the hello):
        with ``tls_ca_file`` set the connection must carry a verified certificate naming
        ``peer_id``.
        """
        if self.config.tls_ca_file is None:
            return None
        cert = transport.get_extra_info("peercert") if transport is not None else None
        if not cert:
            why = "no verified client certificate (peers authenticate with mutual TLS)"
        else:
            names = cert_names(cert)
            if peer_id in names:
                return None
            why = f"certificate names {sorted(names)} do not include {peer_id!r}"
        self.counters["peer_auth_failures"] += 1
        log.warning("peer_unauthenticated", claimed=peer_id, reason=why)
        return why

def check_exposure(cfg: NodeConfig) -> list[str]:
    """Refuse unsafe settings (SecurityError); return warnings to log at start."""
    host = cfg.listen.rpartition(":")[0].strip("[]")
    exposed = not is_loopback(host)
    auth_required = (cfg.auth_token is not None or cfg.auth_tokens_file is not None
                     or cfg.client_cert_auth)
    multi = len(cfg.cluster_peers) > 1
    warnings: list[str] = []
    if exposed and not cfg.insecure:
        if not cfg.tls and not auth_required:
            raise SecurityError(
                f"refusing to listen on {cfg.listen} (not loopback) without TLS or tokens: "
                "set tls_cert_file/tls_key_file/tls_ca_file and auth_tokens_file "
                "(`dsnode certs` makes them), or insecure = true"
            )
        if multi and cfg.tls_ca_file is None and cfg.auth_token is None:
            raise SecurityError(
                f"refusing to listen on {cfg.listen} (not loopback) with peers that cannot "
                "authenticate: set tls_ca_file (mutual TLS) or auth_token, or insecure = true"
            )
    if multi and cfg.auth_tokens_file is not None and cfg.auth_token is None \
            and cfg.tls_ca_file is None:
        raise SecurityError(
            "auth_tokens_file is set but peers have no way to authenticate: "
            "set tls_ca_file (mutual TLS) or auth_token (the cluster token)"
        )
    if exposed and cfg.insecure:
        warnings.append(
            f"insecure = true: listening on {cfg.listen} without the protections "
            "docs/SECURITY.md asks for"
        )
    if multi and not cfg.tls:
        how = "the cluster token" if cfg.auth_token is not None else "nothing at all"
        warnings.append(
            f"peer traffic is unauthenticated plain text (peers prove membership with {how}); "
            "set tls_cert_file/tls_key_file/tls_ca_file for mutual TLS"
        )
    return warnings


def _reason(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__
