"""The CLI and the local cluster as a user meets them: real `dsnode` processes throughout.

* `scripts/run-local` (and so `dsnode local-cluster`) keeps serving when a node is
  SIGKILLed, reports it and restarts it; with `--no-restart` the node stays down while
  the others serve; Ctrl-C stops everything.
* The `dsnode` binary against real nodes: dial timeout on a refused port, the error
  contract and exit statuses, stdin and binary values, `endpoint health` exit statuses,
  member discovery, a write without a quorum.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import ServerPool, _bindable, free_port, sync_call, wait_until

from dsnode.client import SyncClient

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
DSNODE = [sys.executable, "-m", "dsnode"]
FAST = ("--fsync", "false")


def dsnode(*args: str, endpoints: str, stdin: bytes | None = None, timeout: float = 30.0,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the real `dsnode` client binary."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("DSNODE_")}
    full_env["DSNODE_ENDPOINTS"] = endpoints
    full_env.update(env or {})
    return subprocess.run([*DSNODE, *args], input=stdin if stdin is not None else b"",
                          capture_output=True, timeout=timeout, env=full_env)


def _free_base(n: int) -> int:
    for _ in range(200):
        base = free_port()
        if base + n < 65000 and all(_bindable(base + i) for i in range(n)):
            return base
    raise AssertionError("no run of free ports found")


def _ready(port: int) -> bool:
    try:
        st = sync_call(("127.0.0.1", port), [{"id": 1, "op": "status"}], timeout=1.0)[0]
    except (OSError, TimeoutError, ValueError):
        return False
    return bool(st.get("ok") and st.get("ready"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0): look at its state
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class LocalCluster:
    """A `dsnode local-cluster` (or `scripts/run-local`) process tree; killed at close."""

    def __init__(self, argv: list[str], tmp: Path, nodes: int) -> None:
        self.log = tmp / "local-cluster.err"
        self.nodes = nodes
        self._err = open(self.log, "wb")
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._err,
                                     start_new_session=True, cwd=tmp)
        self.seen_pids: set[int] = set()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pids(self) -> dict[str, int]:
        """node id -> pid, from the start-up table and the restart lines (latest wins)."""
        out: dict[str, int] = {}
        for m in re.finditer(r"(?:^dsnode:\s+(n\d)\s+\S+\s+pid (\d+)$|node (n\d) restarted "
                             r"\(pid (\d+)\))", self.output(), re.M):
            nid, pid = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            out[nid] = int(pid)
            self.seen_pids.add(int(pid))
        return out

    def wait_started(self) -> dict[str, int]:
        return wait_until(lambda: (p := self.pids()) and len(p) == self.nodes and p, 30.0,
                          "the node table", self.output)

    def interrupt(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGINT)
        return self.proc.wait(timeout)

    def close(self) -> None:
        self.pids()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in self.seen_pids:
            if _alive(pid):
                os.killpg(pid, signal.SIGKILL)  # nodes run in their own sessions
        self._err.close()


@pytest.fixture
def clusters() -> Iterator[list[LocalCluster]]:
    made: list[LocalCluster] = []
    try:
        yield made
    finally:
        for c in made:
            c.close()


def test_run_local_survives_a_sigkilled_node_and_restarts_it(tmp_path, clusters):
    base = _free_base(3)
    ports = [base, base + 1, base + 2]
    lc = LocalCluster([str(ROOT / "scripts" / "run-local"), "--base-port", str(base),
                       "--data-dir", str(tmp_path / "data"), *FAST], tmp_path, 3)
    clusters.append(lc)
    pids = lc.wait_started()
    wait_until(lambda: all(_ready(p) for p in ports), 60.0, "all three nodes ready", lc.output)
    survivors = f"127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}"
    assert dsnode("put", "before", "1", endpoints=survivors).returncode == 0

    os.kill(pids["n3"], signal.SIGKILL)
    wait_until(lambda: f"node n3 (127.0.0.1:{ports[2]}) killed by SIGKILL" in lc.output(),
               20.0, "the kill to be reported", lc.output)
    assert lc.proc.poll() is None, lc.output()  # the cluster did not stop
    assert "the others keep serving; restarting it in 0.5s" in lc.output()
    r = dsnode("put", "during", "2", endpoints=survivors)
    assert r.returncode == 0, r.stderr
    new = wait_until(lambda: lc.pids()["n3"] != pids["n3"] and lc.pids()["n3"], 20.0,
                     "n3 to be restarted", lc.output)
    assert _alive(new) and not _alive(pids["n3"])
    wait_until(lambda: _ready(ports[2]), 60.0, "the restarted n3 to be ready", lc.output)
    r = dsnode("get", "during", endpoints=f"127.0.0.1:{ports[2]}")
    assert r.returncode == 0 and r.stdout == b"2\n", r.stderr
    assert all(_alive(p) for n, p in lc.pids().items())

    assert lc.interrupt() == 0, lc.output()  # Ctrl-C stops everything
    assert "cluster stopped" in lc.output()
    wait_until(lambda: not any(_alive(p) for p in lc.pids().values()), 10.0,
               "every node to be gone", lc.output)


def test_local_cluster_no_restart_leaves_the_node_down_and_the_others_serving(tmp_path,
                                                                               clusters):
    base = _free_base(3)
    ports = [base, base + 1, base + 2]
    lc = LocalCluster([*DSNODE, "local-cluster", "--base-port", str(base), "--no-restart",
                       "--data-dir", str(tmp_path / "data"), *FAST], tmp_path, 3)
    clusters.append(lc)
    pids = lc.wait_started()
    wait_until(lambda: all(_ready(p) for p in ports), 60.0, "all three nodes ready", lc.output)
    os.kill(pids["n1"], signal.SIGKILL)
    wait_until(lambda: "node n1" in lc.output() and "left down (--no-restart)" in lc.output(),
               20.0, "the kill to be reported", lc.output)
    everyone = ",".join(f"127.0.0.1:{p}" for p in ports)
    # n1 (the first endpoint) is down: the client moves on to the next one.
    r = dsnode("put", "k", "v", endpoints=everyone)
    assert r.returncode == 0, r.stderr

    def health() -> list[str] | None:
        # ready once every partition n1 led has elected a new leader (an election timeout)
        r = dsnode("endpoint", "health", endpoints=everyone)
        lines = r.stdout.decode().splitlines()
        healthy = sum(" true " in f" {line} " for line in lines)
        return lines if r.returncode == 1 and healthy == 2 else None

    lines = wait_until(health, 20.0, "the two live nodes healthy", lc.output)
    assert any(f"127.0.0.1:{ports[0]}" in line and "false" in line and "connect_failed" in line
               for line in lines), lines
    assert lc.proc.poll() is None and not _alive(pids["n1"])
    assert "restarted" not in lc.output()
    assert lc.interrupt() == 0, lc.output()


def test_local_cluster_refuses_ports_in_use_before_starting_anything(tmp_path):
    base = _free_base(2)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 1))
        s.listen()
        r = subprocess.run([*DSNODE, "local-cluster", "--nodes", "2", "--base-port", str(base),
                            "--data-dir", str(tmp_path / "data")], capture_output=True,
                           timeout=30)
    assert r.returncode == 2
    assert f"127.0.0.1:{base + 1} is already in use" in r.stderr.decode()
    assert not (tmp_path / "data").exists()


# --------------------------------------------------------------------------- the binary


def test_refused_port_fails_in_under_a_second_naming_endpoints_and_the_env_variable():
    port = free_port()
    t0 = time.monotonic()
    r = dsnode("get", "k", endpoints=f"127.0.0.1:{port}")
    took = time.monotonic() - t0
    err = r.stderr.decode()
    assert r.returncode == 1
    assert err.startswith("error: connect_failed: ") and err.count("\n") == 1
    assert f"127.0.0.1:{port}: connection refused" in err and "DSNODE_ENDPOINTS" in err
    assert took < 1.0, took  # python start-up included


def test_binary_against_a_real_node_error_contract_stdin_and_binary(pool: ServerPool):
    n1 = pool.start()
    ep = n1.listen
    r = dsnode("put", "bin", "-", stdin=b"\x00\xff\x1b[2J\n", endpoints=ep)
    assert r.returncode == 0 and r.stdout.startswith(b"succeeded: true\nversion: ")
    r = dsnode("get", "bin", endpoints=ep)
    assert r.returncode == 0 and r.stdout == b"\\x00\\xff\\x1b[2J\n\n" and b"escaped" in r.stderr
    assert dsnode("get", "bin", "--raw", endpoints=ep).stdout == b"\x00\xff\x1b[2J\n"
    assert dsnode("get", "bin", "--hex", endpoints=ep).stdout == b"00ff1b5b324a0a\n"
    r = dsnode("put", "e", endpoints=ep)  # empty stdin
    assert r.returncode == 2 and b"--allow-empty" in r.stderr
    r = dsnode("get", "missing", endpoints=ep)
    assert (r.returncode, r.stderr) == (1, b"error: not_found: key not found: missing\n")
    r = dsnode("-o", "json", "get", "missing", endpoints=ep)
    assert r.returncode == 1 and b'"code": "not_found"' in r.stdout
    r = dsnode("txn", stdin=b'{"then": [{"op": "put", "key": "a", "value": "1"}, '
                            b'{"op": "put", "key": "a", "value": "2"}]}', endpoints=ep)
    assert r.returncode == 2 and r.stderr.startswith(b"error: usage: txn spec: then[1]")
    r = dsnode("status", "--check", endpoints=ep)
    assert r.returncode == 0 and r.stdout.startswith(b"node_id: ")
    assert b"ready: true" in r.stdout and b"role: leader" in r.stdout
    r = dsnode("endpoint", "status", "-o", "json", endpoints=ep)
    assert r.returncode == 0 and b'"ready": true' in r.stdout


def test_a_put_that_cannot_reach_a_leader_is_unavailable_not_a_timeout(pool: ServerPool):
    """n1 of a two-node cluster whose n2 never starts: no quorum, so no leader. The server
    knows the put never reached a leader and says `unavailable` (definite, exit 1) within
    the client's deadline, instead of an ambiguous timeout."""
    p1, p2 = free_port(), free_port()
    n1 = pool.new("--peers", f"n1=127.0.0.1:{p1},n2=127.0.0.1:{p2}", node_id="n1", port=p1)
    n1.spawn()
    wait_until(lambda: dsnode("status", endpoints=n1.listen).returncode == 0, 30.0,
               "n1 to answer", n1.output_tail)
    r = dsnode("status", "--check", endpoints=n1.listen)
    assert r.returncode == 1 and b"ready: false" in r.stdout
    r = dsnode("endpoint", "health", endpoints=n1.listen)
    assert r.returncode == 1 and b"not ready" in r.stdout
    t0 = time.monotonic()
    r = dsnode("put", "k", "v", "--timeout", "1.5", endpoints=n1.listen)
    assert time.monotonic() - t0 < 10
    assert r.returncode == 1, r.stderr
    assert r.stderr.startswith(b"error: unavailable: no leader reachable"), r.stderr
    assert b"outcome unknown" not in r.stderr


def test_bench_writes_under_its_prefix_and_cleanup_deletes_what_it_wrote(pool: ServerPool):
    n1 = pool.start("--fsync", "false")
    ep = n1.listen

    def keys() -> int:
        r = dsnode("-o", "json", "status", endpoints=ep)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["keys"]

    assert dsnode("put", "mine", "precious", endpoints=ep).returncode == 0
    bench = ("bench", "--endpoints", ep, "--connections", "2", "--inflight", "8",
             "--requests", "400", "--keyspace", "40", "--mix", "put=1,get=1,txn=1",
             "--output", "json")
    r = dsnode(*bench, "--prefix", "tmp/", endpoints=ep, timeout=60)
    assert r.returncode == 0, r.stderr
    written = keys() - 1
    assert 0 < written <= 40
    with SyncClient(ep, timeout=10) as c:  # keys padded to --key-size 16: tmp/k00000000007
        under_prefix = sum(c.get(f"tmp/k{i:011d}").version > 0 for i in range(40))
    assert under_prefix == written
    assert dsnode("get", "mine", endpoints=ep).stdout == b"precious\n"

    r = dsnode(*bench, "--cleanup", endpoints=ep, timeout=60)  # default prefix bench/
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["config"]["prefix"] == "bench/" and report["cleanup"]["errors"] == 0
    assert report["cleanup"]["deleted"] > 0
    assert keys() == 1 + written  # every bench/ key is gone; tmp/ and mine are untouched
    assert dsnode("get", "mine", endpoints=ep).stdout == b"precious\n"
    r = dsnode("bench", "--endpoints", ep, "--requests", "1", "--prefix", "x" * 20,
               endpoints=ep)
    assert r.returncode == 2 and b"--prefix" in r.stderr


def test_serve_on_a_port_in_use_fails_before_creating_or_logging_anything(tmp_path):
    import socket

    data = tmp_path / "fresh"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([*DSNODE, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir",
                            str(data), "--log-format", "json"], capture_output=True, timeout=30)
    assert r.returncode == 2 and r.stdout == b""
    assert r.stderr.decode() == f"dsnode: cannot listen on 127.0.0.1:{port}: address already in use\n"
    assert not data.exists()
