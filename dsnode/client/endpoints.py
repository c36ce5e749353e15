"""Endpoints: ``host:port`` strings, parsed and printed (IPv6 in brackets)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["parse_endpoints", "fmt_endpoint"]


def parse_endpoints(endpoints: str | Iterable[str]) -> list[tuple[str, int]]:
    """Parse ``"host:port,host:port"`` or a list of ``host:port`` (IPv6 as ``[::1]:7379``).

    Raises ValueError naming the bad entry; the result is never empty.
    """
    items = endpoints.split(",") if isinstance(endpoints, str) else list(endpoints)
    out: list[tuple[str, int]] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        host, sep, port_text = item.rpartition(":")
        if not sep or not host:
            raise ValueError(f"endpoint {item!r} is not host:port")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        try:
            port = int(port_text)
        except ValueError:
            raise ValueError(f"endpoint {item!r} has a bad port") from None
        if not 0 < port < 65536:
            raise ValueError(f"endpoint {item!r} has a port out of range")
        out.append((host, port))
    if not out:
        raise ValueError("no endpoints given")
    return out


def fmt_endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
