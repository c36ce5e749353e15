"""Client request maps -> validated commands (PROTOCOL.md, "Ops").

Strict at the boundary: wrong types are errors, never coerced (``True`` is
not an int here, ``"1"`` is not a version). Every failure is a
:class:`RequestError` whose message names the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsnode.core.commands import (
    LINEARIZABLE,
    STALE,
    Command,
    Delete,
    Get,
    Put,
    SubDelete,
    SubGet,
    SubOp,
    SubPut,
    Txn,
)
from dsnode.core.membership.members import (
    ADDRESS_BYTES_MAX,
    ID_BYTES_MAX,
    NODE_ID_RE,
    MemberAdd,
    MemberLeave,
    MemberRemove,
)
from dsnode.wire.errors import BAD_REQUEST, TOO_LARGE, UNKNOWN_OP

MAX_ID = (1 << 63) - 1
MAX_TIMEOUT_MS = 24 * 3600 * 1000
MAX_CLIENT_ID_BYTES = 64

# Fields every op accepts besides its own.
COMMON_FIELDS = frozenset({"id", "op", "timeout_ms"})
OP_FIELDS: dict[str, frozenset[str]] = {
    "hello": frozenset({"token", "client", "peer", "cluster_id", "incarnation", "log_end",
                        "promised", "pins", "cluster_uuid", "dropped", "conf_epoch"}),
    "get": frozenset({"key", "consistency"}),
    "put": frozenset({"key", "value", "if_version", "client_id", "seq", "retry"}),
    "delete": frozenset({"key", "if_version", "client_id", "seq", "retry"}),
    "txn": frozenset({"if", "then", "else", "client_id", "seq", "retry"}),
    "status": frozenset(),
    "ring": frozenset(),  # the partition map (PROTOCOL.md, "ring")
    # membership changes (PROTOCOL.md, "Membership")
    "member_join": frozenset({"node_id", "address", "incarnation"}),
    "member_leave": frozenset({"node_id"}),
    "member_remove": frozenset({"node_id"}),
}


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Limits:
    max_key_bytes: int = 1024
    max_value_bytes: int = 1024 * 1024
    max_txn_ops: int = 128


@dataclass(frozen=True, slots=True)
class Request:
    id: int
    op: str
    command: Command | None  # None for hello/status/ring
    timeout_ms: int | None
    fields: dict
    # the write's request id for deduplication: [client_id, seq] or [client_id, seq, True]
    # for a retry (PROTOCOL.md, "Client request ids"); None without one
    dedup: list | None = None


def _bad(message: str) -> RequestError:
    return RequestError(BAD_REQUEST, message)


def _is_int(v: object) -> bool:
    return type(v) is int


def request_id(obj: object) -> int | None:
    """The request id if ``obj`` carries a valid one, else None (answered with id 0)."""
    if isinstance(obj, dict):
        rid = obj.get("id")
        if _is_int(rid) and 1 <= rid <= MAX_ID:
            return rid
    return None


def _key(v: object, field: str, limits: Limits) -> bytes:
    if isinstance(v, str):
        v = v.encode()
    elif not isinstance(v, bytes):
        raise _bad(f"field {field!r} must be bin or str, got {_type_name(v)}")
    if not v:
        raise _bad(f"field {field!r} must not be empty")
    if len(v) > limits.max_key_bytes:
        raise RequestError(
            TOO_LARGE, f"field {field!r}: key of {len(v)} bytes exceeds max_key_bytes={limits.max_key_bytes}"
        )
    return v


def _value(v: object, field: str, limits: Limits) -> bytes:
    if isinstance(v, str):
        v = v.encode()
    elif not isinstance(v, bytes):
        raise _bad(f"field {field!r} must be bin or str, got {_type_name(v)}")
    if len(v) > limits.max_value_bytes:
        raise RequestError(
            TOO_LARGE,
            f"field {field!r}: value of {len(v)} bytes exceeds max_value_bytes={limits.max_value_bytes}",
        )
    return v


def _version(v: object, field: str) -> int:
    if not _is_int(v):
        raise _bad(f"field {field!r} must be an integer, got {_type_name(v)}")
    if v < 0 or v > MAX_ID:
        raise _bad(f"field {field!r} must be between 0 and 2^63-1")
    return v


def _type_name(v: object) -> str:
    if v is None:
        return "nil"
    return {bytes: "bin", str: "str", int: "int", float: "float", bool: "bool", list: "array",
            dict: "map"}.get(type(v), type(v).__name__)


def _check_fields(obj: dict, allowed: frozenset[str], where: str) -> None:
    for k in obj:
        if k not in allowed:
            raise _bad(f"unknown field {k!r}{where}")


def parse_request(obj: object, limits: Limits) -> Request:
    """Validate one decoded frame. ``obj`` must already be a dict with a valid id."""
    assert isinstance(obj, dict)
    rid = obj["id"]
    op = obj.get("op")
    if op is None:
        raise _bad("missing field 'op'")
    if not isinstance(op, str):
        raise _bad(f"field 'op' must be str, got {_type_name(op)}")
    allowed = OP_FIELDS.get(op)
    if allowed is None:
        raise RequestError(UNKNOWN_OP, f"unknown op {op!r}")
    for k in obj:
        if k not in allowed and k not in COMMON_FIELDS:
            raise _bad(f"unknown field {k!r} for op {op!r}")
    timeout_ms = obj.get("timeout_ms")
    if timeout_ms is not None:
        if not _is_int(timeout_ms) or timeout_ms <= 0:
            raise _bad("field 'timeout_ms' must be a positive integer")
        timeout_ms = min(timeout_ms, MAX_TIMEOUT_MS)
    cmd: Command | None = None
    if op == "get":
        cmd = Get(_key(_required(obj, "key"), "key", limits), _consistency(obj.get("consistency")))
    elif op == "put":
        cmd = Put(
            _key(_required(obj, "key"), "key", limits),
            _value(_required(obj, "value"), "value", limits),
            _opt_version(obj, "if_version"),
        )
    elif op == "delete":
        cmd = Delete(_key(_required(obj, "key"), "key", limits), _opt_version(obj, "if_version"))
    elif op == "txn":
        cmd = _txn(obj, limits)
    elif op in MEMBER_OPS:
        cmd = _member_command(op, obj)
    elif op == "hello":
        for f in ("token", "client", "peer", "cluster_id", "incarnation", "cluster_uuid"):
            if f in obj and not isinstance(obj[f], str):
                raise _bad(f"field {f!r} must be str, got {_type_name(obj[f])}")
        for f in ("log_end", "promised", "pins"):
            if f in obj and not isinstance(obj[f], dict):
                raise _bad(f"field {f!r} must be a map, got {_type_name(obj[f])}")
    dedup = _dedup(obj) if op in ("put", "delete", "txn") else None
    return Request(rid, op, cmd, timeout_ms, obj, dedup)


MEMBER_OPS = frozenset(("member_join", "member_leave", "member_remove"))


def _member_command(op: str, obj: dict) -> Command:
    node_id = _required(obj, "node_id")
    if not isinstance(node_id, str) or not NODE_ID_RE.match(node_id):
        raise _bad("field 'node_id' must match [a-z0-9][a-z0-9_-]{0,62}")
    if op == "member_leave":
        return MemberLeave(node_id)
    if op == "member_remove":
        return MemberRemove(node_id)
    address, incarnation = _required(obj, "address"), _required(obj, "incarnation")
    if not isinstance(address, str) or len(address.encode()) > ADDRESS_BYTES_MAX:
        raise _bad(f"field 'address' must be a HOST:PORT str of at most {ADDRESS_BYTES_MAX} bytes")
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad(f"field 'address' {address!r} is not HOST:PORT")
    if not isinstance(incarnation, str) or not 0 < len(incarnation.encode()) <= ID_BYTES_MAX:
        raise _bad(f"field 'incarnation' must be a non-empty str of at most {ID_BYTES_MAX} bytes")
    return MemberAdd(node_id, address, incarnation)


def _dedup(obj: dict) -> list | None:
    """The optional ``client_id``/``seq``/``retry`` fields of a write, validated."""
    client_id, seq, retry = obj.get("client_id"), obj.get("seq"), obj.get("retry")
    if client_id is None and seq is None:
        if retry is not None:
            raise _bad("field 'retry' needs 'client_id' and 'seq'")
        return None
    if client_id is None or seq is None:
        raise _bad("fields 'client_id' and 'seq' go together")
    if isinstance(client_id, str):
        client_id = client_id.encode()
    elif not isinstance(client_id, bytes):
        raise _bad(f"field 'client_id' must be bin or str, got {_type_name(client_id)}")
    if not 1 <= len(client_id) <= MAX_CLIENT_ID_BYTES:
        raise _bad(f"field 'client_id' must be 1 to {MAX_CLIENT_ID_BYTES} bytes")
    if not _is_int(seq) or not 1 <= seq <= MAX_ID:
        raise _bad("field 'seq' must be an integer between 1 and 2^63-1")
    if retry is not None and type(retry) is not bool:
        raise _bad(f"field 'retry' must be a bool, got {_type_name(retry)}")
    return [client_id, seq, True] if retry else [client_id, seq]


def _required(obj: dict, field: str, where: str = "") -> object:
    if field not in obj:
        raise _bad(f"missing field {(where + '.' + field) if where else field!r}")
    return obj[field]


def _opt_version(obj: dict, field: str) -> int | None:
    v = obj.get(field)
    return None if v is None else _version(v, field)


def _consistency(v: object) -> str:
    if v is None:
        return LINEARIZABLE
    if v not in (LINEARIZABLE, STALE) or not isinstance(v, str):
        raise _bad("field 'consistency' must be 'linearizable' or 'stale'")
    return v


def _list(obj: dict, field: str) -> list:
    v = obj.get(field)
    if v is None:
        return []
    if not isinstance(v, list):
        raise _bad(f"field {field!r} must be an array, got {_type_name(v)}")
    return v


_SUB_FIELDS = {
    "get": frozenset({"op", "key"}),
    "put": frozenset({"op", "key", "value"}),
    "delete": frozenset({"op", "key"}),
}


def _sub(v: object, where: str, limits: Limits) -> SubOp:
    if not isinstance(v, dict):
        raise _bad(f"{where} must be a map, got {_type_name(v)}")
    op = v.get("op")
    allowed = _SUB_FIELDS.get(op) if isinstance(op, str) else None
    if allowed is None:
        raise _bad(f"{where}.op must be 'get', 'put' or 'delete'")
    _check_fields(v, allowed, f" in {where}")
    key = _key(_required(v, "key", where), f"{where}.key", limits)
    if op == "get":
        return SubGet(key)
    if op == "put":
        return SubPut(key, _value(_required(v, "value", where), f"{where}.value", limits))
    return SubDelete(key)


def _txn(obj: dict, limits: Limits) -> Txn:
    raw_if, raw_then, raw_else = _list(obj, "if"), _list(obj, "then"), _list(obj, "else")
    total = len(raw_if) + len(raw_then) + len(raw_else)
    if total > limits.max_txn_ops:
        raise _bad(f"txn has {total} compares and sub-ops; max_txn_ops={limits.max_txn_ops}")
    compares = []
    for i, c in enumerate(raw_if):
        where = f"if[{i}]"
        if not isinstance(c, dict):
            raise _bad(f"{where} must be a map, got {_type_name(c)}")
        _check_fields(c, frozenset({"key", "version"}), f" in {where}")
        compares.append(
            (
                _key(_required(c, "key", where), f"{where}.key", limits),
                _version(_required(c, "version", where), f"{where}.version"),
            )
        )
    branches = []
    for name, raw in (("then", raw_then), ("else", raw_else)):
        subs = tuple(_sub(s, f"{name}[{i}]", limits) for i, s in enumerate(raw))
        written: set[bytes] = set()
        for i, s in enumerate(subs):
            if not isinstance(s, SubGet):
                if s.key in written:
                    raise _bad(f"{name}[{i}]: key written twice in one branch")
                written.add(s.key)
        branches.append(subs)
    return Txn(tuple(compares), branches[0], branches[1])
