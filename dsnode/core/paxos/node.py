"""``PaxosNode``: every Multi-Paxos group hosted by one node, behind one API.

Inputs: ``step(from_peer, msg)``, ``tick()``, ``propose(group, token, cmd,
request_id)``, ``read(group, token, cmd)``, ``campaign(group)``,
``snapshot_ready(group, index, blob, crc)``; one drain,
``ready()``. Recovery:
``recover(records)`` on a fresh node, before any input. The shell must keep the
ordering contract of ``dsnode.core.effects``.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dsnode.core.commands import STALE, Get
from dsnode.core.effects import Ready, Reply
from dsnode.core.errors import InvariantBroken
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.acceptor import Acceptor
from dsnode.core.paxos.checkpoint import CheckpointWriter, DropCapture, GroupCapture
from dsnode.core.paxos.config import PaxosConfig
from dsnode.core.paxos.group import PaxosGroup
from dsnode.core.paxos.messages import Accept, Dropped, Host, NodeHeartbeat
from dsnode.core.paxos.metadata import MetaSM
from dsnode.core.paxos.outputs import Outbox, StoredSnapshot
from dsnode.core.paxos.reconfig import GroupConf
from dsnode.core.paxos.reconfig import add_learner as _add_learner
from dsnode.core.paxos.reconfig import promote as _promote
from dsnode.core.paxos.reconfig import remove as _remove
from dsnode.core.paxos.roles import Role
from dsnode.core.ring import Ring
from dsnode.core.twopc.records import TxForget, TxResolve

#: How long a transaction's resolve may wait, in ticks, for a command to ride with
#: (``PaxosNode.propose``)
RESOLVE_RIDE_TICKS = 4
#: The commands held back to ride (``PaxosNode.propose``): a participant's resolve, and a
#: home's forget (which only lets decided transactions go)
_RIDERS = frozenset((TxResolve, TxForget))


class PaxosNode:
    def __init__(
        self,
        node_id: str,
        groups: Mapping[Any, Sequence[str]],
        rng: random.Random,
        config: PaxosConfig | None = None,
        acceptor_cls: type[Acceptor] = Acceptor,
        group_cls: type[PaxosGroup] = PaxosGroup,
        metadata: Any = None,
    ) -> None:
        self.node_id = node_id
        self.config = config or PaxosConfig()
        self.rng = rng
        self.out = Outbox()
        self._acceptor_cls = acceptor_cls
        self._group_cls = group_cls
        self.groups: dict[Any, PaxosGroup] = {}
        # node-level liveness: one NodeHeartbeat per peer per heartbeat interval, and
        # the tick we last heard anything from each peer
        self.now = 0
        self.peers: list[str] = []
        self.peer_heard: dict[str, int] = {}
        self._last_node_heartbeat = -(10**9)
        self._dirty: set[Any] = set()
        self.contacts: set[str] = set()
        # peers the shell's failure detector suspects (or declared dead): not alive here
        # even if heard within an election timeout (``peer_alive``)
        self.suspects: frozenset[str] = frozenset()
        # Resolves of cross-partition transactions held back to ride in the slot of the
        # next command proposed to their group, or proposed alone once held for
        # ``resolve_ride_ticks`` ticks (0: never held; see ``propose``);
        # group -> (the tick the first was held at, [(token, cmd, request_id)])
        self.resolve_ride_ticks = RESOLVE_RIDE_TICKS
        self._riders: dict[Any, tuple[int, list[tuple[Any, Any, Any]]]] = {}
        # held resolves that went in another command's slot, and that went alone
        self.resolves = {"rode": 0, "alone": 0}
        # groups not ticked (see ``tick``), and the peers alive at the last tick
        self._quiet: set[Any] = set()
        # the others (ticked), in the order they became so: an idle node's tick touches
        # only these, whatever the number of groups it hosts
        self._ticking: dict[Any, PaxosGroup] = {}
        self._alive_seen: frozenset[str] = frozenset()
        # recovered records (and snapshot files) of groups this node does not have
        # (yet): a group created later from the metadata group's state gets them
        self._orphans: dict[Any, list[list]] = {}
        self._orphan_snapshots: dict[Any, StoredSnapshot] = {}
        # the metadata group's id (its state machine holds the ring: MetaSM), or None:
        # no ring, the groups given here are all there is (tests, the single-group build)
        self.metadata = metadata
        self._ring_epoch = 0  # the ring the hosted partitions were last synced with
        # groups this node started hosting as a learner (``host_learner``), with the
        # configuration each was created with, and the groups it dropped (``remove_group``
        # with ``drop``) and hosts no more: checkpoints carry both
        self._hosted: dict[Any, GroupConf] = {}
        self._dropped: set[Any] = set()
        self._conf_changes_seen = 0  # ``conf_changes`` when the peers were last listed
        for g, members in sorted(groups.items(), key=lambda kv: str(kv[0])):
            self._create(g, members, MetaSM if g == metadata and g is not None else None)
        if metadata is not None and metadata not in self.groups and self.groups:
            # (no group at all: a node joining a cluster, hosted as a learner later)
            raise ValueError(f"the metadata group {metadata!r} is not among the groups")
        # group -> the configuration epoch it was dropped at (this run): an invitation
        # (``Host``) from a configuration no newer is stale
        self._dropped_at: dict[Any, int] = {}
        self._update_peers()

    # ------------------------------------------------------------ groups
    def _create(self, group: Any, members: Sequence[str], sm_cls: type | None = None,
                conf: GroupConf | None = None) -> PaxosGroup:
        g = self._group_cls(group, self.node_id, tuple(members), self.rng, self.out,
                            self.config, self._acceptor_cls, self.peer_alive, conf=conf)
        if sm_cls is not None:  # the group's state machine (membership, KV, ...)
            g.sm_cls = sm_cls
            g.sm = sm_cls(shards=self.config.kv_shards)
        g.now = self.now
        if self.config.lease_ticks:
            g.heard_leader_at = self.now  # as at a start: honour what it may have acked
        self.groups[group] = g
        self._ticking[group] = g
        return g

    def _update_peers(self) -> None:
        """Who gets this node's heartbeat: every member of its groups, the members on
        the metadata group's ring, and the contacts the shell named."""
        peers = {m for g in self.groups.values() for m in g.everyone} | self.contacts
        ring = self.ring
        if ring is not None:
            peers.update(ring.members)
        peers.discard(self.node_id)
        self.peers = sorted(peers)

    def set_contacts(self, ids: Iterable[str]) -> None:
        """Nodes to heartbeat besides the groups' members and the ring's: the members a
        joining node was told of before it hosts anything (so they see it alive and
        invite it: ``messages.Host``)."""
        self.contacts = set(ids)
        self._update_peers()

    def add_group(self, group: Any, members: Sequence[str], sm_cls: type | None = None) -> None:
        """Start hosting ``group`` (a partition the metadata group placed here), with
        ``members`` in preference order and ``sm_cls`` as its state machine (default
        the KV store). Records and a snapshot file of it that recovery set aside are
        replayed into it first. Raises ValueError for a group this node has, or one
        it is no member of."""
        if group in self.groups:
            raise ValueError(f"group {group!r} exists on {self.node_id}")
        if self.node_id not in members:
            raise ValueError(f"{self.node_id} is no member of group {group!r}: {list(members)}")
        g = self._create(group, members, sm_cls)
        snap = self._orphan_snapshots.pop(group, None)
        records = self._orphans.pop(group, ())
        if snap is None and not records and self.config.lease_ticks:
            # nothing of it was ever stored here, so this node acknowledged no lease in
            # it: no need to sit out an election timeout before helping elect a leader
            g.heard_leader_at = -(10**9)
        if snap is not None:
            g.recover_snapshot(snap)
        for r in records:
            g.recover_record(r)
        g.finish_recovery()
        self._update_peers()

    # ------------------------------------------------------------ partitions
    @property
    def ring(self) -> Ring | None:
        """The metadata group's current ring (None: no metadata group, or no ring yet)."""
        g = self.groups.get(self.metadata) if self.metadata is not None else None
        return None if g is None else g.sm.ring

    def sync_partitions(self) -> list[Any]:
        """Host the partitions the metadata group's *first* ring placed on this node
        (issue 8; a formation member): create each missing one (not dropped since)
        with its replicas in ring order (the first is its preferred leader),
        replaying what recovery set aside for it, and forget what recovery set aside
        for partitions not placed here. Replicas a later ring places come through
        each partition's own log (``Host``, ``host_learner``: issue 10), never from
        the ring, and go the same way (``retired_groups``). Each hosted partition
        whose voters are the newest ring's replicas prefers its leaders in that
        ring's order. Returns the ids created. Called by ``recover`` (metadata
        first, then the partitions) and by ``ready`` whenever the ring's epoch
        changed."""
        meta = self.groups.get(self.metadata) if self.metadata is not None else None
        ring = None if meta is None else meta.sm.ring
        if ring is None:
            return []
        self._ring_epoch = ring.epoch
        first = meta.sm.first_ring if ring.epoch > 1 else ring
        placed = set()
        if first is not None and self.node_id in first.members:
            placed = set(first.partitions_of(self.node_id))
        created = []
        for pid in sorted(placed):
            if pid not in self.groups and pid not in self._dropped:
                self.add_group(pid, first.replicas(pid))
                created.append(pid)
        if ring.epoch > 1:
            for pid, g in self.groups.items():
                if type(pid) is int and pid < ring.partitions:
                    target = ring.replicas(pid)
                    if set(target) == g.member_set:
                        g.preferred = target
        for gid in [*self._orphans, *self._orphan_snapshots]:
            if gid != self.metadata and gid not in placed:
                self._orphans.pop(gid, None)
                self._orphan_snapshots.pop(gid, None)
        return created

    def _ring_changed(self) -> None:
        """The metadata group applied a new ring: create this node's new partitions.
        A new group has no leader to wait for: its preferred leader's election timer
        fires after two heartbeat intervals (time for the other replicas, which learn
        the ring from the metadata leader's next heartbeat, to create theirs), the
        others' after a full random election timeout, so the preferred one is elected
        first nearly always, without a hand-over."""
        soon = 2 * self.config.heartbeat_interval_ticks
        created = self.sync_partitions()
        self._update_peers()
        for pid in created:
            g = self.groups[pid]
            g.elapsed = 0
            g.timeout = soon if g.preferred[0] == self.node_id else g._random_timeout()

    def remove_group(self, group: Any, drop: bool = False) -> None:
        """Stop hosting ``group``: its pending requests fail (definitely if not yet
        proposed), its messages are dropped from now on; its records stay in the
        WAL until the next checkpoint, which no longer lists it. ``drop``: for good
        (a retired replica, ``retired_groups``): a ``drop`` record voids its records,
        so a restart does not bring it back even if the node starts with it; the
        shell may delete the group's snapshot files once that record is durable."""
        g = self._awake(group)
        if g is None:
            return
        del self.groups[group]
        self._ticking.pop(group, None)
        self._quiet.discard(group)
        g.become_follower()  # fails what it had pending, into the shared outbox
        self._dirty.discard(group)
        self._update_peers()
        if drop:
            self.out.persist.append(rec.drop(group))
            self._hosted.pop(group, None)
            self._dropped.add(group)
            self._dropped_at[group] = g.conf.epoch

    # ------------------------------------------------------------ replica-set changes
    def host_learner(self, group: Any, conf: GroupConf, sm_cls: type | None = None) -> None:
        """Start hosting ``group`` as one of its learners in ``conf`` (the configuration
        its leader applied when it added this node, ``add_learner``, with the slot of
        that change: ``group_conf`` gives both): an empty replica that catches up from
        the leader's commits (by snapshot if the log was compacted), recorded durably (a
        ``host`` record) so a restart brings it back. Until it has applied that slot it
        answers neither phase 1 nor phase 2 (``PaxosGroup.joining``).
        Raises ValueError for a group this node hosts or a ``conf`` without it."""
        if group in self.groups:
            raise ValueError(f"group {group!r} exists on {self.node_id}")
        if self.node_id not in conf.learners:
            raise ValueError(f"{self.node_id} is no learner of group {group!r} in {conf}")
        self._start_hosting(group, conf, sm_cls)
        self.out.persist.append(rec.host(group, conf.voters, conf.learners, conf.epoch,
                                         conf.slot))
        if self.config.lease_ticks:
            self.groups[group].heard_leader_at = -(10**9)  # it acknowledged nothing yet

    def _start_hosting(self, group: Any, conf: GroupConf, sm_cls: type | None = None) -> None:
        if sm_cls is None and group == self.metadata and group is not None:
            sm_cls = MetaSM
        self._forget(group)
        self._create(group, conf.voters, sm_cls, conf)
        self._hosted[group] = conf
        self._dropped.discard(group)
        self._update_peers()

    def _forget(self, group: Any) -> None:
        """In recovery: the group's state so far is void (a ``drop`` or ``host`` record),
        and so is what recovering it produced (apply notices, snapshot jobs)."""
        self.groups.pop(group, None)
        self._ticking.pop(group, None)
        self._quiet.discard(group)
        out = self.out
        out.apply = [x for x in out.apply if x.group != group]
        out.snapshots = [x for x in out.snapshots if x.group != group]

    def _invited(self, m: Host) -> None:
        """A group's leader says this node is a learner of it (``Host``): host it,
        unless that configuration is no newer than one that removed us (stale), or the
        group is no partition of the ring. Safe even when stale otherwise: a replica
        hosted afresh answers nothing until it applied the change that added it, and
        retires once it applies the one that removed it."""
        conf = GroupConf(m.voters, m.learners, m.epoch, m.slot)
        gid = m.group
        if self.node_id not in conf.learners or m.epoch <= self._dropped_at.get(gid, -1):
            self.out.dropped["stale_host"] += 1
            return
        if gid != self.metadata:
            ring = self.ring
            if ring is None or type(gid) is not int or not 0 <= gid < ring.partitions:
                self.out.dropped["unknown_group"] += 1
                return
        self.host_learner(gid, conf)

    def change_config(self, group: Any, token: Any, conf: GroupConf) -> None:
        """Propose ``conf`` as ``group``'s next configuration (``PaxosGroup.change_config``:
        answered in ``Ready.reply`` with ``{"epoch": n}`` once applied, or an error)."""
        g = self._awake(group)
        if g is None:
            self.out.reply.append(Reply(token, error=("unavailable", "unknown group", False)))
            return
        g.change_config(token, conf)
        self._dirty.add(group)

    def add_learner(self, group: Any, token: Any, node: str) -> None:
        """Step 1 of moving a replica: ``node`` becomes a learner of ``group`` (then
        the shell calls ``host_learner`` on ``node`` with the configuration applied)."""
        self.change_config(group, token, _add_learner(self.group_conf(group), node))

    def promote_learner(self, group: Any, token: Any, node: str) -> None:
        """Step 2: the learner ``node``, caught up, becomes a voter."""
        self.change_config(group, token, _promote(self.group_conf(group), node))

    def remove_replica(self, group: Any, token: Any, node: str) -> None:
        """Step 3: ``node`` (a voter or a learner) leaves ``group``; once it applied the
        change it is retired (``retired_groups``). A leader removing itself hands
        leadership to a caught-up voter first."""
        self.change_config(group, token, _remove(self.group_conf(group), node))

    def group_conf(self, group: Any) -> GroupConf:
        """``group``'s configuration as this node has applied it."""
        return self.groups[group].conf

    def caught_up_learners(self, group: Any) -> list[str]:
        """As ``group``'s leader: its learners that have acknowledged everything chosen
        (``promote_learner`` takes only these); empty elsewhere."""
        g = self.groups.get(group)
        p = g.proposer if g is not None and g.role is Role.LEADER else None
        if p is None:
            return []
        ct = g.log.chosen_through
        return [m for m in g.learners if p.match.get(m, 0) >= ct]

    def learner_progress(self, group: Any) -> dict[str, int]:
        """As ``group``'s leader: each learner's acknowledged chosen prefix (its progress
        toward ``caught_up_learners``); empty elsewhere."""
        g = self.groups.get(group)
        p = g.proposer if g is not None and g.role is Role.LEADER else None
        return {} if p is None else {m: p.match.get(m, 0) for m in g.learners}

    def retired_groups(self) -> list[Any]:
        """Groups whose configuration, as applied here, no longer lists this node: it
        takes no part in them; the shell calls ``remove_group(gid, drop=True)`` and
        deletes their data. Worth asking only when ``conf_changes`` moved."""
        return sorted((gid for gid, g in self.groups.items() if g.retired), key=str)

    @property
    def conf_changes(self) -> int:
        """Times any group of this node switched configuration."""
        return self.out.conf_changes

    def drop_orphans(self) -> list[Any]:
        """Forget what recovery set aside for groups never created (they were removed
        for good); returns their ids."""
        gone = sorted(set(self._orphans) | set(self._orphan_snapshots), key=str)
        self._orphans.clear()
        self._orphan_snapshots.clear()
        return gone

    # ------------------------------------------------------------ inputs
    def step(self, from_peer: str, msg: Any) -> None:
        self.peer_heard[from_peer] = self.now
        if type(msg) is NodeHeartbeat:
            return
        g = self._awake(getattr(msg, "group", None))
        if g is None:
            if type(msg) is Host and self.config.reconfig:
                self._invited(msg)
            elif type(msg) is Accept and msg.group in self._dropped:
                # a leader still telling us of our removal: we applied it and dropped
                # the group; say so, or it goes on for as long as we are alive
                self.out.send.append((from_peer, Dropped(msg.group)))
                self.out.dropped["told_dropped"] += 1
            else:
                self.out.dropped["unknown_group"] += 1
            return
        if type(msg) is Host:
            return  # hosted already
        g.step(from_peer, msg)
        p = g.proposer
        if p is not None and p.queue:
            # slots chosen may have opened the in-flight window: flush the queue
            self._dirty.add(g.group)

    def tick(self, n: int = 1) -> None:
        """``n`` ticks of this node's clock passed since the last call (the shell
        passes every tick that elapsed, also after a pause: see ``PaxosGroup.tick``).

        Quiet groups (``PaxosGroup.is_quiet``: quiesced, nothing to do, their
        leader's node alive) are not ticked: an idle node's work per tick does
        not grow with the number of groups. A quiet group is woken, its clock
        caught up first, by any input for it and by any change in the liveness
        of a peer (which may be its leader, or a member it must tell)."""
        if n < 1:
            raise InvariantBroken(f"tick({n})")
        self.now += n
        if self.now - self._last_node_heartbeat >= self.config.heartbeat_interval_ticks:
            self._last_node_heartbeat = self.now
            beat = NodeHeartbeat()
            self.out.send.extend((peer, beat) for peer in self.peers)
        alive = frozenset(p for p in self.peers if self.peer_alive(p))
        if alive != self._alive_seen:
            changed = alive ^ self._alive_seen
            self._alive_seen = alive
            # in a fixed order (not the set's, which the hash seed decides for "meta"):
            # the groups woken tick, and send, in this order
            for gid in sorted(self._quiet, key=str):
                g = self.groups[gid]
                if changed & g.member_set or not changed.isdisjoint(g.learners):
                    self._awake(gid)
        quiet, ticking, now = self._quiet, self._ticking, self.now
        for gid, g in list(ticking.items()):
            # up to the node's clock: n ticks, or none for a group just woken above
            # (``_awake`` caught it up already; ticking it n more would run its clock
            # ahead of the node's, and a follower would stop honouring a lease early)
            if g.now < now:
                g.tick(now - g.now)
            p = g.proposer
            if p is not None and p.queue and self.config.reconfig:
                self._dirty.add(gid)  # a fence may have lifted (catch-up): flush the queue
            if self.config.quiesce and g.is_quiet():
                quiet.add(gid)
                del ticking[gid]
        if self._riders:  # after the groups ticked: one woken here is caught up, not ticked
            self._release_riders(self.now - self.resolve_ride_ticks)

    def awake_groups(self) -> list[tuple[Any, PaxosGroup]]:
        """The groups ticked now (not quiet): only these can change role or leader
        without an input waking them first."""
        return list(self._ticking.items())

    def idle_ticks(self) -> int:
        """Ticks the shell may let pass before the next ``tick`` without this node
        missing a duty: 1 while any group is ticked (not quiet); with every group quiet
        (an idle node), the ticks until its next node heartbeat is due. Liveness changes
        are then noticed at heartbeat pace, and any input wakes what it concerns, so an
        idle node wakes once per heartbeat interval whatever the number of groups."""
        if self._ticking or self._dirty or self._riders:
            return 1
        due = self._last_node_heartbeat + self.config.heartbeat_interval_ticks - self.now
        return max(1, due)

    def _awake(self, gid: Any) -> PaxosGroup | None:
        """The group, no longer quiet, its clock caught up with the node's."""
        g = self.groups.get(gid)
        if g is not None and gid in self._quiet:
            self._quiet.discard(gid)
            self._ticking[gid] = g
            if self.now > g.now:
                g.tick(self.now - g.now)
        return g

    def peer_alive(self, peer: str) -> bool:
        """Heard from ``peer`` (anything, a node heartbeat at least) within an election
        timeout, and not suspected by the shell's failure detector (``suspects``: with an
        election timeout longer than the detector's suspicion, a quiet group's followers
        then stop waiting on a leader the detector gave up on, and no leadership is handed
        to a suspect); this node itself always is."""
        if peer == self.node_id:
            return True
        if peer in self.suspects:
            return False
        heard = self.peer_heard.get(peer)
        return heard is not None and self.now - heard < self.config.election_timeout_ticks

    def propose(self, group: Any, token: Any, cmd: Any, request_id: Any = None) -> None:
        """Queue ``cmd`` in ``group`` (batched into slots at ``ready``).

        A transaction's ``TxResolve`` (its client was answered already: it only applies
        a participant's writes and releases its locks) or a home's ``TxForget`` is held
        back until the next command proposed to the same group, or the next linearizable
        read of it (which then waits for it), and goes into that command's slot, ahead
        of it; at the latest after ``resolve_ride_ticks`` ticks, alone. A leader's slot
        round (accepts, acceptances, log records on every replica) is then shared
        instead of run once more for it. Holding a command back changes nothing but
        when it is proposed (as a slower link would); a participant's locks are held at
        most that much longer, and a command or read that waits for them sends it."""
        g = self._awake(group)
        if g is None:
            self.out.reply.append(Reply(token, error=("unavailable", "unknown group", False)))
            return
        riders = self._riders
        if type(cmd) in _RIDERS and self.resolve_ride_ticks:
            held = riders.get(group)
            if held is None:
                riders[group] = (self.now, [(token, cmd, request_id)])
            else:
                held[1].append((token, cmd, request_id))
            return
        if riders:
            self._ride(group, g)
        g.propose(token, cmd, request_id)
        self._dirty.add(group)

    def _ride(self, group: Any, g: PaxosGroup) -> None:
        """Propose ``group``'s held resolves now, ahead of what comes next."""
        held = self._riders.pop(group, None)
        if held is not None:
            self.resolves["rode"] += len(held[1])
            for t, c, r in held[1]:
                g.propose(t, c, r)
            self._dirty.add(group)

    def _release_riders(self, due: int) -> None:
        """Propose the resolves held since tick ``due`` or before (see ``propose``)."""
        riders = self._riders
        for group in [gid for gid, (since, _) in riders.items() if since <= due]:
            _since, held = riders.pop(group)
            self.resolves["alone"] += len(held)
            g = self._awake(group)
            for t, c, r in held:
                if g is None:
                    self.out.reply.append(Reply(t, error=("unavailable", "unknown group",
                                                          False)))
                else:
                    g.propose(t, c, r)
            if g is not None:
                self._dirty.add(group)

    def read(self, group: Any, token: Any, cmd: Get) -> None:
        g = self._awake(group)
        if g is None:
            self.out.reply.append(Reply(token, error=("unavailable", "unknown group", False)))
            return
        if self._riders and cmd.consistency != STALE:
            self._ride(group, g)  # what it reads may be locked until they are applied
        g.read(token, cmd)
        self._dirty.add(group)

    def campaign(self, group: Any) -> None:
        """Start phase 1 in ``group`` now, without a pre-vote; no-op for a leader."""
        g = self._awake(group)
        if g is not None:
            g.campaign()

    def transfer_leadership(self, group: Any, target: str) -> bool:
        """Hand ``group``'s leadership to ``target`` (see ``PaxosGroup.transfer_leadership``);
        False when this node does not lead the group or ``target`` is no other member."""
        g = self._awake(group)
        return g is not None and g.transfer_leadership(target)

    def snapshot_ready(
        self, group: Any, index: int, blob: bytes, crc: int | None = None
    ) -> None:
        """The shell finished the ``SnapshotWanted(group, index, ...)`` job: the
        snapshot is durable in its file; ``blob`` is its bytes (or a bytes-like
        view of the file) and ``crc`` their CRC-32 (computed here if None).
        Records the file in the WAL and compacts (``PaxosGroup.snapshot_ready``);
        unknown groups are ignored."""
        g = self._awake(group)
        if g is not None:
            g.snapshot_ready(index, blob, crc)

    def snapshot_restored(self, group: Any, index: int, sm: Any | None) -> None:
        """The shell finished the ``SnapshotRestore(group, index, ...)`` job: ``sm`` is
        the state machine decoded from the peer's snapshot, or None if decoding
        failed (``PaxosGroup.snapshot_restored``); unknown groups are ignored."""
        g = self._awake(group)
        if g is not None:
            g.snapshot_restored(index, sm)
            self._dirty.add(group)

    def log_bytes(self) -> int:
        """About the memory held by the chosen values above the groups' snapshots (in
        the WAL too, until a checkpoint): ``Log.bytes`` summed."""
        return sum(g.log.bytes for g in self.groups.values())

    def request_largest_snapshot(self) -> Any:
        """Snapshot the group holding the most log that can take one now (none in
        progress, something applied since its last); returns its id, or None."""
        best, most = None, 0
        for gid, g in self.groups.items():
            log = g.log
            if log.bytes > most and g.snap_pending is None and log.applied > log.snap_index:
                best, most = gid, log.bytes
        if best is None:
            return None
        self._awake(best).request_snapshot()
        return best

    # ------------------------------------------------------------ drain
    def ready(self) -> Ready:
        if self.out.conf_changes != self._conf_changes_seen:
            self._conf_changes_seen = self.out.conf_changes
            self._update_peers()  # a group's members changed: node heartbeats follow
        if self.metadata is not None:
            g = self.groups.get(self.metadata)
            if g is not None and g.sm.ring_epoch != self._ring_epoch:
                self._ring_changed()
        for group in sorted(self._dirty, key=str):
            self.groups[group].flush()
        self._dirty.clear()
        return self.out.take()

    # ------------------------------------------------------------ recovery
    def recover(
        self, records: Iterable[bytes], snapshots: Mapping[Any, StoredSnapshot] | None = None
    ) -> None:
        """Rebuild acceptor promises/accepts, logs and state machines.

        ``snapshots``: per group, the newest valid snapshot file the shell
        found; each group starts from it, then the WAL records are replayed
        (those it covers change nothing). Records and snapshot files of groups
        this node does not have are set aside: ``add_group`` replays them into a
        group created later (the metadata group first, then the partitions its
        state names), ``drop_orphans`` forgets them. Raises ``StateLost`` when a group's
        records name a newer snapshot file than the state recovered reaches.
        The apply notices (and snapshot jobs) recovery produces stay in the
        next ``ready()``.
        """
        for gid, snap in (snapshots or {}).items():
            g = self.groups.get(gid)
            if g is not None:
                g.recover_snapshot(snap)
            else:
                self._orphan_snapshots[gid] = snap
        for raw in records:
            r = rec.decode(raw)
            if r[0] == rec.HOST or r[0] == rec.DROP:
                self._recover_hosting(r, snapshots or {})
                continue
            g = self.groups.get(r[1])
            if g is not None:
                g.recover_record(r)
            else:
                self._orphans.setdefault(r[1], []).append(r)
        for gid in self._dropped:
            self._orphans.pop(gid, None)
            self._orphan_snapshots.pop(gid, None)
        for g in list(self.groups.values()):
            g.finish_recovery()
        self.sync_partitions()

    def _recover_hosting(self, r: list, snapshots: Mapping[Any, StoredSnapshot]) -> None:
        """A ``host`` record: the group starts afresh with that configuration, from
        the newest snapshot file of it if any (the group's state at some chosen
        index, whoever wrote it); a ``drop`` record: the group goes."""
        gid = r[1]
        self._orphans.pop(gid, None)
        if r[0] == rec.DROP:
            self._forget(gid)
            self._hosted.pop(gid, None)
            self._dropped.add(gid)
            self._update_peers()
            return
        self._start_hosting(gid, GroupConf.from_list(r[2:]))
        snap = snapshots.get(gid)
        if snap is not None:
            self._orphan_snapshots.pop(gid, None)
            self.groups[gid].recover_snapshot(snap)

    def checkpoint(self) -> bytes | None:
        """The node's durable Paxos state as one blob of records, for a WAL
        snapshot; None while a snapshot installed from a peer is not yet in its
        file (the records before it are its only durable copy until then).

        Per group: which snapshot file is current (a ``snapfile`` record, not
        the state: the checkpoint stays small whatever the state), its
        promise, every accepted value above the snapshot, the chosen values its
        acceptor does not hold and a commit record for the chosen prefix that
        its commit records prove. Replaying these through :meth:`recover`, with
        the same snapshot files, rebuilds the state that the records persisted
        so far would (the same acceptor, log and state machine:
        tests/core/test_checkpoint_property.py, and the simulator on every
        restart), so the WAL may drop everything before the checkpoint. Call
        it with ``ready()`` drained: what it says must be on the WAL already.
        Also None while recovery's set-aside records of groups not created yet
        are pending (``add_group``/``drop_orphans``): they would be lost.
        """
        w = self.checkpoint_writer()
        if w is None:
            return None
        while not w.step(1 << 30):
            continue
        return w.result()

    def checkpoint_writer(self) -> CheckpointWriter | None:
        """What :meth:`checkpoint` returns, captured now (shallow copies of each
        group's accepted and chosen values) and encoded later, a bounded piece
        per ``step`` (``core.paxos.checkpoint``), so the shell never encodes the
        whole log window in one event-loop turn. None when :meth:`checkpoint`
        would be. Same precondition: ``ready()`` drained."""
        if self._orphans or self._orphan_snapshots:
            return None
        groups: list = [DropCapture(sorted(self._dropped, key=str))]
        for gid in sorted(self.groups, key=str):
            g = self.groups[gid]
            if g.log.snap_index > 0 and g.snap_file_index != g.log.snap_index:
                return None
            groups.append(GroupCapture(g, self._hosted.get(gid)))
        return CheckpointWriter(groups)

    # ------------------------------------------------------------ queries
    def snapshot_indexes(self) -> dict[Any, int]:
        """Per group, the snapshot (file) a :meth:`checkpoint` taken now names."""
        return {gid: g.log.snap_index for gid, g in self.groups.items() if g.log.snap_index}

    def leader_of(self, group: Any) -> str | None:
        g = self.groups[group]
        return g.me if g.role is Role.LEADER else g.leader_hint

    def log_end(self, group: Any) -> int:
        """The highest slot this node's log holds anything for (accepted, chosen or
        in the snapshot): a healthy node's never falls below what it acknowledged."""
        g = self.groups[group]
        return max(g.log.snap_index, g.log.chosen_through, max(g.acceptor.accepted, default=0))

    def durable_summary(self) -> tuple[dict[str, int], dict[str, tuple[int, str]]]:
        """Per group (id as a string): ``log_end`` and the acceptor's promise, for
        the peer hello's identity check (``core.membership.incarnations``)."""
        return (
            {str(g): self.log_end(g) for g in self.groups},
            {str(g): grp.acceptor.promised for g, grp in self.groups.items()},
        )

    def dropped_groups(self) -> list[str]:
        """The groups this node dropped for good and hosts no more (ids as strings), for
        the peer hello: peers let go of its watermarks there (``Incarnations.note_drops``)."""
        return sorted(str(g) for g in self._dropped if g not in self.groups)

    def removed_at(self, peer: str, group: str) -> int | None:
        """The configuration epoch, as applied here, of group ``group`` (id as a string)
        that no longer lists ``peer``; 0 for a group not hosted here; None while the
        configuration applied here still lists it."""
        for gid, g in self.groups.items():
            if str(gid) == group:
                return None if g.conf.hosts(peer) else g.conf.epoch
        return 0

    def conf_epochs(self) -> dict[str, int]:
        """Per group (id as a string): the epoch of the configuration applied here, for
        the peer hello's identity check (a group dropped and hosted again must come
        back with a later configuration: ``Incarnations.dropped``)."""
        return {str(g): grp.conf.epoch for g, grp in self.groups.items()}

    def is_leader(self, group: Any) -> bool:
        return self.groups[group].role is Role.LEADER

    def applied_index(self, group: Any) -> int:
        return self.groups[group].log.applied

    def state_machine(self, group: Any):
        return self.groups[group].sm

    @property
    def role_changes(self) -> int:
        """Times any group of this node became leader or stopped leading."""
        return self.out.role_changes

    @property
    def quiet_groups(self) -> int:
        """Groups not ticked right now (quiet: see ``tick``)."""
        return len(self._quiet)

    @property
    def dropped(self):
        return self.out.dropped

    @property
    def largest_message(self) -> int:
        """Bytes (``messages.wire_size``) of the largest peer message built since start."""
        return self.out.largest_message

    @property
    def reads(self):
        """Linearizable reads answered as leader, by "lease" and "read_index"."""
        return self.out.reads

    def lease_held(self, group: Any) -> bool:
        g = self._awake(group)
        return g is not None and g.lease_held()
