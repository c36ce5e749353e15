"""The sole owner of a NodeCore: inputs in, Ready out, effects carried out in order.

Everything here runs on the event loop thread. Client connections call
:meth:`Driver.submit`; once per loop turn :meth:`Driver._flush` drains the
core's ``Ready``: log records are appended to the WAL, and replies wait until
the WAL is durable up to the last record appended before them (effects.py
contract). A single flusher task runs the fsyncs: while one fsync is in
flight, later batches accumulate and share the next one (group commit).
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dsnode.core.commands import Command
from dsnode.core.effects import Reply
from dsnode.runtime.logs import get_logger
from dsnode.wire.errors import TIMEOUT

if TYPE_CHECKING:
    from dsnode.core.node import NodeCore
    from dsnode.runtime.wal import WriteAheadLog

log = get_logger("dsnode.driver")


class Pending:
    """One client request in flight. ``done`` guards against answering twice."""

    __slots__ = ("conn", "rid", "write", "done")

    def __init__(self, conn: Any, rid: int, write: bool) -> None:
        self.conn = conn
        self.rid = rid
        self.write = write
        self.done = False


Deliver = Callable[[list[Reply]], None]


class Driver:
    def __init__(
        self,
        core: NodeCore,
        wal: WriteAheadLog,
        deliver: Deliver,
        *,
        snapshot_every_records: int,
        tick_seconds: float,
    ) -> None:
        self.core = core
        self.wal = wal
        self._deliver = deliver
        self._loop = asyncio.get_running_loop()
        self._flush_scheduled = False
        self._waiting: collections.deque[tuple[int, list[Reply]]] = collections.deque()
        self._kick = asyncio.Event()
        self._snapshot_every = snapshot_every_records
        self._snapshot_task: asyncio.Task | None = None
        self._tick_seconds = tick_seconds
        self._tick = 0
        # timer wheel: tick -> requests whose deadline is that tick
        self._deadlines: dict[int, list[Pending]] = collections.defaultdict(list)
        self._fatal: BaseException | None = None
        self.stopped = asyncio.Event()

    # ------------------------------------------------------------ inputs
    def submit(self, pending: Pending, cmd: Command, timeout_s: float) -> None:
        self.core.submit(pending, cmd)
        self._deadlines[self._tick + max(1, int(timeout_s / self._tick_seconds) + 1)].append(pending)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    @property
    def unsynced(self) -> int:
        return self.wal.last_lsn - self.wal.durable_lsn

    # ------------------------------------------------------------ effects
    def _flush(self) -> None:
        self._flush_scheduled = False
        ready = self.core.ready()
        if ready.persist:
            self.wal.append_many(ready.persist)
        if not ready.reply:
            return
        lsn = self.wal.last_lsn
        if lsn <= self.wal.durable_lsn and not self._waiting:
            self._deliver(ready.reply)
        else:
            self._waiting.append((lsn, ready.reply))
            self._kick.set()
        if (
            self.core.records_since_snapshot >= self._snapshot_every
            and self._snapshot_task is None
        ):
            self._start_snapshot()

    async def run(self) -> None:
        """The flusher and the ticker; returns when :meth:`stop` is called."""
        ticker = asyncio.create_task(self._ticker())
        try:
            await self._flusher()
        finally:
            ticker.cancel()
            try:
                await ticker
            except asyncio.CancelledError:
                if asyncio.current_task().cancelling():  # type: ignore[union-attr]
                    raise

    async def _flusher(self) -> None:
        waiting = self._waiting
        while True:
            await self._kick.wait()
            self._kick.clear()
            if not waiting:
                if self.stopped.is_set():
                    return
                continue
            await self.wal.sync()
            durable = self.wal.durable_lsn
            while waiting and waiting[0][0] <= durable:
                self._deliver(waiting.popleft()[1])
            if waiting:
                self._kick.set()

    def stop(self) -> None:
        self.stopped.set()
        self._kick.set()

    async def drain(self) -> None:
        """Flush what the core has and wait until every held reply is released."""
        self._flush()
        while self._waiting:
            await self.wal.sync()
            durable = self.wal.durable_lsn
            while self._waiting and self._waiting[0][0] <= durable:
                self._deliver(self._waiting.popleft()[1])
        if self._snapshot_task is not None:
            await self._snapshot_task

    # ------------------------------------------------------------ snapshots
    def _start_snapshot(self) -> None:
        blob = self.core.snapshot()
        lsn = self.wal.last_lsn
        self._snapshot_task = asyncio.create_task(self._write_snapshot(lsn, blob))

    async def _write_snapshot(self, lsn: int, blob: bytes) -> None:
        try:
            await self.wal.write_snapshot(lsn, blob)
            log.info("snapshot_written", lsn=lsn, bytes=len(blob))
        finally:
            self._snapshot_task = None

    # ------------------------------------------------------------ time
    async def _ticker(self) -> None:
        loop = self._loop
        next_at = loop.time()
        while True:
            next_at += self._tick_seconds
            delay = next_at - loop.time()
            if delay < -10 * self._tick_seconds:
                log.warning("event_loop_behind", seconds=round(-delay, 3))
                next_at = loop.time()
                delay = 0
            await asyncio.sleep(max(0.0, delay))
            self._tick += 1
            expired = self._deadlines.pop(self._tick, None)
            if expired:
                self._expire(expired)

    def _expire(self, expired: list[Pending]) -> None:
        out = []
        for p in expired:
            if not p.done:
                out.append(
                    Reply(
                        p,
                        error=(
                            TIMEOUT,
                            "request deadline passed before it completed",
                            p.write,
                        ),
                    )
                )
        if out:
            self._deliver(out)
