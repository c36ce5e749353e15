"""Structure-aware fuzzing of everything that parses bytes from the network.

Targets: the client frame decoder (FrameDecoder + unpack_payload), the request validator
(request_id + parse_request), and the peer message decoders (paxos ``from_wire`` and the
forwarded-command decoder ``commands.decode_checked``). Inputs are mostly *valid msgpack of
the wrong shape* (maps with the right field names holding the wrong types, right ops with
missing fields, txns with malformed sub-ops, peer messages with the right tag and wrong
fields), plus mutated and truncated frames and raw bytes.

The rule each target must keep: it returns a well-typed result or raises one of the
exceptions its caller handles; anything else (TypeError, KeyError, AttributeError,
RecursionError...) is a crash of the node's connection handler, a hang fails on the test
timeout. The default run has a bounded budget; ``-m slow`` runs at least 1,000,000 inputs
and prints the count and the time.
"""

from __future__ import annotations

import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsnode.core import commands
from dsnode.core.commands import Delete, Get, Put, SubDelete, SubGet, SubPut, Txn
from dsnode.core.errors import PeerMisbehaved
from dsnode.core.paxos import messages
from dsnode.wire.framing import HEADER, FrameDecoder, FrameError, unpack_payload
from dsnode.wire.requests import OP_FIELDS, Limits, RequestError, parse_request, request_id

LIMITS = Limits(max_key_bytes=64, max_value_bytes=256, max_txn_ops=16)
MAX_FRAME = 4096
# msgpack's own errors for bytes that are not one well-formed object within the limits.
UNPACK_ERRORS = (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError)

FIELD_NAMES = sorted({f for fs in OP_FIELDS.values() for f in fs} | {"id", "op", "timeout_ms"})
OPS = [*OP_FIELDS, "member_add", "", "GET", "nope"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0, 1, -1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63)]),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.binary(max_size=40),
    st.sampled_from(OPS + FIELD_NAMES + ["linearizable", "stale", "g", "p", "d"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(FIELD_NAMES), st.text(max_size=6)), inner,
                        max_size=4),
    ),
    max_leaves=8,
)
sub_ops = st.one_of(
    st.fixed_dictionaries({"op": st.sampled_from(["get", "put", "delete", "x"]), "key": values},
                          optional={"value": values, "extra": values}),
    values,
)
requests = st.builds(
    lambda base, extra: {**base, **extra},
    st.fixed_dictionaries(
        {"op": st.one_of(st.sampled_from(OPS), values)},
        optional={"id": st.one_of(st.integers(min_value=-5, max_value=2**64 - 1), values)},
    ),
    st.dictionaries(
        st.sampled_from(FIELD_NAMES),
        st.one_of(values, st.lists(sub_ops, max_size=5),
                  st.lists(st.fixed_dictionaries({"key": values, "version": values}), max_size=4)),
        max_size=5,
    ),
)


def _encode(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


frames = st.one_of(
    requests.map(_encode),
    values.map(_encode),
    st.binary(max_size=64),
    st.tuples(requests.map(_encode), st.integers(min_value=0, max_value=100)).map(
        lambda t: t[0][: t[1]]  # truncated
    ),
    st.tuples(requests.map(_encode), st.integers(min_value=0), st.integers(0, 255)).map(
        lambda t: t[0][: t[1] % (len(t[0]) or 1)] + bytes([t[2]]) + t[0][t[1] % (len(t[0]) or 1) + 1:]
    ),  # one byte replaced
)
# A stream: frames with right or wrong length prefixes, delivered in arbitrary chunks.
streams = st.tuples(
    st.lists(
        st.tuples(frames, st.sampled_from(["ok", "ok", "ok", "zero", "huge", "short"])),
        min_size=1, max_size=4,
    ),
    st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=8),
)


def client_input(stream: tuple) -> int:
    """Feed one stream through decoder + validator as the server does; returns the inputs."""
    parts, chunk_sizes = stream
    data = bytearray()
    for payload, prefix in parts:
        length = {"ok": len(payload), "zero": 0, "huge": MAX_FRAME + 1,
                  "short": max(0, len(payload) - 1)}[prefix]
        data += HEADER.pack(length) + payload
    decoder = FrameDecoder(MAX_FRAME)
    pos = i = 0
    while pos < len(data):
        chunk = bytes(data[pos: pos + chunk_sizes[i % len(chunk_sizes)]])
        pos += len(chunk)
        i += 1
        try:
            payloads = decoder.feed(chunk)
        except FrameError as e:
            assert e.code in ("bad_request", "too_large")
            return len(parts)
        for payload in payloads:
            check_client_payload(payload)
    return len(parts)


def check_client_payload(payload: bytes) -> None:
    try:
        obj = unpack_payload(payload, MAX_FRAME)
    except UNPACK_ERRORS:
        return
    rid = request_id(obj)
    if not isinstance(obj, dict) or rid is None:
        return
    try:
        req = parse_request(obj, LIMITS)
    except RequestError as e:
        assert e.code in ("bad_request", "unknown_op", "too_large") and e.message
        return
    assert req.id == rid and req.op in OP_FIELDS
    if req.timeout_ms is not None:
        assert type(req.timeout_ms) is int and req.timeout_ms > 0
    check_command(req.command)


def check_command(cmd: object) -> None:
    """A decoded command holds exactly the types the state machine relies on."""
    def key(k: object) -> None:
        assert type(k) is bytes and 0 < len(k)

    def version(v: object) -> None:
        assert v is None or (type(v) is int and v >= 0)

    if cmd is None:
        return
    if isinstance(cmd, Get):
        key(cmd.key)
        assert cmd.consistency in ("linearizable", "stale")
    elif isinstance(cmd, Put):
        key(cmd.key)
        assert type(cmd.value) is bytes
        version(cmd.if_version)
    elif isinstance(cmd, Delete):
        key(cmd.key)
        version(cmd.if_version)
    else:
        assert isinstance(cmd, Txn)
        for k, v in cmd.compares:
            key(k)
            assert type(v) is int and v >= 0
        for s in (*cmd.then, *cmd.otherwise):
            assert isinstance(s, SubGet | SubPut | SubDelete)
            key(s.key)
            if isinstance(s, SubPut):
                assert type(s.value) is bytes


# ---------------------------------------------------------------- peer messages
ballots = st.one_of(st.tuples(st.integers(-2, 2**64), st.text(max_size=4)).map(list), values)
peer_tags = st.sampled_from(sorted(messages._KINDS))


@st.composite
def paxos_messages(draw: st.DrawFn) -> list:
    tag = draw(st.one_of(peer_tags, peer_tags, values))
    cls = messages._KINDS.get(tag) if isinstance(tag, str) else None
    n = len(messages._FIELDS[cls]) if cls is not None else draw(st.integers(0, 6))
    n = draw(st.sampled_from([n, n, n, max(0, n - 1), n + 1]))
    field = st.one_of(
        ballots, values, st.integers(0, 2**63), st.binary(max_size=16),
        st.lists(st.tuples(st.integers(-1, 99), ballots, st.one_of(st.binary(max_size=8), values))
                 .map(list), max_size=3),
        st.lists(values, max_size=3),
    )
    return [tag, *draw(st.lists(field, min_size=n, max_size=n))]


command_encodings = st.one_of(
    st.tuples(st.sampled_from(["P", "D", "G", "T", "X"]),
              st.lists(st.one_of(values, st.lists(st.lists(values, max_size=3), max_size=3)),
                       max_size=4)).map(lambda t: [t[0], *t[1]]),
    st.builds(commands.encode, st.builds(Put, st.binary(min_size=1, max_size=8),
                                         st.binary(max_size=8), st.none())),
    values,
)


def check_paxos_message(m: list) -> None:
    try:
        messages.from_wire(m)
    except PeerMisbehaved:
        pass


def check_forwarded_command(enc: object) -> None:
    try:
        cmd = commands.decode_checked(enc)
    except ValueError:
        return
    check_command(cmd)


peer_inputs = st.one_of(paxos_messages().map(lambda m: ("px", m)),
                        command_encodings.map(lambda c: ("cmd", c)))


def peer_input(item: tuple) -> None:
    kind, obj = item
    if kind == "px":
        check_paxos_message(obj)
    else:
        check_forwarded_command(obj)


FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))


@FUZZ
@given(streams)
def test_client_decoder_and_validator_only_raise_their_own_errors(stream: tuple) -> None:
    """Any byte stream gets frames, FrameError, or per-request RequestError: nothing else."""
    client_input(stream)


@FUZZ
@given(peer_inputs)
def test_peer_decoders_only_raise_peer_misbehaved(item: tuple) -> None:
    """A malformed peer message is dropped and counted (PeerMisbehaved / ValueError), and a
    forwarded command that decodes is well-typed: no poison pill reaches the log."""
    peer_input(item)


@settings(max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(requests, min_size=5, max_size=5), st.lists(values, min_size=10, max_size=10),
       st.lists(paxos_messages(), min_size=5, max_size=5),
       st.lists(command_encodings, min_size=3, max_size=3))
def test_crossed_shapes(reqs: list, vals: list, pax: list, encs: list) -> None:
    """Right field names and tags holding wrong values, crossed: the same rule holds."""
    assert crossed_inputs(reqs, vals, pax, encs) > 0


def test_regression_forwarded_put_with_int_key_is_refused() -> None:
    """Found by the fuzzer: ``decode`` built Put(123, ...) from a peer's forward, a command the
    state machine of every replica would later choke on."""
    with pytest.raises(ValueError):
        commands.decode_checked(["P", 123, b"v", None])
    with pytest.raises(ValueError):
        commands.decode_checked(["T", [[b"k", -1]], [], []])
    with pytest.raises(ValueError):
        commands.decode_checked(["G", b"k", "sometimes"])
    assert commands.decode_checked(["P", b"k", b"v", 3]) == Put(b"k", b"v", 3)


# ---------------------------------------------------------------- the long run
LONG_RUN_INPUTS = 1_000_000


def crossed_inputs(reqs: list[dict], vals: list, pax: list[list], encs: list) -> int:
    """Every drawn request with each of its fields (and one new field) replaced by each drawn
    value, and every drawn peer message and command encoding with each position replaced:
    many structure-aware inputs per Hypothesis example. Returns how many were checked."""
    count = 0
    for r in reqs:
        keys = [*r, FIELD_NAMES[len(r) % len(FIELD_NAMES)]]
        for i, v in enumerate(vals):
            variant = dict(r)
            variant[keys[i % len(keys)]] = v
            check_client_payload(_encode(variant))
            count += 1
    for m in pax:
        for i, v in enumerate(vals):
            variant = list(m)
            variant[i % len(variant)] = v
            check_paxos_message(variant)
            count += 1
    for enc in encs:
        if not isinstance(enc, list) or not enc:
            check_forwarded_command(enc)
            count += 1
            continue
        for i, v in enumerate(vals):
            variant = list(enc)
            variant[i % len(variant)] = v
            check_forwarded_command(variant)
            count += 1
    return count


@pytest.mark.slow
@pytest.mark.timeout(6 * 3600)
def test_fuzz_long_run_one_million_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    """At least 1,000,000 inputs over all targets: no crash, no hang, no unexpected type."""
    count = 0
    batch = settings(max_examples=200, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))

    @batch
    @given(st.lists(streams, max_size=5), st.lists(requests, min_size=10, max_size=10),
           st.lists(values, min_size=30, max_size=30),
           st.lists(paxos_messages(), min_size=10, max_size=10),
           st.lists(command_encodings, min_size=5, max_size=5))
    def run(client_streams: list, reqs: list, vals: list, pax: list, encs: list) -> None:
        nonlocal count
        for s in client_streams:
            count += client_input(s)
        count += crossed_inputs(reqs, vals, pax, encs)

    start = time.monotonic()
    while count < LONG_RUN_INPUTS:
        run()
    elapsed = time.monotonic() - start
    with capsys.disabled():
        print(f"\nfuzz long run: {count} inputs in {elapsed:.0f} s "
              f"({count / elapsed:.0f} inputs/s)")
