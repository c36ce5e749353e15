"""No answer outgrows a client frame (issue 13).

A transaction's gets can ask for more than one frame holds. Under the default
limits the state machine refuses such a transaction before it does anything
(``too_large``); with a smaller ``max_frame_bytes`` the node still never sends
an oversized frame: the answer becomes an error naming the limit.
"""

from __future__ import annotations

import pytest
from harness import RawConn, ServerPool, assert_error, assert_ok

pytestmark = pytest.mark.cluster


async def test_answer_larger_than_the_frame_limit_becomes_an_error(pool: ServerPool) -> None:
    srv = pool.start("--max-frame-bytes", "1048576", "--max-value-bytes", "600000")
    async with await RawConn.open(srv.addr) as c:
        for key in (b"a", b"b"):
            assert_ok(await c.call("put", key=key, value=b"x" * 600_000))
        r = await c.call("txn", then=[{"op": "get", "key": b"a"}, {"op": "get", "key": b"b"}])
        # a txn is answered like a write: it may have taken effect
        assert_error(r, "internal", names="max_frame_bytes", indeterminate=True)
        # the connection is still good
        got = assert_ok(await c.call("get", key=b"a"))
        assert len(got["value"]) == 600_000


async def test_txn_reading_more_than_the_result_bound_has_no_effect(pool: ServerPool) -> None:
    srv = pool.start()
    async with await RawConn.open(srv.addr) as c:
        for i in range(5):
            assert_ok(await c.call("put", key=b"k%d" % i, value=b"x" * (1024 * 1024), timeout=20))
        subs = [{"op": "get", "key": b"k%d" % i} for i in range(5)]
        r = await c.call("txn", then=[*subs, {"op": "put", "key": b"w", "value": b"1"}], timeout=20)
        assert_error(r, "too_large", names="nothing done")
        assert assert_ok(await c.call("get", key=b"w"))["version"] == 0
