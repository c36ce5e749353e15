"""Example configs, the container entrypoint and the health check, without Docker.

The example TOML files must track the settings model (dsnode/config.py): a setting added there
and forgotten in config/node.example.toml, or a default changed in one place only, fails here.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from dsnode.config import NodeConfig, load_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "config"
ENTRYPOINT = REPO / "deploy" / "entrypoint.sh"


# ---------------------------------------------------------------- config files


def test_example_lists_every_setting_with_its_default() -> None:
    text = (CONFIG / "node.example.toml").read_text()
    values = tomllib.loads(text)
    mentioned = set(re.findall(r"^#? ?([a-z_]+) = ", text, flags=re.MULTILINE))
    missing = [name for name in NodeConfig.model_fields if name not in mentioned]
    assert not missing, f"settings missing from config/node.example.toml: {missing}"
    for name, value in values.items():
        assert name in NodeConfig.model_fields, f"{name} is not a setting"
        assert value == NodeConfig.model_fields[name].default, f"{name}: not the default"
    unset = {n for n, f in NodeConfig.model_fields.items() if f.default is None}
    assert unset.isdisjoint(values), "settings without a default belong in comments"


@pytest.mark.parametrize(
    "path",
    sorted(p.relative_to(CONFIG).as_posix() for p in CONFIG.rglob("*.toml")),
)
def test_every_config_file_loads(path: str) -> None:
    config = load_config({}, env={}, config_file=CONFIG / path)
    if path.startswith(("cluster3/", "vm3/")):
        assert config.node_id == Path(path).stem
        if config.join is not None:  # a node that joins the running cluster later
            assert config.peers is None and config.advertise is not None
        else:
            assert config.peers is not None and len(config.peers) == 3


def test_cluster_files_agree_on_membership() -> None:
    for group in ("cluster3", "vm3"):
        configs = [load_config({}, env={}, config_file=p) for p in (CONFIG / group).glob("*.toml")]
        formed = [c for c in configs if c.join is None]
        assert len({json.dumps(c.peers, sort_keys=True) for c in formed}) == 1, group
        assert len({c.cluster_id for c in configs}) == 1, group


def test_compose_mounts_each_node_its_own_config() -> None:
    text = (REPO / "docker-compose.yml").read_text()
    for i in (1, 2, 3):
        assert f"./config/cluster3/node{i}.toml:/etc/dsnode/dsnode.toml:ro" in text
        assert f"node{i}-data:/var/lib/dsnode" in text
        assert f"${{DSNODE_PORT{i}:-{7378 + i}}}:7379" in text


# ---------------------------------------------------------------- entrypoint


@pytest.fixture
def fake_dsnode(tmp_path: Path) -> dict[str, str]:
    """PATH with a `dsnode` that prints its arguments, one per line, and DSNODE_CONFIG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "dsnode"
    script.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\necho "env=${DSNODE_CONFIG:-unset}"\n')
    script.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "DSNODE_DEFAULT_CONFIG": str(tmp_path / "absent.toml"),
    }


def entrypoint(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), *args], env=env, capture_output=True, text=True, timeout=30
    )


def test_entrypoint_serves_with_config_from_env(fake_dsnode: dict, tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('node_id = "x"\n')
    done = entrypoint({**fake_dsnode, "DSNODE_CONFIG": str(config)}, "--log-level", "debug")
    assert done.returncode == 0, done.stderr
    args = done.stdout.splitlines()
    assert args == ["serve", "--config", str(config), "--log-level", "debug", "env=unset"]


def test_entrypoint_uses_default_config_when_present(fake_dsnode: dict, tmp_path: Path) -> None:
    default = Path(fake_dsnode["DSNODE_DEFAULT_CONFIG"])
    default.write_text("")
    done = entrypoint(fake_dsnode)
    assert done.stdout.splitlines() == ["serve", "--config", str(default), "env=unset"]


def test_entrypoint_without_config_passes_flags_only(fake_dsnode: dict) -> None:
    done = entrypoint(fake_dsnode, "serve", "--node-id", "a")
    assert done.stdout.splitlines() == ["serve", "--node-id", "a", "env=unset"]


def test_entrypoint_rejects_missing_config_file(fake_dsnode: dict, tmp_path: Path) -> None:
    done = entrypoint({**fake_dsnode, "DSNODE_CONFIG": str(tmp_path / "nope.toml")})
    assert done.returncode == 2
    assert "nope.toml is not a readable file" in done.stderr
    assert done.stdout == ""


def test_entrypoint_runs_other_commands_unchanged(fake_dsnode: dict) -> None:
    done = entrypoint(fake_dsnode, "dsnode", "status", "--endpoints", "n1:7379")
    assert done.stdout.splitlines() == ["status", "--endpoints", "n1:7379", "env=unset"]


# ---------------------------------------------------------------- health check


def load_healthcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("healthcheck", REPO / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("output", "ready"),
    [
        ('{"node_id": "n1", "ready": true}', True),
        ('{"node_id": "n1", "ready": false}', False),
        ('{"node_id": "n1"}', False),
        ('[{"ready": true}]', True),
        ('{"status": {"ready": true}}', True),
        ('{"ready": "yes"}', False),
    ],
)
def test_healthcheck_reads_ready_flag(output: str, ready: bool) -> None:
    assert load_healthcheck().is_ready(output) is ready


def test_healthcheck_targets_listen_port_and_token_from_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "node.toml"
    config.write_text('listen = "0.0.0.0:9000"\nauth_token = "s3cret"\n')
    for name in ("DSNODE_HEALTH_ENDPOINT", "DSNODE_LISTEN", "DSNODE_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DSNODE_CONFIG", str(config))
    hc = load_healthcheck()
    assert hc.node_settings() == ("127.0.0.1:9000", "s3cret")
    monkeypatch.setenv("DSNODE_LISTEN", "0.0.0.0:9100")
    monkeypatch.setenv("DSNODE_AUTH_TOKEN", "other")
    assert hc.node_settings() == ("127.0.0.1:9100", "other")
    monkeypatch.setenv("DSNODE_HEALTH_ENDPOINT", "127.0.0.1:1")
    assert hc.node_settings() == ("127.0.0.1:1", "other")
