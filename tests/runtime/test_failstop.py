"""Fail-stop, never a zombie (issue 7): every fatal error ends the node.

An InvariantBroken raised in a peer or client callback, a WAL append or fsync
error, a checkpoint failure and an exception in the ticker each end the
driver task with that error (so ``main.run`` logs one critical line and exits
with status 70); none of them merely closes a connection or kills a task
silently.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys

import pytest
from test_driver import _connect, _started_node

from dsnode.core.errors import InvariantBroken
from dsnode.runtime.main import EXIT_FAILED, fail_stop_handler
from dsnode.runtime.wal import WALFailedError
from dsnode.wire.framing import pack_frame

PUT = pack_frame({"id": 1, "op": "put", "key": b"k", "value": b"v"})


async def _ends_with(task: asyncio.Task, kind: type[BaseException], match: str) -> None:
    done, _ = await asyncio.wait([task], timeout=10)
    assert done, "the driver went on after a fatal error"
    with pytest.raises(kind, match=match):
        task.result()


async def test_wal_append_error_ends_the_node(tmp_path, monkeypatch):
    node, task = await _started_node(tmp_path)

    def broken_append(records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(node.wal, "append_many", broken_append)
    conn, _transport = _connect(node)
    conn.data_received(PUT)
    await _ends_with(task, OSError, "No space left")


async def test_fsync_error_ends_the_node(tmp_path, monkeypatch):
    node, task = await _started_node(tmp_path)

    async def broken_sync():
        raise WALFailedError("fsync failed: EIO")

    monkeypatch.setattr(node.wal, "sync", broken_sync)
    conn, _transport = _connect(node)
    conn.data_received(PUT)
    await _ends_with(task, WALFailedError, "EIO")


async def test_exception_in_the_ticker_ends_the_node(tmp_path, monkeypatch):
    node, task = await _started_node(tmp_path)

    def broken_tick(n=1):
        raise InvariantBroken("tick bug")

    monkeypatch.setattr(node.core, "tick", broken_tick)
    await _ends_with(task, InvariantBroken, "tick bug")


async def test_checkpoint_failure_ends_the_node(tmp_path, monkeypatch):
    node, task = await _started_node(tmp_path, snapshot_every_records="1")

    async def broken_snapshot(lsn, blob):
        raise OSError(5, "checkpoint write failed")

    monkeypatch.setattr(node.wal, "write_snapshot", broken_snapshot)
    conn, _transport = _connect(node)
    conn.data_received(PUT)
    await _ends_with(task, OSError, "checkpoint write failed")


async def test_invariant_broken_in_a_connection_callback_ends_the_node(tmp_path, monkeypatch):
    """asyncio would only log an exception from ``data_received`` and close that
    connection; the node's exception handler turns a broken invariant into fail-stop."""
    node, task = await _started_node(tmp_path)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(fail_stop_handler(node))

    def broken_propose(*args, **kwargs):
        raise InvariantBroken("own message rejected")

    monkeypatch.setattr(node.core, "propose", broken_propose)
    conn, _transport = _connect(node)
    loop.call_soon(conn.data_received, PUT)  # as the transport would call it
    await _ends_with(task, InvariantBroken, "own message rejected")


def test_a_failed_node_logs_one_critical_line_and_exits_70(tmp_path):
    """End to end in a real process: a broken invariant in the ticker after start-up
    (injected by a wrapper) is one critical line naming the cause, and status 70."""
    inject = (
        "import dsnode.core.paxos.node as n\n"
        "from dsnode.core.errors import InvariantBroken\n"
        "orig = n.PaxosNode.tick\n"
        "count = [0]\n"
        "def tick(self, n=1):\n"
        "    count[0] += 1\n"
        "    if count[0] > 30:\n"
        "        raise InvariantBroken('injected: slot chosen twice')\n"
        "    return orig(self, n)\n"
        "n.PaxosNode.tick = tick\n"
        "from dsnode.cli import main\n"
        "main()\n"
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    done = subprocess.run(
        [sys.executable, "-c", inject, "serve", "--node-id", "n1", "--listen", f"127.0.0.1:{port}",
         "--data-dir", str(tmp_path / "d"), "--log-format", "json"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == EXIT_FAILED, done.stderr[-2000:]
    out = done.stdout + done.stderr
    critical = [line for line in out.splitlines() if '"critical"' in line]
    assert len(critical) == 1, out[-3000:]
    assert "node_failed" in critical[0] and "slot chosen twice" in critical[0]
