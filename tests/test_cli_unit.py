"""The dsnode CLI's client commands, run with click's CliRunner against the fake server
(tests/client/fake_server.py) running on its own loop in a background thread."""

from __future__ import annotations

import base64
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from dsnode.cli import main, parse_txn_spec
from dsnode.cli_format import render_status
from dsnode.core.ring.hashing import partition_of


def _load_fake_server() -> Any:
    name = "dsnode_tests_fake_server"
    if name not in sys.modules:
        path = Path(__file__).parent / "client" / "fake_server.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


fs = _load_fake_server()
pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def srv():
    with fs.ThreadedFakeServer() as s:
        yield s


@pytest.fixture
def run(srv):
    """Invoke the CLI against the fake server; returns the click Result."""
    runner = CliRunner()

    def invoke(*args: str, input: bytes | str | None = None, env: dict | None = None) -> Any:
        full_env = {"DSNODE_ENDPOINTS": srv.endpoint, "DSNODE_OUTPUT": None, "DSNODE_TOKEN": None}
        full_env.update(env or {})
        return runner.invoke(main, ["--timeout", "2", *args], input=input, env=full_env)

    return invoke


def test_put_then_get_prints_value_and_version_lines(run):
    r = run("put", "greeting", "hello world")
    assert r.exit_code == 0, r.output
    assert r.stdout == "succeeded: true\nversion: 1\n"
    r = run("get", "greeting")
    assert r.exit_code == 0 and r.stdout == "hello world\n"
    r = run("get", "greeting", "--show-version")
    assert r.stdout == "hello world\n" and "version: 1" in r.stderr


def test_put_reads_value_from_stdin_byte_for_byte(run, srv):
    assert run("put", "k", input=b"line1\nline2\n").exit_code == 0
    assert run("put", "k2", "-", input=b"\x00\x01").exit_code == 0
    data = srv.call(lambda: dict(srv.server.data))
    assert data[b"k"] == (b"line1\nline2\n", 1)
    assert data[b"k2"] == (b"\x00\x01", 1)


def test_get_of_binary_value_is_escaped_in_text_and_exact_with_raw(run, srv):
    srv.call(lambda: srv.server.data.__setitem__(b"bin", (b"\xff\x00ok", 4)))
    r = run("get", "bin")
    assert r.exit_code == 0
    assert r.stdout == "\\xff\\x00ok\n" and "not UTF-8" in r.stderr
    r = run("get", "bin", "--raw")
    assert r.stdout_bytes == b"\xff\x00ok"
    r = run("get", "bin", "--hex")
    assert r.exit_code == 0 and r.stdout == "ff006f6b\n"


def test_get_escapes_terminal_control_bytes_and_backslashes_only_when_needed(run, srv):
    srv.call(lambda: srv.server.data.__setitem__(b"esc", (b"red\x1b[31m\\x", 1)))
    srv.call(lambda: srv.server.data.__setitem__(b"plain", ("a\\b\ttab\nline é".encode(), 1)))
    r = run("get", "esc")
    assert r.exit_code == 0 and "\x1b" not in r.stdout
    assert r.stdout == "red\\x1b[31m\\\\x\n" and "escaped" in r.stderr
    r = run("get", "plain")
    assert r.stdout == "a\\b\ttab\nline é\n" and r.stderr == ""


def test_get_missing_key_is_not_found_with_exit_1_in_both_formats(run):
    r = run("get", "nope")
    assert r.exit_code == 1 and r.stderr == "error: not_found: key not found: nope\n"
    r = run("--output", "json", "get", "nope")
    assert r.exit_code == 1 and r.stderr == ""
    assert json.loads(r.stdout) == {
        "error": {"code": "not_found", "message": "key not found: nope"}
    }


def test_json_output_uses_text_or_b64_suffix(run, srv):
    srv.call(lambda: srv.server.data.__setitem__(b"bin", (b"\xff", 2)))
    run("put", "t", "text")
    assert json.loads(run("-o", "json", "get", "t").stdout) == {
        "key": "t",
        "value": "text",
        "version": 1,
    }
    doc = json.loads(run("get", "bin", env={"DSNODE_OUTPUT": "json"}).stdout)
    assert doc == {"key": "bin", "value_b64": base64.b64encode(b"\xff").decode(), "version": 2}
    r = run("put", "t", "again", "--output", "json")
    assert json.loads(r.stdout) == {"succeeded": True, "version": 2}


def test_failed_if_version_is_not_an_error(run):
    run("put", "k", "v")
    r = run("put", "k", "w", "--if-version", "0")
    assert r.exit_code == 0 and r.stdout == "succeeded: false\nversion: 1\n"
    r = run("del", "k", "--if-version", "9")
    assert r.exit_code == 0 and r.stdout.startswith("succeeded: false\n")
    r = run("del", "k", "--if-version", "1")
    assert r.exit_code == 0 and r.stdout == "succeeded: true\nexisted: true\nversion: 1\n"
    r = run("del", "k")
    assert r.exit_code == 0 and "existed: false" in r.stdout


def test_txn_reads_json_spec_from_stdin_and_file(run, tmp_path):
    spec = {
        "if": [{"key": "a", "version": 0}],
        "then": [
            {"op": "put", "key": "a", "value": "1"},
            {"op": "put", "key": "b", "value_b64": base64.b64encode(b"\xfe").decode()},
            {"op": "get", "key": "c"},
        ],
        "else": [{"op": "get", "key": "a"}, {"op": "del", "key": "b"}],
    }
    r = run("txn", input=json.dumps(spec))
    assert r.exit_code == 0, r.output
    assert r.stdout == ("succeeded: true\nput a: version 1\nput b: version 1\nget c: (not found)\n")
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    r = run("txn", str(path))
    assert r.exit_code == 0
    assert r.stdout == "succeeded: false\nget a: 1 (version 1)\ndelete b: existed true\n"
    r = run("-o", "json", "txn", str(path))
    assert json.loads(r.stdout) == {
        "succeeded": False,
        "results": [{"value": "1", "version": 1}, {"existed": False}],
    }


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("not json", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"iff": []}', "unknown field"),
        ('{"if": [{"key": "a"}]}', "'version'"),
        ('{"then": [{"op": "put", "key": "a"}]}', "'value'"),
        ('{"then": [{"op": "cas", "key": "a"}]}', "'op'"),
        ('{"then": [{"op": "get", "key_b64": "!!"}]}', "base64"),
    ],
)
def test_malformed_txn_spec_is_a_usage_error(run, srv, spec, problem):
    r = run("txn", input=spec)
    assert r.exit_code == 2 and problem in r.stderr
    assert srv.call(lambda: list(srv.server.requests)) == []


def test_parse_txn_spec_defaults_to_empty_lists():
    assert parse_txn_spec(b"{}") == ([], [], [])


def test_status_text_and_json(run):
    r = run("status")
    assert r.exit_code == 0
    lines = r.stdout.splitlines()
    assert lines[:4] == ["node_id: n1", "cluster_id: c1", "ready: true", "leader: n1"]
    assert "  NODE_ID  ADDR         STATE" in lines and "  n1       127.0.0.1:1  alive" in lines
    assert "  ID  REPLICAS  LEADER  APPLIED" in lines and "  0   n1        n1      -" in lines
    assert "{" not in r.stdout
    doc = json.loads(run("status", "-o", "json").stdout)
    assert doc["cluster_id"] == "c1" and doc["partitions"][0]["leader"] == "n1"


PARTITIONED_STATUS = {
    "node_id": "n2", "cluster_id": "c1", "ready": True, "revision": 41, "keys": 7,
    "ring": {"partitions": 4, "replication": 2, "epoch": 3},
    "members": [{"node_id": "n1", "addr": "127.0.0.1:7379", "state": "alive"},
                {"node_id": "n2", "addr": "127.0.0.1:7380", "state": "alive"},
                {"node_id": "n3", "addr": "127.0.0.1:7381", "state": "dead"}],
    "partitions": [
        {"id": 0, "replicas": ["n1", "n2"], "leader": "n1", "applied": 17},
        {"id": 1, "replicas": ["n2", "n3"], "leader": "n2", "applied": 1234},
        {"id": 2, "replicas": ["n3", "n1"], "leader": None, "applied": None},
        {"id": 3, "replicas": ["n2", "n1"], "leader": "n2", "applied": 9, "lag": 2},
    ],
    "paxos": {"quiesced": 3},
}


def test_status_of_a_partitioned_node_is_a_summary_then_one_row_per_partition(srv):
    async def hook(req, conn):
        return fs.ok(req, **PARTITIONED_STATUS) if req.get("op") == "status" else None

    srv.call(lambda: setattr(srv.server, "hook", hook))
    r = CliRunner().invoke(main, ["--endpoints", srv.endpoint, "status"])
    assert r.exit_code == 0, r.output
    lines = r.stdout.splitlines()
    assert lines[:7] == [
        "node_id: n2", "cluster_id: c1", "ready: true",
        "ring: 4 partitions, replication 2, epoch 3",
        "leads: 2 of 4 partitions (replica of 3)",
        "revision: 41", "keys: 7",
    ]
    at = lines.index("partitions: 4")
    assert lines[at + 1:at + 6] == [
        "  ID  REPLICAS  LEADER  APPLIED  LAG",
        "  0   n1,n2     n1      17       -",
        "  1   n2,n3     n2      1234     -",
        "  2   n3,n1     -       -        -",  # not hosted here: applied is null
        "  3   n2,n1     n2      9        2",
    ]
    assert "paxos.quiesced: 3" in lines and not any(x.startswith("leader:") for x in lines)
    r = CliRunner().invoke(main, ["--endpoints", srv.endpoint, "status", "--output", "json"])
    assert r.exit_code == 0 and json.loads(r.stdout) == PARTITIONED_STATUS


def test_status_table_of_a_node_without_ring_or_partitions():
    lines = render_status({"node_id": "n1", "ready": False, "members": []})
    assert lines == ["node_id: n1", "ready: false", "leader: -", "members: 0", "partitions: 0"]


def _serve_ring(srv, ring):
    srv.call(lambda: setattr(srv.server, "ring", ring))


def test_key_prints_partition_replicas_and_leader_in_text_and_json(run, srv):
    ring = {
        "partitions": 4, "replication": 2, "epoch": 9,
        "members": [{"node_id": "n1", "addr": "127.0.0.1:7379"},
                    {"node_id": "n2", "addr": "[::1]:7380"}],
        "map": [{"id": p, "replicas": ["n2", "n1"] if p % 2 else ["n1", "n2"],
                 "leader": None if p == 3 else ("n2" if p % 2 else "n1")} for p in range(4)],
    }
    _serve_ring(srv, ring)
    keys = {partition_of(f"k{i}".encode(), 4): f"k{i}" for i in range(100)}
    r = run("key", keys[1])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines() == [
        f"key: {keys[1]}", "partition: 1 of 4", "replicas: n2,n1",
        "leader: n2 ([::1]:7380)", "epoch: 9",
    ]
    r = run("key", keys[3])
    assert "leader: -" in r.stdout.splitlines()
    r = run("key", keys[0], "-o", "json")
    assert json.loads(r.stdout) == {
        "key": keys[0], "partition": 0, "partitions": 4, "replicas": ["n1", "n2"],
        "leader": "n1", "leader_addr": "127.0.0.1:7379", "epoch": 9,
    }
    binary = b"\xff\x1b"
    r = run("-o", "json", "key", binary.decode("utf-8", "surrogateescape"))
    doc = json.loads(r.stdout)
    assert doc["key_b64"] == base64.b64encode(binary).decode()
    assert doc["partition"] == partition_of(binary, 4)
    ops = [x["op"] for x in srv.call(lambda: list(srv.server.requests))]
    assert ops.count("ring") == 4 and set(ops) <= {"ring", "status"}  # status: discovery


def test_key_errors_old_server_malformed_map_and_empty_key(run, srv):
    r = run("key", "k")  # the fake server has no ring op until given a map
    assert r.exit_code == 1
    assert r.stderr.startswith("error: unknown_op: this node has no partition map")
    _serve_ring(srv, {"partitions": 2, "replication": 1, "epoch": 1, "members": [],
                      "map": [{"id": 0, "replicas": [], "leader": None}]})
    r = run("key", "k", "-o", "json")
    assert r.exit_code == 1
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "internal" and "malformed partition map" in err["message"]
    r = run("key", "")
    assert r.exit_code == 2 and "KEY must not be empty" in r.stderr


def test_key_waits_out_a_map_not_known_yet_then_reports_unavailable(srv):
    async def hook(req, conn):
        if req.get("op") == "ring":
            return fs.err(req, "unavailable", "partition map not known yet")
        return None

    srv.call(lambda: setattr(srv.server, "hook", hook))
    r = CliRunner().invoke(main, ["--endpoints", srv.endpoint, "--timeout", "0.3", "key", "k"])
    assert r.exit_code == 1
    assert r.stderr == "error: unavailable: partition map not known yet\n"


def test_server_error_exits_1_with_one_line_message(srv):
    async def hook(req, conn):
        if req.get("op") == "put":
            return fs.err(req, "unavailable", "no leader for partition 3", indeterminate=True)
        return None

    srv.call(lambda: setattr(srv.server, "hook", hook))
    r = CliRunner().invoke(main, ["--endpoints", srv.endpoint, "put", "k", "v"])
    assert r.exit_code == 3  # the write's outcome is unknown
    assert r.stderr.startswith("error: unavailable: no leader for partition 3")
    assert "outcome unknown: the write may or may not have happened" in r.stderr
    assert r.stderr.count("\n") == 1
    r = CliRunner().invoke(main, ["--endpoints", srv.endpoint, "-o", "json", "put", "k", "v"])
    assert r.exit_code == 3
    err = json.loads(r.stdout)["error"]
    assert err["code"] == "unavailable" and err["outcome_unknown"] is True


def test_unreachable_endpoint_exits_1_and_bad_endpoint_exits_2():
    with fs.ThreadedFakeServer() as gone:
        endpoint = gone.endpoint
    r = CliRunner().invoke(main, ["get", "k", "--endpoints", endpoint, "--timeout", "0.3"])
    assert r.exit_code == 1 and r.stderr.startswith("error: connect_failed: ")
    assert endpoint in r.stderr and "DSNODE_ENDPOINTS" in r.stderr
    r = CliRunner().invoke(main, ["get", "k", "--endpoints", "nonsense"])
    assert r.exit_code == 2 and r.stderr.startswith("error: usage: --endpoints")


def test_token_option_and_env_send_hello_first():
    with fs.ThreadedFakeServer(token="tok") as srv:
        runner = CliRunner()
        env = {"DSNODE_ENDPOINTS": srv.endpoint}
        r = runner.invoke(main, ["put", "k", "v"], env=env)
        assert r.exit_code == 1 and "unauthenticated" in r.stderr
        r = runner.invoke(main, ["put", "k", "v"], env={**env, "DSNODE_TOKEN": "tok"})
        assert r.exit_code == 0, r.output
        r = runner.invoke(main, ["get", "k", "--token", "tok"], env=env)
        assert r.stdout == "v\n"


def test_usage_errors_exit_2(run):
    assert run("get").exit_code == 2
    assert run("put", "k", "v", "--if-version", "-1").exit_code == 2
    assert run("--output", "yaml", "status").exit_code == 2


def test_main_is_callable_entry_point_and_lists_client_commands():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for name in ("get", "put", "del", "txn", "status", "key"):
        assert f"  {name} " in r.stdout


# --------------------------------------------------------------------------- error contract


@pytest.mark.parametrize(
    ("args", "stdin", "problem"),
    [
        (("put", "", "v"), None, "KEY must not be empty"),
        (("get", ""), None, "KEY must not be empty"),
        (("del", ""), None, "KEY must not be empty"),
        (("txn",), '{"then": [{"op": "put", "key": "a", "value": "1"},'
                   ' {"op": "delete", "key": "a"}]}', "written twice"),
        (("txn",), '{"then": [{"op": "get", "key": ""}]}', "must not be empty"),
        (("txn",), "{not json", "not valid JSON"),
        (("txn",), '{"then": [{"op": "get", "key": "a", "valeu": "x"}]}', "unknown field"),
        (("put", "k"), b"", "--allow-empty"),
        (("-o", "json", "get", "k", "--raw"), None, "text output"),
        (("-o", "json", "get", "k", "--show-version"), None, "text output"),
        (("get", "k", "--raw", "--hex"), None, "exclude"),
    ],
)
def test_inputs_rejected_before_sending_exit_2_with_one_error_line(run, srv, args, stdin, problem):
    r = run(*args, input=stdin)
    assert r.exit_code == 2, r.output
    out = r.stdout if "json" in args else r.stderr
    if "json" in args:
        err = json.loads(out)["error"]
        assert err["code"] == "usage" and problem in err["message"]
    else:
        assert out.startswith("error: usage: ") and problem in out and out.count("\n") == 1
    assert srv.call(lambda: list(srv.server.requests)) == []


def test_etcd_style_value_compare_says_only_version_compares_exist(run, srv):
    spec = '{"if": [{"key": "a", "target": "VALUE", "result": "EQUAL", "value": "x"}]}'
    r = run("txn", input=spec)
    assert r.exit_code == 2 and "only version compares exist" in r.stderr
    assert srv.call(lambda: list(srv.server.requests)) == []


def test_click_usage_errors_follow_the_error_contract_in_text_and_json(run):
    r = run("get")
    assert r.exit_code == 2 and r.stderr.startswith("error: usage: Missing argument 'KEY'")
    assert r.stderr.count("\n") == 1
    r = run("-o", "json", "put", "k", "v", "--if-version", "x")
    assert r.exit_code == 2 and json.loads(r.stdout)["error"]["code"] == "usage"


def test_put_with_empty_stdin_needs_allow_empty(run, srv):
    r = run("put", "k", "--allow-empty", input=b"")
    assert r.exit_code == 0, r.output
    assert srv.call(lambda: dict(srv.server.data))[b"k"] == (b"", 1)
    assert run("put", "k2", "", input=b"").exit_code == 0  # an explicit empty VALUE is fine


def test_txn_text_output_escapes_keys_and_values(run, srv):
    srv.call(lambda: srv.server.data.__setitem__(b"v", (b"x\x1by\nz", 3)))
    spec = {"then": [{"op": "put", "key_b64": base64.b64encode(b"a\x1b[2J").decode(),
                      "value": "1"}, {"op": "get", "key": "v"}]}
    r = run("txn", input=json.dumps(spec))
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.stdout
    assert r.stdout == "succeeded: true\nput a\\x1b[2J: version 1\nget v: x\\x1by\\x0az (version 3)\n"


def test_status_check_exits_1_when_the_node_is_not_ready(srv):
    async def hook(req, conn):
        if req.get("op") == "status":
            return fs.ok(req, node_id="n1", cluster_id="c1", ready=False, members=[],
                         partitions=[{"id": 0, "replicas": ["n1"], "leader": None}])
        return None

    srv.call(lambda: setattr(srv.server, "hook", hook))
    runner = CliRunner()
    r = runner.invoke(main, ["--endpoints", srv.endpoint, "status"])
    assert r.exit_code == 0 and "ready: false" in r.stdout and "leader: -" in r.stdout
    r = runner.invoke(main, ["--endpoints", srv.endpoint, "status", "--check"])
    assert r.exit_code == 1
    r = runner.invoke(main, ["--endpoints", srv.endpoint, "-o", "json", "status", "--check"])
    assert r.exit_code == 1 and json.loads(r.stdout)["ready"] is False


def test_endpoint_health_and_status_over_every_endpoint(srv):
    with fs.ThreadedFakeServer() as gone:
        dead = gone.endpoint
    runner = CliRunner()
    r = runner.invoke(main, ["--endpoints", srv.endpoint, "endpoint", "health"])
    assert r.exit_code == 0, r.output
    assert r.stdout.splitlines()[0].split() == ["ENDPOINT", "HEALTH", "TOOK", "ERROR"]
    assert r.stdout.splitlines()[1].split()[:2] == [srv.endpoint, "true"]
    eps = f"{srv.endpoint},{dead}"
    r = runner.invoke(main, ["--endpoints", eps, "endpoint", "health", "-o", "json"])
    assert r.exit_code == 1
    rows = {e["endpoint"]: e for e in json.loads(r.stdout)["endpoints"]}
    assert rows[srv.endpoint]["health"] is True and rows[srv.endpoint]["error"] is None
    assert rows[dead]["health"] is False and "connect_failed" in rows[dead]["error"]
    r = runner.invoke(main, ["--endpoints", eps, "endpoint", "status"])
    assert r.exit_code == 1
    lines = r.stdout.splitlines()
    assert lines[0].split()[:3] == ["ENDPOINT", "NODE", "ID"]
    assert any(line.startswith(srv.endpoint) and " n1 " in line for line in lines)
    r = runner.invoke(main, ["--endpoints", srv.endpoint, "endpoint", "status", "-o", "json"])
    assert r.exit_code == 0
    (row,) = json.loads(r.stdout)["endpoints"]
    assert row["node_id"] == "n1" and row["leader"] == "n1" and row["ready"] is True


def test_help_lists_real_commands_and_describes_options():
    r = CliRunner().invoke(main, ["--help"])
    assert "partitioned" not in r.stdout and "endpoint" in r.stdout
    ctx = click.Context(main)
    for path in (["get"], ["put"], ["del"], ["txn"], ["status"], ["key"], ["local-cluster"],
                 ["bench"],
                 ["endpoint", "health"], ["endpoint", "status"]):
        cmd: Any = main
        for name in path:
            cmd = cmd.get_command(ctx, name)
        for p in cmd.params:
            if isinstance(p, click.Option):
                assert p.help, f"dsnode {' '.join(path)} {p.opts[0]} has no description"
        r = CliRunner().invoke(main, [*path, "--help"])
        assert r.exit_code == 0, r.output


# --------------------------------------------------------------------------- serve flags


def test_serve_flags_have_descriptions_and_types_from_the_settings_model():
    from dsnode.config import SETTINGS
    from dsnode.runtime.main import serve_command

    params = {p.name: p for p in serve_command.params}
    for name in SETTINGS:
        p = params[name]
        assert p.help and not p.help.startswith("["), f"--{name} has no description"
    assert params["max_key_bytes"].type.name == "integer"
    assert params["clock_drift_max"].type.name == "float"
    assert params["fsync"].type.name == "boolean"
    assert list(params["log_level"].type.choices) == ["debug", "info", "warning", "error"]
    assert list(params["log_format"].type.choices) == ["auto", "console", "json"]
    assert params["listen"].type.name == "text"
    r = CliRunner().invoke(main, ["serve", "--help"])
    assert "--max-key-bytes INTEGER" in r.stdout and "--fsync BOOLEAN" in r.stdout
    assert "[debug|info|warning|error]" in r.stdout


def test_serve_flags_still_override_environment_and_toml(monkeypatch, tmp_path):
    import dsnode.runtime.main as serve_main

    seen = []
    monkeypatch.setattr(serve_main, "run", lambda config: seen.append(config) or 0)
    toml = tmp_path / "node.toml"
    toml.write_text("max_key_bytes = 7\nfsync = true\nlog_level = 'error'\n")
    env = {"DSNODE_FSYNC": "true", "DSNODE_MAX_KEY_BYTES": "9"}
    r = CliRunner().invoke(main, ["serve", "--config", str(toml), "--fsync", "false",
                                  "--max-key-bytes", "11"], env=env)
    assert r.exit_code == 0, r.output
    cfg = seen[-1]
    assert (cfg.fsync, cfg.max_key_bytes, cfg.log_level) == (False, 11, "error")
    r = CliRunner().invoke(main, ["serve", "--config", str(toml)], env=env)
    assert (seen[-1].fsync, seen[-1].max_key_bytes) == (True, 9)
    r = CliRunner().invoke(main, ["serve", "--max-key-bytes", "0"])
    assert r.exit_code == 2 and "max_key_bytes" in r.stderr  # range still checked by pydantic


def test_write_without_an_answer_is_outcome_unknown_with_exit_3(srv):
    async def hook(req, conn):
        return fs.SILENT if req.get("op") in ("put", "txn") else None

    srv.call(lambda: setattr(srv.server, "hook", hook))
    runner = CliRunner()
    r = runner.invoke(main, ["--endpoints", srv.endpoint, "--timeout", "0.4", "put", "k", "v"])
    assert r.exit_code == 3
    assert r.stderr.startswith("error: deadline_exceeded: no answer from the server within 0.4s")
    assert "outcome unknown: the write may or may not have happened" in r.stderr
    r = runner.invoke(main, ["--endpoints", srv.endpoint, "--timeout", "0.4", "-o", "json",
                             "txn"], input="{}")
    assert r.exit_code == 3
    assert json.loads(r.stdout)["error"]["outcome_unknown"] is True


def test_put_without_value_refuses_to_read_a_terminal():
    import os
    import pty
    import subprocess

    master, slave = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-m", "dsnode", "put", "k"], stdin=slave,
                           capture_output=True, timeout=20,
                           env={**os.environ, "DSNODE_ENDPOINTS": "127.0.0.1:1"})
    finally:
        os.close(master)
        os.close(slave)
    assert r.returncode == 2
    assert r.stderr.decode().startswith("error: usage: no VALUE given and stdin is a terminal")
