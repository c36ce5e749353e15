"""sd_notify: the datagrams systemd would see, received on a test AF_UNIX socket.

The unit tests drive ``dsnode.runtime.sdnotify`` directly. The end-to-end test starts
``python -m dsnode serve`` with ``NOTIFY_SOCKET`` pointing at a temp socket, the way systemd
starts a ``Type=notify`` unit, and checks the order the unit relies on: READY=1 only once the
port accepts connections, STOPPING=1 after SIGTERM, then exit 0 within the 10 s of PROTOCOL.md.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dsnode.runtime import sdnotify

REPO = Path(__file__).resolve().parents[2]


class NotifyListener:
    """A bound AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.env_value}

    def receive(self, timeout: float = 5.0) -> str:
        """The next datagram; fails the test when none arrives within ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode("utf-8")
        except TimeoutError:
            pytest.fail(f"no sd_notify datagram within {timeout}s")

    def receive_until(self, assignment: str, timeout: float) -> list[str]:
        """Datagrams up to and including the first that contains the line ``assignment``."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"{assignment!r} not received within {timeout}s; got {seen!r}")
            message = self.receive(remaining)
            seen.append(message)
            if assignment in message.split("\n"):
                return seen


@pytest.fixture
def path_listener(tmp_path: Path) -> Iterator[NotifyListener]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    try:
        yield NotifyListener(sock, str(path))
    finally:
        sock.close()


@pytest.fixture
def abstract_listener() -> Iterator[NotifyListener]:
    name = f"dsnode-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        yield NotifyListener(sock, "@" + name)
    finally:
        sock.close()


# ---------------------------------------------------------------- unit: notify and helpers


def test_notify_delivers_message_to_path_socket(path_listener: NotifyListener) -> None:
    """One call is one datagram holding the message bytes unchanged."""
    assert sdnotify.notify("READY=1\nSTATUS=serving", path_listener.env) is True
    assert path_listener.receive() == "READY=1\nSTATUS=serving"


def test_notify_delivers_message_to_abstract_socket(abstract_listener: NotifyListener) -> None:
    """A NOTIFY_SOCKET starting with '@' names a socket in the abstract namespace."""
    assert sdnotify.notify("STOPPING=1", abstract_listener.env) is True
    assert abstract_listener.receive() == "STOPPING=1"


@pytest.mark.parametrize("value", [None, "", "relative/notify.sock", "vsock:2:1234"])
def test_notify_without_usable_socket_is_a_noop(value: str | None) -> None:
    """Outside systemd the server calls notify unconditionally; it must neither raise nor send."""
    env = {} if value is None else {"NOTIFY_SOCKET": value}
    assert sdnotify.notify("READY=1", env) is False


def test_notify_to_missing_socket_returns_false(tmp_path: Path) -> None:
    """A socket that went away (systemd restarted) is not an error for the node."""
    assert sdnotify.notify("READY=1", {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}) is False


def test_ready_and_stopping_use_process_environment(
    path_listener: NotifyListener, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    assert sdnotify.ready("serving on 127.0.0.1:7379")
    assert path_listener.receive() == "READY=1\nSTATUS=serving on 127.0.0.1:7379"
    assert sdnotify.status("compacting")
    assert path_listener.receive() == "STATUS=compacting"
    assert sdnotify.stopping()
    assert path_listener.receive() == "STOPPING=1"
    assert sdnotify.watchdog_ping()
    assert path_listener.receive() == "WATCHDOG=1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": "x"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ],
)
def test_watchdog_interval_only_for_this_process(
    env: dict[str, str], expected: float | None
) -> None:
    """WATCHDOG_PID naming another process means the variables were inherited, not ours."""
    assert sdnotify.watchdog_interval(env) == expected


async def test_watchdog_loop_pings_at_half_interval(path_listener: NotifyListener) -> None:
    env = {**path_listener.env, "WATCHDOG_USEC": "100000"}  # 0.1 s: a ping every 0.05 s
    task = asyncio.create_task(sdnotify.watchdog_loop(env=env))
    try:
        started = time.monotonic()
        for _ in range(3):
            message = await asyncio.to_thread(path_listener.receive, 2.0)
            assert message == "WATCHDOG=1"
        # Three pings take two half-intervals; far less than one interval would mean no pacing.
        assert time.monotonic() - started >= 0.09
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_skips_pings_while_not_alive(path_listener: NotifyListener) -> None:
    env = {**path_listener.env, "WATCHDOG_USEC": "40000"}
    alive = asyncio.Event()
    task = asyncio.create_task(sdnotify.watchdog_loop(is_alive=alive.is_set, env=env))
    try:
        path_listener.sock.setblocking(False)
        await asyncio.sleep(0.1)  # five would-be ping periods: the absence of pings is the point
        with pytest.raises(BlockingIOError):
            path_listener.sock.recv(4096)
        alive.set()
        assert await asyncio.to_thread(path_listener.receive, 2.0) == "WATCHDOG=1"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watchdog_loop_returns_without_watchdog() -> None:
    await asyncio.wait_for(sdnotify.watchdog_loop(env={}), timeout=1.0)


# ---------------------------------------------------------------- end to end: dsnode serve


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_available() -> bool:
    try:
        from dsnode.runtime import main as _main  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(not _serve_available(), reason="dsnode serve (dsnode/runtime/main.py) missing")
def test_serve_sends_ready_after_listening_and_stopping_on_sigterm(
    tmp_path: Path, path_listener: NotifyListener
) -> None:
    """The Type=notify contract: READY=1 once the port accepts, STOPPING=1 on SIGTERM, exit 0."""
    port = _free_port()
    env = {
        **os.environ,
        **path_listener.env,
        "WATCHDOG_USEC": "200000",  # as WatchdogSec=0.2s would; PID unset means "this process"
        "PYTHONPATH": str(REPO),
    }
    cmd = [
        sys.executable, "-m", "dsnode", "serve",
        "--node-id", "n1", "--listen", f"127.0.0.1:{port}",
        "--data-dir", str(tmp_path / "data"), "--log-format", "json",
    ]  # fmt: skip
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        messages = path_listener.receive_until("READY=1", timeout=30)
        assert all("STOPPING=1" not in m for m in messages)
        # READY=1 is sent only after the listener is bound: a connect must succeed right now.
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            pass
        assert proc.poll() is None

        # The server pets the watchdog when systemd asks for one.
        path_listener.receive_until("WATCHDOG=1", timeout=5)

        proc.send_signal(signal.SIGTERM)
        path_listener.receive_until("STOPPING=1", timeout=10)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        # Captured by pytest and shown only when the test fails.
        print((tmp_path / "serve.log").read_text(errors="replace")[-4000:])
