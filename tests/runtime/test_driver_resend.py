"""The router re-sends a forwarded write with a request id after a leader change
(driver.py, "Routing"), and the state machine applies it once. Driven with a
stub core, network and WAL, so every step is explicit; the "cluster" behind
the stub network is one replicated ``DedupKV`` that every leader applies to."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from dsnode.core import commands
from dsnode.core.commands import Put
from dsnode.core.effects import Ready, Reply
from dsnode.core.paxos.roles import Role
from dsnode.core.paxos.statemachine import DedupKV
from dsnode.runtime.driver import FWD, FWD_REPLY, Driver, Pending

GROUP = 0  # a core without a metadata group: one group holding every key


class StubCore:
    def __init__(self, leader: str) -> None:
        self.leader = leader
        # what the driver logs on a leader change
        self.groups = {GROUP: SimpleNamespace(role=Role.FOLLOWER, members=("a", "b", "c"),
                                              ballot=(1, "b"),
                                              acceptor=SimpleNamespace(promised=(1, "b")))}
        self.metadata = None
        self.proposed: list[tuple[Any, Any, Any]] = []

    def leader_of(self, group: Any) -> str:
        return self.leader

    def propose(self, group: Any, token: Any, cmd: Any, request_id: Any = None) -> None:
        self.proposed.append((token, cmd, request_id))

    def tick(self) -> None: ...

    def ready(self) -> Ready:
        return Ready()


class StubNet:
    def __init__(self) -> None:
        self.sent: list[tuple[str, list]] = []
        self.links: list[str] = []

    def connected(self, peer: str) -> bool:
        return True

    def send(self, peer: str, msg: list) -> None:
        self.sent.append((peer, msg))


class StubWal:
    last_lsn = 0
    durable_lsn = 0

    def append_many(self, records: list[bytes]) -> None: ...

    async def sync(self) -> None: ...


def _driver(leader: str) -> tuple[Driver, StubCore, StubNet, list[Reply]]:
    core, net, answered = StubCore(leader), StubNet(), []
    d = Driver(core, StubWal(), answered.extend, net, node_id="a",  # type: ignore[arg-type]
               tick_seconds=0.01, checkpoint_every_records=10**9)
    return d, core, net, answered


def _leader_applies(sm: DedupKV, msg: list, index: int) -> dict:
    """What a leader does with a forwarded write: apply it (at log ``index``)."""
    _, _fwd_id, _group, enc, _timeout, *rid = msg
    return sm.apply(rid[0] if rid else None, commands.decode_checked(enc), index)


async def test_forwarded_write_is_resent_to_the_new_leader_and_applied_once():
    """The write reached leader b, which applied it but died before answering. When
    c becomes leader the router re-sends it to c marked as a retry; c finds the id
    in the table and answers b's result. b's late answer is ignored."""
    d, core, net, answered = _driver("b")
    sm = DedupKV()
    p = Pending(None, 1, True)
    p.dedup = [b"client-1", 1]
    d.submit(p, Put(b"k", b"v", None), timeout_s=5.0)
    (to, first), = net.sent
    assert to == "b" and first[0] == FWD and first[5] == [b"client-1", 1]
    r_b = _leader_applies(sm, first, 1)

    core.leader = "c"
    d._on_tick()
    to, again = net.sent[-1]
    assert to == "c" and again[0] == FWD and again[5] == [b"client-1", 1, True]
    assert again[1] != first[1] and d.counters["route_resend"] == 1
    r_c = _leader_applies(sm, again, 2)
    assert r_c == r_b and sm.kv.revision == 1  # applied once

    d.on_peer_messages("b", [[FWD_REPLY, first[1], r_b, None]])  # late: dropped
    assert answered == []
    d.on_peer_messages("c", [[FWD_REPLY, again[1], r_c, None]])
    assert [(r.token, r.result, r.error) for r in answered] == [(p, r_b, None)]


async def test_indeterminate_unavailable_from_the_old_leader_resends_the_write():
    """The old leader stepped down with the write in flight (``unavailable``,
    indeterminate): with a request id it goes again instead of that answer."""
    d, core, net, answered = _driver("b")
    p = Pending(None, 1, True)
    p.dedup = [b"client-1", 4]
    d.submit(p, Put(b"k", b"v", None), timeout_s=5.0)
    fwd_id = net.sent[0][1][1]
    core.leader = "c"
    d.on_peer_messages("b", [[FWD_REPLY, fwd_id, None, ["unavailable", "lost leadership", True]]])
    assert answered == [] and p.dedup == [b"client-1", 4, True]
    d._on_tick()
    assert net.sent[-1][0] == "c" and net.sent[-1][1][5] == [b"client-1", 4, True]


async def test_local_proposal_failing_indeterminately_is_resent_when_it_has_an_id():
    d, core, net, answered = _driver("a")
    p = Pending(None, 1, True)
    p.dedup = [b"client-1", 2]
    d.submit(p, Put(b"k", b"v", None), timeout_s=5.0)
    assert core.proposed[-1][2] == [b"client-1", 2]
    d._effects([], [Reply(p, error=("unavailable", "lost leadership", True))])
    assert answered == []
    d._on_tick()
    assert core.proposed[-1][0] is p and core.proposed[-1][2] == [b"client-1", 2, True]


async def test_writes_without_an_id_keep_the_indeterminate_answer():
    """Backward compatible: no request id, no re-send, no id on the FWD message."""
    d, core, net, answered = _driver("b")
    p = Pending(None, 1, True)
    d.submit(p, Put(b"k", b"v", None), timeout_s=5.0)
    msg = net.sent[0][1]
    assert len(msg) == 5
    core.leader = "c"
    d._on_tick()
    assert len(net.sent) == 1
    d.on_peer_messages("b", [[FWD_REPLY, msg[1], None, ["unavailable", "lost leadership", True]]])
    assert [r.error for r in answered] == [("unavailable", "lost leadership", True)]


async def test_no_resend_past_the_deadline():
    d, core, net, answered = _driver("b")
    p = Pending(None, 1, True)
    p.dedup = [b"client-1", 1]
    d.submit(p, Put(b"k", b"v", None), timeout_s=0.001)
    fwd_id = net.sent[0][1][1]
    d.tick_count = p.deadline
    d.on_peer_messages("b", [[FWD_REPLY, fwd_id, None, ["unavailable", "lost leadership", True]]])
    assert [r.error[2] for r in answered] == [True]


async def test_forward_with_a_malformed_request_id_is_dropped_and_counted():
    d, core, net, answered = _driver("a")
    enc = commands.encode(Put(b"k", b"v", None))
    for bad in ([b"c"], ["str-id", 1], [b"c", "1"], [b"c", 1, 1], [b"c", 1, True, 0], 7):
        d.on_peer_messages("b", [[FWD, 9, GROUP, enc, 100, bad]])
    assert d.counters["malformed_peer_message"] == 6 and core.proposed == []
    d.on_peer_messages("b", [[FWD, 9, GROUP, enc, 100, [b"c", 1, True]]])
    assert core.proposed[-1][2] == [b"c", 1, True]


async def test_a_write_refused_by_a_stale_leader_is_routed_once_when_the_leader_changes():
    """A forwarded write without a request id answered "not leader" (definitely not
    applied) waits to be routed again; the leader change that follows must not hand it
    out a second time: sent twice, it could be applied twice."""
    d, core, net, answered = _driver("b")
    p = Pending(None, 1, True)
    d.submit(p, Put(b"k", b"v", None), timeout_s=5.0)
    (to, first), = net.sent
    assert to == "b"
    d.on_peer_messages("b", [[FWD_REPLY, first[1], None, ["unavailable", "not leader", False]]])
    core.leader = "c"
    d._on_tick()
    d._on_tick()
    again = [(to, m) for to, m in net.sent[1:] if m[0] == FWD]
    assert [to for to, _ in again] == ["c"]  # once
    assert answered == []
    assert d.router is not None and d.router.in_flight == 1
