"""`dsnode local-cluster`: N real `dsnode serve` processes on loopback, for trying dsnode out.

Data lives under one folder (``<data-dir>/<node id>``), so running the
command again restarts the same cluster with its data. Ctrl-C (or SIGTERM)
stops every node gracefully; a node that dies on its own is reported and the
others are stopped too, so nothing is left running behind the user's back.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import click


def _node_command(node_id: str, port: int, peers: str, data_dir: Path, extra: tuple[str, ...]):
    return [
        sys.executable, "-m", "dsnode", "serve",
        "--node-id", node_id,
        "--listen", f"127.0.0.1:{port}",
        "--peers", peers,
        "--data-dir", str(data_dir / node_id),
        *extra,
    ]


@click.command("local-cluster", context_settings={"ignore_unknown_options": True})
@click.option("--nodes", type=click.IntRange(1, 9), default=3, show_default=True)
@click.option("--base-port", type=click.IntRange(1024, 65000), default=7379, show_default=True,
              help="node i listens on base-port + i - 1")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("dsnode-data"), show_default=True)
@click.argument("serve_args", nargs=-1, type=click.UNPROCESSED)
def local_cluster_command(nodes: int, base_port: int, data_dir: Path,
                          serve_args: tuple[str, ...]) -> None:
    """Start a local cluster of NODES processes on 127.0.0.1; Ctrl-C stops it.

    Extra arguments go to every `dsnode serve` (for example --fsync false).
    """
    ids = [f"n{i}" for i in range(1, nodes + 1)]
    ports = {nid: base_port + i for i, nid in enumerate(ids)}
    peers = ",".join(f"{nid}=127.0.0.1:{ports[nid]}" for nid in ids)
    data_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen] = {}
    stopping = False

    def stop_all(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop_all)
    signal.signal(signal.SIGTERM, stop_all)
    for nid in ids:
        log_path = data_dir / f"{nid}.log"
        log_file = open(log_path, "ab")
        procs[nid] = subprocess.Popen(
            _node_command(nid, ports[nid], peers, data_dir, serve_args),
            stdout=log_file, stderr=log_file, start_new_session=True,
        )
    endpoints = ",".join(f"127.0.0.1:{ports[n]}" for n in ids)
    click.echo(f"dsnode: {nodes}-node cluster starting; data and logs in {data_dir}/", err=True)
    click.echo("  talk to it (any node works; requests go to the leader):", err=True)
    click.echo(f"    export DSNODE_ENDPOINTS={endpoints}", err=True)
    click.echo("    dsnode put hello world && dsnode get hello && dsnode status", err=True)
    click.echo("  Ctrl-C stops every node.", err=True)
    exit_code = 0
    while not stopping:
        for nid, p in procs.items():
            if p.poll() is not None:
                click.echo(f"dsnode: node {nid} exited with status {p.returncode}; "
                           f"see {data_dir}/{nid}.log; stopping the others", err=True)
                stopping = True
                exit_code = 1
                break
        else:
            time.sleep(0.2)  # supervising loop of an interactive command, not test synchronisation
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 12
    for nid, p in procs.items():
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            click.echo(f"dsnode: node {nid} did not stop in time; killing it", err=True)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    click.echo("dsnode: cluster stopped", err=True)
    sys.exit(exit_code)
