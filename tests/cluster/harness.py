"""Real ``python -m dsnode serve`` processes on loopback, and a raw protocol client.

Everything here is bounded by explicit deadlines: waits poll a condition (the
process answering ``status``, the process having exited) until a deadline and
fail with the node's captured stderr, never sleep a fixed time and hope.

* :class:`ServerProcess` starts one node in its own process group on a free
  loopback port with its own data directory, captures stdout/stderr to a file,
  and sends it signals (SIGKILL, SIGTERM, SIGINT, SIGSTOP, SIGCONT) or restarts
  it with the same port, data directory and flags.
* :class:`ServerPool` owns every process a test starts; its :meth:`close`
  (called from fixture finalizers, and at interpreter exit as a last resort)
  kills each process group, even when the test failed.
* :class:`RawConn` speaks PROTOCOL.md directly (framing + msgpack), so these
  tests depend only on the wire contract, not on ``dsnode.client``.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import os
import random
import signal
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from polling import POLL_S, WaitTimeout, wait_until  # noqa: F401 (re-exported)

from dsnode.wire.framing import FrameDecoder, encode_frame, pack_frame, unpack_payload

START_TIMEOUT_S = 20.0  # python start-up + imports + WAL recovery, on a loaded 2-core box
EXIT_TIMEOUT_S = 15.0
IO_TIMEOUT_S = 10.0
# A one-node cluster elects itself after one election timeout: keep its start-ups short.
# (Applied only to nodes started without --peers; multi-node clusters keep the defaults.)
FAST_ELECTION = ("--election-timeout-ms", "100", "--heartbeat-interval-ms", "20")


# A harness wait failed; the message carries the node's captured output.
HarnessError = WaitTimeout


# ---------------------------------------------------------------- ports
SINGLE_GROUP_ENV = {"DSNODE_PARTITIONS": "1", "DSNODE_REPLICATION": "16",
                    "DSNODE_PREFER_RING_LEADERS": "false"}


def _ephemeral_range() -> tuple[int, int]:
    try:
        lo, hi = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(lo), int(hi)
    except (OSError, ValueError):
        return 32768, 60999


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_port() -> int:
    """A loopback TCP port nobody uses right now.

    Picked below the kernel's ephemeral range when possible: a port from that range can be
    taken as the local end of some unrelated outgoing connection while a node is down
    between a kill and its restart, and the restart would then fail to bind.
    """
    lo, _ = _ephemeral_range()
    rng = random.SystemRandom()
    if lo > 11000:
        for _ in range(50):
            port = rng.randrange(10000, lo)
            if _bindable(port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- sync one-shot calls
def sync_call(
    addr: tuple[str, int], requests: Sequence[dict], timeout: float = 2.0
) -> list[dict]:
    """Open a connection, send ``requests`` (each with an id), return their answers by id order.

    Used for readiness polling, where no event loop may be running.
    """
    deadline = time.monotonic() + timeout
    with socket.create_connection(addr, timeout=timeout) as s:
        s.sendall(b"".join(pack_frame(r) for r in requests))
        decoder = FrameDecoder()
        want = {r["id"] for r in requests}
        got: dict[int, dict] = {}
        while want - set(got):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer")
            s.settimeout(left)
            data = s.recv(65536)
            if not data:
                raise ConnectionError("closed by server")
            for payload in decoder.feed(data):
                obj = unpack_payload(payload)
                assert isinstance(obj, dict)
                got[obj["id"]] = obj
        return [got[r["id"]] for r in requests]


# ---------------------------------------------------------------- processes
class ServerProcess:
    """One ``dsnode serve`` process; restartable with the same port, data dir and flags."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        *,
        node_id: str | None = "n1",
        port: int | None = None,
        args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        auth_token: str | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        self.node_id = node_id
        self.port = port if port is not None else free_port()
        self.extra_args = list(args)
        self.env = dict(env or {})
        self.auth_token = auth_token
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self._log_file: Any = None

    # ------------------------------------------------------------ launching
    @property
    def addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @property
    def name(self) -> str:
        return f"{self.node_id or 'node'}@{self.port}"

    @property
    def listen(self) -> str:
        return f"127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "dsnode", "serve"]
        if self.node_id is not None:  # None: leave it to the environment or config file
            argv += ["--node-id", self.node_id]
        argv += [
            "--listen", self.listen,
            "--data-dir", str(self.data_dir),
            "--log-format", "json",
        ]
        if self.auth_token is not None:
            argv += ["--auth-token", self.auth_token]
        return argv + self.extra_args

    def spawn(self) -> ServerProcess:
        """Start the process (own process group, output to ``log_path``); do not wait."""
        if self.running:
            raise HarnessError(f"{self.name} is already running (pid {self.proc.pid})")
        self._close_log()
        self.starts += 1
        self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in _close_log
        self._log_file.write(f"==== start #{self.starts}: {' '.join(self.argv())}\n".encode())
        self._log_file.flush()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DSNODE_")}
        env.pop("NOTIFY_SOCKET", None)
        # Tests of one group's protocol (leases, catch-up, failover, restarts) run one
        # partition on every node, the whole keyspace in one group as before the ring,
        # whose leader stays put until it fails (their scenarios pick a leader to hurt);
        # tests of partitioning set DSNODE_PARTITIONS and the others themselves.
        env.update(SINGLE_GROUP_ENV)
        env.update(self.env)
        self.proc = subprocess.Popen(
            self.argv(),
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            env=env,
            start_new_session=True,  # own process group: killpg reaches every child
        )
        _LIVE.add(self)
        return self

    def start(self, timeout: float = START_TIMEOUT_S) -> ServerProcess:
        self.spawn()
        self.wait_ready(timeout)
        return self

    def restart(self, timeout: float = START_TIMEOUT_S) -> ServerProcess:
        """Start again with the same port, data directory and flags (after it exited)."""
        if self.running:
            raise HarnessError(f"restart of {self.name} while it still runs")
        return self.start(timeout)

    def _status_ok(self) -> dict | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise HarnessError(
                f"{self.name} exited with status {self.proc.returncode} before it was ready"
                + self.output_tail()
            )
        reqs: list[dict] = []
        if self.auth_token is not None:
            reqs.append({"id": 1, "op": "hello", "token": self.auth_token})
        reqs.append({"id": 2, "op": "status"})
        try:
            answer = sync_call(self.addr, reqs, timeout=1.0)[-1]
        except (OSError, TimeoutError, ValueError):
            return None
        if answer.get("ok") and answer.get("ready"):
            return answer
        return None

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> dict:
        """Wait until the node accepts connections and ``status`` says ready."""
        return wait_until(self._status_ok, timeout, f"{self.name} to answer status ready",
                          self.output_tail)

    # ------------------------------------------------------------ signals
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the node's whole process group."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def kill(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        """SIGKILL (no chance to flush) and reap."""
        self.send_signal(signal.SIGKILL)
        return self.wait_exit(timeout)

    def terminate(self, sig: int = signal.SIGTERM, timeout: float = EXIT_TIMEOUT_S) -> int:
        self.send_signal(sig)
        return self.wait_exit(timeout)

    def pause(self) -> None:
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.send_signal(signal.SIGCONT)

    def wait_exit(self, timeout: float = EXIT_TIMEOUT_S) -> int:
        """Wait for the process to exit; returns its status (negative: killed by a signal)."""
        assert self.proc is not None
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise HarnessError(
                f"{self.name} (pid {self.proc.pid}) did not exit within {timeout:.1f}s"
                + self.output_tail()
            ) from None
        self._close_log()
        return rc

    # ------------------------------------------------------------ output
    def output(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def last_run_output(self) -> str:
        """What the most recent start wrote (stdout and stderr together)."""
        text = self.output()
        marker = f"==== start #{self.starts}:"
        idx = text.rfind(marker)
        if idx < 0:
            return text
        return text[idx:].split("\n", 1)[1] if "\n" in text[idx:] else ""

    def output_tail(self, lines: int = 40) -> str:
        tail = "\n".join(self.output().splitlines()[-lines:])
        return f"\n--- {self.name} output ({self.log_path}) ---\n{tail}"

    # ------------------------------------------------------------ cleanup
    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def cleanup(self) -> None:
        """Kill the process group and reap; idempotent, safe on a stopped process."""
        if self.proc is not None:
            if self.proc.poll() is None:
                # SIGCONT first: a SIGSTOPped group still dies on SIGKILL, but be explicit.
                self.send_signal(signal.SIGCONT)
            self.send_signal(signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(EXIT_TIMEOUT_S)
        self._close_log()
        _LIVE.discard(self)


_LIVE: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:  # pragma: no cover - only if a finalizer never ran
    for srv in list(_LIVE):
        srv.cleanup()


class ServerPool:
    """Factory for the servers of one test (or module); :meth:`close` kills them all."""

    def __init__(self, base: Path) -> None:
        self.base = Path(base)
        self.servers: list[ServerProcess] = []
        self._n = itertools.count(1)

    def new(
        self,
        *args: str,
        node_id: str | None = "n1",
        data_dir: Path | None = None,
        port: int | None = None,
        env: dict[str, str] | None = None,
        auth_token: str | None = None,
    ) -> ServerProcess:
        """A not-yet-started server with its own data dir and log file under ``base``.

        ``args`` are extra flags. Without ``--peers`` (a one-node cluster) they come after
        :data:`FAST_ELECTION`, so a test can still override those timings.
        """
        n = next(self._n)
        srv = ServerProcess(
            data_dir if data_dir is not None else self.base / f"data{n}",
            self.base / f"server{n}.log",
            node_id=node_id,
            port=port,
            args=args if "--peers" in args else (*FAST_ELECTION, *args),
            env=env,
            auth_token=auth_token,
        )
        self.servers.append(srv)
        return srv

    def start(self, *args: str, **kw: Any) -> ServerProcess:
        return self.new(*args, **kw).start()

    def run_to_exit(
        self, *args: str, timeout: float = START_TIMEOUT_S, **kw: Any
    ) -> tuple[int, str]:
        """Start a server that is expected to exit by itself; return (status, its output)."""
        srv = self.new(*args, **kw)
        srv.spawn()
        rc = srv.wait_exit(timeout)
        return rc, srv.last_run_output()

    def close(self) -> None:
        for srv in self.servers:
            srv.cleanup()


# ---------------------------------------------------------------- raw async client
class ConnectionClosed(Exception):
    """The server closed the connection (EOF or reset)."""


class RawConn:
    """One TCP connection speaking PROTOCOL.md frames, with no client-library logic.

    ``send`` writes a request without waiting; ``recv`` returns the next answer
    (any id); ``call`` sends one request and waits for the answer with its id,
    keeping answers to other ids for later ``recv`` calls.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.decoder = FrameDecoder()
        self.buffered: list[dict] = []
        self._ids = itertools.count(1)
        self.eof = False

    @classmethod
    async def open(cls, addr: tuple[str, int], timeout: float = IO_TIMEOUT_S) -> RawConn:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(*addr)
        return cls(reader, writer)

    def next_id(self) -> int:
        return next(self._ids)

    # ------------------------------------------------------------ sending
    def send_bytes(self, data: bytes) -> None:
        self.writer.write(data)

    def send(self, req: dict) -> int:
        """Queue one request (``id`` assigned if absent); returns its id."""
        if "id" not in req:
            req = {"id": self.next_id(), **req}
        self.writer.write(pack_frame(req))
        return req["id"]

    def send_many(self, reqs: Iterable[dict]) -> list[int]:
        ids = []
        chunks = []
        for req in reqs:
            if "id" not in req:
                req = {"id": self.next_id(), **req}
            ids.append(req["id"])
            chunks.append(pack_frame(req))
        self.writer.write(b"".join(chunks))
        return ids

    async def drain(self) -> None:
        await self.writer.drain()

    # ------------------------------------------------------------ receiving
    async def _read_more(self) -> None:
        try:
            data = await self.reader.read(1 << 16)
        except (ConnectionResetError, BrokenPipeError) as e:
            self.eof = True
            raise ConnectionClosed(str(e)) from None
        if not data:
            self.eof = True
            raise ConnectionClosed("EOF")
        for payload in self.decoder.feed(data):
            obj = unpack_payload(payload)
            assert isinstance(obj, dict), f"server sent a non-map frame: {obj!r}"
            self.buffered.append(obj)

    async def recv(self, timeout: float = IO_TIMEOUT_S) -> dict:
        """The next answer from the server, whatever its id."""
        async with asyncio.timeout(timeout):
            while not self.buffered:
                await self._read_more()
        return self.buffered.pop(0)

    async def recv_id(self, rid: int, timeout: float = IO_TIMEOUT_S) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                for i, obj in enumerate(self.buffered):
                    if obj.get("id") == rid:
                        return self.buffered.pop(i)
                await self._read_more()

    async def call(self, op: str, timeout: float = IO_TIMEOUT_S, **fields: Any) -> dict:
        rid = self.send({"op": op, **fields})
        return await self.recv_id(rid, timeout)

    async def request(self, req: dict, timeout: float = IO_TIMEOUT_S) -> dict:
        rid = self.send(req)
        return await self.recv_id(rid, timeout)

    async def wait_closed_by_server(self, timeout: float = IO_TIMEOUT_S) -> list[dict]:
        """Read until the server closes the connection; returns answers seen before EOF."""
        seen: list[dict] = []
        async with asyncio.timeout(timeout):
            while True:
                seen.extend(self.buffered)
                self.buffered.clear()
                try:
                    await self._read_more()
                except ConnectionClosed:
                    seen.extend(self.buffered)
                    self.buffered.clear()
                    return seen

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError, ConnectionError, TimeoutError):
            async with asyncio.timeout(2):
                await self.writer.wait_closed()

    async def __aenter__(self) -> RawConn:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def raw_frame(payload: bytes) -> bytes:
    """A frame with a correct length prefix around arbitrary payload bytes."""
    return encode_frame(payload)


# ---------------------------------------------------------------- assertions
def assert_ok(resp: dict) -> dict:
    assert resp.get("ok") is True, f"expected success, got {resp!r}"
    return resp


def assert_error(
    resp: dict,
    code: str,
    *,
    rid: int | None = None,
    names: str | None = None,
    retryable: bool = False,
    indeterminate: bool = False,
) -> dict:
    """Check a failure answer's full shape (PROTOCOL.md "Requests and responses")."""
    assert resp.get("ok") is False, f"expected {code}, got {resp!r}"
    if rid is not None:
        assert resp["id"] == rid, resp
    err = resp["error"]
    assert set(err) >= {"code", "message", "retryable", "indeterminate"}, err
    assert err["code"] == code, resp
    assert isinstance(err["message"], str) and err["message"], resp
    assert err["retryable"] is retryable, resp
    assert err["indeterminate"] is indeterminate, resp
    if names is not None:
        assert names in err["message"], f"message should name {names!r}: {err['message']!r}"
    return err


def single_error_line(output: str) -> str:
    """A start-up failure prints one line on stderr: the output minus JSON log lines must
    be exactly one ``dsnode: ...`` line, with no traceback. Returns that line."""
    lines = [ln for ln in output.splitlines() if ln.strip() and not ln.startswith("{")]
    assert "Traceback" not in output, output
    assert len(lines) == 1, f"expected one line on stderr, got:\n{output}"
    assert lines[0].startswith("dsnode: "), lines[0]
    return lines[0]
