"""The replica mover (issue 10, part 2: core.membership.mover) on whole nodes: a member
joins, one leaves, a dead one is removed; each ring's moves are carried out through
the partitions' own logs until every partition's voters are the ring's placement."""

from __future__ import annotations

import random

from dsnode.core.commands import Put
from dsnode.core.membership.members import (
    ACTIVE,
    LEFT,
    META_LABEL,
    REMOVED,
    MemberAdd,
    MemberLeave,
    MemberRemove,
)
from dsnode.core.membership.mover import Mover, MoveToken, meta_step, meta_target
from dsnode.core.membership.moves import ADD_LEARNER, REMOVE
from dsnode.core.paxos import PaxosConfig, PaxosNode
from dsnode.core.paxos.reconfig import GroupConf
from tests.core.test_paxos_node import Cluster

FORMED = ("a", "b", "c")
ALL = ("a", "b", "c", "d", "e")
META = "meta"
P, R = 8, 3


def _cfg() -> PaxosConfig:
    return PaxosConfig(election_timeout_ticks=10, heartbeat_interval_ticks=2,
                       formation_group=META, formation_ring=(FORMED, P, R), reconfig=True,
                       snapshot_interval_slots=4)


class Net(Cluster):
    """Three formed nodes, two more that start with nothing (they join later), a
    mover on each; the test plays the runtime's part around them."""

    def __init__(self) -> None:
        super().__init__(_cfg(), {META: FORMED}, ALL)
        self.movers = {n: Mover(node, moves_max=2, answer_ticks=30) for n, node in
                       self.nodes.items()}
        self.down: set[str] = set()
        for node in self.nodes.values():
            node.recover([])
        for n in ALL[len(FORMED):]:
            self.nodes[n].set_contacts(FORMED)  # the members a joining node was told of

    def _make(self, n: str) -> PaxosNode:
        groups = {META: FORMED} if n in FORMED else {}
        return PaxosNode(n, groups, random.Random(n), self.cfg, metadata=META)

    def meta_leader(self) -> str | None:
        return next((n for n in self.names if n not in self.down and META in self.nodes[n].groups
                     and self.nodes[n].is_leader(META)), None)

    def tick(self, n_ticks: int = 1) -> None:
        for _ in range(n_ticks):
            for n, node in self.nodes.items():
                if n in self.down:
                    continue
                node.tick()
                for cmd in self.movers[n].tick():
                    leader = self.meta_leader()
                    if leader is not None:
                        self.nodes[leader].propose(META, ("report", n), cmd)
            self.settle()
            for n, node in self.nodes.items():
                mine = [r for r in self.replies[n] if type(r.token) is MoveToken]
                self.replies[n] = [r for r in self.replies[n] if type(r.token) is not MoveToken]
                for r in mine:
                    self.movers[n].on_reply(r)
                for gid in node.retired_groups():
                    node.remove_group(gid, drop=True)

    def propose_meta(self, cmd) -> dict:
        leader = self.meta_leader()
        assert leader is not None
        before = len(self.replies[leader])
        self.nodes[leader].propose(META, "admin", cmd)
        self.settle()
        got = [r for r in self.replies[leader][before:] if r.token == "admin"]
        assert got, "no answer"
        return got[0].result if got[0].error is None else {"error": got[0].error}

    def settle_moves(self, deadline: int = 3000) -> None:
        for _ in range(deadline):
            self.tick()
            leader = self.meta_leader()
            if leader is not None and not self.nodes[leader].state_machine(META).changes_pending():
                return
        raise AssertionError("the moves never finished: " + repr(
            {n: self.movers[n].status() for n in self.names if n not in self.down}))

    def table(self):
        return self.nodes[self.meta_leader()].state_machine(META).members

    def check_placement(self) -> None:
        """Every live node hosts exactly the partitions the ring places on it, with the
        ring's replicas as voters and no learner."""
        ring = self.nodes[self.meta_leader()].ring
        for n in self.names:
            if n in self.down:
                continue
            node = self.nodes[n]
            hosted = sorted(g for g in node.groups if g != META)
            want = sorted(ring.partitions_of(n)) if n in ring.members else []
            assert hosted == want, (n, hosted, want)
            for pid in hosted:
                conf = node.group_conf(pid)
                assert set(conf.voters) == set(ring.replicas(pid)) and not conf.learners, (
                    n, pid, conf)


def _formed() -> Net:
    net = Net()
    net.nodes["a"].campaign(META)
    net.settle()
    net.tick(40)
    return net


def _write_everywhere(net: Net, n_keys: int) -> dict[bytes, bytes]:
    ring = net.nodes["a"].ring
    data = {}
    for i in range(n_keys):
        k, v = b"k%d" % i, b"v%d" % i
        pid = ring.partition_of(k)
        leader = next(n for n in net.names if pid in net.nodes[n].groups
                      and net.nodes[n].is_leader(pid))
        net.nodes[leader].propose(pid, ("put", i), Put(k, v))
        data[k] = v
    net.settle()
    net.tick(5)
    return data


def _check_data(net: Net, data: dict[bytes, bytes]) -> None:
    ring = net.nodes[net.meta_leader()].ring
    for k, v in data.items():
        pid = ring.partition_of(k)
        for n in ring.replicas(pid):
            if n not in net.down:
                assert net.nodes[n].state_machine(pid).kv.get(k)[0] == v, (n, pid, k)


def test_a_node_joins_leaves_and_a_dead_one_is_removed_and_placement_follows_the_ring():
    net = _formed()
    data = _write_everywhere(net, 60)
    assert net.propose_meta(MemberAdd("d", "hd:1", "inc-d"))["epoch"] == 2
    net.settle_moves()
    assert net.table().state_of("d") == ACTIVE and net.table().settled == 2
    net.check_placement()
    assert META in net.nodes["d"].groups  # a voter of the metadata group too
    assert set(net.nodes["a"].group_conf(META).voters) == {"a", "b", "c", "d"}
    _check_data(net, data)
    assert sum(m.counts["asked"] for m in net.movers.values()) > 0

    assert net.propose_meta(MemberLeave("a"))["state"] == "leaving"
    net.settle_moves()
    assert net.table().state_of("a") == LEFT
    net.check_placement()
    assert not net.nodes["a"].groups  # it dropped everything, metadata group included
    _check_data(net, data)
    net.tick(30)  # the leaders stop telling "a" of its removal: it said it dropped the groups
    for n in ("b", "c", "d"):
        node = net.nodes[n]
        for gid, g in node.groups.items():
            if node.is_leader(gid):
                assert not g.proposer.gone, (n, gid, g.proposer.gone)

    net.down.add("c")  # dies for good
    net.cut.add("c")
    assert net.propose_meta(MemberRemove("c"))["state"] == REMOVED
    net.settle_moves()
    ring = net.nodes[net.meta_leader()].ring
    assert ring.members == ("b", "d")
    net.check_placement()
    _check_data(net, data)


def test_a_retried_join_changes_nothing_and_a_second_change_waits_for_the_first():
    net = _formed()
    assert net.propose_meta(MemberAdd("d", "hd:1", "inc-d"))["epoch"] == 2
    again = net.propose_meta(MemberAdd("d", "hd:1", "inc-d"))
    assert again["epoch"] == 2 and again["state"] == "joining"
    refused = net.propose_meta(MemberAdd("e", "he:1", "inc-e"))
    assert "one membership change at a time" in refused["error"][1]
    net.settle_moves()
    assert net.propose_meta(MemberAdd("e", "he:1", "inc-e"))["epoch"] == 3
    net.settle_moves()
    net.check_placement()
    reached = net.table().reached
    assert reached[META_LABEL] == 3 and all(reached[str(p)] == 3 for p in range(P))


def test_an_idle_mover_costs_nothing_and_reports_nothing():
    net = _formed()
    m = net.movers["a"]
    assert m.tick() == [] and m.status() == {"epoch": 0, "pending": 0, "running": [],
                                             "steps": {}}


def test_the_metadata_group_keeps_its_voters_and_takes_the_rest_as_learners():
    conf = GroupConf(("a", "b", "c"), (), 1)
    on = ("a", "b", "c", "d", "e", "f", "g")
    assert meta_target(conf, on, 5) == (("a", "b", "c", "d", "e"), ("f", "g"))
    assert meta_step("m", conf, on, [], "a", 5).action == ADD_LEARNER
    # a learner off the ring goes first; a voter off the ring goes once one replaces it
    conf = GroupConf(("a", "b", "c"), ("z",), 1)
    assert meta_step("m", conf, ("a", "b"), [], "a", 5) == meta_step("m", conf, ("a", "b"),
                                                                      [], "a", 5)
    assert meta_step("m", conf, ("a", "b"), [], "a", 5).node == "z"
    assert meta_step("m", GroupConf(("a", "b", "c")), ("a", "b"), [], "a", 5).action == REMOVE


def test_members_silent_too_long_are_named_for_removal_one_at_a_time():
    from dsnode.core.membership.members import MemberTable

    table = MemberTable.formed(("a", "b", "c", "d"), 1)
    silent = {"a": 0, "b": 500, "c": 900, "d": None}
    assert Mover.dead_to_remove(table, "a", silent, 600) == ["c"]
    assert Mover.dead_to_remove(table, "a", silent, 400) == ["b"]
    assert Mover.dead_to_remove(table, "c", silent, 600) == []  # never itself
    assert Mover.dead_to_remove(table, "a", silent, 1000) == []  # d: never heard, not counted
