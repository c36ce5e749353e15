"""Metrics and the admin listener in-process: a real node on this test's event loop, its
client connections driven through fake transports, its admin endpoints over real HTTP from
another thread (the admin listener calls into this loop, so this loop must stay free)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request

import pytest
from polling import async_wait_until
from prometheus_client.parser import text_string_to_metric_families
from test_driver import _answers, _connect

from dsnode.config import load_config
from dsnode.runtime.main import Node, StartupError
from dsnode.runtime.metrics import Histogram, op_label, quantile
from dsnode.wire.framing import pack_frame


# ---------------------------------------------------------------- pure parts
def test_histogram_buckets_are_cumulative_and_le_inclusive() -> None:
    """Prometheus buckets count observations <= le; +Inf holds everything."""
    h = Histogram((0.1, 1.0))
    for v in (0.05, 0.1, 0.5, 1.0, 3.0):
        h.observe(v)
    assert h.buckets() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.sum == pytest.approx(4.65)


@pytest.mark.parametrize("bounds", [(), (1.0, 0.5), (1.0, 1.0)])
def test_histogram_rejects_bounds_that_are_not_increasing(bounds) -> None:
    with pytest.raises(ValueError, match="increasing"):
        Histogram(bounds)


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert quantile(bounds, [0, 10, 0, 0], 0.5) == pytest.approx(1.5)
    assert quantile(bounds, [10, 0, 0, 0], 0.99) == pytest.approx(0.99)
    assert quantile(bounds, [0, 0, 0, 5], 0.99) == 4.0  # +Inf answers the top bound
    assert quantile(bounds, [0, 0, 0, 0], 0.99) is None
    assert quantile(bounds, [1, 0, 0, 0], 1.5) is None


def test_op_label_keeps_the_op_label_bounded() -> None:
    assert op_label("put") == "put"
    assert op_label("status") == "status"
    assert op_label("drop_table_" * 10) == "other"
    assert op_label(None) == "other"
    assert op_label(b"put") == "other"


# ---------------------------------------------------------------- a node in-process
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _node(tmp_path, **settings) -> tuple[Node, asyncio.Task, asyncio.Event]:
    cfg = load_config(
        {"node_id": "n1", "listen": f"127.0.0.1:{_port()}", "data_dir": str(tmp_path / "d"),
         "log_format": "json", "election_timeout_ms": "50", "partitions": "1",
         "heartbeat_interval_ms": "10",
         "metrics_listen": f"127.0.0.1:{_port()}", **settings},
        {},
    )
    node = Node(cfg)
    await node.start()
    stop = asyncio.Event()
    task = asyncio.create_task(node.run(stop))
    await async_wait_until(lambda: 0 in node.core.groups and node.core.leader_of(0), 10,
                           "a leader")
    return node, task, stop


async def _stop(task: asyncio.Task, stop: asyncio.Event) -> None:
    stop.set()
    async with asyncio.timeout(15):
        await task


def _get(url: str, timeout: float = 5.0) -> tuple[int, str, str]:
    """(status, content type, body) of a GET; runs in a worker thread."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


async def http(node: Node, path: str) -> tuple[int, str, str]:
    host, port = node.admin.bound
    return await asyncio.to_thread(_get, f"http://{host}:{port}{path}")


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_count_the_requests_answered_by_op_and_outcome(tmp_path):
    """After a known workload the counters move by exactly what was sent: 7 puts and 3 gets
    ok, one bad request, one unknown op; the latency histograms count each data request
    once; bytes in and out are counted; the WAL and Paxos series move."""
    node, task, stop = await _node(tmp_path)
    try:
        _, _, before_text = await http(node, "/metrics")
        before = samples(before_text)
        conn, transport = _connect(node)
        reqs = [{"op": "put", "key": b"k%d" % i, "value": b"v"} for i in range(7)]
        reqs += [{"op": "get", "key": b"k%d" % i} for i in range(3)]
        reqs += [{"op": "put", "key": b""}, {"op": "frobnicate"}]
        sent = b"".join(pack_frame({"id": i + 1, **r}) for i, r in enumerate(reqs))
        conn.data_received(sent)
        answers = await _answers(transport, len(reqs))
        assert sum(a["ok"] for a in answers) == 10
        status, ctype, text = await http(node, "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        after = samples(text)
    finally:
        await _stop(task, stop)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert delta("dsnode_requests_total", op="put", outcome="ok") == 7
    assert delta("dsnode_requests_total", op="get", outcome="ok") == 3
    assert delta("dsnode_requests_total", op="put", outcome="bad_request") == 1
    assert delta("dsnode_requests_total", op="other", outcome="unknown_op") == 1
    assert delta("dsnode_request_duration_seconds_count", op="put") == 7
    assert delta("dsnode_request_duration_seconds_count", op="get") == 3
    assert delta("dsnode_request_duration_seconds_bucket", op="put", le="+Inf") == 7
    assert delta("dsnode_client_received_bytes_total") == len(sent)
    assert delta("dsnode_client_sent_bytes_total") == len(transport.out)
    assert delta("dsnode_router_choices_total", choice="local") == 10
    assert delta("dsnode_paxos_proposals_total", partition="0") == 7
    assert delta("dsnode_paxos_commit_index", partition="0") >= 1
    assert delta("dsnode_wal_appended_records_total") >= 1
    assert delta("dsnode_wal_fsync_duration_seconds_count") >= 1
    assert after[("dsnode_paxos_is_leader", (("partition", "0"),))] == 1
    assert after[("dsnode_paxos_elections_total", (("partition", "0"),))] == 1
    assert after[("dsnode_paxos_leader_changes_total", (("partition", "0"),))] == 1
    assert after[("dsnode_ready", ())] == 1
    assert after[("dsnode_requests_in_flight", ())] == 0
    assert after[("dsnode_router_resends_total", ())] == 0  # no leader change here
    assert ("process_resident_memory_bytes", ()) in after  # the standard collectors too


async def test_requests_past_the_inflight_cap_count_as_load_shed(tmp_path):
    """Requests refused with `overloaded` count in dsnode_load_shed_total and as requests
    with that outcome."""
    node, task, stop = await _node(tmp_path, inflight_requests_max="2")
    try:
        conn, transport = _connect(node)
        conn.data_received(b"".join(
            pack_frame({"id": i, "op": "put", "key": b"k", "value": b"v"}) for i in range(1, 6)))
        answers = await _answers(transport, 5)
        assert sorted(a["ok"] for a in answers) == [False, False, False, True, True]
        got = samples((await http(node, "/metrics"))[2])
    finally:
        await _stop(task, stop)
    assert got[("dsnode_load_shed_total", (("reason", "inflight_requests_max"),))] == 3
    assert got[("dsnode_requests_total", (("op", "put"), ("outcome", "overloaded")))] == 3


async def test_snapshots_are_timed_and_sized(tmp_path):
    node, task, stop = await _node(tmp_path, snapshot_interval_slots="3")
    try:
        conn, transport = _connect(node)
        for i in range(1, 11):
            conn.data_received(pack_frame({"id": i, "op": "put", "key": b"k%d" % i,
                                           "value": b"v"}))
            await _answers(transport, i)  # one slot per put
        await async_wait_until(lambda: node.metrics.snapshot_duration["state_machine"].count,
                               10, "a snapshot")
        got = samples((await http(node, "/metrics"))[2])
    finally:
        await _stop(task, stop)
    kind = (("kind", "state_machine"),)
    assert got[("dsnode_snapshot_duration_seconds_count", kind)] >= 1
    assert got[("dsnode_snapshot_size_bytes", kind)] > 0


async def test_status_readyz_and_livez_over_http(tmp_path):
    node, task, stop = await _node(tmp_path)
    try:
        status, ctype, body = await http(node, "/status")
        assert status == 200 and ctype.startswith("application/json")
        doc = json.loads(body)
        assert doc["node_id"] == "n1" and doc["ready"] is True
        assert doc["event_loop"]["lag_ms_max"] >= 0
        assert doc["metrics"]["requests"] == 0
        assert await http(node, "/readyz") == (200, "text/plain; charset=utf-8", "ready\n")
        assert (await http(node, "/livez"))[::2] == (200, "ok\n")
        assert (await http(node, "/nope"))[0] == 404
        node.client_server.accepting = False  # what a graceful stop does first
        assert (await http(node, "/readyz"))[::2] == (503, "shutting down\n")
        node.client_server.accepting = True
    finally:
        await _stop(task, stop)


async def test_livez_and_readyz_fail_while_the_event_loop_is_stuck(tmp_path):
    """/livez is answered from the admin thread, so a stuck loop gets a prompt 503 naming
    the stall, not a hung probe; /readyz needs the loop and answers 503 after its bound."""
    node, task, stop = await _node(tmp_path, livez_loop_stall_max_ms="300")
    node.admin.call_timeout_s = 0.3
    host, port = node.admin.bound
    try:
        assert (await http(node, "/livez"))[0] == 200
        results: dict[str, tuple] = {}

        def probe() -> None:
            time.sleep(0.8)  # the loop has been stuck for longer than the bound by now
            results["livez"] = _get(f"http://{host}:{port}/livez", timeout=3)
            results["readyz"] = _get(f"http://{host}:{port}/readyz", timeout=3)

        prober = asyncio.get_running_loop().run_in_executor(None, probe)
        time.sleep(2.0)  # the event loop is stuck: nothing else runs on it meanwhile
        await prober
        assert results["livez"][0] == 503
        assert "event loop stalled for" in results["livez"][2]
        assert results["readyz"][0] == 503
        assert "did not answer" in results["readyz"][2]
        async def live() -> bool:  # it turns again: live again
            return (await http(node, "/livez"))[0] == 200

        await async_wait_until(live, 10, "/livez to answer 200", interval=0.05)
        assert node.metrics.loop_lag_max >= 1.5
    finally:
        await _stop(task, stop)


async def test_a_metrics_port_in_use_is_a_startup_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = load_config(
            {"node_id": "n1", "listen": f"127.0.0.1:{_port()}", "data_dir": str(tmp_path / "d"),
             "log_format": "json", "metrics_listen": f"127.0.0.1:{port}"},
            {},
        )
        node = Node(cfg)
        with pytest.raises(StartupError, match="metrics_listen: cannot listen on .* in use"):
            await node.start()
        node.server_handle.close()
        await node.wal.close()
