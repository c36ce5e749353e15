"""Small helpers for the container tests: run docker, wait for conditions, talk to nodes.

Every wait has a deadline and re-checks a condition; nothing sleeps in the hope that something
has happened meanwhile.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import polling
from polling import GiveUp  # noqa: F401 (raised by probes, re-exported)

REPO = Path(__file__).resolve().parents[2]
POLL_S = 0.25
# One id per test session: image tags, container names, compose projects and this label.
SESSION = uuid.uuid4().hex[:10]
LABEL = f"org.dsnode.test-session={SESSION}"
T = TypeVar("T")


class CommandFailed(AssertionError):
    pass


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    cwd: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        list(cmd),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
        cwd=cwd,
        check=False,
    )
    if check and done.returncode != 0:
        raise CommandFailed(
            f"{' '.join(cmd)} exited {done.returncode}\n"
            f"--- stdout\n{done.stdout[-3000:]}\n--- stderr\n{done.stderr[-3000:]}"
        )
    return done


def docker_available() -> str | None:
    """None when a Docker engine answers, else the reason it does not."""
    try:
        done = run(["docker", "info", "--format", "{{.ServerVersion}}"], check=False, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired) as e:
        return f"docker CLI unusable: {e}"
    if done.returncode != 0:
        return f"no Docker engine: {done.stderr.strip()[:200]}"
    return None


@functools.cache
def compose_cmd() -> tuple[str, ...]:
    """`docker compose` (v2 plugin) when present, else `docker-compose` (v1)."""
    if run(["docker", "compose", "version"], check=False, timeout=30).returncode == 0:
        return ("docker", "compose")
    return ("docker-compose",)


def wait_until(
    what: str,
    probe: Callable[[], T | None],
    timeout: float,
    *,
    diagnose: Callable[[], str] | None = None,
) -> T:
    """Call ``probe`` until it returns something truthy; fail after ``timeout`` (the one
    poll helper, tests/polling.py, with a failing docker command counted as "not yet").

    ``probe`` may raise ``GiveUp`` to fail at once (a container crash-looping, say).
    """
    return polling.wait_until(
        probe, timeout, what, (lambda: f"\n{diagnose()}") if diagnose else None,
        interval=POLL_S, retry_on=(CommandFailed, OSError, ValueError),
    )



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- containers


def inspect(container: str) -> dict[str, Any]:
    return json.loads(run(["docker", "inspect", container], timeout=30).stdout)[0]


def health_status(container: str, max_restarts: int = 3) -> str:
    """The container's health (starting/healthy/unhealthy); GiveUp if it is crash-looping."""
    state = inspect(container)
    st = state["State"]
    if state.get("RestartCount", 0) >= max_restarts or (
        st["Status"] == "exited" and state["HostConfig"]["RestartPolicy"]["Name"] in ("", "no")
    ):
        raise GiveUp(
            f"{container} is not staying up (status {st['Status']}, exit code {st['ExitCode']}, "
            f"restarts {state.get('RestartCount', 0)})\n{logs(container)}"
        )
    health = st.get("Health")
    return health["Status"] if health else "none"


def wait_healthy(containers: Sequence[str], timeout: float) -> float:
    """Wait until every container reports healthy; returns the seconds it took."""
    started = time.monotonic()
    for name in containers:
        remaining = max(1.0, timeout - (time.monotonic() - started))
        wait_until(
            f"{name} to become healthy",
            lambda name=name: health_status(name) == "healthy",
            remaining,
            diagnose=lambda name=name: health_log(name) + "\n" + logs(name),
        )
    return time.monotonic() - started


def health_log(container: str) -> str:
    try:
        entries = (inspect(container)["State"].get("Health") or {}).get("Log") or []
    except CommandFailed as e:
        return str(e)
    return "\n".join(f"health: exit {e['ExitCode']}: {e['Output'].strip()}" for e in entries[-3:])


def logs(container: str, tail: int = 40) -> str:
    done = run(["docker", "logs", "--tail", str(tail), container], check=False, timeout=30)
    return f"--- last logs of {container}\n{done.stdout}{done.stderr}"


# ---------------------------------------------------------------- the dsnode CLI on the host


@dataclass
class Cli:
    """Runs ``python -m dsnode`` from this checkout against published ports."""

    timeout_s: float = 5.0
    env: dict[str, str] = field(default_factory=dict)  # DSNODE_CACERT, DSNODE_TOKEN

    def secure(self, workdir: Path, fetch: Callable[[str], str]) -> None:
        """Trust the cluster's CA and send its admin token; ``fetch(name)`` returns the text of
        a file that ``dsnode certs`` wrote (ca.pem, admin.token) inside the containers."""
        ca = workdir / "ca.pem"
        ca.write_text(fetch("ca.pem"))
        self.env = {"DSNODE_CACERT": str(ca), "DSNODE_TOKEN": fetch("admin.token").strip()}

    def run(self, endpoints: str, *args: str) -> dict[str, Any]:
        cmd = [
            sys.executable, "-m", "dsnode", *args,
            "--endpoints", endpoints, "--output", "json", "--timeout", str(self.timeout_s),
        ]  # fmt: skip
        done = run(cmd, check=False, timeout=self.timeout_s * 4 + 10,
                   env={**_pythonpath(), **self.env})
        if done.returncode != 0:
            raise CommandFailed(
                f"dsnode {' '.join(args)} @ {endpoints}: {done.stderr.strip()}{done.stdout.strip()}"
            )
        return json.loads(done.stdout)

    def put(self, endpoints: str, key: str, value: str) -> dict[str, Any]:
        return self.run(endpoints, "put", key, value)

    def get(self, endpoints: str, key: str) -> str | None:
        try:
            return self.run(endpoints, "get", key).get("value")
        except CommandFailed as e:  # a missing key is the error not_found (exit 1)
            if '"not_found"' in str(e):
                return None
            raise

    def status(self, endpoints: str) -> dict[str, Any]:
        return self.run(endpoints, "status")


def _pythonpath() -> dict[str, str]:
    existing = os.environ.get("PYTHONPATH")
    return {"PYTHONPATH": f"{REPO}{os.pathsep}{existing}" if existing else str(REPO)}
