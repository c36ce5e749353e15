"""Fixtures shared by the multi-process tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ServerPool


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[ServerPool]:
    """The servers one test starts; every process group is killed afterwards, pass or fail."""
    p = ServerPool(tmp_path)
    try:
        yield p
    finally:
        p.close()
