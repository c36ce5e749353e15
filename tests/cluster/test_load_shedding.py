"""Load shedding and deadlines when no leader can be reached.

PROTOCOL.md: `overloaded` is load shed before any effect (definite, retryable); the
server answers rather than nothing once a request's deadline passes (`unavailable` when it
never found a leader to send it to, else `timeout`), and says `indeterminate: false` only
when it knows the request had no effect.
"""

from __future__ import annotations

import pytest
from harness import RawConn, ServerPool, assert_error, free_port, sync_call, wait_until

pytestmark = pytest.mark.cluster


def _lonely_n1(pool: ServerPool, *extra: str):
    """n1 of a two-node cluster whose n2 never starts: it has no quorum, so no leader,
    and every linearizable request waits for one until its deadline."""
    p1, p2 = free_port(), free_port()
    n1 = pool.new("--peers", f"n1=127.0.0.1:{p1},n2=127.0.0.1:{p2}", *extra,
                  node_id="n1", port=p1)
    n1.spawn()

    def answers() -> dict | None:
        try:
            got = sync_call(n1.addr, [{"id": 1, "op": "status"}], timeout=1.0)[-1]
        except (OSError, TimeoutError, ValueError):
            return None
        return got if got.get("ok") else None

    st = wait_until(answers, 20.0, "n1 to answer status", n1.output_tail)
    assert st["ready"] is False
    return n1


async def test_requests_past_the_inflight_cap_are_shed_as_overloaded_and_definite(pool):
    """With inflight_requests_max requests waiting, the next ones get `overloaded`
    (retryable, definitely not applied); the waiting ones end in `unavailable` at their
    deadline, definite too because no leader ever saw them."""
    n1 = _lonely_n1(pool, "--inflight-requests-max", "8")
    async with await RawConn.open(n1.addr) as c:
        ids = c.send_many(
            {"op": "put", "key": b"k%d" % i, "value": b"v", "timeout_ms": 1500}
            for i in range(20)
        )
        await c.drain()
        answers = {}
        for _ in ids:
            a = await c.recv(timeout=10)
            answers[a["id"]] = a
    assert set(answers) == set(ids)
    shed = [answers[i] for i in ids[8:]]
    waited = [answers[i] for i in ids[:8]]
    for a in shed:
        assert_error(a, "overloaded", retryable=True, indeterminate=False)
    for a in waited:
        assert_error(a, "unavailable", retryable=True, indeterminate=False)
    # A status request is never shed: it does not count against the cap.
    st = sync_call(n1.addr, [{"id": 1, "op": "status"}], timeout=5)[-1]
    assert st["ok"] and st["inflight"] == 0
    # Nothing was applied: the cluster never formed (n2 never came), so no partition
    # exists here yet and even a stale read waits for the partition map, then fails
    # definitely at its deadline.
    got = sync_call(n1.addr, [{"id": 2, "op": "get", "key": b"k0", "consistency": "stale",
                               "timeout_ms": 300}], timeout=5)[-1]
    assert_error(got, "unavailable", retryable=True, indeterminate=False)
    assert st["revision"] == 0 and st["hosted"] == 0
