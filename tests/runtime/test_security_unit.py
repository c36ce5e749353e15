"""Security policy without processes: tokens and roles, safe defaults, TLS files, `dsnode certs`."""

from __future__ import annotations

import importlib.util
import ssl
from pathlib import Path

import pytest
from click.testing import CliRunner

from dsnode.certs import certs_command, token_hash_command, write_bundle
from dsnode.cli import main as cli_main
from dsnode.client.tls import client_ssl_context
from dsnode.config import ConfigError, NodeConfig, load_config
from dsnode.core.commands import Get, Put, SubGet, SubPut, Txn
from dsnode.runtime.security import (
    Security,
    SecurityError,
    cert_names,
    check_exposure,
    hash_token,
    parse_tokens,
    required_role,
    role_allows,
)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    write_bundle(out, ["n1", "n2"])
    return out


# ---------------------------------------------------------------- tokens and roles
def test_tokens_file_stores_hashes_with_roles() -> None:
    text = f"# comment\n\n{hash_token('a')} read alice\n{hash_token('b')} admin\n"
    assert parse_tokens(text) == {hash_token("a"): "read", hash_token("b"): "admin"}


@pytest.mark.parametrize(("line", "why"), [
    ("plain-token read", "not in clear"),
    (f"{hash_token('a')} superuser", "not read, readwrite or admin"),
    (f"{hash_token('a')}", "expected"),
    ("sha256:zz read", "not in clear"),
    (f"{hash_token('a')} read\n{hash_token('a')} admin", "twice"),
])
def test_bad_tokens_file_lines_are_named(line: str, why: str) -> None:
    with pytest.raises(SecurityError, match=why) as err:
        parse_tokens(line, "tokens")
    assert "line" in str(err.value)


def test_roles_per_op() -> None:
    assert required_role("get", Get(b"k")) == "read"
    assert required_role("status") == "read"
    assert required_role("ring") == "read"
    assert required_role("put", Put(b"k", b"v")) == "readwrite"
    assert required_role("txn", Txn((), (SubGet(b"k"),), ())) == "read"
    assert required_role("txn", Txn((), (), (SubPut(b"k", b"v"),))) == "readwrite"
    assert required_role("member_add") == "admin"  # anything else is administration
    assert role_allows("admin", "readwrite") and not role_allows("read", "readwrite")
    assert not role_allows(None, "read")


def test_token_roles_and_cluster_token(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{hash_token('rw')} readwrite\n")
    sec = Security(NodeConfig(auth_tokens_file=tokens, auth_token="cluster"))
    assert sec.token_role("rw") == "readwrite"
    assert sec.token_role("cluster") == "admin"
    assert sec.token_role("nope") is None and sec.token_role(None) is None
    assert sec.initial_role() is None
    assert Security(NodeConfig()).initial_role() == "admin"  # no authentication configured


# ---------------------------------------------------------------- safe defaults
def cfg(**kw) -> NodeConfig:
    return NodeConfig(**kw)


def test_loopback_without_security_starts() -> None:
    assert check_exposure(cfg(listen="127.0.0.1:7379")) == []
    assert check_exposure(cfg(listen="[::1]:7379")) == []
    assert check_exposure(cfg(listen="localhost:7379")) == []


@pytest.mark.parametrize("listen", ["0.0.0.0:7379", "10.0.0.1:7379", "[::]:7379", "myhost:7379"])
def test_non_loopback_without_tls_or_tokens_refuses(listen: str) -> None:
    with pytest.raises(SecurityError, match="insecure = true"):
        check_exposure(cfg(listen=listen))
    warnings = check_exposure(cfg(listen=listen, insecure=True))
    assert any("insecure" in w for w in warnings)


def test_peers_must_be_able_to_authenticate(tmp_path: Path) -> None:
    peers = "n1=10.0.0.1:7379,n2=10.0.0.2:7379"
    tokens = tmp_path / "t"
    with pytest.raises(SecurityError, match="peers"):
        check_exposure(cfg(listen="0.0.0.0:7379", peers=peers, auth_tokens_file=tokens))
    warnings = check_exposure(cfg(listen="0.0.0.0:7379", peers=peers, auth_token="s"))
    assert any("plain text" in w for w in warnings)
    with pytest.raises(SecurityError, match="peers have no way"):
        check_exposure(cfg(peers="n1=127.0.0.1:1,n2=127.0.0.1:2", auth_tokens_file=tokens))


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "config").rglob("*.toml"))
)
def test_every_shipped_config_passes_the_safe_defaults_check(path: str) -> None:
    config = load_config({}, env={}, config_file=REPO / path)
    check_exposure(config)  # raises if the file would refuse to start
    assert not config.insecure


def test_tls_settings_are_checked_together() -> None:
    with pytest.raises(ConfigError, match="together"):
        load_config({"tls_cert_file": "a.pem"}, env={})
    with pytest.raises(ConfigError, match="client_cert_auth needs tls_ca_file"):
        load_config({"client_cert_auth": "true"}, env={})
    with pytest.raises(ConfigError, match="insecure.*boolean"):
        load_config({}, env={"DSNODE_INSECURE": "maybe"})
    assert load_config({}, env={"DSNODE_INSECURE": "yes"}).insecure


# ---------------------------------------------------------------- TLS files
def test_security_loads_certs_and_names_bad_files(certs: Path, tmp_path: Path) -> None:
    good = NodeConfig(tls_cert_file=certs / "n1.pem", tls_key_file=certs / "n1.key",
                      tls_ca_file=certs / "ca.pem")
    sec = Security(good)
    assert sec.server_context is not None
    assert sec.server_context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert sec.server_context.verify_mode == ssl.CERT_OPTIONAL
    assert sec.reload() and sec.counters["reloads"] == 1
    wrong_key = good.model_copy(update={"tls_key_file": certs / "n2.key"})
    with pytest.raises(SecurityError, match="tls_cert_file"):
        Security(wrong_key)
    missing = good.model_copy(update={"tls_ca_file": tmp_path / "nope.pem"})
    with pytest.raises(SecurityError, match="tls_ca_file .*no such file"):
        Security(missing)


def test_cert_names_reads_san_and_cn() -> None:
    cert = {"subject": ((("commonName", "n1"),),),
            "subjectAltName": (("DNS", "n1"), ("DNS", "localhost"), ("IP Address", "127.0.0.1"))}
    assert cert_names(cert) == {"n1", "localhost"}
    assert cert_names({}) == set() and cert_names(None) == set()


def test_client_ssl_context(certs: Path, tmp_path: Path) -> None:
    assert client_ssl_context() is None
    ctx = client_ssl_context(certs / "ca.pem", certs / "client.pem", certs / "client.key")
    assert ctx is not None and ctx.check_hostname
    with pytest.raises(ValueError, match="CA file"):
        client_ssl_context(tmp_path / "missing.pem")
    with pytest.raises(ValueError, match="needs its certificate"):
        client_ssl_context(key=certs / "client.key")


def test_cli_takes_cacert_from_flag_and_environment(certs: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(cli_main, ["--cacert", str(tmp_path / "nope.pem"), "get", "k"])
    assert res.exit_code == 2 and "nope.pem" in res.output
    res = runner.invoke(cli_main, ["get", "k"], env={"DSNODE_CACERT": str(tmp_path / "env.pem")})
    assert res.exit_code == 2 and "env.pem" in res.output
    res = runner.invoke(cli_main, ["get", "k", "--key", str(certs / "client.key")])
    assert res.exit_code == 2 and "--cert" in res.output


# ---------------------------------------------------------------- dsnode certs
def test_certs_command_makes_named_certs_and_hashed_tokens(tmp_path: Path) -> None:
    out = tmp_path / "tls"
    res = CliRunner().invoke(certs_command, ["--out", str(out), "--nodes", "a1,a2", "--san",
                                             "10.1.2.3"])
    assert res.exit_code == 0, res.output
    from cryptography import x509
    cert = x509.load_pem_x509_certificate((out / "a1.pem").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "a1" in san.get_values_for_type(x509.DNSName)
    assert "10.1.2.3" in {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}
    tokens = parse_tokens((out / "tokens").read_text())
    assert sorted(tokens.values()) == ["admin", "read", "readwrite"]
    admin = (out / "admin.token").read_text().strip()
    assert admin not in (out / "tokens").read_text() and tokens[hash_token(admin)] == "admin"
    assert (out / "a1.key").stat().st_mode & 0o077 == 0
    before = (out / "ca.pem").read_bytes()
    res = CliRunner().invoke(certs_command, ["--out", str(out), "--nodes", "a1", "--if-missing"])
    assert res.exit_code == 0 and (out / "ca.pem").read_bytes() == before
    res = CliRunner().invoke(certs_command, ["--out", str(out), "--nodes", "Bad!"])
    assert res.exit_code == 2
    res = CliRunner().invoke(token_hash_command, ["read"], input="abc\n")
    assert res.output.strip() == f"{hash_token('abc')} read"


# ---------------------------------------------------------------- container health check
def test_healthcheck_uses_the_nodes_ca_and_read_token(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("hc", REPO / "deploy" / "healthcheck.py")
    assert spec is not None and spec.loader is not None
    hc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hc)
    (tmp_path / "read.token").write_text("rtok\n")
    conf = tmp_path / "node.toml"
    conf.write_text(f'listen = "0.0.0.0:9000"\ntls_cert_file = "/c.pem"\ntls_key_file = "/c.key"\n'
                    f'tls_ca_file = "/ca.pem"\nauth_tokens_file = "{tmp_path / "tokens"}"\n')
    for var in ("DSNODE_HEALTH_ENDPOINT", "DSNODE_LISTEN", "DSNODE_AUTH_TOKEN",
                "DSNODE_TLS_CA_FILE", "DSNODE_TLS_CERT_FILE", "DSNODE_TLS_KEY_FILE",
                "DSNODE_AUTH_TOKENS_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DSNODE_CONFIG", str(conf))
    assert hc.node_settings() == ("127.0.0.1:9000", "rtok")
    assert hc.tls_env() == {"DSNODE_CACERT": "/ca.pem", "DSNODE_CERT": "/c.pem",
                            "DSNODE_KEY": "/c.key"}
