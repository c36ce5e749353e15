"""Self-tests of the linearizability checker: it must accept linearizable
histories and reject known non-linearizable ones (Wing & Gong 1993;
Herlihy & Wing 1990 for the definition)."""

from __future__ import annotations

import pytest

from dsnode.sim.linearizability import HOp, check_history, check_ops


def put(call, ret, value, version, key=b"k", if_version=None, ok=True):
    result = (
        None
        if ret is None
        else (
            {"succeeded": True, "version": version}
            if ok
            else {"succeeded": False, "version": version}
        )
    )
    return HOp(call, ret, "put", key, value, if_version, result)


def get(call, ret, value, version, key=b"k"):
    return HOp(call, ret, "get", key, result={"value": value, "version": version})


def delete(call, ret, existed, version, key=b"k"):
    return HOp(
        call, ret, "delete", key, result={"succeeded": True, "existed": existed, "version": version}
    )


LINEARIZABLE = {
    "sequential": [put(1, 2, b"a", 1), get(3, 4, b"a", 1)],
    "concurrent read may see either": [put(1, 4, b"a", 1), get(2, 3, None, 0)],
    "concurrent read sees new": [put(1, 4, b"a", 1), get(2, 3, b"a", 1)],
    "overlapping writes in either order": [
        put(1, 5, b"a", 1),
        put(2, 6, b"b", 2),
        get(7, 8, b"b", 2),
    ],
    "indeterminate write that happened": [put(1, None, b"a", None), get(5, 6, b"a", 3)],
    "indeterminate write that did not": [put(1, None, b"a", None), get(5, 6, None, 0)],
    "cas success": [put(1, 2, b"a", 1), put(3, 4, b"b", 2, if_version=1)],
    "cas failure reports current": [put(1, 2, b"a", 1), put(3, 4, b"b", 1, if_version=7, ok=False)],
    "delete then absent": [put(1, 2, b"a", 1), delete(3, 4, True, 1), get(5, 6, None, 0)],
    "indeterminate cas resolved by later read": [
        put(1, 2, b"a", 4),
        put(3, None, b"b", None, if_version=4),
        get(5, 6, b"b", 9),
    ],
}

NOT_LINEARIZABLE = {
    "stale read after acknowledged write": [put(1, 2, b"a", 1), get(3, 4, None, 0)],
    "read of a value never written": [get(1, 2, b"zz", 1)],
    "reads go back in time": [
        put(1, 10, b"a", 1),
        get(2, 3, b"a", 1),
        get(4, 5, None, 0),
    ],
    "lost acknowledged write": [
        put(1, 2, b"a", 1),
        put(3, 4, b"b", 2),
        get(5, 6, b"a", 1),
    ],
    "version went backwards": [put(1, 2, b"a", 5), put(3, 4, b"b", 3)],
    "cas succeeded on wrong version": [put(1, 2, b"a", 1), put(3, 4, b"b", 2, if_version=0)],
    "indeterminate write seen then unseen": [
        put(1, None, b"a", None),
        get(2, 3, b"a", 4),
        get(4, 5, None, 0),
    ],
    "delete of absent key reports existed": [delete(1, 2, True, 1)],
}


@pytest.mark.parametrize("name", sorted(LINEARIZABLE))
def test_checker_accepts_linearizable_history(name):
    assert check_ops(LINEARIZABLE[name]).ok is True


@pytest.mark.parametrize("name", sorted(NOT_LINEARIZABLE))
def test_checker_rejects_non_linearizable_history(name):
    assert check_ops(NOT_LINEARIZABLE[name]).ok is False


def test_checker_is_per_key():
    h = [put(1, 2, b"a", 1, key=b"x"), get(3, 4, None, 0, key=b"y"), get(5, 6, b"a", 1, key=b"x")]
    assert check_history(h).ok is True
    bad = h + [get(7, 8, None, 0, key=b"x")]
    r = check_history(bad)
    assert r.ok is False and r.key == b"x"


def test_checker_handles_many_concurrent_ops_with_memoization():
    """30 fully concurrent writes then a read: 2^30 orders, solved via memo."""
    h = [put(i, 100 + i, b"v%d" % i, i + 1) for i in range(30)]
    h.append(get(200, 201, b"v29", 30))
    r = check_ops(h)
    assert r.ok is True
    assert r.steps < 100_000


def test_checker_reports_budget_exhaustion_as_inconclusive():
    h = [put(i, 100 + i, b"v%d" % i, i + 1) for i in range(12)]
    h.append(get(200, 201, b"nope", 99))
    assert check_ops(h, budget=10).ok is None
