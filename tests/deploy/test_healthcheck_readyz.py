"""deploy/healthcheck.py asks the admin listener's /readyz when the node runs one."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_deploy_files import load_healthcheck


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Readyz(http.server.BaseHTTPRequestHandler):
    answer = (200, "ready")

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        code, text = self.answer if self.path == "/readyz" else (404, "no")
        body = (text + "\n").encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None: ...


@pytest.fixture
def readyz() -> Iterator[tuple[str, type[_Readyz]]]:
    handler = type("Handler", (_Readyz,), {})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    for name in ("DSNODE_METRICS_LISTEN", "DSNODE_HEALTH_ENDPOINT", "DSNODE_LISTEN",
                 "DSNODE_AUTH_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DSNODE_CONFIG", str(tmp_path / "absent.toml"))
    return monkeypatch


def test_admin_address_comes_from_env_then_config(clean_env, tmp_path: Path) -> None:
    hc = load_healthcheck()
    assert hc.admin_address() is None
    config = tmp_path / "node.toml"
    config.write_text('metrics_listen = "127.0.0.1:9400"\n')
    clean_env.setenv("DSNODE_CONFIG", str(config))
    assert hc.admin_address() == "127.0.0.1:9400"
    clean_env.setenv("DSNODE_METRICS_LISTEN", "127.0.0.1:9500")
    assert hc.admin_address() == "127.0.0.1:9500"


def test_healthy_when_readyz_answers_200(clean_env, readyz, capsys) -> None:
    addr, _ = readyz
    clean_env.setenv("DSNODE_METRICS_LISTEN", addr)
    assert load_healthcheck().main() == 0
    assert capsys.readouterr().out.startswith("healthy: ")


def test_unhealthy_with_the_reason_when_readyz_answers_503(clean_env, readyz, capsys) -> None:
    addr, handler = readyz
    handler.answer = (503, "partition 0: no leader known")
    clean_env.setenv("DSNODE_METRICS_LISTEN", addr)
    assert load_healthcheck().main() == 1
    out = capsys.readouterr().out
    assert out.startswith("unhealthy: ") and "503: partition 0: no leader known" in out


def test_unhealthy_when_nothing_listens(clean_env, capsys) -> None:
    clean_env.setenv("DSNODE_METRICS_LISTEN", f"127.0.0.1:{free_port()}")
    assert load_healthcheck().main() == 1
    assert capsys.readouterr().out.startswith("unhealthy: ")
