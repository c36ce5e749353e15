"""A node that lost (or rolled back) its data directory never votes again (issue 15).

Paxos' acceptors must never forget. Every data directory gets an incarnation
id when it is created; peers pin each member's incarnation and the highest
slot they saw it accept. A wiped node (new incarnation) or a restored old
backup (a log ending below what it accepted) is refused at its peer hello,
logs one line with the fix, and exits with status 2; the others keep serving
and lose nothing.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time

import msgpack
import pytest
from cluster_harness import Cluster
from harness import RawConn, ServerPool, assert_ok, single_error_line, wait_until

pytestmark = pytest.mark.cluster


async def put_many(addr: tuple[str, int], prefix: str, n: int) -> dict[bytes, int]:
    out = {}
    async with await RawConn.open(addr) as c:
        for i in range(n):
            key = f"{prefix}-{i:03d}".encode()
            out[key] = assert_ok(await c.call("put", key=key, value=b"v" + key, timeout=20))[
                "version"
            ]
    return out


async def check_all(addr: tuple[str, int], written: dict[bytes, int]) -> None:
    async with await RawConn.open(addr) as c:
        for key, version in written.items():
            r = assert_ok(await c.call("get", key=key, timeout=20))
            assert (r["value"], r["version"]) == (b"v" + key, version), key


def follower_of(cluster: Cluster) -> tuple[str, str]:
    leader = cluster.wait_leader(list(cluster.nodes))
    follower = next(n for n in sorted(cluster.nodes) if n != leader)
    return leader, follower


def refused_and_exited(cluster: Cluster, victim: str) -> str:
    srv = cluster.nodes[victim]
    rc = srv.wait_exit(30)
    out = srv.last_run_output()
    assert rc == 2, out
    line = single_error_line(out)
    assert "stale identity" in line and victim in line, line
    assert "docs/OPERATIONS.md" in line, "the refusal names the way out"
    return line


async def test_node_with_a_wiped_data_directory_is_refused_and_exits_2(
    pool: ServerPool,
) -> None:
    """3 nodes, 100 writes, SIGKILL a follower, delete its data directory, start it
    again with the same --node-id and --peers: it is refused (exit 2, one line with
    the fix) and never votes; the other two keep serving; no acknowledged write is
    lost."""
    cluster = Cluster(pool, 3).start()
    leader, victim = follower_of(cluster)
    laddr = cluster.nodes[leader].addr
    written = await put_many(laddr, "before", 100)
    srv = cluster.nodes[victim]
    assert srv.kill() == -signal.SIGKILL
    shutil.rmtree(srv.data_dir)
    srv.spawn()
    line = await asyncio.to_thread(refused_and_exited, cluster, victim)
    assert "incarnation" in line
    written.update(await put_many(laddr, "after", 20))
    await check_all(laddr, written)
    for nid in cluster.nodes:
        if nid != victim:
            st = cluster.statuses([nid])[nid]
            assert st is not None and st["ready"], (nid, st)


async def test_node_restored_from_an_old_backup_is_refused(pool: ServerPool) -> None:
    """A follower's data directory copied while it was stopped, then more writes
    (which it accepted), then the old copy restored: its log ends below what the
    cluster saw it accept, so it is refused like a wiped one."""
    cluster = Cluster(pool, 3).start()
    leader, victim = follower_of(cluster)
    laddr = cluster.nodes[leader].addr
    written = await put_many(laddr, "first", 20)
    srv = cluster.nodes[victim]
    assert srv.terminate() == 0
    backup = srv.data_dir.with_name(srv.data_dir.name + ".backup")
    shutil.copytree(srv.data_dir, backup)
    srv.restart()
    written.update(await put_many(laddr, "second", 60))
    others = [n for n in cluster.nodes if n != victim]

    def others_pinned_it_high() -> bool:
        """The leader saw the victim accept slot 60 and more; the third node has it
        by gossip (pins spread within about a second)."""
        for n in others:
            members = cluster.nodes[n].data_dir / "members.msgpack"
            if not members.exists():
                return False
            pins = msgpack.unpackb(members.read_bytes(), raw=False)
            if victim not in pins or pins[victim][1].get("0", 0) < 60:
                return False
        return True

    await asyncio.to_thread(wait_until, others_pinned_it_high, 20, "the pins to rise and spread")
    assert srv.kill() == -signal.SIGKILL
    shutil.rmtree(srv.data_dir)
    shutil.copytree(backup, srv.data_dir)
    srv.spawn()
    line = await asyncio.to_thread(refused_and_exited, cluster, victim)
    assert "log ending at slot" in line
    t0 = time.monotonic()
    written.update(await put_many(laddr, "third", 10))
    assert time.monotonic() - t0 < 20
    await check_all(laddr, written)


async def test_restart_with_its_own_data_directory_is_still_welcome(pool: ServerPool) -> None:
    """The pins do not get in the way of an ordinary restart (SIGKILL, same data
    directory): the node rejoins and serves."""
    cluster = Cluster(pool, 3).start()
    leader, victim = follower_of(cluster)
    written = await put_many(cluster.nodes[leader].addr, "plain", 30)
    srv = cluster.nodes[victim]
    assert srv.kill() == -signal.SIGKILL
    srv.restart()
    await asyncio.to_thread(cluster.wait_caught_up, victim, 30.0)
    await check_all(srv.addr, written)


async def test_corrupt_members_file_refuses_to_start(pool: ServerPool) -> None:
    """The pins file is checked like the identity file: damage is one clear line and
    exit 2, never silently replaced by an empty set of pins."""
    cluster = Cluster(pool, 3).start()
    srv = cluster.nodes["n1"]
    members = srv.data_dir / "members.msgpack"
    await asyncio.to_thread(wait_until, members.exists, 20, "n1 to pin its peers")
    assert srv.terminate() == 0
    members.write_bytes(b"\xc1garbage")
    srv.spawn()
    rc = await asyncio.to_thread(srv.wait_exit, 30)
    assert rc == 2
    assert "members.msgpack" in single_error_line(srv.last_run_output())


async def test_a_data_directory_of_another_formation_is_refused(pool: ServerPool) -> None:
    """Two clusters created with the same cluster_id and node ids get different
    UUIDs (chosen through Paxos at formation and shown by status). A node carrying
    the other cluster's data directory is refused even by peers that never met it."""
    first = Cluster(pool, 3).start()
    await asyncio.to_thread(
        wait_until,
        lambda: len({(st or {}).get("cluster_uuid") for st in first.statuses().values()}) == 1
        and None not in {(st or {}).get("cluster_uuid") for st in first.statuses().values()},
        20, "every node of the first cluster to know its uuid")
    uuids = {st["cluster_uuid"] for st in first.statuses().values()}
    for srv in first.nodes.values():
        assert srv.terminate() == 0
    second = Cluster(pool, 3, addrs=first.endpoints())  # the same addresses and ids
    for nid in ("n1", "n2"):
        second.nodes[nid].spawn()
    await asyncio.to_thread(second.wait_ready, ["n1", "n2"], 30.0)
    await asyncio.to_thread(
        wait_until,
        lambda: all((second.statuses([n])[n] or {}).get("cluster_uuid") for n in ("n1", "n2")),
        20, "the second cluster to form")
    other = second.statuses(["n1"])["n1"]["cluster_uuid"]
    assert other not in uuids
    stranger = second.nodes["n3"]
    shutil.copytree(first.nodes["n3"].data_dir, stranger.data_dir, dirs_exist_ok=True)
    stranger.spawn()
    line = await asyncio.to_thread(refused_and_exited, second, "n3")
    assert "holds data of cluster" in line
    for nid in ("n1", "n2"):  # a stranger refusing them back does not stop them
        assert second.nodes[nid].running
        assert second.statuses([nid])[nid]["ready"]
