"""Idempotent write retries on a real 3-node cluster (PROTOCOL.md, "Client request ids").

The client library attaches ``client_id``/``seq`` to every write and, when the
connection drops after the write was sent, sends the same id again on another
endpoint. These tests cut that connection mid-write and count: every write is
acknowledged once and took effect exactly once.

Counting: the store-wide revision advances by exactly one per applied write
(PROTOCOL.md, "Keys, values, versions"), and a put answers the revision it was
applied at. With only the test writing, a probe put before and after the load
brackets the number of writes that took effect; reading every key back shows
the version each write's (first) answer reported.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from cluster_harness import Cluster
from harness import ServerPool

from dsnode.client import Client
from dsnode.wire.framing import FrameDecoder, unpack_payload

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(120)]


def _ep(addr: tuple[str, int]) -> str:
    return f"{addr[0]}:{addr[1]}"


class AnswerEatingProxy:
    """A TCP proxy to one node that forwards everything, except that it swallows the
    answer to the ``eat``-th put and closes the client's connection instead: the
    write took effect, its answer never arrives."""

    def __init__(self, upstream: tuple[str, int], eat: int) -> None:
        self.upstream = upstream
        self.eat = eat
        self.puts: list[int] = []  # request ids of the puts seen, in order
        self.eaten: list[int] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def start(self) -> AnswerEatingProxy:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        await self._server.wait_closed()

    async def _on_conn(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        ur, uw = await asyncio.open_connection(*self.upstream)
        self._writers += [cw, uw]
        up = asyncio.create_task(self._to_server(cr, uw))
        try:
            await self._to_client(ur, cw)
        finally:
            up.cancel()
            cw.transport.abort()
            uw.transport.abort()

    async def _to_server(self, cr: asyncio.StreamReader, uw: asyncio.StreamWriter) -> None:
        dec = FrameDecoder()
        while data := await cr.read(65536):
            for payload in dec.feed(data):
                msg = unpack_payload(payload)
                if msg.get("op") == "put":
                    self.puts.append(msg["id"])
            uw.write(data)

    async def _to_client(self, ur: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        dec = FrameDecoder()
        while data := await ur.read(65536):
            frames = dec.feed(data)
            for payload in frames:
                rid = unpack_payload(payload).get("id")
                if len(self.puts) >= self.eat and rid == self.puts[self.eat - 1]:
                    self.eaten.append(rid)
                    return  # applied, answer lost: the connection goes down
            cw.write(data)  # whole chunks: the client's decoder joins split frames


async def _versions(c: Client, keys: list[bytes]) -> dict[bytes, int]:
    return {k: (await c.get(k)).version for k in keys}


async def test_write_whose_answer_is_lost_is_retried_on_another_node_and_applied_once(
    pool: ServerPool,
) -> None:
    """The connection to node X drops after X applied the 3rd put but before its answer
    arrived. The client sends the same (client_id, seq) again to node Y, gets the first
    answer (the same version), and the write took effect once."""
    cluster = Cluster(pool).start()
    leader = await cluster.async_wait_leader(cluster.running(), timeout=30)
    other = next(n for n in cluster.running() if n != leader)
    proxy = await AnswerEatingProxy(cluster.nodes[leader].addr, eat=3).start()
    try:
        endpoints = f"127.0.0.1:{proxy.port},{_ep(cluster.nodes[other].addr)}"
        # not ring-aware: every put must go through the proxy, not straight to the leader
        async with Client(endpoints, timeout=10.0, ring_aware=False) as c:
            answers = [(await c.put(b"k%d" % i, b"v%d" % i)).version for i in range(6)]
            assert proxy.eaten, "the proxy never cut the connection"
            assert c.write_retries == 1
            assert answers == list(range(answers[0], answers[0] + 6))  # one revision each
            probe = (await c.put(b"probe", b"p")).version
            assert probe == answers[-1] + 1  # nothing applied twice
            read = await _versions(c, [b"k%d" % i for i in range(6)])
            assert list(read.values()) == answers
    finally:
        await proxy.stop()


async def test_sigkill_of_the_node_a_pipelining_client_talks_to_applies_each_write_once(
    pool: ServerPool,
) -> None:
    """8 writers share one client connected to the leader and keep puts in flight;
    the leader is SIGKILLed mid-load. In-flight writes fail over with their ids to
    the survivors: every put is acknowledged, and the revision advanced by exactly
    the number of puts (each took effect once), each key showing its answer's version."""
    cluster = Cluster(pool).start()
    leader = await cluster.async_wait_leader(cluster.running(), timeout=30)
    order = [leader] + [n for n in cluster.running() if n != leader]
    endpoints = ",".join(_ep(cluster.nodes[n].addr) for n in order)
    answers: dict[bytes, int] = {}
    stop = asyncio.Event()

    async def writer(c: Client, w: int) -> None:
        i = 0
        while not stop.is_set():
            key = b"w%d/%d" % (w, i)
            answers[key] = (await c.put(key, b"x")).version
            i += 1

    async with Client(endpoints, timeout=15.0) as c:
        start = (await c.put(b"probe", b"start")).version
        tasks = [asyncio.create_task(writer(c, w)) for w in range(8)]
        try:
            await _until(lambda: len(answers) >= 200, 30)
            cluster.nodes[leader].send_signal(signal.SIGKILL)
            await asyncio.to_thread(cluster.nodes[leader].wait_exit, 10)
            killed_at = len(answers)
            await _until(lambda: len(answers) >= killed_at + 200, 30)
        finally:
            stop.set()
            results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors  # every write answered, none indeterminate
        assert c.write_retries > 0  # writes were in flight at the kill
        end = (await c.put(b"probe", b"end")).version
        assert end - start == len(answers) + 1, (start, end, len(answers))
        assert sorted(answers.values()) == list(range(start + 1, end))
        read = await _versions(c, sorted(answers))
        assert read == answers


async def _until(cond, timeout: float) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)  # polling a condition under a deadline
