"""Per-connection and per-node caps an unauthenticated client cannot exceed (issue 11, part 5).

A slow-loris client, a client that never reads, a flood of connections and a half frame
followed by silence are each answered or closed cleanly, counted in ``status``, and leave the
node serving everyone else.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from harness import ConnectionClosed, RawConn, ServerPool, ServerProcess, sync_call
from polling import async_wait_until

from dsnode.wire.framing import HEADER, pack_frame

pytestmark = pytest.mark.cluster

CAPS = (
    "--handshake-timeout-ms", "600",
    "--idle-timeout-ms", "1000",
    "--pending-connections-max", "16",
    "--max-connections", "64",
    "--max-frame-bytes", "65536",
    "--connection-buffer-bytes-max", "131072",
)


@pytest.fixture
def node(pool: ServerPool) -> ServerProcess:
    return pool.start(*CAPS)


def limits(srv: ServerProcess) -> dict:
    return sync_call(srv.addr, [{"id": 1, "op": "status"}])[0]["limits"]


def serves(srv: ServerProcess, key: bytes = b"probe") -> bool:
    got = sync_call(srv.addr, [{"id": 1, "op": "put", "key": key, "value": b"v"},
                               {"id": 2, "op": "get", "key": key}], timeout=5)
    return got[0]["ok"] and got[1]["value"] == b"v"


async def closed_within(conn: RawConn, seconds: float) -> dict | None:
    """Wait for the server to close ``conn``; returns its last (id 0) answer, if any."""
    last = None
    async with asyncio.timeout(seconds):
        try:
            while True:
                last = await conn.recv(timeout=seconds)
        except ConnectionClosed:
            return last


async def test_slow_loris_is_closed_at_the_first_frame_deadline(node: ServerProcess) -> None:
    conn = await RawConn.open(node.addr)
    frame = pack_frame({"id": 1, "op": "get", "key": b"k" * 200})
    start = time.monotonic()
    for b in frame[:-1]:  # one byte at a time, never finishing the frame
        if conn.writer.is_closing() or conn.reader.at_eof():
            break
        try:
            conn.send_bytes(bytes([b]))
        except (RuntimeError, ConnectionError):
            break  # closed by the server under our feet
        await asyncio.sleep(0.05)
    last = await closed_within(conn, 5)
    # (The id-0 answer may be lost: writing after the server closed draws a reset, which
    # discards what was not yet read.)
    assert last is None or last["error"]["code"] == "timeout"
    assert time.monotonic() - start < 5
    assert serves(node)
    assert limits(node)["first_frame_timeouts"] >= 1


async def test_half_frame_then_silence_before_and_after_the_first_request(
    node: ServerProcess,
) -> None:
    first = await RawConn.open(node.addr)
    first.send_bytes(pack_frame({"id": 1, "op": "get", "key": b"k"})[:7])
    later = await RawConn.open(node.addr)
    assert (await later.call("status"))["ok"]
    later.send_bytes(HEADER.pack(100) + b"\x81")  # a half frame, then nothing
    assert serves(node)
    assert (await closed_within(first, 5))["error"]["code"] == "timeout"
    last = await closed_within(later, 5)
    assert last is not None and "idle" in last["error"]["message"]
    got = limits(node)
    assert got["first_frame_timeouts"] >= 1 and got["idle_closed"] >= 1


async def test_client_that_never_reads_is_cut_off_at_the_buffer_cap(node: ServerProcess) -> None:
    big = b"x" * 60_000
    assert sync_call(node.addr, [{"id": 1, "op": "put", "key": b"big", "value": big}])[0]["ok"]
    sock = socket.create_connection(node.addr)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    request = pack_frame({"id": 1, "op": "get", "key": b"big"})
    loop = asyncio.get_running_loop()
    try:
        sent = 0
        for _ in range(3000):  # ~180 MB of answers asked for, none read
            try:
                await asyncio.wait_for(loop.sock_sendall(sock, request), 2)
            except (TimeoutError, OSError):
                break  # the server stopped reading or closed us: either is the cap working
            sent += 1
        assert serves(node, b"other")

        def overflowed() -> bool:
            return limits(node)["buffer_overflows"] >= 1

        await async_wait_until(overflowed, 10, f"an overflow counted after {sent} requests",
                               interval=0.05)
    finally:
        sock.close()


async def test_connection_flood_leaves_room_for_real_clients(node: ServerProcess) -> None:
    flood = [socket.create_connection(node.addr) for _ in range(80)]
    try:
        # The newest connection gets a slot: the oldest silent ones were dropped.
        assert serves(node)
        got = limits(node)
        assert got["pending_evicted"] + got["connections_refused"] >= 1
        assert got["pending_connections"] <= 16
    finally:
        for s in flood:
            s.close()


async def test_requests_before_hello_are_capped(pool: ServerPool) -> None:
    srv = pool.start(*CAPS, "--unauthenticated-requests-max", "3", "--max-frame-bytes", "1048576",
                     "--connection-buffer-bytes-max", "2097152", auth_token="secret")
    conn = await RawConn.open(srv.addr)
    for _ in range(3):
        ans = await conn.call("get", key=b"k")
        assert ans["error"]["code"] == "unauthenticated"
    conn.send({"op": "get", "key": b"k"})
    last = await closed_within(conn, 5)
    assert last is not None and last["id"] == 0 and "too many" in last["error"]["message"]
    # A frame larger than a hello needs is refused before authentication.
    conn = await RawConn.open(srv.addr)
    conn.send_bytes(HEADER.pack(100_000) + b"\x00" * 100)  # fine once authenticated
    last = await closed_within(conn, 5)
    assert last is not None and last["error"]["code"] == "too_large"
    got = sync_call(srv.addr, [{"id": 1, "op": "hello", "token": "secret"},
                               {"id": 2, "op": "status"}])
    assert got[1]["limits"]["unauthenticated_closed"] >= 1
