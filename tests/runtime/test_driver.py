"""The driver in-process: a node's shell around its core, without sockets."""

from __future__ import annotations

import asyncio
import socket

import pytest
from polling import async_wait_until

from dsnode.config import load_config
from dsnode.core.paxos import statemachine
from dsnode.runtime.main import Node
from dsnode.wire.framing import FrameDecoder, pack_frame, unpack_payload


class FakeTransport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def get_write_buffer_size(self) -> int:
        return 0  # everything written is taken at once

    def get_extra_info(self, name: str):
        return ("127.0.0.1", 1)

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None:
        self.closed = True


async def _started_node(tmp_path, **settings) -> tuple[Node, asyncio.Task]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = load_config(
        {"node_id": "n1", "listen": f"127.0.0.1:{port}", "data_dir": str(tmp_path / "d"),
         "log_format": "json", "election_timeout_ms": "50", "partitions": "1",
         "heartbeat_interval_ms": "10",
         **settings},
        {},
    )
    node = Node(cfg)
    await node.start()
    task = asyncio.create_task(node.driver.run())
    await async_wait_until(lambda: 0 in node.core.groups and node.core.leader_of(0), 10,
                           "a leader")
    return node, task


def _connect(node: Node):
    conn = node.client_server.protocol_factory()
    transport = FakeTransport()
    conn.connection_made(transport)
    return conn, transport


async def _answers(transport: FakeTransport, n: int) -> list[dict]:
    def got() -> list[dict] | None:
        frames = FrameDecoder().feed(bytes(transport.out))
        return [unpack_payload(f) for f in frames] if len(frames) >= n else None

    return await async_wait_until(got, 10, f"{n} answers", interval=0.005)


async def test_snapshot_work_runs_in_steps_and_compacts(tmp_path):
    """Snapshots are encoded by the driver a piece per loop turn and then compact the log."""
    node, task = await _started_node(tmp_path, snapshot_interval_slots="3")
    conn, transport = _connect(node)
    for i in range(1, 21):
        conn.data_received(pack_frame({"id": i, "op": "put", "key": b"k%d" % i, "value": b"v"}))
        await _answers(transport, i)  # one slot per put
    assert all(a["ok"] for a in await _answers(transport, 20))
    await async_wait_until(lambda: node.core.groups[0].log.snap_index, 10, "a snapshot")
    node.driver.stop()
    await task
    await node.wal.close()


async def test_a_failing_snapshot_step_stops_the_driver_instead_of_hiding(tmp_path, monkeypatch):
    """A bug in snapshot encoding is ours (STYLE.md habit 5): the driver task ends with
    the error, so the node exits, rather than running on without ever compacting."""

    def broken_step(self, n, max_bytes=None):
        raise RuntimeError("encoder bug")

    monkeypatch.setattr(statemachine.DedupSnapshotWriter, "step", broken_step)
    node, task = await _started_node(tmp_path, snapshot_interval_slots="2")
    conn, transport = _connect(node)
    for i in range(1, 6):  # each put fills a slot of its own: the second one asks for a snapshot
        conn.data_received(pack_frame({"id": i, "op": "put", "key": b"k%d" % i, "value": b"v"}))
        await asyncio.wait([task], timeout=0.2)  # let the slot commit (or the driver fail)
        if task.done():
            break
    with pytest.raises(RuntimeError, match="encoder bug"):
        async with asyncio.timeout(10):
            await task
    await node.wal.close()


async def test_a_repeated_request_id_gets_the_first_answer_and_applies_once(tmp_path):
    """A node end to end: the retry of (client_id, seq) answers the first result (same
    version) under its own request id, the store's revision moved once, and answering
    it did not change the result the dedup table keeps (server.deliver copies)."""
    node, task = await _started_node(tmp_path)
    conn, transport = _connect(node)
    put = {"op": "put", "key": b"k", "value": b"v", "client_id": b"cl", "seq": 1}
    conn.data_received(pack_frame({"id": 1, **put}))
    (first,) = await _answers(transport, 1)
    conn.data_received(pack_frame({"id": 2, "op": "put", "key": b"j", "value": b"w"}))
    conn.data_received(pack_frame({"id": 3, **put, "value": b"other", "retry": True}))
    answers = {a["id"]: a for a in await _answers(transport, 3)}
    assert first == {"id": 1, "ok": True, "succeeded": True, "version": 1}
    assert answers[3] == {**first, "id": 3}
    sm = node.core.groups[0].sm
    assert sm.kv.revision == 2 and sm.kv.get(b"k") == (b"v", 1)
    assert sm.clients[b"cl"].results[1][1] == {"succeeded": True, "version": 1}
    conn.data_received(pack_frame({"id": 4, **put, "client_id": 5}))
    (bad,) = [a for a in await _answers(transport, 4) if a["id"] == 4]
    assert bad["error"]["code"] == "bad_request" and "client_id" in bad["error"]["message"]
    node.driver.stop()
    await task
    await node.wal.close()
