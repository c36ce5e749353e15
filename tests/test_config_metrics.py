"""The observability settings: `metrics_listen` (off by default, loopback only until TLS
exists) and `livez_loop_stall_max_ms`."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from dsnode.cli import main
from dsnode.config import ConfigError, load_config


def test_the_admin_listener_is_off_by_default():
    cfg = load_config({}, {})
    assert cfg.metrics_listen is None
    assert cfg.livez_loop_stall_max_ms == 5000


@pytest.mark.parametrize("addr", ["127.0.0.1:9379", "127.0.0.5:1", "[::1]:9379",
                                  "localhost:9379"])
def test_loopback_addresses_are_accepted(addr):
    assert load_config({"metrics_listen": addr}, {}).metrics_listen == addr
    assert load_config({}, {"DSNODE_METRICS_LISTEN": addr}).metrics_listen == addr


@pytest.mark.parametrize(
    "flags, needle",
    [
        ({"metrics_listen": "0.0.0.0:9379"}, "not a loopback address"),
        ({"metrics_listen": "192.0.2.7:9379"}, "not a loopback address"),
        ({"metrics_listen": "metrics.example:9379"}, "not a loopback address"),
        ({"metrics_listen": "9379"}, "not HOST:PORT"),
        ({"metrics_listen": "127.0.0.1:0"}, "port out of range"),
        ({"livez_loop_stall_max_ms": "50"}, "livez_loop_stall_max_ms"),
    ],
)
def test_bad_observability_settings_are_one_line_errors(flags, needle):
    with pytest.raises(ConfigError) as e:
        load_config(flags, {})
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert next(iter(flags)) in str(e.value)


def test_serve_refuses_a_public_metrics_address_with_exit_status_2(tmp_path):
    result = CliRunner().invoke(main, ["serve", "--data-dir", str(tmp_path),
                                       "--metrics-listen", "0.0.0.0:9379"])
    assert result.exit_code == 2
    assert "metrics_listen" in result.output and "loopback" in result.output
