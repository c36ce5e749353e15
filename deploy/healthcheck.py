"""Container health check: healthy when this node can serve linearizable requests.

Exits 0 (healthy) or 1 (unhealthy), printing one line for ``docker inspect``.

* When the node runs its admin listener (``metrics_listen``, from ``$DSNODE_METRICS_LISTEN``,
  else the config file the entrypoint would pick; the image's and the compose files set it),
  it asks ``GET /readyz`` there: 200 is healthy, anything else (503 with the node's reason,
  no answer) is not.
* Otherwise it runs ``dsnode status --endpoints HOST:PORT --output json`` and wants
  ``"ready": true``. The endpoint is ``$DSNODE_HEALTH_ENDPOINT`` when set, else the port of
  ``listen`` (``$DSNODE_LISTEN``, else the config file) on 127.0.0.1. The token is
  ``auth_token`` from the same places (``$DSNODE_AUTH_TOKEN`` first), else the ``read.token``
  that ``dsnode certs`` writes next to ``auth_tokens_file``. With TLS on, the node's own CA
  (``tls_ca_file``) is trusted and its certificate and key serve as the client certificate.

Why /readyz first: it is one HTTP request from the standard library instead of starting the
dsnode client in a new Python process every few seconds; it needs no token; and it is
answered by the admin thread, so a node whose event loop is stuck gets a prompt 503 ("event
loop did not answer") rather than a client timeout. The same readiness rule backs both.
Standard library only, so that a broken install still gives a clear message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request

DEFAULT_CONFIG = "/etc/dsnode/dsnode.toml"
DEFAULT_PORT = 7379
TIMEOUT_S = 4.0


def _config() -> dict:
    path = os.environ.get("DSNODE_CONFIG") or DEFAULT_CONFIG
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def admin_address() -> str | None:
    """HOST:PORT of the node's admin listener, or None when it runs without one."""
    listen = os.environ.get("DSNODE_METRICS_LISTEN")
    if listen is None:
        listen = _config().get("metrics_listen")
    return listen if isinstance(listen, str) and listen else None


def check_readyz(addr: str) -> int:
    url = f"http://{addr}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as r:
            reason = r.read().decode(errors="replace").strip()
        print(f"healthy: {url}: {reason}")
        return 0
    except urllib.error.HTTPError as e:
        reason = e.read().decode(errors="replace").strip()
        print(f"unhealthy: {url} answered {e.code}: {reason}")
    except (OSError, TimeoutError) as e:
        print(f"unhealthy: {url}: {getattr(e, 'reason', e)}")
    return 1


def _setting(doc: dict, name: str) -> str | None:
    value = os.environ.get("DSNODE_" + name.upper()) or doc.get(name)
    return value if isinstance(value, str) and value else None


def tls_env() -> dict[str, str]:
    """DSNODE_CACERT/CERT/KEY for the CLI when the node has TLS on (its CA, its own cert)."""
    doc = _config()
    ca = _setting(doc, "tls_ca_file")
    cert, key = _setting(doc, "tls_cert_file"), _setting(doc, "tls_key_file")
    env: dict[str, str] = {}
    if cert is None:
        return env
    if ca is not None:
        env["DSNODE_CACERT"] = ca
    env["DSNODE_CERT"], env["DSNODE_KEY"] = cert, key or cert
    return env


def _token_file_token(doc: dict) -> str | None:
    tokens = _setting(doc, "auth_tokens_file")
    if tokens is None:
        return None
    try:
        with open(os.path.join(os.path.dirname(tokens), "read.token")) as f:
            return f.read().strip() or None
    except OSError:
        return None


def node_settings() -> tuple[str, str | None]:
    """(endpoint, auth token) of the node in this container, as the entrypoint configures it."""
    explicit = os.environ.get("DSNODE_HEALTH_ENDPOINT")
    listen = os.environ.get("DSNODE_LISTEN")
    token = os.environ.get("DSNODE_AUTH_TOKEN")
    if not (explicit or listen) or token is None:
        doc = _config()
        listen = listen or doc.get("listen")
        token = token if token is not None else doc.get("auth_token")
        if token is None:
            token = _token_file_token(doc)
    if explicit:
        return explicit, token or None
    port = DEFAULT_PORT
    if isinstance(listen, str) and listen.rpartition(":")[2].isdigit():
        port = int(listen.rpartition(":")[2])
    return f"127.0.0.1:{port}", token or None


def is_ready(output: str) -> bool:
    doc = json.loads(output)
    if isinstance(doc, list):  # one entry per endpoint
        doc = doc[0] if doc else {}
    if isinstance(doc, dict) and isinstance(doc.get("status"), dict):
        doc = doc["status"]
    return isinstance(doc, dict) and doc.get("ready") is True


def main() -> int:
    admin = admin_address()
    if admin is not None:
        return check_readyz(admin)
    addr, token = node_settings()
    cmd = [sys.executable, "-m", "dsnode", "status", "--endpoints", addr, "--output", "json"]
    cmd += ["--timeout", str(TIMEOUT_S / 2)]
    env = dict(os.environ)
    env.update(tls_env())
    if token:
        env["DSNODE_TOKEN"] = token  # not on the command line, where `ps` would show it
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False, env=env
        )
    except subprocess.TimeoutExpired:
        print(f"unhealthy: dsnode status {addr} timed out after {TIMEOUT_S}s")
        return 1
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        print(f"unhealthy: dsnode status {addr} exited {done.returncode}: {last[0]}")
        return 1
    try:
        ready = is_ready(done.stdout)
    except ValueError:
        print(f"unhealthy: dsnode status {addr} printed no JSON")
        return 1
    if not ready:
        print(f"unhealthy: {addr} is up but not ready (no quorum or no leader yet)")
        return 1
    print(f"healthy: {addr} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
