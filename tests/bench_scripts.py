"""Load a script from ``bench/`` as a module, so tests can call its pure functions."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def load_bench_script(name: str) -> Any:
    """``bench/NAME.py`` imported under the module name ``NAME``."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
