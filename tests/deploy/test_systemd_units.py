"""The systemd units in deploy/systemd: valid for systemd, and carrying the settings we rely on.

``systemd-analyze verify`` needs the ExecStart binary to exist, so it runs on a temp copy whose
ExecStart points at a stub script. It prints problems as warnings and may still exit 0, so any
output about our unit fails the test. The template is verified as an instance (dsnode@node1).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNIT_DIR = Path(__file__).resolve().parents[2] / "deploy" / "systemd"
UNITS = ["dsnode.service", "dsnode@.service"]
EXEC = "/opt/dsnode/bin/dsnode"

systemd_analyze = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    systemd_analyze is None,
    reason="systemd-analyze not installed (apt-get install systemd)",
)


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value in order (keys like SystemCallFilter repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"setting outside a section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def install_for_verify(unit: str, tmp_path: Path) -> Path:
    """A copy of ``unit`` whose ExecStart binary exists; templates become an instance."""
    stub = tmp_path / "bin" / "dsnode"
    stub.parent.mkdir(parents=True, exist_ok=True)
    stub.write_text("#!/bin/sh\nexit 0\n")
    stub.chmod(0o755)
    text = (UNIT_DIR / unit).read_text()
    assert EXEC in text
    name = unit.replace("@.", "@node1.")
    target = tmp_path / name
    target.write_text(text.replace(EXEC, str(stub)))
    return target


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_passes_systemd_analyze_verify(unit: str, tmp_path: Path) -> None:
    path = install_for_verify(unit, tmp_path)
    done = subprocess.run(
        [systemd_analyze, "verify", "--man=no", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0 and "Failed to" in output and "bus" in output.lower():
        pytest.skip(f"systemd-analyze cannot run in this sandbox: {output.splitlines()[0]}")
    # Warnings (unknown keys, unparsable values) leave the exit status at 0: read the output.
    ours = [line for line in output.splitlines() if path.name in line or "dsnode" in line]
    assert done.returncode == 0 and not ours, output


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_sandbox_exposure_is_low(unit: str, tmp_path: Path) -> None:
    """`systemd-analyze security` rates the sandbox; keep the hardening from eroding."""
    path = install_for_verify(unit, tmp_path)
    done = subprocess.run(
        [systemd_analyze, "security", "--offline=yes", "--no-pager", str(path)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout + done.stderr)
    if match is None:
        pytest.skip(f"systemd-analyze security --offline unsupported: {done.stderr.strip()[:200]}")
    assert float(match.group(1)) <= 2.0, done.stdout


@pytest.mark.parametrize("unit", UNITS)
def test_unit_has_notify_restart_and_hardening(unit: str) -> None:
    service = parse_unit((UNIT_DIR / unit).read_text())["Service"]
    one = {key: values[-1] for key, values in service.items()}
    expected = {
        "Type": "notify",
        "NotifyAccess": "main",
        "Restart": "on-failure",
        "RestartPreventExitStatus": "2",
        "User": "dsnode",
        "LimitNOFILE": "65536",
        "TimeoutStopSec": "15",
        "KillSignal": "SIGTERM",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "RestrictNamespaces": "yes",
        "LockPersonality": "yes",
        "MemoryDenyWriteExecute": "yes",
        "CapabilityBoundingSet": "",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }
    assert {k: one.get(k) for k in expected} == expected
    assert "@system-service" in service["SystemCallFilter"]
    assert one["ExecStart"].startswith(f"{EXEC} serve --config /etc/dsnode/")
    assert "ConfigurationDirectory" in one and "StateDirectory" in one


def test_template_keeps_instances_apart() -> None:
    """dsnode@NAME reads /etc/dsnode/NAME.toml and owns /var/lib/dsnode/NAME."""
    service = parse_unit((UNIT_DIR / "dsnode@.service").read_text())["Service"]
    assert service["ExecStart"] == [f"{EXEC} serve --config /etc/dsnode/%i.toml"]
    assert service["StateDirectory"] == ["dsnode/%i"]
    assert "DSNODE_DATA_DIR=/var/lib/dsnode/%i" in service["Environment"]
    assert service["WorkingDirectory"] == ["/var/lib/dsnode/%i"]


def test_single_unit_data_dir_is_its_state_directory() -> None:
    service = parse_unit((UNIT_DIR / "dsnode.service").read_text())["Service"]
    assert service["StateDirectory"] == ["dsnode"]
    assert "DSNODE_DATA_DIR=/var/lib/dsnode" in service["Environment"]
