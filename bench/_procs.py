"""Process plumbing shared by the ``bench/compare_*.py`` scripts.

Children are started in their own session (so their whole process group can be
signalled), tracked in ``CHILDREN`` and removed by ``cleanup()`` together with
every directory from ``tmpdir()``; ``install_signal_handlers()`` turns the given
signals into ``SystemExit`` so that ``finally: cleanup()`` runs on them too.

Also the dsnode side both comparisons share: starting ``dsnode serve`` (one node
or a cluster), waiting until it is ready, and running ``dsnode bench``.

The scripts import this as a top-level module (``bench/`` is on ``sys.path``).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from dsnode.bench.targets import DsnodeTarget, TargetError  # noqa: E402

CHILDREN: list[subprocess.Popen[bytes]] = []
TMPDIRS: list[str] = []


# --------------------------------------------------------------------------- plumbing


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports (held open together so none repeats)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def tmpdir(prefix: str) -> Path:
    """A fresh temp dir that ``cleanup()`` removes."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    TMPDIRS.append(str(work))
    return work


def spawn(
    argv: list[str], logfile: Path, env: dict[str, str] | None = None, cwd: Path = REPO
) -> subprocess.Popen[bytes]:
    """Start a long-running child in its own session (so we can kill its whole group)."""
    out = open(logfile, "wb")  # noqa: SIM115 - closed with the process
    p = subprocess.Popen(
        argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd
    )
    out.close()
    CHILDREN.append(p)
    return p


def communicate(
    argv: list[str], timeout: float, **popen: Any
) -> tuple[subprocess.Popen[bytes], bytes, bytes]:
    """Run a short-lived child in its own session, tracked until it exits.

    Returns ``(process, stdout, stderr)``; on a timeout the child stays tracked,
    so ``cleanup()`` kills it.
    """
    p: subprocess.Popen[bytes] = subprocess.Popen(argv, start_new_session=True, **popen)
    CHILDREN.append(p)
    out, err = p.communicate(timeout=timeout)
    CHILDREN.remove(p)
    return p, out, err


def stop(p: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM the child's process group, then SIGKILL if it lingers."""
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=5)
    if p in CHILDREN:
        CHILDREN.remove(p)


def cleanup() -> None:
    for p in list(CHILDREN):
        try:
            stop(p, timeout=10)
        except Exception as exc:  # keep cleaning up
            log(f"could not stop pid {p.pid}: {exc!r}")
    for d in TMPDIRS:
        shutil.rmtree(d, ignore_errors=True)
    TMPDIRS.clear()


def _on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def install_signal_handlers(*signums: signal.Signals) -> None:
    """Make these signals raise ``SystemExit`` (so ``finally: cleanup()`` runs)."""
    for s in signums:
        signal.signal(s, _on_signal)


def tail(path: Path, n: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def apt_install(*packages: str) -> None:
    """``apt-get update`` then ``apt-get install -y`` the Debian packages."""
    log(f"installing {' and '.join(packages)} from Debian packages")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env, stdout=subprocess.DEVNULL)
    subprocess.run(
        ["apt-get", "install", "-y", *packages],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def wait_ready(
    name: str,
    p: subprocess.Popen[bytes],
    probe: Callable[[], Coroutine[Any, Any, bool]],
    logfile: Path,
    timeout: float,
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise SystemExit(f"{name} exited with {p.returncode}:\n{tail(logfile)}")
        if asyncio.run(probe()):
            return
        time.sleep(0.2)
    raise SystemExit(f"{name} not ready after {timeout:.0f}s:\n{tail(logfile)}")


# --------------------------------------------------------------------------- dsnode


async def probe_dsnode(port: int) -> bool:
    """Ready when ``status`` says so, or (without ``status``) when a put succeeds."""
    t = DsnodeTarget("127.0.0.1", port)
    try:
        await t.connect()
        st = await asyncio.wait_for(t.request({"op": "status"}), 5)
        if st.get("ok"):
            return bool(st.get("ready"))
        return await asyncio.wait_for(t.put(b"__compare_ready__", b""), 5) is None
    except (OSError, TimeoutError, TargetError):
        return False
    finally:
        t.close()


async def dsnode_status(port: int) -> dict[str, Any] | None:
    t = DsnodeTarget("127.0.0.1", port)
    try:
        await t.connect()
        st = await asyncio.wait_for(t.request({"op": "status"}), 5)
        return st if st.get("ok") else None
    except (OSError, TimeoutError, TargetError):
        return None
    finally:
        t.close()


def leader_of(st: dict[str, Any] | None) -> str | None:
    if not st or not st.get("ready"):
        return None
    parts = st.get("partitions") or []
    return parts[0].get("leader") if parts else None


def start_dsnode(
    work: Path, name: str, fsync: bool, cmd: list[str]
) -> tuple[subprocess.Popen[bytes], int]:
    """One ``dsnode serve`` node (its own single-member cluster), waited for until ready."""
    port = free_port()
    addr = f"127.0.0.1:{port}"
    logfile = work / f"{name}.log"
    env = child_env(None if fsync else {"DSNODE_FSYNC": "false"})
    argv = [*cmd, "serve", "--node-id", "n1", "--listen", addr,
            "--peers", f"n1={addr}", "--data-dir", str(work / name)]  # fmt: skip
    p = spawn(argv, logfile, env)
    wait_ready(f"dsnode serve ({name})", p, lambda: probe_dsnode(port), logfile, 60)
    return p, port


def start_dsnode_cluster(
    work: Path,
    cmd: list[str],
    nodes: int = 3,
    env: dict[str, str] | None = None,
    node_env: dict[str, dict[str, str]] | None = None,
) -> tuple[list[subprocess.Popen[bytes]], list[int]]:
    """``nodes`` dsnode nodes (ids n1, n2, ...), waited for until all report the same
    leader; ``env``: settings for every node (``DSNODE_<SETTING>`` variables);
    ``node_env``: more variables for some nodes, by node id."""
    ports = free_ports(nodes)
    ids = [f"n{i + 1}" for i in range(nodes)]
    peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in zip(ids, ports, strict=True))
    procs = []
    for nid, port in zip(ids, ports, strict=True):
        argv = [*cmd, "serve", "--node-id", nid, "--listen", f"127.0.0.1:{port}",
                "--peers", peers, "--data-dir", str(work / f"dsnode-{nid}")]  # fmt: skip
        # ``python -m dsnode`` imports from its working directory first: run it in the
        # tree PYTHONPATH names (another build's worktree), or this one
        code = Path(env["PYTHONPATH"]) if env and "PYTHONPATH" in env else REPO
        mine = {**(env or {}), **(node_env or {}).get(nid, {})}
        procs.append(spawn(argv, work / f"dsnode-{nid}.log", child_env(mine), cwd=code))
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        for nid, p in zip(ids, procs, strict=True):
            if p.poll() is not None:
                raise SystemExit(f"dsnode {nid} exited with {p.returncode}:\n"
                                 f"{tail(work / f'dsnode-{nid}.log')}")  # fmt: skip
        leaders = [leader_of(asyncio.run(dsnode_status(port))) for port in ports]
        if leaders[0] is not None and all(ld == leaders[0] for ld in leaders):
            log(f"dsnode cluster ready, leader {leaders[0]}")
            return procs, ports
        time.sleep(0.3)
    raise SystemExit("dsnode cluster has no common leader after 90s:\n"
                     + tail(work / "dsnode-n1.log"))  # fmt: skip


def run_dsnode_bench(args: list[str], timeout: float) -> dict[str, Any]:
    """``python -m dsnode.bench ARGS`` (which must ask for ``--output json``); its report."""
    p, out, err = communicate(
        [sys.executable, "-m", "dsnode.bench", *args], timeout,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env(), cwd=REPO,
    )  # fmt: skip
    if p.returncode != 0:
        raise SystemExit(f"dsnode bench failed ({p.returncode}): {err.decode(errors='replace')}")
    return json.loads(out)
