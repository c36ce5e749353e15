"""systemd's sd_notify(3) protocol in a few lines, with no dependency.

Under a ``Type=notify`` unit, systemd sets ``NOTIFY_SOCKET`` to an AF_UNIX datagram socket (a
path, or an abstract name written with a leading ``@``) and waits for ``READY=1`` before it
counts the service as started; ``STOPPING=1`` says a stop is under way, ``STATUS=...`` shows in
``systemctl status``, and ``WATCHDOG=1`` pets the watchdog when the unit sets ``WatchdogSec=``
(systemd then passes ``WATCHDOG_USEC`` and ``WATCHDOG_PID``).

Outside systemd (no ``NOTIFY_SOCKET``) every call is a cheap no-op returning False, so the
server calls these unconditionally. Sending never blocks and never raises: a full or vanished
socket only makes ``notify`` return False.

How the server uses it (dsnode/runtime/main.py)::

    watchdog = asyncio.create_task(sdnotify.watchdog_loop())  # returns at once if no watchdog
    sdnotify.notify("READY=1\\nSTATUS=serving on HOST:PORT")   # recovered and listening
    ...
    sdnotify.notify("STOPPING=1\\nSTATUS=shutting down")        # first thing on SIGTERM
    watchdog.cancel()
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Mapping

__all__ = [
    "notify",
    "ready",
    "stopping",
    "status",
    "watchdog_ping",
    "watchdog_interval",
    "watchdog_loop",
]


def _address(env: Mapping[str, str]) -> str | None:
    """``$NOTIFY_SOCKET`` as an address for ``socket.connect``, or None when unusable."""
    path = env.get("NOTIFY_SOCKET", "")
    if path.startswith("@"):
        return "\0" + path[1:]  # abstract namespace (Linux)
    if path.startswith("/"):
        return path
    return None  # unset, empty, or a transport we do not speak (e.g. vsock:)


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send one datagram of newline-separated ``KEY=VALUE`` assignments to systemd.

    Returns True when the datagram was handed to the socket, False when there is no
    ``NOTIFY_SOCKET`` or sending failed.
    """
    addr = _address(os.environ if env is None else env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.setblocking(False)
            sock.connect(addr)
            sock.send(message.encode("utf-8"))
    except OSError:
        return False
    return True


def ready(status_text: str | None = None) -> bool:
    """The node has recovered and is listening: ``READY=1`` (plus ``STATUS=`` if given)."""
    return notify("READY=1" + (f"\nSTATUS={status_text}" if status_text else ""))


def stopping(status_text: str | None = None) -> bool:
    """A graceful stop has begun: ``STOPPING=1`` (plus ``STATUS=`` if given)."""
    return notify("STOPPING=1" + (f"\nSTATUS={status_text}" if status_text else ""))


def status(text: str) -> bool:
    """Free-form one-line status shown by ``systemctl status``."""
    return notify(f"STATUS={text}")


def watchdog_ping() -> bool:
    return notify("WATCHDOG=1")


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """The watchdog timeout in seconds, or None when this process has no watchdog.

    None when ``WATCHDOG_USEC`` is unset or not a positive integer, or when ``WATCHDOG_PID``
    is set and names another process (the variables were inherited, not meant for us).
    """
    env = os.environ if env is None else env
    usec_text = env.get("WATCHDOG_USEC", "")
    if not usec_text.isdigit() or int(usec_text) <= 0:
        return None
    pid_text = env.get("WATCHDOG_PID", "")
    if pid_text and (not pid_text.isdigit() or int(pid_text) != os.getpid()):
        return None
    return int(usec_text) / 1_000_000


async def watchdog_loop(
    is_alive: Callable[[], bool] | None = None, env: Mapping[str, str] | None = None
) -> None:
    """Send ``WATCHDOG=1`` every half watchdog interval while ``is_alive()`` holds.

    Returns at once when there is no watchdog, so it can always be started as a task. Because
    it runs on the event loop, a stalled loop stops the pings and systemd restarts the node.
    Skipping a ping when ``is_alive`` says False lets a wedged core be caught the same way.
    Cancel the task to stop it.
    """
    interval = watchdog_interval(env)
    if interval is None:
        return
    while True:
        if is_alive is None or is_alive():
            notify("WATCHDOG=1", env)
        await asyncio.sleep(interval / 2)
