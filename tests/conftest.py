"""Suite-wide test set-up.

* ``--seed N`` (default 1, or ``random``): the base of every random choice tests
  make. The ``seed`` fixture derives a per-test seed from it and the test's id,
  so a test sees the same numbers whatever else runs; the header prints the
  base seed to reproduce a run.
* Async tests run on uvloop, as the server does, through pytest-asyncio's
  ``pytest_asyncio_loop_factories`` hook (the non-deprecated way since 1.x; a
  deeper conftest, e.g. tests/client, may return its own set of factories).
"""

from __future__ import annotations

import asyncio
import random
import zlib
from collections.abc import Callable, Mapping

import pytest
import uvloop

DEFAULT_SEED = 1


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--seed",
        action="store",
        default=str(DEFAULT_SEED),
        help="base seed for randomized tests: an integer, or 'random' (default %(default)s)",
    )


def pytest_configure(config: pytest.Config) -> None:
    raw = config.getoption("--seed")
    if raw == "random":
        base = random.SystemRandom().randrange(1 << 32)
    else:
        try:
            base = int(raw, 0)
        except ValueError:
            raise pytest.UsageError(f"--seed must be an integer or 'random', not {raw!r}") from None
    config.stash[_SEED_KEY] = base


_SEED_KEY = pytest.StashKey[int]()


def pytest_report_header(config: pytest.Config) -> str:
    return f"dsnode test seed: --seed {config.stash[_SEED_KEY]}"


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's seed: the base ``--seed`` mixed with the test's node id."""
    base = request.config.stash[_SEED_KEY]
    return (base * 1_000_003 + zlib.crc32(request.node.nodeid.encode())) & 0xFFFFFFFF


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    if report.failed and "seed" in getattr(item, "fixturenames", ()):
        base = item.config.stash[_SEED_KEY]
        report.sections.append(("seed", f"reproduce with: pytest '{item.nodeid}' --seed {base}"))


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop}

