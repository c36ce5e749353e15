"""TLS settings of a client: a CA to trust, and optionally a client certificate (like etcdctl's
``--cacert``/``--cert``/``--key``)."""

from __future__ import annotations

import os
import ssl


def client_ssl_context(
    cacert: str | os.PathLike | None = None,
    cert: str | os.PathLike | None = None,
    key: str | os.PathLike | None = None,
) -> ssl.SSLContext | None:
    """An SSLContext for connecting to dsnode nodes, or None when nothing asks for TLS.

    ``cacert`` is the CA that signed the nodes' certificates (without it the system's CAs are
    trusted); ``cert``/``key`` a client certificate for nodes with ``client_cert_auth``. The
    node's certificate must name the host the client connects to. TLS 1.2 or later only.
    Raises ValueError naming the file that cannot be used.
    """
    if cacert is None and cert is None and key is None:
        return None
    if (cert is None) != (key is None) and cert is None:
        raise ValueError("a client key needs its certificate (--cert)")
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if cacert is not None:
        try:
            ctx.load_verify_locations(cafile=os.fspath(cacert))
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"CA file {os.fspath(cacert)!r}: {_why(e)}") from None
    if cert is not None:
        try:
            ctx.load_cert_chain(os.fspath(cert), os.fspath(key) if key is not None else None)
        except (OSError, ssl.SSLError) as e:
            raise ValueError(f"client certificate {os.fspath(cert)!r}: {_why(e)}") from None
    return ctx


def _why(e: BaseException) -> str:
    if isinstance(e, OSError) and e.strerror and not isinstance(e, ssl.SSLError):
        return e.strerror.lower()
    return str(e)
