"""`dsnode top`'s frame computation, from hand-made status answers (no cluster)."""

from __future__ import annotations

from dsnode.top import Sample, build_rows, render, rows_json

LE = [0.001, 0.01, 0.1]


def status(nid: str, *, role: str, commit: int, applied: int, requests: int,
           latency: list[int], fsync: list[int], members: dict[str, str],
           leader: str | None) -> dict:
    return {
        "node_id": nid, "ready": leader is not None, "inflight": 2,
        "members": [{"node_id": m, "addr": f"h:{i}", "state": st}
                    for i, (m, st) in enumerate(members.items())],
        "partitions": [{"id": 0, "leader": leader}],
        "paxos": {"role": role, "commit": commit, "applied": applied},
        "event_loop": {"lag_ms": 1.0, "lag_ms_max": 12.5},
        "metrics": {"requests": requests,
                    "request_latency": {"le": LE, "counts": latency},
                    "fsync_latency": {"le": LE, "counts": fsync}},
    }


def test_rates_percentiles_lag_and_the_worst_failure_detector_view() -> None:
    """Rates and p99 come from the difference of two samples; lag is the highest commit
    any member reports minus what this one applied; a member nobody reaches is shown with
    the worst state the others report."""
    up = {"a": "alive", "b": "alive", "c": "suspect"}
    a0 = status("a", role="leader", commit=100, applied=100, requests=1000,
                latency=[900, 100, 0, 0], fsync=[10, 0, 0, 0], members=up, leader="a")
    b0 = status("b", role="follower", commit=90, applied=90, requests=50,
                latency=[50, 0, 0, 0], fsync=[10, 0, 0, 0], members=up, leader="a")
    a1 = status("a", role="leader", commit=150, applied=150, requests=1500,
                latency=[900, 100, 500, 0], fsync=[10, 0, 4, 0], members=up, leader="a")
    b1 = status("b", role="follower", commit=140, applied=130, requests=50,
                latency=[50, 0, 0, 0], fsync=[10, 0, 0, 0],
                members={**up, "c": "dead"}, leader="a")
    addrs = {"a": "h:0", "b": "h:1", "c": "h:2"}
    prev = Sample(10.0, {"a": a0, "b": b0, "c": None}, addrs)
    cur = Sample(12.0, {"a": a1, "b": b1, "c": None}, addrs)
    rows = {r.node: r for r in build_rows(prev, cur)}
    a, b, c = rows["a"], rows["b"], rows["c"]
    assert a.requests_per_s == 250.0 and b.requests_per_s == 0.0
    # all 500 new requests fell in (0.01, 0.1]: p99 interpolates to 0.01 + 0.09 * 0.99
    assert abs(a.p99_ms - (10 + 90 * 0.99)) < 1e-6
    assert b.p99_ms is None  # nothing answered in the interval
    assert abs(a.fsync_p99_ms - (10 + 90 * 0.99)) < 1e-6
    assert (a.roles, a.leads, b.roles, b.leads) == ("L1", 1, "F1", 0)
    assert (a.lag_slots, b.lag_slots) == (0, 20)
    assert a.peers_alive == "2/3" and a.loop_lag_max_ms == 12.5 and a.inflight == 2
    assert not c.reachable and c.state == "dead" and c.ready is None
    assert a.state == "alive"


def test_the_first_frame_has_no_rates_and_renders() -> None:
    st = status("a", role="leader", commit=1, applied=1, requests=5, latency=[5, 0, 0, 0],
                fsync=[1, 0, 0, 0], members={"a": "alive"}, leader="a")
    rows = build_rows(None, Sample(1.0, {"a": st}, {"a": "h:0"}))
    assert rows[0].requests_per_s is None and rows[0].p99_ms is None
    assert rows_json(rows, 1.0)["members"][0]["node"] == "a"
    assert render(rows, 1.0) is not None


def test_status_without_metrics_still_gives_a_row() -> None:
    """An older node (no `metrics` in status) shows '-' for what it cannot tell."""
    st = {"node_id": "a", "ready": True, "members": [], "partitions": [],
          "paxos": {"role": "follower", "commit": 3, "applied": 3}}
    rows = build_rows(Sample(0.0, {"a": st}, {}), Sample(1.0, {"a": st}, {}))
    assert rows[0].requests_per_s is None and rows[0].p99_ms is None
    assert rows[0].addr == "?" and rows[0].roles == "F1"
