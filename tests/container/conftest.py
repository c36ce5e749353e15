"""Fixtures for the container tests (``pytest -m container tests/container``).

- ``base_image``: the image to build on. ``$DSNODE_TEST_BASE_IMAGE`` when set (for example
  python:3.11-slim where a registry is reachable), else dsnode-base:bookworm from
  deploy/build-base-image.sh, which is cached on the machine between runs.
- ``dsnode_image``: the repository's Dockerfile built once per session under a unique tag,
  with build arg DSNODE_BUILD_ID=<session>; every image carrying that label (both stages, the
  compose test's too) is removed with its untagged parent layers at the end of the session,
  so a run leaves only the base image behind (cached on purpose).
  Before building, deploy/wheelhouse.sh fills deploy/wheelhouse/ on the host so the build
  needs no network from inside containers; ``DSNODE_TEST_WHEELHOUSE=0`` skips that.
- ``measurements``: numbers printed in the terminal summary (image size, build time, time to
  healthy).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from dockerctl import REPO, SESSION, CommandFailed, docker_available, run

_measurements: dict[str, str] = {}


@pytest.fixture(scope="session")
def docker_engine() -> None:
    reason = docker_available()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def measurements() -> dict[str, str]:
    return _measurements


@pytest.fixture(scope="session")
def session_id() -> str:
    return SESSION


@pytest.fixture(scope="session")
def base_image(docker_engine: None, measurements: dict[str, str]) -> str:
    explicit = os.environ.get("DSNODE_TEST_BASE_IMAGE")
    if explicit:
        return explicit
    image = "dsnode-base:bookworm"
    started = time.monotonic()
    run(["bash", str(REPO / "deploy" / "build-base-image.sh"), "--image", image], timeout=1200)
    measurements["base image (build or cache hit)"] = f"{time.monotonic() - started:.1f} s"
    return image


@pytest.fixture(scope="session")
def dsnode_image(base_image: str, measurements: dict[str, str], session_id: str) -> Iterator[str]:
    if os.environ.get("DSNODE_TEST_WHEELHOUSE", "1") != "0":
        run(["bash", str(REPO / "deploy" / "wheelhouse.sh")], timeout=600)
    tag = f"dsnode-test:{session_id}"
    cmd = [
        "docker", "build", "--build-arg", f"BASE_IMAGE={base_image}",
        "--build-arg", f"DSNODE_BUILD_ID={session_id}", "--tag", tag, str(REPO),
    ]  # fmt: skip
    started = time.monotonic()
    try:
        run(cmd, timeout=1200)
    except CommandFailed as e:
        # The classic builder on some storage drivers sporadically loses a fresh layer
        # ("layer does not exist"); a second build reuses the cache and succeeds.
        if "layer does not exist" not in str(e):
            raise
        run(cmd, timeout=1200)
    measurements["image build"] = f"{time.monotonic() - started:.1f} s"
    size = int(run(["docker", "image", "inspect", "-f", "{{.Size}}", tag]).stdout)
    measurements["image size"] = f"{size / 1e6:.0f} MB (base {base_image})"
    try:
        yield tag
    finally:
        remove_labelled(session_id)
        remove_built_images(session_id)


def remove_labelled(session_id: str) -> None:
    """Safety net: containers and volumes this session labelled, whatever state they are in."""
    label = f"label=org.dsnode.test-session={session_id}"
    ids = run(["docker", "ps", "-aq", "--filter", label], check=False).stdout.split()
    if ids:
        run(["docker", "rm", "--force", "--volumes", *ids], check=False, timeout=120)
    vols = run(["docker", "volume", "ls", "-q", "--filter", label], check=False).stdout.split()
    if vols:
        run(["docker", "volume", "rm", "--force", *vols], check=False, timeout=120)


def remove_built_images(session_id: str) -> None:
    """Every image this session built (both stages, any tag), with their untagged parents."""
    label = f"label=org.dsnode.build-id={session_id}"
    ids = run(["docker", "images", "-aq", "--filter", label], check=False).stdout.split()
    if ids:
        run(["docker", "rmi", "--force", *set(ids)], check=False, timeout=300)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _measurements:
        terminalreporter.section("container measurements")
        for name, value in _measurements.items():
            terminalreporter.write_line(f"{name}: {value}")
