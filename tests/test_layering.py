"""dsnode/core is pure: no clock, sockets, files, threads, processes, logging or
module-level randomness (STYLE.md: "core imports nothing with side effects"), and it
never imports the shells that drive it (dsnode.runtime, dsnode.sim).

``import random`` is allowed for the ``random.Random`` type only: every use of
the module must be ``random.Random``; instances arrive seeded from outside.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[1] / "dsnode" / "core"
BANNED = {
    "time",
    "asyncio",
    "socket",
    "os",
    "threading",
    "subprocess",
    "multiprocessing",
    "selectors",
    "signal",
    "uvloop",
    "datetime",
    "secrets",
    "uuid",
    "shutil",
    "io",
    "pathlib",
    "logging",
}
# the shells that drive the core: the core never reaches back into them
BANNED_PACKAGES = ("dsnode.runtime", "dsnode.sim")


def _core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def _violations(source: str) -> list[str]:
    tree = ast.parse(source)
    bad = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in BANNED:
                    bad.append(f"import {alias.name}")
                if alias.name.startswith(BANNED_PACKAGES):
                    bad.append(f"import {alias.name} (a shell)")
        elif isinstance(node, ast.ImportFrom) and node.module:
            root = node.module.split(".")[0]
            if root in BANNED:
                bad.append(f"from {node.module} import ...")
            if node.module.startswith(BANNED_PACKAGES):
                bad.append(f"from {node.module} import ... (a shell)")
            if root == "random" and any(a.name != "Random" for a in node.names):
                bad.append("from random import <module-level function>")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and (
            node.func.id == "open"
        ):
            bad.append("open() (files belong to the shell)")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "random"
            and node.attr != "Random"
        ):
            bad.append(f"random.{node.attr} (module-global randomness)")
    return bad


def test_core_has_files():
    assert len(_core_files()) >= 5


@pytest.mark.parametrize("path", _core_files(), ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_imports_nothing_with_side_effects(path: Path):
    assert _violations(path.read_text()) == []


@pytest.mark.parametrize(
    "source",
    [
        "import time",
        "import os.path",
        "from asyncio import sleep",
        "import random\nx = random.random()",
        "from random import randint",
        "import threading",
        "import pathlib",
        "import logging",
        "from dsnode.runtime.wal import WriteAheadLog",
        "from dsnode.sim.world import SimWorld",
        "with open('x') as f: pass",
    ],
)
def test_layering_check_rejects_banned_source(source: str):
    assert _violations(source)


def test_layering_check_allows_random_type():
    assert _violations("import random\ndef f(rng: random.Random): return rng.random()") == []
