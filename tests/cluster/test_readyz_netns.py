"""/readyz across a real network partition: each node in its own network namespace
(tests/cluster/netns.py), the cut made with iptables DROP rules.

The admin listener binds loopback, so the probe runs inside the node's namespace
(`ip netns exec`), as a health check in the node's container or host would.
Needs root, `ip` and `iptables`; skipped with the reason otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import Cluster
from harness import wait_until
from netns import NetLab, lab_cluster

pytestmark = [pytest.mark.cluster, pytest.mark.netns, pytest.mark.timeout(180)]

IDS = ["n1", "n2", "n3"]
ADMIN = "127.0.0.1:9379"  # the same in every namespace
PROBE = """
import sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        print(r.status, r.read().decode().strip())
except urllib.error.HTTPError as e:
    print(e.code, e.read().decode().strip())
except OSError as e:
    print(0, e)
"""


def probe(lab: NetLab, nid: str, path: str) -> tuple[int, str]:
    """GET http://ADMIN{path} from inside ``nid``'s namespace: (status, body)."""
    done = subprocess.run(
        ["ip", "netns", "exec", lab.ns[nid], sys.executable, "-c", PROBE,
         f"http://{ADMIN}{path}"],
        capture_output=True, text=True, timeout=15,
    )
    code, _, body = done.stdout.strip().partition(" ")
    return (int(code) if code.isdigit() else 0), body


@pytest.fixture
def lab_and_cluster(tmp_path: Path) -> Iterator[tuple[NetLab, Cluster]]:
    with lab_cluster(tmp_path, IDS, ("--metrics-listen", ADMIN)) as lc:
        yield lc


@pytest.mark.parametrize("who", ["leader", "follower"])
def test_readyz_turns_503_when_partitioned_from_the_majority_and_200_after_healing(
    lab_and_cluster: tuple[NetLab, Cluster], who: str
) -> None:
    lab, cluster = lab_and_cluster
    cluster.start()
    leader = cluster.wait_leader(IDS, 30.0)
    nid = leader if who == "leader" else next(n for n in IDS if n != leader)
    assert probe(lab, nid, "/readyz") == (200, "ready")
    lab.isolate(nid)
    got = wait_until(lambda: (lambda r: r if r[0] == 503 else None)(probe(lab, nid, "/readyz")),
                     30.0, f"/readyz of the isolated {nid} to turn 503")
    assert got[1].startswith("partition 0: "), got
    assert probe(lab, nid, "/livez") == (200, "ok")  # its loop still turns
    majority = [n for n in IDS if n != nid]
    cluster.wait_leader(majority, 30.0)
    for n in majority:  # the majority keeps (or regains) a leader: ready there
        wait_until(lambda n=n: probe(lab, n, "/readyz") == (200, "ready"), 30.0,
                   f"/readyz of {n} in the majority")
    lab.heal()
    wait_until(lambda: probe(lab, nid, "/readyz") == (200, "ready"), 30.0,
               f"/readyz of {nid} after healing", cluster.output_tails)
