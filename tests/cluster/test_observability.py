"""Observability of a live 3-node cluster: /metrics, /livez, /readyz, /status, `dsnode top`
and the Grafana dashboard, on real `dsnode serve` processes.

Every node runs its admin listener (`--metrics-listen`) on a free loopback port.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import Cluster, node_status
from harness import RawConn, ServerPool, free_port, wait_until
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.cluster

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "dsnode.json"


def http_get(port: int, path: str, timeout: float = 5.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()
    except (OSError, TimeoutError) as e:
        return 0, str(e)


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


class MetricsCluster:
    """A 3-node cluster whose nodes all listen for admin HTTP; ``mport[nid]`` is the port."""

    def __init__(self, pool: ServerPool) -> None:
        self.mport: dict[str, int] = {}

        def make(nid: str, addr: tuple[str, int], flags: tuple) -> object:
            self.mport[nid] = free_port()
            return pool.new(*flags, "--metrics-listen", f"127.0.0.1:{self.mport[nid]}",
                            node_id=nid, port=addr[1])

        self.cluster = Cluster(pool, 3, make_server=make)

    def start(self) -> MetricsCluster:
        self.cluster.start()
        self.leader = self.cluster.wait_leader()
        return self


@pytest.fixture(scope="module")
def mc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MetricsCluster]:
    pool = ServerPool(tmp_path_factory.mktemp("observability"))
    try:
        yield MetricsCluster(pool).start()
    finally:
        pool.close()


async def _run(addr: tuple[str, int], reqs: list[dict]) -> list[dict]:
    async with await RawConn.open(addr) as c:
        ids = c.send_many({**r, "timeout_ms": 5000} for r in reqs)
        await c.drain()
        got = {}
        for _ in ids:
            a = await c.recv(timeout=15)
            got[a["id"]] = a
    return [got[i] for i in ids]


def test_counters_match_a_known_workload_on_every_node(mc: MetricsCluster) -> None:
    """Puts and gets sent to a follower are counted there by op and outcome, timed, routed
    as forwards, and arrive at the leader as forwarded requests and proposals; the WAL and
    commit index move on every node."""
    cluster = mc.cluster
    leader = cluster.wait_leader()
    follower = next(n for n in cluster.nodes if n != leader)
    before = {nid: scrape(p) for nid, p in mc.mport.items()}
    n_put, n_get = 40, 25
    reqs = [{"op": "put", "key": b"obs%d" % i, "value": b"x" * 100} for i in range(n_put)]
    reqs += [{"op": "get", "key": b"obs%d" % i} for i in range(n_get)]
    answers = asyncio.run(_run(cluster.nodes[follower].addr, reqs))
    assert all(a["ok"] for a in answers), [a for a in answers if not a["ok"]][:3]
    cluster.wait_caught_up(follower)
    for nid in cluster.nodes:
        cluster.wait_caught_up(nid)
    after = {nid: scrape(p) for nid, p in mc.mport.items()}
    assert cluster.wait_leader() == leader, "the leader changed during the test"

    def delta(nid: str, name: str, **labels: str) -> float:
        return value(after[nid], name, **labels) - value(before[nid], name, **labels)

    f, ld = follower, leader
    assert delta(f, "dsnode_requests_total", op="put", outcome="ok") == n_put
    assert delta(f, "dsnode_requests_total", op="get", outcome="ok") == n_get
    assert delta(f, "dsnode_request_duration_seconds_count", op="put") == n_put
    assert delta(f, "dsnode_request_duration_seconds_count", op="get") == n_get
    assert delta(f, "dsnode_router_choices_total", choice="forward") == n_put + n_get
    assert delta(f, "dsnode_forwarded_requests_total", direction="out") == n_put + n_get
    assert delta(ld, "dsnode_forwarded_requests_total", direction="in") == n_put + n_get
    assert delta(ld, "dsnode_paxos_proposals_total", partition="0") == n_put
    assert delta(f, "dsnode_client_received_bytes_total") > n_put * 100
    for nid in cluster.nodes:
        assert delta(nid, "dsnode_paxos_commit_index", partition="0") >= 1, nid
        assert delta(nid, "dsnode_wal_appended_records_total") >= 1, nid
        assert delta(nid, "dsnode_wal_fsync_duration_seconds_count") >= 1, nid
        assert value(after[nid], "dsnode_paxos_is_leader", partition="0") == (nid == ld)
        assert value(after[nid], "dsnode_paxos_role", partition="0") == (3 if nid == ld else 0)
        assert value(after[nid], "dsnode_ready") == 1
        for peer in cluster.nodes:
            if peer != nid:
                assert value(after[nid], "dsnode_peer_state", peer=peer, state="alive") == 1
                assert value(after[nid], "dsnode_peer_connected", peer=peer) == 1
    # one partition here (and the metadata group, which may be led elsewhere)
    assert value(after[ld], "dsnode_paxos_is_leader", partition="0") == 1
    assert value(after[f], "dsnode_paxos_is_leader", partition="0") == 0
    assert value(after[ld], "dsnode_paxos_groups", role="leader") >= 1
    assert value(after[f], "dsnode_paxos_groups", role="follower") >= 1


def test_status_livez_and_readyz_on_every_node(mc: MetricsCluster) -> None:
    for nid, port in mc.mport.items():
        assert http_get(port, "/livez") == (200, "ok\n")
        assert http_get(port, "/readyz") == (200, "ready\n")
        status, body = http_get(port, "/status")
        doc = json.loads(body)
        assert status == 200 and doc["node_id"] == nid and doc["ready"] is True
        op = node_status(mc.cluster.nodes[nid])
        assert op is not None and doc["partitions"] == op["partitions"]


def test_top_once_shows_every_member(mc: MetricsCluster) -> None:
    """`dsnode top --once` reached through one node lists all three members, one leader,
    all alive and ready; the text frame names them too."""
    one = mc.cluster.nodes[mc.leader]
    argv = [sys.executable, "-m", "dsnode", "top", "--once", "--interval", "0.5",
            "--endpoints", f"127.0.0.1:{one.port}"]
    done = subprocess.run([*argv, "--output", "json"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    frame = json.loads(done.stdout)
    rows = {r["node"]: r for r in frame["members"]}
    assert set(rows) == set(mc.cluster.nodes)
    assert sum(r["leads"] for r in rows.values()) == 1 and rows[mc.leader]["leads"] == 1
    for nid, r in rows.items():
        assert r["reachable"] and r["ready"] and r["state"] == "alive", r
        assert r["roles"] == ("L1" if nid == mc.leader else "F1")
        assert r["peers_alive"] == "3/3" and r["lag_slots"] >= 0
        assert r["requests_per_s"] is not None and r["inflight"] == 0
    text = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert text.returncode == 0, text.stderr
    for nid in mc.cluster.nodes:
        assert re.search(rf"^{nid}\s+127\.0\.0\.1:\d+\s+alive\s+yes", text.stdout, re.M), text.stdout


def test_top_once_exits_1_when_no_node_answers() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "dsnode", "top", "--once", "--interval", "0.2",
         "--timeout", "1", "--endpoints", f"127.0.0.1:{free_port()}"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    assert done.stderr.startswith("error: unavailable")


def dashboard_metrics() -> set[str]:
    doc = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in doc["panels"] for t in p.get("targets", [])]
    assert exprs, "the dashboard queries nothing"
    return {m for e in exprs for m in re.findall(r"\b(dsnode_[a-z0-9_]+)", e)}


def test_every_metric_the_dashboard_queries_exists_on_a_live_node(mc: MetricsCluster) -> None:
    """deploy/grafana/dsnode.json covers throughput, latency percentiles, leader changes,
    replication lag, fsync latency and load shed, and each series it names is exposed (the
    leader exposes them all: replication lag exists only where a node leads)."""
    wanted = dashboard_metrics()
    for needed in ("dsnode_requests_total", "dsnode_request_duration_seconds_bucket",
                   "dsnode_paxos_leader_changes_total", "dsnode_paxos_replication_lag_slots",
                   "dsnode_wal_fsync_duration_seconds_bucket", "dsnode_load_shed_total"):
        assert needed in wanted, needed
    exposed = {name for name, _ in scrape(mc.mport[mc.cluster.wait_leader()])}
    missing = sorted(wanted - exposed)
    assert not missing, f"the dashboard queries metrics no node exposes: {missing}"


def test_readyz_is_503_on_a_node_cut_off_from_the_majority_and_200_after_healing(
    tmp_path: Path,
) -> None:
    """With both other nodes frozen (SIGSTOP: from this node's side they are cut off), the
    node cannot serve linearizable requests: /readyz answers 503 with a reason while /livez
    stays 200. Once they run again it is ready again."""
    pool = ServerPool(tmp_path)
    try:
        mc = MetricsCluster(pool).start()
        cluster = mc.cluster
        lone = next(n for n in cluster.nodes if n != mc.leader)
        others = [n for n in cluster.nodes if n != lone]
        port = mc.mport[lone]
        assert http_get(port, "/readyz") == (200, "ready\n")
        for n in others:
            cluster.nodes[n].pause()
        got = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(http_get(port, "/readyz")),
                         20.0, f"{lone} /readyz to turn 503")
        assert got[1].startswith("partition 0: "), got
        assert http_get(port, "/livez")[0] == 200
        for n in others:
            cluster.nodes[n].resume()
        wait_until(lambda: http_get(port, "/readyz") == (200, "ready\n"), 30.0,
                   f"{lone} /readyz to return to 200", cluster.output_tails)
    finally:
        pool.close()
