"""The one way tests wait: poll a condition until it holds or a deadline passes.

Never sleep for a fixed time to let something happen; ask for the condition.
``wait_until`` blocks the thread (subprocesses, containers); ``async_wait_until``
yields to the event loop between polls so tasks under test keep running. Both
return the condition's first truthy value (``async_wait_until`` also takes a
condition that returns an awaitable) and raise ``WaitTimeout`` (an
AssertionError naming what was awaited, plus ``on_fail()``'s diagnosis) after
``timeout`` seconds. A condition that raises ``GiveUp`` fails at once; one that
raises an exception listed in ``retry_on`` counts as "not yet" (the last such
error is reported on timeout).
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any

POLL_S = 0.02


class WaitTimeout(AssertionError):
    pass


class GiveUp(AssertionError):
    """Raised by a condition to stop waiting at once (a crash-looping container, say)."""


def _probe(cond: Callable[[], Any], retry_on: tuple[type[BaseException], ...]):
    try:
        return cond(), None
    except GiveUp:
        raise
    except retry_on as e:
        return None, e


class _Wait:
    """One wait's bookkeeping, shared by the blocking and the async form."""

    def __init__(self, timeout: float, what: str, on_fail: Callable[[], str] | None,
                 retry_on: tuple[type[BaseException], ...]) -> None:
        self.deadline = time.monotonic() + timeout
        self.timeout, self.what, self.on_fail, self.retry_on = timeout, what, on_fail, retry_on

    def over(self, last: BaseException | None) -> bool:
        """False while there is time left; raises WaitTimeout once there is none."""
        if time.monotonic() < self.deadline:
            return False
        detail = f"; last error: {last}" if last is not None else ""
        extra = self.on_fail() if self.on_fail is not None else ""
        raise WaitTimeout(
            f"timed out after {self.timeout:.1f}s waiting for {self.what}{detail}{extra}"
        )


def wait_until(
    cond: Callable[[], Any],
    timeout: float,
    what: str,
    on_fail: Callable[[], str] | None = None,
    *,
    interval: float = POLL_S,
    retry_on: tuple[type[BaseException], ...] = (),
) -> Any:
    w = _Wait(timeout, what, on_fail, retry_on)
    while True:
        value, last = _probe(cond, retry_on)
        if value:
            return value
        w.over(last)
        time.sleep(interval)


async def async_wait_until(
    cond: Callable[[], Any],
    timeout: float,
    what: str,
    on_fail: Callable[[], str] | None = None,
    *,
    interval: float = POLL_S,
    retry_on: tuple[type[BaseException], ...] = (),
) -> Any:
    w = _Wait(timeout, what, on_fail, retry_on)
    while True:
        value, last = _probe(cond, retry_on)
        if inspect.isawaitable(value):
            value, last = await _await(value, retry_on)
        if value:
            return value
        w.over(last)
        await asyncio.sleep(interval)


async def _await(aw, retry_on: tuple[type[BaseException], ...]):
    try:
        return await aw, None
    except GiveUp:
        raise
    except retry_on as e:
        return None, e
