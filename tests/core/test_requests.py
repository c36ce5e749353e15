"""Request validation at the boundary: strict types, errors naming the field."""

import pytest

from dsnode.core.commands import Delete, Get, Put, SubGet, SubPut, Txn
from dsnode.wire.requests import Limits, RequestError, parse_request, request_id

L = Limits(max_key_bytes=8, max_value_bytes=16, max_txn_ops=4)


def ok(obj):
    return parse_request({"id": 1, **obj}, L)


def err(obj):
    with pytest.raises(RequestError) as e:
        parse_request({"id": 1, **obj}, L)
    return e.value.code, e.value.message


def test_valid_requests_become_commands():
    assert ok({"op": "get", "key": b"k"}).command == Get(b"k")
    assert ok({"op": "get", "key": "k", "consistency": "stale"}).command == Get(b"k", "stale")
    assert ok({"op": "put", "key": b"k", "value": "v", "if_version": 0}).command == Put(
        b"k", b"v", 0)
    assert ok({"op": "delete", "key": b"k"}).command == Delete(b"k")
    t = ok({"op": "txn", "if": [{"key": b"a", "version": 3}],
            "then": [{"op": "get", "key": b"a"}, {"op": "put", "key": b"b", "value": b""}]})
    assert t.command == Txn(((b"a", 3),), (SubGet(b"a"), SubPut(b"b", b"")), ())
    assert ok({"op": "status", "timeout_ms": 5}).timeout_ms == 5
    ring = ok({"op": "ring", "timeout_ms": 5})
    assert (ring.op, ring.command, ring.timeout_ms, ring.dedup) == ("ring", None, 5, None)


@pytest.mark.parametrize(
    "obj, code, needle",
    [
        ({"op": "frobnicate"}, "unknown_op", "frobnicate"),
        ({"op": 3}, "bad_request", "'op'"),
        ({}, "bad_request", "'op'"),
        ({"op": "get"}, "bad_request", "'key'"),
        ({"op": "get", "key": 5}, "bad_request", "'key'"),
        ({"op": "get", "key": b""}, "bad_request", "'key'"),
        ({"op": "get", "key": b"k", "extra": 1}, "bad_request", "'extra'"),
        ({"op": "get", "key": b"k", "consistency": "weird"}, "bad_request", "consistency"),
        ({"op": "put", "key": b"k"}, "bad_request", "'value'"),
        ({"op": "put", "key": b"k", "value": 1}, "bad_request", "'value'"),
        ({"op": "put", "key": b"k", "value": b"v", "if_version": "1"}, "bad_request", "if_version"),
        ({"op": "put", "key": b"k", "value": b"v", "if_version": True}, "bad_request", "if_version"),
        ({"op": "put", "key": b"k", "value": b"v", "if_version": -1}, "bad_request", "if_version"),
        ({"op": "put", "key": b"123456789", "value": b""}, "too_large", "max_key_bytes"),
        ({"op": "put", "key": b"k", "value": b"x" * 17}, "too_large", "max_value_bytes"),
        ({"op": "get", "key": b"k", "timeout_ms": 0}, "bad_request", "timeout_ms"),
        ({"op": "get", "key": b"k", "timeout_ms": 1.5}, "bad_request", "timeout_ms"),
        ({"op": "txn", "if": {}}, "bad_request", "'if'"),
        ({"op": "txn", "if": [{"key": b"a"}]}, "bad_request", "if[0].version"),
        ({"op": "txn", "then": [{"op": "put", "key": b"a"}]}, "bad_request", "then[0].value"),
        ({"op": "txn", "then": [{"op": "cas", "key": b"a"}]}, "bad_request", "then[0].op"),
        ({"op": "txn", "then": [{"op": "get", "key": b"a", "x": 1}]}, "bad_request", "'x'"),
        ({"op": "txn", "then": [{"op": "put", "key": b"a", "value": b""},
                                {"op": "delete", "key": b"a"}]}, "bad_request", "twice"),
        ({"op": "txn", "then": [{"op": "get", "key": b"a"}] * 5}, "bad_request", "max_txn_ops"),
        ({"op": "hello", "token": 5}, "bad_request", "'token'"),
        ({"op": "ring", "key": b"k"}, "bad_request", "unknown field 'key' for op 'ring'"),
    ],
)
def test_bad_requests_get_a_clear_error_naming_the_field(obj, code, needle):
    got_code, message = err(obj)
    assert got_code == code
    assert needle in message


@pytest.mark.parametrize("obj", [[1], {"id": 0}, {"id": -1}, {"id": "1"}, {"id": 2**63},
                                 {"id": True}, {"op": "get"}])
def test_request_without_valid_id_is_rejected(obj):
    assert request_id(obj) is None


def test_write_request_ids_are_optional_and_parsed():
    """Without ids a write carries none (today's behaviour); str ids become bytes."""
    assert ok({"op": "put", "key": b"k", "value": b"v"}).dedup is None
    assert ok({"op": "put", "key": b"k", "value": b"v", "client_id": b"c1", "seq": 7}
              ).dedup == [b"c1", 7]
    assert ok({"op": "delete", "key": b"k", "client_id": "c1", "seq": 1, "retry": True}
              ).dedup == [b"c1", 1, True]
    assert ok({"op": "txn", "client_id": b"c", "seq": 2, "retry": False}).dedup == [b"c", 2]


@pytest.mark.parametrize(
    "fields, needle",
    [
        ({"client_id": 5, "seq": 1}, "'client_id' must be bin or str, got int"),
        ({"client_id": b"", "seq": 1}, "'client_id' must be 1 to 64 bytes"),
        ({"client_id": b"x" * 65, "seq": 1}, "'client_id' must be 1 to 64 bytes"),
        ({"client_id": b"c", "seq": "1"}, "'seq' must be an integer"),
        ({"client_id": b"c", "seq": True}, "'seq' must be an integer"),
        ({"client_id": b"c", "seq": 0}, "'seq' must be an integer between 1"),
        ({"client_id": b"c", "seq": 1 << 63}, "'seq' must be an integer between 1"),
        ({"client_id": b"c", "seq": 1.0}, "'seq' must be an integer"),
        ({"client_id": b"c"}, "'client_id' and 'seq' go together"),
        ({"seq": 3}, "'client_id' and 'seq' go together"),
        ({"retry": True}, "'retry' needs 'client_id' and 'seq'"),
        ({"client_id": b"c", "seq": 1, "retry": 1}, "'retry' must be a bool, got int"),
    ],
)
def test_bad_request_id_fields_are_refused_with_a_clear_error(fields, needle):
    for base in ({"op": "put", "key": b"k", "value": b"v"}, {"op": "delete", "key": b"k"},
                 {"op": "txn"}):
        code, message = err({**base, **fields})
        assert code == "bad_request" and needle in message


def test_reads_do_not_take_request_ids():
    code, message = err({"op": "get", "key": b"k", "client_id": b"c", "seq": 1})
    assert code == "bad_request" and "unknown field 'client_id'" in message


def test_membership_ops_become_membership_commands():
    from dsnode.core.membership.members import MemberAdd, MemberLeave, MemberRemove

    assert ok({"op": "member_join", "node_id": "n4", "address": "10.0.0.4:7379",
               "incarnation": "ab12"}).command == MemberAdd("n4", "10.0.0.4:7379", "ab12")
    assert ok({"op": "member_leave", "node_id": "n2"}).command == MemberLeave("n2")
    assert ok({"op": "member_remove", "node_id": "n3"}).command == MemberRemove("n3")


@pytest.mark.parametrize("obj, needle", [
    ({"op": "member_leave"}, "node_id"),
    ({"op": "member_leave", "node_id": "N1"}, "node_id"),
    ({"op": "member_remove", "node_id": 3}, "node_id"),
    ({"op": "member_join", "node_id": "n4", "address": "nowhere", "incarnation": "x"},
     "HOST:PORT"),
    ({"op": "member_join", "node_id": "n4", "address": "h:99999", "incarnation": "x"},
     "HOST:PORT"),
    ({"op": "member_join", "node_id": "n4", "address": "h:1", "incarnation": ""},
     "incarnation"),
    ({"op": "member_join", "node_id": "n4", "address": "h:1"}, "incarnation"),
    ({"op": "member_leave", "node_id": "n1", "extra": 1}, "extra"),
])
def test_bad_membership_requests_get_a_clear_error(obj, needle):
    code, message = err(obj)
    assert code == "bad_request" and needle in message
