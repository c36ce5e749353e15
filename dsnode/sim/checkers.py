"""Safety checkers run on every simulation.

- ``one value per slot`` (ground truth): from durable acceptor records, a
  value is chosen once a quorum of a group's acceptors durably accepted it in
  one ballot; two different chosen values for a slot is a violation, at any
  time, whether or not anyone learned them.
- ``one value per slot`` (learned) and ``applied prefixes``: every applied
  slot, on any node at any time, has the same value, each node applies
  strictly in slot order, and learned values equal the chosen ones.
- ``same state`` after convergence: every replica of a group holds the same
  KV state and dedup table (with its cross-partition transactions' table).
- ``linearizable``: the client history, per key (``linearizability.py``).
- ``nothing acknowledged lost``: every acknowledged write is in the applied log.
- ``exactly once``: a replica's KV state equals the applied log replayed with
  every request id ``(client, seq)`` applied at its first occurrence only (a
  reference with an unbounded memory of ids), so no retried write took effect
  twice and none was dropped. Cross-partition transactions' commands are
  replayed into a ``TxnTable`` beside the store (``replay``), whose history of
  the bank's accounts the transaction checks read (``sim/txns.py``).
- ``amnesiacs never vote``: a node that came back with less durable state than
  the votes it had already delivered (a wiped or rolled-back data directory)
  never has another promise or accept delivered. Tracked here from the votes
  themselves, independently of the pins that enforce it.
- ``partitions match the ring`` (a partitioned cluster, :func:`misplaced` and
  :func:`unhosted`): every node hosts only partitions the ring places on it,
  each with the ring's replicas in the ring's order (the first its preferred
  leader), the ring its metadata group holds is that ring, and once the
  cluster settles every live replica hosts all its partitions.

- ``replica-set changes`` (``SimConfig.reconfig``): the acceptors of a slot
  are the voters of the configuration in effect for it (``conf_at``), which
  the checker replays from the applied log with the cores' own validation
  (``reconfig.refusal``); only their votes count toward the ground truth, and
  at the end every vote is counted again against the final history. Once
  quiet, every replica holds the last chosen configuration and no removed
  node hosts the group (``sim/reconfig.py``, ``Mover.misplaced``).

- ``membership changes`` (``SimConfig.membership``): the same configuration
  replay for the partitions and the metadata group, whose replay applies the
  membership commands as its state machine does; once quiet the member table
  settled, every partition's voting set is the final ring's placement (no
  learner), the metadata group holds the members on the ring, and no live node
  keeps a group it no longer holds (``sim/membership.py``, ``Membership.misplaced``).

Every group is checked alike, the metadata group (whose state machine keeps
the ring) and each partition; the groups and their members come from the
world (for a partitioned cluster, its ring), not from what the nodes host.
"""

from __future__ import annotations

from typing import Any

import msgpack

from dsnode.core.commands import ConfChange, Delete, Form, Put, SetRing, SubGet, Txn
from dsnode.core.kv.store import KVStore
from dsnode.core.membership.members import TYPES as MEMBER_TYPES
from dsnode.core.paxos import Applied, SnapshotInstalled
from dsnode.core.paxos import records as rec
from dsnode.core.paxos.metadata import MetaSM
from dsnode.core.paxos.reconfig import GroupConf, refusal
from dsnode.core.paxos.statemachine import unpack_batch
from dsnode.core.ring import Ring
from dsnode.core.twopc.participant import TxnTable
from dsnode.core.twopc.records import TYPES as TX_TYPES
from dsnode.core.twopc.records import TxCommit, TxResolve


class SafetyViolation(AssertionError):
    pass


class SafetyChecker:
    def __init__(
        self, groups: dict[Any, tuple[str, ...]], check_amnesia: bool = True,
        metadata: Any = None,
    ) -> None:
        self.check_amnesia = check_amnesia
        self.groups = groups
        self.metadata = metadata  # the metadata group's id (None: there is none)
        self.quorum = {g: len(m) // 2 + 1 for g, m in groups.items()}
        # (group, slot, ballot) -> {node: value}
        self.votes: dict[tuple, dict[str, bytes]] = {}
        self.chosen: dict[tuple, bytes] = {}  # (group, slot) -> value (ground truth)
        self.learned: dict[tuple, bytes] = {}  # (group, slot) -> value (applied anywhere)
        self.last_applied: dict[tuple, int] = {}  # (node, group) -> slot
        self.violations: list[str] = []
        # node -> group -> [highest slot, highest ballot] its delivered votes showed
        self.voted: dict[str, dict[str, list]] = {}
        self.incarnation: dict[str, str] = {}
        self.amnesiac: set[str] = set()
        self.left: dict[str, dict[str, int]] = {}  # node -> group -> epoch that removed it
        # per group, the configurations chosen so far: [(slot of the change, conf)]
        self.confs: dict[Any, list[tuple[int, GroupConf]]] = {
            g: [(0, GroupConf(tuple(m)))] for g, m in groups.items()
        }

    def fail(self, text: str) -> None:
        self.violations.append(text)
        raise SafetyViolation(text)

    # ------------------------------------------------------------ inputs
    def on_durable(self, node: str, records: list[bytes]) -> None:
        for raw in records:
            if not raw.startswith(b"\x95\xa6accept"):
                continue  # promises and snapshots carry no votes
            r = rec.decode(raw)
            _, group, slot, ballot, value = r
            key = (group, slot, ballot)
            voters = self.votes.setdefault(key, {})
            prev = voters.get(node)
            if prev is not None and prev != value:
                self.fail(f"{node} accepted two values for {group}/{slot} in ballot {ballot}")
            voters[node] = value
            conf = self.conf_at(group, slot)
            n = sum(1 for m, v in voters.items() if v == value and m in conf.voters)
            if n >= conf.quorum:
                self._chosen(group, slot, value, f"ballot {ballot}")

    def conf_at(self, group: Any, slot: int) -> GroupConf:
        """The configuration in effect for ``slot``: set by the last change below it."""
        conf = self.confs[group][0][1]
        for at, c in self.confs[group]:
            if at >= slot:
                break
            conf = c
        return conf

    def conf(self, group: Any) -> GroupConf:
        """``group``'s last chosen configuration (as applied anywhere so far)."""
        return self.confs[group][-1][1]

    def on_host(self, node: str, group: Any) -> None:
        """``node`` starts hosting ``group`` afresh (as a learner): it applies from
        its beginning (or a snapshot) again."""
        self.last_applied[(node, group)] = 0

    def _learn_conf(self, group: Any, slot: int, value: bytes) -> None:
        if not value or b"\xa1C" not in value:
            return
        for _rid, cmd in unpack_batch(value):
            if type(cmd) is ConfChange:
                cur = self.conf(group)
                if refusal(cur, cmd) is None:
                    self.confs[group].append((slot, GroupConf(cmd.voters, cmd.learners,
                                                              cmd.epoch, slot)))

    def recount(self) -> None:
        """Every durable vote counted again against the final configuration history:
        two values chosen in a slot, or a learned value that is not the chosen one,
        is a violation."""
        self.chosen = {}
        for (group, slot, ballot), voters in self.votes.items():
            conf = self.conf_at(group, slot)
            for value in set(voters.values()):
                n = sum(1 for m, v in voters.items() if v == value and m in conf.voters)
                if n >= conf.quorum:
                    self._chosen(group, slot, value, f"ballot {ballot}, recounted")
        self.check_learned_were_chosen()

    def _chosen(self, group: Any, slot: int, value: bytes, how: str) -> None:
        cur = self.chosen.get((group, slot))
        if cur is None:
            self.chosen[(group, slot)] = value
        elif cur != value:
            self.fail(f"two values chosen for {group}/{slot} ({how}): {cur!r} vs {value!r}")

    def on_vote_delivered(self, node: str, group: str, slot: int, promised) -> None:
        if node in self.amnesiac and self.check_amnesia:
            self.fail(f"{node} voted after coming back with a wiped or rolled-back data directory")
        v = self.voted.setdefault(node, {}).setdefault(group, [0, (0, "")])
        v[0] = max(v[0], slot)
        v[1] = max(v[1], promised)

    def dropped(self, node: str, group: str, epoch: int) -> None:
        """``node`` left ``group`` for good, removed by the configuration of ``epoch``
        (``Incarnations.dropped``): its votes there no longer matter, but it may come
        back to the group only with a later configuration (hosted afresh)."""
        self.voted.get(node, {}).pop(group, None)
        self.left.setdefault(node, {})[group] = epoch

    def on_presented(self, node: str, p) -> None:
        """``node`` (re)started presenting durable state ``p``: amnesiac if it is
        less than what its votes already showed."""
        old = self.incarnation.get(node)
        self.incarnation[node] = p.incarnation
        voted = self.voted.get(node, {})
        lost = old is not None and old != p.incarnation and bool(voted)
        for g, (slot, ballot) in voted.items():
            if p.log_end.get(g, 0) < slot or p.promised.get(g, (0, "")) < ballot:
                lost = True
        for g, epoch in self.left.get(node, {}).items():
            if g in p.log_end and p.conf_epoch.get(g, 0) <= epoch:
                lost = True  # an old copy of a group it dropped
        if lost:
            self.amnesiac.add(node)
        else:
            self.amnesiac.discard(node)

    def on_restart(self, node: str) -> None:
        for g in self.groups:
            self.last_applied[(node, g)] = 0

    def on_apply(self, node: str, notice: Any) -> None:
        if type(notice) is SnapshotInstalled:
            key = (node, notice.group)
            if notice.index <= self.last_applied.get(key, 0):
                self.fail(f"{node} installed snapshot {notice.index} going backwards")
            self.last_applied[key] = notice.index
            return
        if type(notice) is not Applied:
            return
        key = (node, notice.group)
        last = self.last_applied.get(key, 0)
        if notice.slot != last + 1:
            self.fail(f"{node} applied {notice.group}/{notice.slot} after {last}: out of order")
        self.last_applied[key] = notice.slot
        lk = (notice.group, notice.slot)
        cur = self.learned.get(lk)
        if cur is None:
            self.learned[lk] = notice.value
            self._learn_conf(notice.group, notice.slot, notice.value)
        elif cur != notice.value:
            self.fail(f"{node} applied a different value at {notice.group}/{notice.slot}")
        truth = self.chosen.get(lk)
        if truth is not None and truth != notice.value:
            self.fail(f"{node} applied {notice.group}/{notice.slot} but another value was chosen")

    # ------------------------------------------------------------ end of run
    def check_learned_were_chosen(self) -> None:
        for lk, value in self.learned.items():
            truth = self.chosen.get(lk)
            if truth is not None and truth != value:
                self.fail(f"learned value at {lk} differs from the chosen one")

    def applied_request_ids(self) -> set[tuple]:
        ids = set()
        for value in self.learned.values():
            if value:
                for rid, _cmd in msgpack.unpackb(value, raw=False):
                    if rid is not None:
                        ids.add((rid[0], rid[1]))
        return ids

    def exactly_once_state(self, group: Any) -> tuple[int, list]:
        """``(revision, items)`` of ``group``'s applied log replayed with each request id
        applied at its first occurrence only."""
        kv, _ = self.replay(group)
        return kv.revision, sorted(kv.items())

    def replay(self, group: Any, watch: frozenset = frozenset()) -> tuple[KVStore, dict]:
        """``group``'s applied log replayed into a fresh store, each request id applied
        at its first occurrence only (a reference with an unbounded memory of ids).
        Cross-partition transactions' commands go to a ``TxnTable`` beside it; a
        command that meets a prepared transaction's lock is not applied and its id not
        remembered (it is sent again). Also returns, for each key of ``watch``, every
        value it took -> the version it took it at."""
        meta = MetaSM() if group == self.metadata else None
        kv = KVStore() if meta is None else meta.kv
        txns = TxnTable()
        seen: set[tuple] = set()
        values: dict[bytes, dict] = {k: {} for k in watch}
        slots = sorted(s for g, s in self.learned if g == group)
        if slots and slots != list(range(1, len(slots) + 1)):
            self.fail(f"group {group}: the applied log has gaps, cannot replay it")
        for s in slots:
            for rid, cmd in unpack_batch(self.learned[(group, s)]):
                t = type(cmd)
                if t is Form or t is ConfChange:
                    continue
                if t in TX_TYPES:
                    # a commit carries its client's request id: a retry (another attempt)
                    # is answered from the table, not applied; a refusal is not remembered
                    key = (rid[0], rid[1]) if rid is not None else None
                    if key in seen:
                        continue
                    result = txns.apply(cmd, kv)
                    if key is not None and "conflict" not in result:
                        seen.add(key)
                    if (t is TxResolve or t is TxCommit) and watch:
                        for k in watch:
                            value, version = kv.get(k)
                            if value is not None:
                                values[k].setdefault(value, version)
                    continue
                key = (rid[0], rid[1]) if rid is not None else None
                if key in seen:
                    continue
                if (txns.xlocks or txns.slocks) and _blocked(txns, cmd):
                    continue
                if key is not None:
                    seen.add(key)
                if meta is not None and (t is SetRing or t in MEMBER_TYPES):
                    meta.apply(None, cmd, s)  # the ring and members, in the metadata store
                else:
                    kv.apply(cmd)
        return kv, values


def _blocked(txns: TxnTable, cmd: Any) -> bool:
    """Whether a prepared transaction's lock keeps ``cmd`` from being applied now."""
    t = type(cmd)
    if t is Put or t is Delete:
        return txns.write_blocked(cmd.key) is not None
    if t is Txn:
        reads = [k for k, _ in cmd.compares]
        reads += [s.key for s in (*cmd.then, *cmd.otherwise) if type(s) is SubGet]
        writes = [s.key for s in (*cmd.then, *cmd.otherwise) if type(s) is not SubGet]
        return (any(txns.read_blocked(k) is not None for k in reads)
                or any(txns.write_blocked(k) is not None for k in writes))
    return False


def misplaced(node: str, core: Any, ring: Ring, metadata: Any) -> str | None:
    """Why the partitions ``node``'s core hosts disagree with ``ring`` (None: they
    agree): a partition the ring does not place on ``node``, one whose members are
    not its replicas or whose preference order is not the ring's, or a ring in the
    node's metadata group that is not ``ring``."""
    placed = ring.partitions_of(node) if node in ring.members else ()
    for gid, g in core.groups.items():
        if gid == metadata:
            continue
        if gid not in placed:
            return f"{node} hosts partition {gid!r}, which the ring does not place on it"
        want = ring.replicas(gid)
        if g.preferred != want or g.member_set != frozenset(want):
            return (f"{node} hosts partition {gid} on {list(g.preferred)}; "
                    f"the ring places it on {list(want)}")
    held = core.ring
    if held is not None and (held.members, held.partitions, held.replication, held.epoch) != (
        ring.members, ring.partitions, ring.replication, ring.epoch
    ):
        return f"{node}'s metadata group holds {held!r}, not {ring!r}"
    return None


def unhosted(cores: dict[str, Any], ring: Ring) -> dict[str, list[int]]:
    """Per node of ``cores`` (a core, or None while the node is down): the
    partitions ``ring`` places on it that it does not host."""
    out = {}
    for node, core in cores.items():
        groups = core.groups if core is not None else {}
        missing = [p for p in ring.partitions_of(node) if p not in groups]
        if missing:
            out[node] = missing
    return out
