"""`dsnode local-cluster`: N real `dsnode serve` processes on loopback, for trying dsnode out.

Data lives under one folder (``<data-dir>/<node id>``), so running the
command again restarts the same cluster with its data. Ctrl-C (or SIGTERM)
stops every node gracefully.

A node that dies on its own (kill -9 it to watch the cluster survive a
failure) is reported; the others keep serving, and the dead node is started
again with its data after a back-off (0.5 s, doubling up to 10 s while it
keeps dying quickly), unless ``--no-restart`` keeps it down. A node that
exits with status 2 (bad configuration) is not restarted: that would fail
again. When no node is left running or waiting to restart, the command exits 1.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import click

RESTART_FIRST_S = 0.5
RESTART_MAX_S = 10.0
STABLE_AFTER_S = 10.0  # a node up this long has its back-off reset
EXIT_CONFIG = 2  # `dsnode serve`'s exit status for bad configuration


def _node_command(node_id: str, port: int, peers: str, data_dir: Path, extra: tuple[str, ...]):
    return [
        sys.executable, "-m", "dsnode", "serve",
        "--node-id", node_id,
        "--listen", f"127.0.0.1:{port}",
        "--peers", peers,
        "--data-dir", str(data_dir / node_id),
        *extra,
    ]


def describe_exit(status: int) -> str:
    """``-9`` -> ``killed by SIGKILL``; ``1`` -> ``exit status 1``."""
    if status < 0:
        try:
            return f"killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"killed by signal {-status}"
    return f"exit status {status}"


def port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
        return False


@dataclass
class _Node:
    node_id: str
    port: int
    argv: list[str]
    log_path: Path
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    restart_at: float | None = None  # when down and due to be restarted
    backoff: float = RESTART_FIRST_S
    down_for_good: bool = False
    _log: IO[bytes] | None = None

    def start(self) -> None:
        if self._log is None:
            self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv, stdout=self._log, stderr=self._log, start_new_session=True
        )
        self.started_at = time.monotonic()
        self.restart_at = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _say(message: str) -> None:
    click.echo(f"dsnode: {message}", err=True)


@click.command(
    "local-cluster",
    context_settings={"ignore_unknown_options": True, "show_default": True},
)
@click.option("--nodes", type=click.IntRange(1, 9), default=3,
              help="Number of nodes (n1..nN), each a `dsnode serve` process.")
@click.option("--base-port", type=click.IntRange(1024, 65000), default=7379,
              help="Node i listens on 127.0.0.1:(base-port + i - 1).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("dsnode-data"),
              help="Folder for each node's data (<data-dir>/<id>) and log (<data-dir>/<id>.log).")
@click.option("--restart/--no-restart", default=True,
              help="Restart a node that dies (after a back-off of 0.5 s doubling to 10 s), "
                   "or leave it down.")
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED)
def local_cluster_command(nodes: int, base_port: int, data_dir: Path, restart: bool,
                          serve_args: tuple[str, ...]) -> None:
    """Start a local cluster of NODES processes on 127.0.0.1; Ctrl-C stops it.

    A node that dies (try kill -9 on one) is reported and restarted; the others
    keep serving meanwhile. Extra arguments go to every `dsnode serve` (for
    example --fsync false).
    """
    ids = [f"n{i}" for i in range(1, nodes + 1)]
    ports = {nid: base_port + i for i, nid in enumerate(ids)}
    busy = [p for p in ports.values() if port_in_use(p)]
    if busy:
        click.echo(f"dsnode: cannot start: 127.0.0.1:{busy[0]} is already in use "
                   "(another cluster running? pick other ports with --base-port)", err=True)
        sys.exit(2)
    peers = ",".join(f"{nid}=127.0.0.1:{ports[nid]}" for nid in ids)
    data_dir.mkdir(parents=True, exist_ok=True)
    cluster = {
        nid: _Node(nid, ports[nid], _node_command(nid, ports[nid], peers, data_dir, serve_args),
                   data_dir / f"{nid}.log")
        for nid in ids
    }
    stopping = False

    def stop_all(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    for node in cluster.values():
        node.start()
    endpoints = ",".join(f"127.0.0.1:{ports[n]}" for n in ids)
    _say(f"{nodes}-node cluster starting; data and logs in {data_dir}/")
    for node in cluster.values():
        assert node.proc is not None
        _say(f"  {node.node_id}  127.0.0.1:{node.port}  pid {node.proc.pid}")
    click.echo("  talk to it (any node works; requests go to the leader):", err=True)
    click.echo(f"    export DSNODE_ENDPOINTS={endpoints}", err=True)
    click.echo("    dsnode put hello world && dsnode get hello && dsnode endpoint status",
               err=True)
    click.echo("  kill -9 a node's pid to watch the others keep serving"
               + (" and the node come back." if restart else " (--no-restart: it stays down)."),
               err=True)
    click.echo("  Ctrl-C stops every node.", err=True)
    exit_code = 0
    while not stopping:
        now = time.monotonic()
        for node in cluster.values():
            if node.proc is not None and node.proc.poll() is not None:
                _on_exit(node, now, restart, data_dir)
            elif node.restart_at is not None and now >= node.restart_at:
                node.start()
                assert node.proc is not None
                _say(f"node {node.node_id} restarted (pid {node.proc.pid})")
        if all(n.down_for_good for n in cluster.values()):
            _say("no node is running; stopping")
            exit_code = 1
            break
        time.sleep(0.1)  # supervising loop of an interactive command, not test synchronisation
    _stop(cluster.values())
    _say("cluster stopped")
    sys.exit(exit_code)


def _on_exit(node: _Node, now: float, restart: bool, data_dir: Path) -> None:
    """Report a node that exited and schedule its restart (or leave it down)."""
    assert node.proc is not None
    status = node.proc.returncode
    node.proc = None
    what = (f"node {node.node_id} (127.0.0.1:{node.port}) {describe_exit(status)}; "
            f"see {data_dir}/{node.node_id}.log")
    if now - node.started_at >= STABLE_AFTER_S:
        node.backoff = RESTART_FIRST_S
    if status == EXIT_CONFIG:
        node.down_for_good = True
        _say(f"{what}; bad configuration, not restarting it")
    elif not restart:
        node.down_for_good = True
        _say(f"{what}; left down (--no-restart), the others keep serving")
    else:
        node.restart_at = now + node.backoff
        _say(f"{what}; the others keep serving; restarting it in {node.backoff:g}s")
        node.backoff = min(node.backoff * 2, RESTART_MAX_S)


def _stop(nodes) -> None:
    nodes = list(nodes)
    for node in nodes:
        if node.running:
            assert node.proc is not None
            os.killpg(node.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 12
    for node in nodes:
        p = node.proc
        if p is not None:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _say(f"node {node.node_id} did not stop in time; killing it")
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        node.close_log()
