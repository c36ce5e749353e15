"""TLS, mutual-TLS peers, tokens with roles and SIGHUP reloads, on real processes.

Issue 11: with TLS on a plain-text connection is refused; a peer must present a certificate
from the cluster CA naming the node id it claims; a ``read`` token cannot write; certificates
and tokens reload on SIGHUP without dropping connections.
"""

from __future__ import annotations

import signal
import socket
import ssl
import time
from pathlib import Path

import pytest
from harness import ServerPool, ServerProcess, free_port, wait_until

from dsnode.certs import load_ca, make_cert, write_bundle
from dsnode.client import Client, Unauthenticated
from dsnode.runtime.security import hash_token
from dsnode.wire.framing import FrameDecoder, pack_frame, unpack_payload

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("certs")
    write_bundle(out, ["n1", "n2", "n3"], clients=["client", "rogue"])
    return out


def tls_flags(certs: Path, node: str, *extra: str) -> tuple[str, ...]:
    return ("--tls-cert-file", str(certs / f"{node}.pem"), "--tls-key-file",
            str(certs / f"{node}.key"), "--tls-ca-file", str(certs / "ca.pem"), *extra)


def client_ctx(certs: Path, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    if cert is not None:
        ctx.load_cert_chain(str(certs / f"{cert}.pem"), str(certs / f"{cert}.key"))
    return ctx


def tls_call(addr: tuple[str, int], ctx: ssl.SSLContext | None, reqs: list[dict],
             timeout: float = 3.0) -> list[dict]:
    """Send ``reqs`` on one (TLS) connection; answers in order of arrival until all ids or EOF."""
    raw = socket.create_connection(addr, timeout=timeout)
    sock = ctx.wrap_socket(raw, server_hostname=addr[0]) if ctx is not None else raw
    with sock:
        sock.sendall(b"".join(pack_frame(r) for r in reqs))
        decoder, got = FrameDecoder(), []
        want = {r["id"] for r in reqs}
        while want - {g.get("id") for g in got}:
            data = sock.recv(65536)
            if not data:
                break
            got += [unpack_payload(p) for p in decoder.feed(data)]
        return got


def start_tls(srv: ServerProcess, certs: Path, token: str | None) -> ServerProcess:
    srv.spawn()

    def ready() -> bool:
        if not srv.running:
            raise AssertionError("node exited" + srv.output_tail())
        reqs = [{"id": 1, "op": "hello", "token": token}] if token else []
        try:
            got = tls_call(srv.addr, client_ctx(certs, "client"), [*reqs, {"id": 2, "op": "status"}])
        except (OSError, ValueError):
            return False
        return any(g.get("id") == 2 and g.get("ready") for g in got)

    wait_until(ready, 30, f"{srv.name} ready over TLS", srv.output_tail)
    return srv


def token(certs: Path, role: str) -> str:
    return (certs / f"{role}.token").read_text().strip()


def test_tls_node_refuses_plain_text_and_enforces_roles(pool: ServerPool, certs: Path) -> None:
    srv = start_tls(pool.new(*tls_flags(certs, "n1", "--auth-tokens-file", str(certs / "tokens"))),
                    certs, token(certs, "read"))
    # Plain text: the TLS handshake fails, nothing is answered, the connection is closed.
    assert tls_call(srv.addr, None, [{"id": 1, "op": "status"}]) == []
    ctx = client_ctx(certs)
    # Before hello: unauthenticated, definite.
    [ans] = tls_call(srv.addr, ctx, [{"id": 1, "op": "get", "key": b"k"}])
    assert ans["error"]["code"] == "unauthenticated" and ans["error"]["indeterminate"] is False
    # A read token reads but cannot write, a readwrite token writes, a wrong token is refused.
    hello = {"id": 1, "op": "hello", "token": token(certs, "read")}
    got = {a["id"]: a for a in tls_call(srv.addr, ctx, [
        hello, {"id": 2, "op": "get", "key": b"k"}, {"id": 3, "op": "put", "key": b"k", "value": b"v"},
        {"id": 4, "op": "txn", "then": [{"op": "get", "key": b"k"}]},
        {"id": 5, "op": "txn", "then": [{"op": "delete", "key": b"k"}]},
    ])}
    assert got[1]["ok"] and got[1]["role"] == "read"
    assert got[2]["ok"] and got[4]["ok"]
    for i in (3, 5):
        assert got[i]["error"]["code"] == "unauthenticated"
        assert got[i]["error"]["indeterminate"] is False
    got = tls_call(srv.addr, ctx, [{"id": 1, "op": "hello", "token": token(certs, "readwrite")},
                                   {"id": 2, "op": "put", "key": b"k", "value": b"v"}])
    assert got[1]["ok"] and got[1]["succeeded"]
    [bad] = tls_call(srv.addr, ctx, [{"id": 1, "op": "hello", "token": "guess"}])
    assert bad["error"]["code"] == "unauthenticated"


async def test_client_library_with_cacert_and_token(pool: ServerPool, certs: Path) -> None:
    srv = start_tls(pool.new(*tls_flags(certs, "n1", "--auth-tokens-file", str(certs / "tokens"))),
                    certs, token(certs, "read"))
    ep = f"127.0.0.1:{srv.port}"
    async with Client(ep, cacert=str(certs / "ca.pem"), token=token(certs, "admin")) as c:
        await c.put("a", "1")
        assert (await c.get("a")).value == b"1"
        st = await c.status()
        assert st["security"]["tls"] and st["security"]["tokens"] == 3
    async with Client(ep, cacert=str(certs / "ca.pem"), token=token(certs, "read")) as c:
        with pytest.raises(Unauthenticated) as err:
            await c.put("a", "2")
        assert not err.value.indeterminate


def test_client_cert_auth_requires_a_certificate(pool: ServerPool, certs: Path) -> None:
    srv = start_tls(pool.new(*tls_flags(certs, "n1", "--client-cert-auth", "true")), certs, None)
    with pytest.raises((ssl.SSLError, OSError)):
        got = tls_call(srv.addr, client_ctx(certs), [{"id": 1, "op": "status"}])
        assert got == []  # some TLS 1.3 stacks report the refusal as EOF on first read
        raise OSError("closed")
    got = tls_call(srv.addr, client_ctx(certs, "client"), [{"id": 1, "op": "put", "key": b"x",
                                                            "value": b"y"}])
    assert got[0]["ok"]


def test_mutual_tls_peers_and_impostors(pool: ServerPool, certs: Path) -> None:
    ports = {n: free_port() for n in ("n1", "n2", "n3")}
    peers = ",".join(f"{n}=127.0.0.1:{p}" for n, p in ports.items())
    nodes = [pool.new("--peers", peers, *tls_flags(certs, n), node_id=n, port=ports[n])
             for n in ports]
    for n in nodes:
        n.spawn()
    for n in nodes:
        start_ready = wait_until(
            lambda n=n: any(g.get("ready") for g in _try(tls_call, n.addr, client_ctx(certs),
                                                          [{"id": 1, "op": "status"}])),
            60, f"{n.name} ready", n.output_tail)
        assert start_ready
    n1 = nodes[0].addr
    # A certificate from the CA, but not named n2, claiming to be n2: refused and logged.
    rogue = tls_call(n1, client_ctx(certs, "rogue"), [{"id": 1, "op": "hello", "peer": "n2",
                                                       "cluster_id": "dsnode"}])
    assert rogue and rogue[0]["error"]["code"] == "unauthenticated"
    # n3's own certificate claiming to be n2: refused too.
    liar = tls_call(n1, client_ctx(certs, "n3"), [{"id": 1, "op": "hello", "peer": "n2",
                                                   "cluster_id": "dsnode"}])
    assert liar and "do not include 'n2'" in liar[0]["error"]["message"]
    # No certificate at all.
    bare = tls_call(n1, client_ctx(certs), [{"id": 1, "op": "hello", "peer": "n2",
                                             "cluster_id": "dsnode"}])
    assert bare and bare[0]["error"]["code"] == "unauthenticated"
    [st] = tls_call(n1, client_ctx(certs), [{"id": 1, "op": "status"}])
    assert st["security"]["peer_auth_failures"] >= 3
    assert all(p["link"]["connected"] for p in st["paxos"]["peers"].values())
    assert "peer_unauthenticated" in nodes[0].output()
    # The cluster still serves writes through its authenticated peer links.
    [put] = tls_call(nodes[2].addr, client_ctx(certs), [{"id": 1, "op": "put", "key": b"k",
                                                         "value": b"v", "timeout_ms": 10000}],
                     timeout=15)
    assert put["ok"]


def _try(fn, *args):
    try:
        return fn(*args)
    except (OSError, ValueError):
        return []


def test_sighup_reloads_certificate_and_tokens_without_dropping_connections(
    pool: ServerPool, certs: Path, tmp_path: Path
) -> None:
    live = tmp_path / "live"
    live.mkdir()
    for name in ("n1.pem", "n1.key", "ca.pem", "tokens"):
        (live / name).write_bytes((certs / name).read_bytes())
    srv = start_tls(pool.new(*tls_flags(live, "n1", "--auth-tokens-file", str(live / "tokens"))),
                    certs, token(certs, "read"))
    ctx = client_ctx(certs)
    held = ctx.wrap_socket(socket.create_connection(srv.addr, timeout=5), server_hostname="127.0.0.1")
    before = held.getpeercert(binary_form=True)
    # New certificate (same CA) and a new token, then SIGHUP.
    ca_key, ca_cert = load_ca(certs)
    key, cert = make_cert(ca_key, ca_cert, "n1", ["127.0.0.1"], server=True)
    from cryptography.hazmat.primitives import serialization
    (live / "n1.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    (live / "n1.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with (live / "tokens").open("a") as f:
        f.write(f"{hash_token('fresh-token')} readwrite fresh\n")
    srv.send_signal(signal.SIGHUP)

    def reloaded() -> bool:
        with ctx.wrap_socket(socket.create_connection(srv.addr, timeout=5),
                             server_hostname="127.0.0.1") as s:
            return s.getpeercert(binary_form=True) != before

    wait_until(reloaded, 15, "the new certificate to be served", srv.output_tail)
    got = tls_call(srv.addr, ctx, [{"id": 1, "op": "hello", "token": "fresh-token"},
                                   {"id": 2, "op": "put", "key": b"r", "value": b"1"}])
    assert got[1]["ok"], got
    # The connection opened before the reload still works.
    held.settimeout(5)
    held.sendall(pack_frame({"id": 7, "op": "hello", "token": token(certs, "read")})
                 + pack_frame({"id": 8, "op": "get", "key": b"r"}))
    decoder, answers, deadline = FrameDecoder(), [], time.monotonic() + 5
    while len(answers) < 2 and time.monotonic() < deadline:
        answers += [unpack_payload(p) for p in decoder.feed(held.recv(65536))]
    held.close()
    assert [a["ok"] for a in answers] == [True, True] and answers[1]["value"] == b"1"
    # A broken file on the next SIGHUP keeps the old settings (and says so).
    (live / "tokens").write_text("not a token line\n")
    srv.send_signal(signal.SIGHUP)
    wait_until(lambda: "security_reload_failed" in srv.output(), 10, "the failed reload logged")
    got = tls_call(srv.addr, ctx, [{"id": 1, "op": "hello", "token": "fresh-token"}])
    assert got[0]["ok"]


def test_non_loopback_listen_without_security_refuses_to_start(pool: ServerPool,
                                                                tmp_path: Path) -> None:
    port = free_port()
    rc, out = pool.run_to_exit("--listen", f"0.0.0.0:{port}")
    assert rc == 2
    lines = [ln for ln in out.splitlines() if ln.startswith("dsnode:")]
    assert len(lines) == 1 and "insecure = true" in lines[0] and "dsnode certs" in lines[0]
    srv = pool.new("--listen", f"0.0.0.0:{port}", "--insecure", "true", port=port)
    srv.start()
    assert "insecure = true" in srv.output()
