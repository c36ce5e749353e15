"""The one poll-until-deadline helper every test waits with (tests/polling.py)."""

from __future__ import annotations

import itertools

import pytest
from polling import GiveUp, WaitTimeout, async_wait_until, wait_until


def test_returns_the_first_truthy_value():
    n = itertools.count()
    assert wait_until(lambda: next(n) >= 3 and "done", 5, "three polls", interval=0) == "done"


def test_times_out_naming_what_and_the_diagnosis_and_the_last_error():
    def cond():
        raise OSError("refused")

    with pytest.raises(WaitTimeout, match=r"waiting for the port; last error: refused; ports"):
        wait_until(cond, 0.05, "the port", lambda: "; ports: none", interval=0.01,
                   retry_on=(OSError,))


def test_an_unlisted_error_and_give_up_stop_at_once():
    with pytest.raises(ValueError):
        wait_until(lambda: int("x"), 5, "never")
    with pytest.raises(GiveUp):
        wait_until(lambda: (_ for _ in ()).throw(GiveUp("crash loop")), 5, "never")


async def test_async_form_takes_plain_and_awaitable_conditions():
    n = itertools.count()

    async def later():
        return next(n) >= 2

    assert await async_wait_until(later, 5, "two polls", interval=0) is True
    assert await async_wait_until(lambda: 7, 5, "a value") == 7
    with pytest.raises(WaitTimeout, match="nothing"):
        await async_wait_until(lambda: None, 0.03, "nothing", interval=0.01)
