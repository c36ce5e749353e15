"""The simulator's disk syncs asynchronously, and its shell keeps the durability order."""

from __future__ import annotations

import random

from dsnode.core.paxos import records as rec
from dsnode.core.paxos.messages import Accepted
from dsnode.sim.disk import SimDisk
from dsnode.sim.world import SimConfig, SimWorld


def test_a_sync_completes_when_due_and_covers_everything_appended_before_it():
    d = SimDisk()
    d.append([b"a", b"b"])
    d.request_sync(due=5)
    d.append([b"c"])
    assert d.complete(4) == [] and d.durable == []
    assert d.complete(5) == [b"a", b"b"]
    d.request_sync(due=9)
    d.append([b"d"])
    d.request_sync(due=7)  # a later sync done first covers the earlier one too
    assert d.complete(7) == [b"c", b"d"]
    assert d.syncs == [] and d.unsynced == []


def test_a_crash_loses_the_requested_syncs_and_keeps_a_prefix_of_the_unsynced_tail():
    d = SimDisk()
    d.append([b"a"])
    d.fsync()
    d.append([b"b", b"c", b"d"])
    d.request_sync(due=3)
    survived = d.crash(random.Random(1))
    assert d.durable == [b"a", *survived] and [b"b", b"c", b"d"][: len(survived)] == survived
    assert d.syncs == [] and d.complete(10) == []


def test_no_accepted_leaves_before_its_accept_record_is_durable():
    """Every Accepted a node sends names slots whose accept records (at that
    ballot) are already on its disk, though syncs take up to 4 ticks."""
    w = SimWorld(3, SimConfig(swarm=False, fsync_ticks_max=4, fault_ticks=200))
    send = w.net.send
    checked = held = 0

    def checked_send(now, src, dst, msg):
        nonlocal checked
        if type(msg) is Accepted and msg.ok and msg.slots:
            durable = {
                (r[2], tuple(r[3]))
                for r in map(rec.decode, w.disks[src].durable)
                if r[0] == rec.ACCEPT and r[1] == msg.group
            }
            snap = w.cores[src].groups[msg.group].log.snap_index
            for s in msg.slots:
                assert s <= snap or (s, msg.ballot) in durable, (src, msg)
            checked += 1
        send(now, src, dst, msg)

    w.net.send = checked_send
    for _ in range(200):
        w.run_tick(faulty=True)
        held += sum(len(q) for q in w.held_out.values())
    assert checked > 50 and held > 0  # the shell really held effects behind syncs
