"""``dsnode bench``: pipelined load generation against dsnode and other stores.

Entry points: :func:`dsnode.bench.cli.bench_command` (click) and
:func:`dsnode.bench.runner.run_bench` (library).
"""

from __future__ import annotations

__all__ = ["BenchConfig", "run_bench"]


def __getattr__(name: str) -> object:
    if name in __all__:
        from dsnode.bench import runner

        return getattr(runner, name)
    raise AttributeError(name)
