"""A tiny in-process dsnode server for client and CLI tests.

It speaks the real framing (dsnode.wire.framing) and answers from an in-memory dict with the
PROTOCOL.md semantics of get/put/delete/txn/status/hello. Each request is handled in its own
task, so answers may come back out of order. Tests steer it with ``hook``: an async function
``(req, conn) -> response | None``; returning ``None`` falls through to the KV behaviour,
``DROP`` aborts the connection, ``SILENT`` never answers.

Writes with a request id (``client_id``, ``seq``) are applied once and a repeat gets the
first answer (PROTOCOL.md, "Client request ids"); ``applied`` counts how often each id was
applied. ``refuse_ids=True`` answers them like a server older than request ids.

The partition map: ``ring`` (None: the server has no ``ring`` op and answers
``unknown_op``, like an older one) is the ``ring`` op's answer (PROTOCOL.md). While it is
set, a keyed request reaching a node that is not its partition's leader (for a stale get:
not one of its replicas) is answered with ``forwarded: true``, as a node that sent it on
would. ``fake_cluster`` starts several servers sharing one store and one map.
"""

from __future__ import annotations

import asyncio
import ssl as _ssl
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from dsnode.core.ring.hashing import partition_of
from dsnode.wire.errors import error_response
from dsnode.wire.framing import FrameDecoder, pack_frame, unpack_payload

DROP = object()
SILENT = object()

Hook = Callable[[dict[str, Any], "FakeConn"], Awaitable[Any]]


def ok(req: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"id": req["id"], "ok": True, **fields}


def err(req: dict[str, Any], code: str, message: str = "", indeterminate: bool = False) -> dict:
    return error_response(req["id"], code, message or code, indeterminate=indeterminate)


class FakeConn:
    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self.writer = writer
        self.requests: list[dict[str, Any]] = []

    def send(self, msg: dict[str, Any]) -> None:
        if not self.writer.is_closing():
            self.writer.write(pack_frame(msg))


class FakeServer:
    """Start with ``await start()``; ``port``, ``requests`` (all, in arrival order), ``conns``."""

    def __init__(
        self, hook: Hook | None = None, token: str | None = None, node_id: str = "n1",
        ssl: _ssl.SSLContext | None = None,
    ) -> None:
        self.hook = hook
        self.token = token
        self.ssl = ssl  # a server context: TLS on
        self.node_id = node_id
        self.ring: dict[str, Any] | None = None
        self.data: dict[bytes, tuple[bytes, int]] = {}
        self.versions: dict[bytes, int] = {}
        self.requests: list[dict[str, Any]] = []
        self.conns: list[FakeConn] = []
        self.received = asyncio.Condition()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        self.applied: dict[tuple[bytes, int], int] = {}  # (client_id, seq) -> times applied
        self._first: dict[tuple[bytes, int], dict[str, Any]] = {}
        self.refuse_ids = False

    async def start(self) -> FakeServer:
        self._server = await asyncio.start_server(self._on_conn, "127.0.0.1", 0, ssl=self.ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for c in self.conns:
            c.writer.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        if self._server is not None:
            await asyncio.wait_for(self._server.wait_closed(), 2)

    async def wait_requests(self, n: int, op: str | None = None) -> None:
        """Block until at least ``n`` requests (of ``op``, if given) have arrived."""

        def enough() -> bool:
            return sum(1 for r in self.requests if op is None or r.get("op") == op) >= n

        async with self.received:
            await self.received.wait_for(enough)

    async def wait_conns(self, n: int) -> None:
        """Block until at least ``n`` connections have been accepted."""
        async with self.received:
            await self.received.wait_for(lambda: len(self.conns) >= n)

    def drop_all(self) -> None:
        for c in self.conns:
            c.writer.transport.abort()

    async def _on_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = FakeConn(writer)
        self.conns.append(conn)
        async with self.received:
            self.received.notify_all()
        decoder = FrameDecoder()
        try:
            while data := await reader.read(65536):
                for payload in decoder.feed(data):
                    req = unpack_payload(payload)
                    assert isinstance(req, dict)
                    conn.requests.append(req)
                    self.requests.append(req)
                    async with self.received:
                        self.received.notify_all()
                    task = asyncio.create_task(self._serve(conn, req))
                    self._tasks.add(task)
                    task.add_done_callback(self._tasks.discard)
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.abort()

    async def _serve(self, conn: FakeConn, req: dict[str, Any]) -> None:
        resp = await self.hook(req, conn) if self.hook is not None else None
        if resp is None:
            resp = self.answer(req, conn)
            if self._forwards(req):
                resp = {**resp, "forwarded": True}
        if resp is DROP:
            conn.writer.transport.abort()
        elif resp is not SILENT:
            conn.send(resp)

    def _forwards(self, req: dict[str, Any]) -> bool:
        """Whether a node of the ring would have sent ``req`` on to another node."""
        ring = self.ring
        op = req.get("op")
        if ring is None or op not in ("get", "put", "delete", "txn"):
            return False
        if op == "txn":
            keys = [x["key"] for part in ("if", "then", "else") for x in req.get(part, [])]
            if not keys:
                return False
            key = keys[0]
        else:
            key = req["key"]
        part = ring["map"][partition_of(_b(key), ring["partitions"])]
        if req.get("consistency") == "stale":
            return self.node_id not in part["replicas"]
        return part["leader"] != self.node_id

    # -- the in-memory KV (single node, trivially strictly serializable)

    def answer(self, req: dict[str, Any], conn: FakeConn) -> dict[str, Any]:
        op = req.get("op")
        if self.token is not None and op != "hello":
            hellos = [r for r in conn.requests if r.get("op") == "hello"]
            if not hellos or hellos[0].get("token") != self.token:
                return err(req, "unauthenticated", "send hello with a valid token first")
        if op == "hello":
            if self.token is not None and req.get("token") != self.token:
                return err(req, "unauthenticated", "bad token")
            return ok(req, node_id="n1", cluster_id="c1", protocol=1, server_version="fake")
        if op == "ring" and self.ring is not None:
            return ok(req, **self.ring)
        if op == "status":
            return ok(
                req,
                node_id=self.node_id,
                cluster_id="c1",
                ready=True,
                members=[{"node_id": "n1", "addr": "127.0.0.1:1", "state": "alive"}],
                partitions=[{"id": 0, "replicas": ["n1"], "leader": "n1"}],
            )
        if op == "get":
            value, version = self.data.get(_b(req["key"]), (None, 0))
            return ok(req, value=value, version=version)
        if op in ("put", "delete", "txn") and ("client_id" in req or "seq" in req):
            if self.refuse_ids:
                return err(req, "bad_request", f"unknown field 'client_id' for op {op!r}")
            rid = (_b(req["client_id"]), req["seq"])
            first = self._first.get(rid)
            if first is None:
                self.applied[rid] = self.applied.get(rid, 0) + 1
                first = self._first[rid] = self._write_op(req, op)
            return {**first, "id": req["id"]}
        if op in ("put", "delete", "txn"):
            return self._write_op(req, op)
        return err(req, "unknown_op", f"unknown op {op!r}")

    def _write_op(self, req: dict[str, Any], op: str) -> dict[str, Any]:
        if op == "put":
            key = _b(req["key"])
            cur = self.data.get(key, (None, 0))[1]
            if "if_version" in req and req["if_version"] != cur:
                return ok(req, succeeded=False, version=cur)
            return ok(req, succeeded=True, version=self._write(key, _b(req["value"])))
        if op == "delete":
            key = _b(req["key"])
            cur = self.data.get(key, (None, 0))[1]
            if "if_version" in req and req["if_version"] != cur:
                return ok(req, succeeded=False, existed=cur > 0, version=cur)
            self.data.pop(key, None)
            return ok(req, succeeded=True, existed=cur > 0, version=cur)
        holds = all(
            self.data.get(_b(c["key"]), (None, 0))[1] == c["version"] for c in req.get("if", [])
        )
        branch = req.get("then", []) if holds else req.get("else", [])
        snapshot = dict(self.data)
        results: list[dict[str, Any]] = []
        for sub in branch:
            key = _b(sub["key"])
            if sub["op"] == "get":
                value, version = snapshot.get(key, (None, 0))
                results.append({"value": value, "version": version})
            elif sub["op"] == "put":
                results.append({"version": self._write(key, _b(sub["value"]))})
            else:
                results.append({"existed": self.data.pop(key, None) is not None})
        return ok(req, succeeded=holds, results=results)

    def _write(self, key: bytes, value: bytes) -> int:
        version = self.versions.get(key, 0) + 1
        self.versions[key] = version
        self.data[key] = (value, version)
        return version


def ring_map(
    servers: list[FakeServer], partitions: int, replication: int, epoch: int = 1
) -> dict[str, Any]:
    """A ``ring`` answer for ``servers``: partition ``p`` on servers ``p``, ``p + 1``, ...
    (mod N), the first its leader."""
    n = len(servers)
    return {
        "partitions": partitions,
        "replication": replication,
        "epoch": epoch,
        "members": [{"node_id": s.node_id, "addr": s.endpoint} for s in servers],
        "map": [
            {
                "id": p,
                "replicas": [servers[(p + i) % n].node_id for i in range(replication)],
                "leader": servers[p % n].node_id,
            }
            for p in range(partitions)
        ],
    }


async def fake_cluster(
    n: int, partitions: int = 8, replication: int = 3, token: str | None = None,
    ssl: _ssl.SSLContext | None = None,
) -> list[FakeServer]:
    """``n`` servers ``n0``, ``n1``, ... sharing one store (any node serves any key, as
    in the real cluster) and one map (``ring_map``; mutate ``servers[0].ring`` to change
    it for all). Stop each when done."""
    servers = [await FakeServer(token=token, node_id=f"n{i}", ssl=ssl).start()
               for i in range(n)]
    ring = ring_map(servers, partitions, min(replication, n))
    first = servers[0]
    for s in servers:
        s.ring = ring
        s.data, s.versions, s.applied, s._first = (
            first.data, first.versions, first.applied, first._first
        )
    return servers


def _b(x: Any) -> bytes:
    return x.encode() if isinstance(x, str) else bytes(x)


class ThreadedFakeServer:
    """Runs a FakeServer on its own event loop in a daemon thread (for sync/CLI tests).

    ``with ThreadedFakeServer() as srv: ... srv.endpoint ...``; ``srv.server`` is the
    FakeServer (touch it only through ``call``, which runs a function on its loop).
    """

    def __init__(self, hook: Hook | None = None, token: str | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._hook = hook
        self._token = token
        self.server: FakeServer

    def __enter__(self) -> ThreadedFakeServer:
        self._thread.start()

        async def make() -> FakeServer:
            return await FakeServer(self._hook, self._token).start()

        self.server = asyncio.run_coroutine_threadsafe(make(), self._loop).result(5)
        return self

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    def call(self, fn: Callable[[], Any]) -> Any:
        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(5)

    def __exit__(self, *exc_info: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()
