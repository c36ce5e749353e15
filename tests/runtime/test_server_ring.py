"""The ``ring`` op at the client listener, without a node: the answer comes from
``ClientServer.ring_provider``; ``unavailable`` (definite) while there is no map."""

from __future__ import annotations

from dsnode.client.ring import RingMap
from dsnode.config import NodeConfig
from dsnode.core.ring import Ring
from dsnode.runtime.server import ClientServer, ring_answer
from dsnode.wire.framing import FrameDecoder, pack_frame, unpack_payload

MAP = {
    "partitions": 2, "replication": 1, "epoch": 4,
    "members": [{"node_id": "n1", "addr": "127.0.0.1:7379"}],
    "map": [{"id": 0, "replicas": ["n1"], "leader": "n1"},
            {"id": 1, "replicas": ["n1"], "leader": None}],
}


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str):
        return ("127.0.0.1", 1)

    def close(self) -> None: ...


def _answers(transport: _Transport) -> list[dict]:
    return [unpack_payload(f) for f in FrameDecoder().feed(bytes(transport.out))]


async def test_ring_answers_the_providers_map_or_unavailable_until_there_is_one():
    server = ClientServer(NodeConfig())
    conn = server.protocol_factory()
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    known: list[dict | None] = [None]
    conn.data_received(pack_frame({"id": 1, "op": "ring"}))  # no provider set yet
    server.ring_provider = lambda: known[0]
    conn.data_received(pack_frame({"id": 2, "op": "ring"}))  # the node has no map yet
    known[0] = MAP
    conn.data_received(pack_frame({"id": 3, "op": "ring"}))
    conn.data_received(pack_frame({"id": 4, "op": "ring", "partition": 1}))
    first, second, third, fourth = _answers(transport)
    for early in (first, second):
        assert early["ok"] is False
        assert early["error"]["code"] == "unavailable"
        assert early["error"]["message"] == "partition map not known yet"
        assert early["error"]["indeterminate"] is False
    assert third == {"id": 3, "ok": True, **MAP}
    assert fourth["error"]["code"] == "bad_request" and "'partition'" in fourth["error"]["message"]
    assert server.metrics.requests[("ring", "ok")] == 1
    assert server.metrics.requests[("ring", "unavailable")] == 2
    conn.connection_lost(None)
    assert server._sweeper is not None
    server._sweeper.cancel()  # the first-frame sweeper the connection started


def test_ring_answer_lists_every_partition_in_ring_order_with_known_leaders():
    ring = Ring(["a", "b", "c", "d"], partitions=16, replication=3, epoch=5)
    addrs = {m: f"127.0.0.1:{7000 + i}" for i, m in enumerate(ring.members)}
    leaders = {0: "b", 5: None}
    body = ring_answer(ring, addrs, lambda pid: leaders.get(pid, ring.replicas(pid)[0]))
    assert (body["partitions"], body["replication"], body["epoch"]) == (16, 3, 5)
    assert body["members"] == [{"node_id": m, "addr": addrs[m]} for m in ring.members]
    assert [p["id"] for p in body["map"]] == list(range(16))
    assert all(p["replicas"] == list(ring.replicas(p["id"])) for p in body["map"])
    assert body["map"][0]["leader"] == "b" and body["map"][5]["leader"] is None
    assert body["map"][1]["leader"] == ring.replicas(1)[0]
    checked = RingMap.from_wire(body)  # what the client accepts
    assert checked.part_of(b"k").replicas == ring.replicas(ring.partition_of(b"k"))
