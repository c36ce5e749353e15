"""Linearizability checking, Wing & Gong search with memoization (as Porcupine).

A history is a list of ``HOp``: ``call`` and ``ret`` are positions in one
global event order (``ret is None``: the outcome is unknown, the op may or may
not have taken effect, at any point after its call). The search extends a
linearized prefix one op at a time: op ``o`` may come next if no op still
outside the prefix *must* precede it (returned before ``o`` was called).
Failed branches are memoized on (linearized-set bitset, model state). Ops
with an unknown outcome are optional. Histories are checked per key.

The per-key model follows PROTOCOL.md: a state is ``(value, version, exact)``;
``exact`` false means ``version`` is only a strict lower bound (after a put
whose outcome, hence new version, is unknown).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class HOp:
    """One client op. ``kind``: get | put | delete; ``result`` is None when unknown."""

    call: int
    ret: int | None
    kind: str
    key: Any
    value: Any = None
    if_version: int | None = None
    result: dict | None = None
    id: Any = None


@dataclass(slots=True)
class CheckResult:
    ok: bool | None  # None: gave up (search budget)
    key: Any = None
    detail: str = ""
    steps: int = 0


State = tuple  # (value, version, exact)
INIT: State = (None, 0, True)


def _match_version(state: State, v: int) -> State | None:
    """State with its version pinned to ``v``, or None if impossible."""
    value, ver, exact = state
    if exact:
        return state if ver == v else None
    return (value, v, True) if v > ver else None


def kv_step(state: State, op: HOp) -> list[State]:
    """Possible next states after ``op`` takes effect in ``state``."""
    value, ver, exact = state
    r = op.result
    if op.kind == "get":
        if r["value"] != value:
            return []
        s = _match_version(state, r["version"])
        return [s] if s is not None else []
    if op.kind == "put":
        if r is None:  # unknown outcome: if it happened, it succeeded
            if op.if_version is None:
                return [(op.value, ver, False)]
            s = _match_version(state, op.if_version)
            return [(op.value, op.if_version, False)] if s is not None else []
        if r["succeeded"]:
            if op.if_version is not None:
                s = _match_version(state, op.if_version)
                if s is None:
                    return []
            if r["version"] <= ver:
                return []
            return [(op.value, r["version"], True)]
        s = _match_version(state, r["version"])  # failed compare: current version
        if s is None or r["version"] == op.if_version:
            return []
        return [s]
    if op.kind == "delete":
        if r is None:
            if op.if_version is None:
                return [INIT]
            return [INIT] if _match_version(state, op.if_version) is not None else []
        if r["succeeded"]:
            if r["existed"] != (value is not None):
                return []
            if value is None:
                ok = r["version"] == 0 and op.if_version in (None, 0)
                return [INIT] if ok else []
            if _match_version(state, r["version"]) is None:
                return []
            if op.if_version is not None and op.if_version != r["version"]:
                return []
            return [INIT]
        s = _match_version(state, r["version"])
        if s is None or r["version"] == op.if_version:
            return []
        return [s]
    raise ValueError(f"unknown op kind {op.kind}")


def check_ops(
    ops: list[HOp],
    step: Callable[[State, HOp], list[State]] = kv_step,
    init: State = INIT,
    budget: int = 200_000,
) -> CheckResult:
    """Is this single-object history linearizable?"""
    n = len(ops)
    if n == 0:
        return CheckResult(True)
    ops = sorted(ops, key=lambda o: o.call)
    inf = float("inf")
    rets = [inf if o.ret is None else o.ret for o in ops]
    calls = [o.call for o in ops]
    must = 0
    for i, o in enumerate(ops):
        if o.ret is not None:
            must |= 1 << i
    failed: set[tuple[int, State]] = set()
    steps = 0

    def dfs(done: int, state: State) -> bool:
        nonlocal steps
        if done & must == must:
            return True
        if (done, state) in failed:
            return False
        steps += 1
        if steps > budget:
            raise _Budget
        # earliest return among ops not yet linearized bounds who may go next
        bound = inf
        for i in range(n):
            if not (done >> i) & 1 and rets[i] < bound:
                bound = rets[i]
        for i in range(n):
            if (done >> i) & 1:
                continue
            if calls[i] > bound:
                break
            for nxt in step(state, ops[i]):
                if dfs(done | (1 << i), nxt):
                    return True
        failed.add((done, state))
        return False

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 4 * n + 100))
    try:
        ok = dfs(0, init)
    except _Budget:
        return CheckResult(None, detail="search budget exhausted", steps=steps)
    finally:
        sys.setrecursionlimit(limit)
    return CheckResult(ok, detail="" if ok else "no linearization", steps=steps)


class _Budget(Exception):
    pass


def check_history(ops: Iterable[HOp], budget: int = 200_000) -> CheckResult:
    """Check a multi-key KV history key by key; the first failure wins."""
    by_key: dict[Any, list[HOp]] = {}
    for o in ops:
        by_key.setdefault(o.key, []).append(o)
    total = 0
    gave_up = None
    for key in sorted(by_key, key=repr):
        r = check_ops(by_key[key], budget=budget)
        total += r.steps
        if r.ok is False:
            r.key = key
            return r
        if r.ok is None:
            gave_up = key
    if gave_up is not None:
        return CheckResult(None, key=gave_up, detail="search budget exhausted", steps=total)
    return CheckResult(True, steps=total)
