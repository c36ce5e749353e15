"""One dsnode container from the repository's image: health, data through restarts, clean stop.

Run with ``pytest -m container tests/container`` (deselected by default).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from dockerctl import LABEL, Cli, CommandFailed, free_port, inspect, logs, run, wait_healthy

# The first test also pays for the session fixtures: base image and image build.
pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

HEALTHY_DEADLINE_S = 90


@dataclass
class Node:
    name: str
    volume: str
    endpoint: str


@pytest.fixture
def node(dsnode_image: str, session_id: str) -> Iterator[Node]:
    name = f"dsnode-test-{session_id}-single"
    volume = f"{name}-data"
    port = free_port()
    run(["docker", "volume", "create", "--label", LABEL, volume])
    try:
        run([
            "docker", "run", "--detach", "--name", name, "--label", LABEL,
            "--publish", f"127.0.0.1:{port}:7379",
            "--volume", f"{volume}:/var/lib/dsnode",
            "--health-interval", "1s", "--health-start-period", "60s",
            "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
            "--security-opt", "no-new-privileges:true",
            dsnode_image,
        ])  # fmt: skip
        yield Node(name, volume, f"127.0.0.1:{port}")
    finally:
        print(logs(name, tail=60))  # shown only when the test fails
        run(["docker", "rm", "--force", "--volumes", name], check=False, timeout=120)
        run(["docker", "volume", "rm", "--force", volume], check=False, timeout=120)


def test_single_node_container_serves_keeps_data_and_stops_cleanly(
    node: Node, measurements: dict[str, str], tmp_path: Path
) -> None:
    cli = Cli()
    took = wait_healthy([node.name], HEALTHY_DEADLINE_S)
    measurements["single container: start to healthy"] = f"{took:.1f} s (health interval 1 s)"

    # Secure by default: the image made its own CA and tokens in the volume on first start;
    # without them the published port serves nothing.
    with pytest.raises(CommandFailed):
        cli.status(node.endpoint)
    cli.secure(tmp_path, lambda name: run(
        ["docker", "exec", node.name, "cat", f"/var/lib/dsnode/tls/{name}"]).stdout)

    # The node is PID 1 itself (exec-form entrypoint + exec), as the dsnode user.
    cmdline = run(["docker", "exec", node.name, "cat", "/proc/1/cmdline"]).stdout.split("\0")
    assert "serve" in cmdline and any(part.endswith("dsnode") for part in cmdline), cmdline
    assert run(["docker", "exec", node.name, "id", "-u"]).stdout.strip() == "10001"
    assert cli.status(node.endpoint)["ready"] is True

    # Writes from the host through the published port.
    assert cli.put(node.endpoint, "greeting", "hello")["version"] > 0
    assert cli.get(node.endpoint, "greeting") == "hello"

    # docker restart: SIGTERM, then start again on the same volume; the data is still there.
    started = time.monotonic()
    run(["docker", "restart", "--time", "20", node.name], timeout=60)
    took = wait_healthy([node.name], HEALTHY_DEADLINE_S) + (time.monotonic() - started)
    measurements["single container: restart to healthy"] = f"{took:.1f} s"
    assert cli.get(node.endpoint, "greeting") == "hello"
    cli.put(node.endpoint, "after-restart", "yes")

    # Stop: SIGTERM (STOPSIGNAL) must end the node with status 0 well before docker's SIGKILL.
    started = time.monotonic()
    run(["docker", "stop", "--time", "20", node.name], timeout=60)
    stop_s = time.monotonic() - started
    state = inspect(node.name)["State"]
    measurements["single container: docker stop"] = f"{stop_s:.1f} s, exit {state['ExitCode']}"
    assert state["ExitCode"] == 0 and not state["OOMKilled"], state
    assert stop_s < 10, f"stop took {stop_s:.1f}s: SIGTERM not handled promptly"

    # Started again after a clean stop, it recovers both keys from the volume.
    run(["docker", "start", node.name])
    wait_healthy([node.name], HEALTHY_DEADLINE_S)
    assert cli.get(node.endpoint, "greeting") == "hello"
    assert cli.get(node.endpoint, "after-restart") == "yes"


def test_entrypoint_rejects_missing_config(dsnode_image: str, session_id: str) -> None:
    """DSNODE_CONFIG naming a file that is not there: one clear line and exit status 2."""
    name = f"dsnode-test-{session_id}-badconfig"
    try:
        done = run(
            ["docker", "run", "--name", name, "--label", LABEL,
             "--env", "DSNODE_CONFIG=/etc/dsnode/nope.toml", dsnode_image],
            check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done
        assert "DSNODE_CONFIG=/etc/dsnode/nope.toml" in done.stderr
    finally:
        run(["docker", "rm", "--force", "--volumes", name], check=False, timeout=60)


def test_image_runs_cli_commands_directly(dsnode_image: str) -> None:
    """Arguments that are not `serve` are executed as given: the image doubles as a client."""
    done = run(["docker", "run", "--rm", dsnode_image, "dsnode", "--help"], timeout=60)
    assert "status" in done.stdout
