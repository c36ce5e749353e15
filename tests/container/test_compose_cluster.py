"""The three-node cluster of docker-compose.yml, built and run on this machine.

Each run uses its own compose project name, image tag and free host ports, so it never
touches a cluster someone started by hand; a finalizer takes everything down even on failure.
The three nodes must all become healthy and serve as one replicated cluster.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from dockerctl import (
    REPO,
    Cli,
    CommandFailed,
    compose_cmd,
    free_port,
    logs,
    run,
    wait_healthy,
    wait_until,
)

pytestmark = [
    pytest.mark.container,
    pytest.mark.timeout(1800),
]

NODES = ("node1", "node2", "node3")
HEALTHY_DEADLINE_S = 180
FAILOVER_DEADLINE_S = 30


@dataclass
class Cluster:
    project: str
    image: str
    env: dict[str, str]
    ports: dict[str, int]
    cli: Cli = field(default_factory=Cli)

    def compose(self, *args: str, timeout: float = 900) -> str:
        cmd = [*compose_cmd(), "--project-name", self.project, "--file", "docker-compose.yml"]
        return run([*cmd, *args], env=self.env, timeout=timeout, cwd=REPO).stdout

    def container(self, service: str) -> str:
        ids = self.compose("ps", "--all", "-q", service).split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def profiled(self, service: str) -> str:
        """The container of a service in a profile (``ps`` lists only the default ones)."""
        ids = run(["docker", "ps", "-aq", "--filter",
                   f"label=com.docker.compose.project={self.project}", "--filter",
                   f"label=com.docker.compose.service={service}"]).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def member_states(self, service: str) -> dict[str, str]:
        try:
            members = self.cli.run(self.endpoints(service), "member", "list")
        except CommandFailed:
            return {}
        return {m["node_id"]: m["state"] for m in members}

    def containers(self) -> list[str]:
        return [self.container(s) for s in NODES]

    @property
    def network(self) -> str:
        return f"{self.project}_dsnode"

    def endpoints(self, *services: str) -> str:
        return ",".join(f"127.0.0.1:{self.ports[s]}" for s in services or NODES)

    def put_eventually(self, key: str, value: str, *services: str) -> None:
        """A write that may have to wait out a leader change (bounded by the deadline)."""
        wait_until(
            f"put {key} via {services or 'any node'}",
            lambda: self.cli.put(self.endpoints(*services), key, value),
            FAILOVER_DEADLINE_S,
        )

    def get(self, key: str, *services: str) -> str | None:
        return self.cli.get(self.endpoints(*services), key)

    def diagnose(self) -> str:
        out = []
        for service in NODES:
            try:
                ids = self.compose("ps", "--all", "-q", service).split()
            except CommandFailed as e:
                return str(e)
            out.extend(logs(i, tail=30) for i in ids)
        return "\n".join(out)


def leftovers(project: str, image: str) -> dict[str, list[str]]:
    label = f"label=com.docker.compose.project={project}"
    found = {
        "containers": run(["docker", "ps", "-aq", "--filter", label]).stdout.split(),
        "volumes": run(["docker", "volume", "ls", "-q", "--filter", label]).stdout.split(),
        "networks": run(
            ["docker", "network", "ls", "-q", "--filter", f"name={project}_"]
        ).stdout.split(),
        "images": run(["docker", "images", "-q", image]).stdout.split(),
    }
    return {kind: ids for kind, ids in found.items() if ids}


@pytest.fixture
def cluster(dsnode_image: str, base_image: str, session_id: str) -> Iterator[Cluster]:
    project = f"dsnodetest{session_id}"
    image = f"dsnode-test-compose:{session_id}"
    ports = {s: free_port() for s in (*NODES, "node4")}  # node4: profile join
    env = {
        "COMPOSE_PROJECT_NAME": project,
        "DSNODE_IMAGE": image,
        "BASE_IMAGE": base_image,
        "DSNODE_BIND": "127.0.0.1",
        "DSNODE_HEALTH_INTERVAL": "1s",
        "DSNODE_BUILD_ID": session_id,
        # Build with the docker CLI, as the session fixture did: its layer cache is then reused.
        "COMPOSE_DOCKER_CLI_BUILD": "1",
        **{f"DSNODE_PORT{i}": str(ports[s]) for i, s in enumerate(NODES, start=1)},
        "DSNODE_PORT4": str(ports["node4"]),
    }
    c = Cluster(project, image, env, ports)
    try:
        yield c
    finally:
        print(c.diagnose())  # shown only when the test fails
        try:
            c.compose("down", "--volumes", "--rmi", "all", "--remove-orphans", "--timeout", "5")
        finally:
            # Whatever compose could not remove (it failed half-way, say).
            rest = leftovers(project, image)
            if rest.get("containers"):
                run(["docker", "rm", "-f", "-v", *rest["containers"]], check=False)
            for vol in rest.get("volumes", []):
                run(["docker", "volume", "rm", "-f", vol], check=False)
            for net in rest.get("networks", []):
                run(["docker", "network", "rm", net], check=False)
            run(["docker", "image", "rm", "-f", image], check=False)


def test_three_node_compose_cluster_survives_kill_restart_and_partition(
    cluster: Cluster, measurements: dict[str, str], tmp_path: Path
) -> None:
    c = cluster

    # up --build reuses the session image's layer cache; then wait for every node.
    started = time.monotonic()
    c.compose("up", "--build", "--detach")
    # Secure by default: the certs service wrote the CA and tokens into the certs volume.
    c.cli.secure(tmp_path, lambda name: c.compose(
        "run", "--rm", "--no-deps", "--entrypoint", "cat", "cli", f"/etc/dsnode/tls/{name}"))
    up_s = time.monotonic() - started
    healthy_s = wait_healthy(c.containers(), HEALTHY_DEADLINE_S)
    measurements["compose: up --build (cached image)"] = f"{up_s:.1f} s"
    measurements["compose: then 3 nodes healthy"] = f"{healthy_s:.1f} s (health interval 1 s)"

    # Through each published port: a write on one node is read on the others.
    c.put_eventually("k1", "v1", "node1")
    assert c.get("k1", "node2") == "v1"
    assert c.get("k1", "node3") == "v1"

    # Lose one node (SIGKILL): the two others keep serving reads and writes.
    run(["docker", "kill", c.container("node3")])
    c.put_eventually("k2", "v2", "node1", "node2")
    assert c.get("k1", "node2") == "v1"
    assert c.get("k2", "node1") == "v2"

    # Bring it back: it recovers from its volume and catches up on what it missed.
    c.compose("start", "node3")
    wait_healthy([c.container("node3")], HEALTHY_DEADLINE_S)
    assert c.get("k2", "node3") == "v2"

    # Restart the whole cluster: every acknowledged write is still there.
    started = time.monotonic()
    c.compose("restart", "--timeout", "15")
    wait_healthy(c.containers(), HEALTHY_DEADLINE_S)
    measurements["compose: restart to healthy"] = f"{time.monotonic() - started:.1f} s"
    for service in NODES:
        assert c.get("k1", service) == "v1"
        assert c.get("k2", service) == "v2"

    # Cut node2 off the network: the majority side keeps taking writes.
    node2 = c.container("node2")
    run(["docker", "network", "disconnect", c.network, node2])
    c.put_eventually("k3", "v3", "node1", "node3")
    assert c.get("k3", "node3") == "v3"
    # Heal (the alias is what the other nodes resolve): node2 serves the write it missed.
    run(["docker", "network", "connect", "--alias", "node2", c.network, node2])
    wait_healthy([node2], HEALTHY_DEADLINE_S)
    wait_until("node2 to serve k3", lambda: c.get("k3", "node2") == "v3", FAILOVER_DEADLINE_S)

    # Grow: node4 (profile join) joins through node1-3 and partitions move replicas onto it;
    # then it leaves again (its replicas move back) and stops by itself.
    started = time.monotonic()
    c.compose("--profile", "join", "up", "--detach", "node4")
    node4 = c.profiled("node4")
    wait_healthy([node4], HEALTHY_DEADLINE_S)
    wait_until("node4 alive on the ring", lambda: c.member_states("node1").get("node4") == "alive",
               HEALTHY_DEADLINE_S)
    measurements["compose: node4 joined, its moves done"] = f"{time.monotonic() - started:.1f} s"
    assert c.get("k1", "node4") == "v1" and c.get("k3", "node4") == "v3"
    assert c.cli.run(c.endpoints("node2"), "member", "leave", "node4")["state"] == "leaving"
    wait_until("node4 left", lambda: c.member_states("node1").get("node4") == "left",
               HEALTHY_DEADLINE_S)
    wait_until("node4 stopped by itself (exit 0; restart: on-failure)",
               lambda: run(["docker", "inspect", "-f", "{{.State.Status}} {{.State.ExitCode}}",
                            node4]).stdout.split() == ["exited", "0"], FAILOVER_DEADLINE_S)
    c.put_eventually("k4", "v4", "node1")
    assert c.get("k4", "node3") == "v4"

    # down -v leaves nothing behind: containers, network, volumes, and the image it built.
    c.compose("down", "--volumes", "--rmi", "all", "--remove-orphans", "--timeout", "15")
    assert leftovers(c.project, c.image) == {}
