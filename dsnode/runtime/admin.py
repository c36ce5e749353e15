"""The admin HTTP listener (setting ``metrics_listen``): ``/metrics``, ``/livez``, ``/readyz``,
``/status``.

Why a thread of its own
-----------------------
``/livez`` must fail when the node's event loop is stuck, and an HTTP server on that same loop
cannot answer at all then: the probe would only ever time out, indistinguishable from a dead
process or a dropped packet, and a scrape would wait behind a long loop turn. So the listener
runs an aiohttp server on a second event loop, in a daemon thread (``dsnode-admin``), and:

* ``/livez`` is answered in that thread from a heartbeat timestamp that the node's loop
  monitor (:meth:`NodeMetrics.loop_monitor`) refreshes every 100 ms: 200 while it is fresh,
  503 with the stall's length once it is older than ``livez_loop_stall_max_ms``. It never
  touches the node's loop, so a stuck loop gets a prompt, explicit failure.
* ``/metrics``, ``/readyz`` and ``/status`` need the node's state, which only its loop may
  read (one owner, no locks). The thread hands the read to that loop with
  ``call_soon_threadsafe`` and waits for it with a deadline (``ADMIN_CALL_TIMEOUT_S``); the
  loop does only the read (for ``/metrics``: building the metric families, well under a
  millisecond), and the encoding into the Prometheus text format, the JSON and the HTTP
  work happen in the admin thread. A loop that does not answer in time gets 503, never a
  hang.

The data path pays nothing while nobody scrapes, and one short callback per request when
someone does (measured by ``bench/metrics_overhead.py``).

Until TLS exists (the security issue), the listener binds loopback addresses only: the
configuration refuses anything else (``dsnode/config.py``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

from dsnode.runtime.logs import get_logger

log = get_logger("dsnode.admin")

T = TypeVar("T")

ADMIN_CALL_TIMEOUT_S = 2.0  # how long the admin thread waits for the node's event loop
START_TIMEOUT_S = 10.0


class AdminError(Exception):
    """The admin listener could not start; the message names the problem."""


class _Collected:
    """Metric families already collected on the node's loop, posing as a registry for the
    encoders (which only call ``collect()``)."""

    def __init__(self, families: list) -> None:
        self._families = families

    def collect(self) -> Iterable:
        return iter(self._families)


class AdminServer:
    """The admin listener of one node, in its own thread and event loop.

    ``ready`` returns ``(ready, reason)``; ``status`` the ``status`` op's body; both, and
    ``registry.collect()``, are called on ``node_loop``. ``heartbeat`` returns the
    ``time.monotonic()`` of the node loop's last turn as seen by its loop monitor.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        node_loop: asyncio.AbstractEventLoop,
        registry: CollectorRegistry,
        ready: Callable[[], tuple[bool, str]],
        status: Callable[[], dict],
        heartbeat: Callable[[], float],
        stall_max_s: float,
        call_timeout_s: float = ADMIN_CALL_TIMEOUT_S,
    ) -> None:
        self.host = host
        self.port = port
        self.node_loop = node_loop
        self.registry = registry
        self._ready = ready
        self._status = status
        self._heartbeat = heartbeat
        self.stall_max_s = stall_max_s
        self.call_timeout_s = call_timeout_s
        self.bound: tuple[str, int] | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started: concurrent.futures.Future[tuple[str, int]] = concurrent.futures.Future()

    # ------------------------------------------------------------ lifecycle (node loop side)
    async def start(self) -> tuple[str, int]:
        """Start the thread and return once it listens; raises :class:`AdminError`."""
        self._thread = threading.Thread(target=self._thread_main, name="dsnode-admin",
                                        daemon=True)
        self._thread.start()
        try:
            self.bound = await asyncio.wait_for(asyncio.wrap_future(self._started),
                                                START_TIMEOUT_S)
        except TimeoutError:
            raise AdminError("admin listener did not start in time") from None
        return self.bound

    async def close(self) -> None:
        """Stop listening and join the thread (bounded)."""
        loop, stop, thread = self._loop, self._stop, self._thread
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # its loop already ended
                pass
        if thread is not None:
            await asyncio.to_thread(thread.join, 5.0)

    # ------------------------------------------------------------ the thread
    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as e:  # reported to start() if it is still waiting
            if not self._started.done():
                self._started.set_exception(e)
            else:
                log.error("admin_listener_failed", error=repr(e))
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/status", self._status_handler)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port, reuse_address=True)
            try:
                await site.start()
            except OSError as e:
                reason = ("address already in use" if e.errno == errno.EADDRINUSE
                          else (e.strerror or str(e)))
                raise AdminError(f"cannot listen on {self.host}:{self.port}: {reason}") from None
            sock = runner.addresses[0]
            self._started.set_result((sock[0], sock[1]))
            await self._stop.wait()
        finally:
            await runner.cleanup()

    async def _on_node_loop(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the node's event loop; TimeoutError when it does not get to it."""
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            if not result.set_running_or_notify_cancel():
                return
            try:
                result.set_result(fn())
            except BaseException as e:
                result.set_exception(e)

        try:
            self.node_loop.call_soon_threadsafe(run)
        except RuntimeError:  # the node's loop is closed: the node is going away
            raise TimeoutError("node event loop is closed") from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(result), self.call_timeout_s)
        except TimeoutError:
            result.cancel()
            raise

    def _unresponsive(self) -> web.Response:
        return web.Response(
            status=503,
            text=f"event loop did not answer within {self.call_timeout_s:g}s\n",
        )

    # ------------------------------------------------------------ handlers (admin thread)
    async def _livez(self, request: web.Request) -> web.Response:
        stalled = time.monotonic() - self._heartbeat()
        if stalled > self.stall_max_s:
            return web.Response(
                status=503,
                text=f"event loop stalled for {stalled:.1f}s (bound {self.stall_max_s:g}s)\n",
            )
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        try:
            ready, reason = await self._on_node_loop(self._ready)
        except TimeoutError:
            return self._unresponsive()
        return web.Response(status=200 if ready else 503, text=reason + "\n")

    async def _status_handler(self, request: web.Request) -> web.Response:
        try:
            body = await self._on_node_loop(self._status)
        except TimeoutError:
            return self._unresponsive()
        return web.Response(text=json.dumps(body, default=_json_default) + "\n",
                            content_type="application/json")

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            families = await self._on_node_loop(lambda: list(self.registry.collect()))
        except TimeoutError:
            return self._unresponsive()
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        body = encoder(_Collected(families))  # type: ignore[arg-type]
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp


def _json_default(obj: Any) -> Any:
    """``status`` holds no bytes today; should one appear, show it rather than fail."""
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "backslashreplace")
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")
