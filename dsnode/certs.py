"""`dsnode certs`: a development CA, node and client certificates and a token file.

Everything a secured cluster needs, in one directory (docs/SECURITY.md):

    ca.pem, ca.key                 the CA (keep ca.key off the nodes in production)
    <node>.pem, <node>.key         one per node: CN and DNS SAN = the node id (peers check it),
                                   plus localhost, 127.0.0.1, ::1 and every --san
    <client>.pem, <client>.key     client certificates (for client_cert_auth)
    tokens                         auth_tokens_file: 'sha256:HEX ROLE NAME' lines, hashes only
    admin.token, readwrite.token, read.token   the tokens themselves, one per role

Keys are ECDSA P-256; private keys and tokens are written with mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
import sys
from pathlib import Path

import click

from dsnode.config import NODE_ID_RE
from dsnode.runtime.security import ROLES, hash_token

CA_NAME = "dsnode development CA"


def _crypto():  # imported lazily: only this command needs `cryptography`
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _san(name: str):
    x509 = _crypto()[0]
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def make_ca(days: int = 3650, name: str = CA_NAME):
    """(key, certificate) of a new self-signed CA."""
    x509, hashes, _, ec, _, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def make_cert(ca_key, ca_cert, name: str, sans: list[str], *, server: bool, days: int = 365):
    """(key, certificate) for ``name`` (CN and first DNS SAN), signed by the CA.

    Node certificates (``server=True``) serve and dial (serverAuth and clientAuth); client
    certificates only dial.
    """
    x509, hashes, _, ec, EKU, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    names = list(dict.fromkeys([name, *sans]))
    usages = [EKU.SERVER_AUTH, EKU.CLIENT_AUTH] if server else [EKU.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert


def _write(path: Path, data: bytes, private: bool = False) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _pem_key(key) -> bytes:
    serialization = _crypto()[2]
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    return cert.public_bytes(_crypto()[2].Encoding.PEM)


def load_ca(out: Path):
    x509, _, serialization, _, _, _ = _crypto()
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((out / "ca.pem").read_bytes())
    return key, cert


def write_bundle(
    out: Path, nodes: list[str], *, sans: list[str] = (), clients: list[str] = ("client",),
    days: int = 365,
) -> dict[str, str]:
    """Make (or extend, reusing an existing CA) the directory described above.

    Returns the new tokens by role. An existing CA in ``out`` is reused, so nodes added later
    get certificates from the same CA; the tokens are written afresh only if ``tokens`` is
    missing.
    """
    out.mkdir(parents=True, exist_ok=True)
    if (out / "ca.pem").exists() and (out / "ca.key").exists():
        ca_key, ca_cert = load_ca(out)
    else:
        ca_key, ca_cert = make_ca()
        _write(out / "ca.key", _pem_key(ca_key), private=True)
        _write(out / "ca.pem", _pem_cert(ca_cert))
    base = ["localhost", "127.0.0.1", "::1", *sans]
    for node in nodes:
        key, cert = make_cert(ca_key, ca_cert, node, base, server=True, days=days)
        _write(out / f"{node}.key", _pem_key(key), private=True)
        _write(out / f"{node}.pem", _pem_cert(cert))
    for client in clients:
        key, cert = make_cert(ca_key, ca_cert, client, [], server=False, days=days)
        _write(out / f"{client}.key", _pem_key(key), private=True)
        _write(out / f"{client}.pem", _pem_cert(cert))
    tokens: dict[str, str] = {}
    if not (out / "tokens").exists():
        lines = ["# dsnode auth_tokens_file: 'sha256:HEX ROLE NAME'; only hashes are stored"]
        for role in ROLES:
            token = secrets.token_urlsafe(32)
            tokens[role] = token
            _write(out / f"{role}.token", token.encode() + b"\n", private=True)
            lines.append(f"{hash_token(token)} {role} {role}-token")
        _write(out / "tokens", ("\n".join(lines) + "\n").encode(), private=True)
    return tokens


def _ids(text: str) -> list[str]:
    ids = [p.strip() for p in text.split(",") if p.strip()]
    for i in ids:
        if not NODE_ID_RE.match(i):
            raise click.BadParameter(f"{i!r} does not match [a-z0-9][a-z0-9_-]{{0,62}}")
    if not ids:
        raise click.BadParameter("no names given")
    return ids


@click.command("certs")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write into (created; an existing CA there is reused).")
@click.option("--nodes", required=True, help="Node ids, comma-separated: node1,node2,node3.")
@click.option("--san", "sans", multiple=True,
              help="Extra DNS name or IP for every node certificate (repeatable).")
@click.option("--clients", default="client", show_default=True,
              help="Client certificate names, comma-separated.")
@click.option("--days", type=click.IntRange(1, 3650), default=365, show_default=True,
              help="Validity of node and client certificates.")
@click.option("--if-missing", is_flag=True,
              help="Do nothing when DIR already holds ca.pem and a certificate per node.")
def certs_command(out_dir: str, nodes: str, sans: tuple[str, ...], clients: str, days: int,
                  if_missing: bool) -> None:
    """Make a development CA, node certificates named after the node ids, client
    certificates and a token file with one token per role (docs/SECURITY.md)."""
    out = Path(out_dir)
    node_ids = _ids(nodes)
    client_ids = _ids(clients)
    clash = set(node_ids) & set(client_ids)
    if clash:
        raise click.BadParameter(f"client names must differ from node ids: {sorted(clash)}")
    if if_missing and (out / "ca.pem").exists() and all(
        (out / f"{n}.pem").exists() for n in node_ids
    ):
        click.echo(f"certs: {out} already set up; nothing to do", err=True)
        return
    try:
        write_bundle(out, node_ids, sans=list(sans), clients=client_ids, days=days)
    except OSError as e:
        click.echo(f"error: cannot write {out}: {e.strerror or e}", err=True)
        sys.exit(1)
    click.echo(f"certs: wrote CA, {len(node_ids)} node and {len(client_ids)} client "
               f"certificates and tokens to {out}", err=True)


@click.command("token-hash")
@click.argument("role", type=click.Choice(ROLES))
@click.option("--name", default="", help="Optional label written after the role.")
def token_hash_command(role: str, name: str) -> None:
    """Read a token on stdin; print its auth_tokens_file line ('sha256:HEX ROLE [NAME]')."""
    token = sys.stdin.readline().strip()
    if not token:
        raise click.BadParameter("no token on stdin", param_hint="stdin")
    click.echo(f"{hash_token(token)} {role} {name}".rstrip())
