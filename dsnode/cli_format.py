"""Text rendering for the ``dsnode`` CLI: safe display of keys and values, tables, status.

Nothing here talks to a server; :mod:`dsnode.cli` calls these to print what it got.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from typing import Any

from dsnode.client.endpoints import fmt_endpoint
from dsnode.client.ring import RingMap

# C0 controls other than newline and tab, DEL, and the C1 controls: bytes a terminal may
# act on (escape sequences, cursor moves) instead of showing.
_UNSAFE = {c for c in range(0x20) if c not in (0x09, 0x0A)} | {0x7F} | set(range(0x80, 0xA0))


def escape(data: bytes, *, keep_newlines: bool = True) -> tuple[str, bool]:
    """Bytes -> (text safe to print on a terminal, whether it had to be escaped).

    Valid UTF-8 without control characters is returned as is. Anything else is shown
    escaped: control characters (newlines and tabs too unless ``keep_newlines``) and bytes
    that are not UTF-8 as ``\\xNN``, and backslashes doubled, so the rendering is
    unambiguous.
    """
    allowed = "\n\t" if keep_newlines else ""
    try:
        text = data.decode()
        if not any(ord(c) in _UNSAFE or (c in "\n\t" and c not in allowed) for c in text):
            return text, False
    except UnicodeDecodeError:
        pass
    text = data.replace(b"\\", b"\\\\").decode("utf-8", "backslashreplace")
    return "".join(
        f"\\x{ord(c):02x}" if ord(c) in _UNSAFE or (c in "\n\t" and c not in allowed) else c
        for c in text
    ), True


def key_text(key: bytes | str) -> str:
    """A key as shown in text output: escaped, on one line."""
    if isinstance(key, str):
        key = key.encode()
    return escape(key, keep_newlines=False)[0]


def jsonable(obj: Any) -> Any:
    """Make a response JSON-ready: bytes under key ``k`` become text, or base64 under
    ``k_b64`` when not UTF-8; bytes inside lists become text or ``{"b64": ...}``."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            name = k if isinstance(k, str) else key_text(k) if isinstance(k, bytes) else str(k)
            if isinstance(v, bytes):
                try:
                    out[name] = v.decode()
                except UnicodeDecodeError:
                    out[name + "_b64"] = base64.b64encode(v).decode()
            else:
                out[name] = jsonable(v)
        return out
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bytes):
        try:
            return obj.decode()
        except UnicodeDecodeError:
            return {"b64": base64.b64encode(obj).decode()}
    return obj


def scalar(value: Any) -> str:
    """One cell or value in text output."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return key_text(value)
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple) and all(not isinstance(v, dict | list) for v in value):
        return ",".join(scalar(v) for v in value) or "-"
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    """Left-aligned columns separated by two spaces; the header in capitals."""
    cells = [[h.upper() for h in headers], *[[scalar(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def render_members(members: list[dict[str, Any]]) -> list[str]:
    """``dsnode member list``: one row per member (fields an older node lacks show '-')."""
    rows = []
    for m in members:
        if not isinstance(m, dict):
            continue
        silence = m.get("silence_ms")
        rows.append([m.get("node_id"), m.get("addr"), m.get("state"),
                     "-" if silence is None else f"{silence / 1000:.1f}s",
                     m.get("replicas", "-"), m.get("leads", "-")])
    return table(["id", "address", "state", "silent", "replicas", "leads"], rows)


def _flatten(prefix: str, value: Any, out: list[tuple[str, Any]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out.append((prefix, value))


def _dict_table(title: str, rows: dict[str, Any]) -> list[str]:
    """``{id: {field: scalar}}`` as a table with an ID column."""
    cols: list[str] = []
    flat: dict[str, dict[str, Any]] = {}
    for rid, info in rows.items():
        items: list[tuple[str, Any]] = []
        _flatten("", info, items)
        flat[rid] = dict(items)
        for name, _ in items:
            if name not in cols:
                cols.append(name)
    lines = [f"{title}:"]
    lines += ["  " + line for line in table(["id", *cols],
                                            ([rid, *(f.get(c) for c in cols)]
                                             for rid, f in flat.items()))]
    return lines


def _list_table(title: str, rows: list[dict[str, Any]]) -> list[str]:
    cols: list[str] = []
    flats = []
    for r in rows:
        items: list[tuple[str, Any]] = []
        _flatten("", r, items)
        flats.append(dict(items))
        for name, _ in items:
            if name not in cols:
                cols.append(name)
    lines = [f"{title}: {len(rows)}"]
    if rows:
        lines += ["  " + line for line in table(cols, ([f.get(c) for c in cols] for f in flats))]
    return lines


# Shown first, in this order, when present.
_STATUS_HEAD = ("node_id", "cluster_id", "ready", "ring", "leads", "leader", "role", "revision",
                "keys", "server_version")
# The columns of the partition table, first, in this order; any other field follows.
_PARTITION_COLS = ("id", "replicas", "leader", "applied")


def render_status(st: dict[str, Any]) -> list[str]:
    """A node's status for people: the essentials first, then members and partitions as
    tables (one row per partition: id, replicas, leader, applied), then every other field
    as ``name: value`` (nested maps flattened to dotted names, maps of maps and lists of
    maps as tables). Never a raw JSON blob.

    With a ``ring`` (a partitioned node) the summary says how the keyspace is split and
    how many partitions this node leads and hosts; without one (an older node) it names
    the leader(s) of its groups, as before."""
    st = dict(st)
    partitions = [p for p in st.pop("partitions", None) or [] if isinstance(p, dict)]
    members = st.pop("members", None) or []
    ring = st.pop("ring", None)
    paxos = st.get("paxos") if isinstance(st.get("paxos"), dict) else {}
    node_id = st.pop("node_id", None)
    head: dict[str, Any] = {
        "node_id": node_id,
        "cluster_id": st.pop("cluster_id", None),
        "ready": st.pop("ready", None),
        "ring": None,
        "leads": None,
        "leader": None,
        "role": paxos.get("role"),
        "revision": st.pop("revision", None),
        "keys": st.pop("keys", None),
        "server_version": st.pop("server_version", None),
    }
    shown = {"ready"}  # shown even when absent; the others only when present
    if isinstance(ring, dict):
        head["ring"] = (f"{scalar(ring.get('partitions'))} partitions, replication "
                        f"{scalar(ring.get('replication'))}, epoch {scalar(ring.get('epoch'))}")
        led = sum(1 for p in partitions if node_id is not None and p.get("leader") == node_id)
        hosted = sum(1 for p in partitions if node_id in (p.get("replicas") or ()))
        head["leads"] = f"{led} of {len(partitions)} partitions (replica of {hosted})"
    else:
        leaders = {p.get("leader") for p in partitions}
        head["leader"] = ",".join(sorted(str(x) for x in leaders if x)) or None
        shown.add("leader")
    lines = [f"{name}: {scalar(head[name])}" for name in _STATUS_HEAD
             if head[name] is not None or name in shown]
    lines += _list_table("members", [m for m in members if isinstance(m, dict)])
    rows = [{c: p.get(c) for c in _PARTITION_COLS}
            | {k: v for k, v in p.items() if k not in _PARTITION_COLS} for p in partitions]
    lines += _list_table("partitions", rows)
    lines += _render_rest("", st)
    return lines


def key_placement(ring: RingMap, key: bytes) -> dict[str, Any]:
    """Where ``key`` lives by a partition map:
    ``key``, ``partition``, ``partitions``, ``replicas``, ``leader`` (None: none known),
    ``leader_addr`` and ``epoch``."""
    part = ring.part_of(key)
    addr = ring.addrs.get(part.leader) if part.leader is not None else None
    return {
        "key": key,
        "partition": part.id,
        "partitions": ring.partitions,
        "replicas": list(part.replicas),
        "leader": part.leader,
        "leader_addr": None if addr is None else fmt_endpoint(*addr),
        "epoch": ring.epoch,
    }


def render_key(info: dict[str, Any]) -> list[str]:
    """:func:`key_placement` for people: ``name: value`` lines."""
    return [
        f"key: {key_text(info['key'])}",
        f"partition: {info['partition']} of {info['partitions']}",
        f"replicas: {scalar(info['replicas'])}",
        f"leader: {scalar(info['leader'])}"
        + (f" ({info['leader_addr']})" if info["leader_addr"] else ""),
        f"epoch: {info['epoch']}",
    ]


def _render_rest(prefix: str, st: dict[str, Any]) -> list[str]:
    lines, tables = _rest(prefix, st)
    return lines + tables


def _rest(prefix: str, st: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(``name: value`` lines, table lines) for the fields of ``st``."""
    lines: list[str] = []
    tables: list[str] = []
    for name, value in st.items():
        full = f"{prefix}{name}"
        if full == "paxos.role":
            continue  # shown at the top as "role"
        if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            tables += _dict_table(full, value)
        elif isinstance(value, dict):
            sub_lines, sub_tables = _rest(full + ".", value)
            lines += sub_lines
            tables += sub_tables
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            tables += _list_table(full, value)
        else:
            lines.append(f"{full}: {scalar(value)}")
    return lines, tables
