"""Replica-set changes chosen through a group's own log (issue 10 part 2).

A group's configuration is ``GroupConf(voters, learners, epoch)``. Voters are
its acceptors: they answer phase 1, their acceptances count toward a quorum
(a majority of the voters) and only they campaign. Learners get every Accept
and commit the leader sends (or catch up by log or snapshot like anyone) and
apply the log, but never count and never campaign. A node hosts a group as a
learner when it is one of its learners (``PaxosNode.host_learner``).

The configuration changes through a ``ConfChange`` command chosen in the
group's log. ``config(s)``, the acceptors of slot ``s``, is the configuration
set by the last valid ``ConfChange`` chosen in a slot below ``s`` (the
group's initial one if none): a change takes effect when it is CHOSEN AND
APPLIED, for every later slot, the same on every replica (the state machine
validates it, ``refusal``, from replicated state only: a refused change is
refused everywhere with the same answer, and changes nothing). The
configuration lives in the state machine (``DedupKV.conf``), so snapshots
carry it and a replica restored or caught up from a snapshot has it; the
group re-reads it after every apply and install (``PaxosGroup._adopt_conf``).

Rules:

- R1 (one voter at a time): a change adds one voter (it must be a learner
  already: the leader also asks that it has caught up) or removes one, or
  changes only learners; at least one voter stays. So any majority of
  ``config(s)`` intersects any majority of the configuration before or
  after it.
- R2 (no pipelining across a change): a leader puts a ``ConfChange`` alone
  in its slot ``c`` and proposes nothing above ``c`` until ``c`` is chosen
  and applied (``Proposer.fence``). A second change is refused while one is
  queued or in flight (``CONF_PENDING``) and, in any case, by its epoch
  when it is applied after another one.
- R3 (phase 1 with a stale configuration): a candidate runs phase 1 with a
  majority of the configuration it has applied, ``C_f``. If a promise shows
  a chosen prefix beyond its own (chosen slots it does not know, which may
  hold changes), it proposes nothing at all, catches up to that prefix and
  then runs phase 1 again (``Proposer.catchup_to``). If a re-proposal from
  phase 1 holds a ``ConfChange`` at slot ``c``, it proposes up to ``c``,
  holds the slots above (``Proposer.held``) and, once ``c`` is applied, runs
  phase 1 again if it held anything.
- R4 (which slots a phase 1 covers): a leader whose promises came from a
  majority of ``C_f`` proposes in slot ``s`` only while ``config(s)`` is
  ``C_f`` or the one right after it, ``C_{f+1}``; applying a configuration
  two steps past ``C_f`` makes it run phase 1 again at once (a leader that
  changed the configuration twice re-runs phase 1 every second change).

- R5 (a replica added afresh): a node removed from a group drops the group's
  data once it applied its removal (every slot it voted on is chosen by
  then), and may be added again later, as a learner with an empty acceptor.
  A leader still holding an old configuration would count that acceptor under
  the node's old identity, and its empty answers would hide what the old one
  accepted. So a replica hosted afresh answers neither phase 1 nor phase 2
  until it has applied the change that added it (``PaxosGroup.joining``, the
  change's slot in ``GroupConf.slot``); from then on its promises report a
  chosen prefix through that slot, which sends any stale leader to catch up
  (R3). The identity pins refuse a node that comes back with an old copy of a
  group it dropped (``Incarnations.dropped``).

Invariant: whoever proposes a value in slot ``s`` with ballot ``b`` (i)
knows ``config(s)`` (every change below ``s`` is chosen and applied by it:
R2 for its own proposals, R3 for what it inherited), and (ii) holds
promises for ``b`` from a majority of ``config(s)`` or of a configuration
one voter away from it (R4). A value chosen in ``s`` was accepted by a
majority of ``config(s)``.

Why that is safe: it is Paxos per slot with the acceptor set ``config(s)``,
where phase 1 uses a quorum that intersects every phase-2 quorum of
``config(s)`` (Flexible Paxos: any majority of a configuration intersects
any majority of one that differs from it by one voter, R1). So the usual
argument goes through: a value chosen in ``s`` at ballot ``b`` is reported
to every later phase 1 that covers ``s`` and re-proposed. It remains to
see that a stale candidate cannot skip a change. Let ``C_f`` be its applied
configuration and ``c`` the slot of the next change ``C_f -> C_{f+1}``
that was chosen; ``c``'s acceptors are ``C_f``, so a majority of ``C_f``
accepted it and one of them is in the candidate's promises: that acceptor
either reports ``c`` (or a later value at ``c``, which by Paxos is the
same) among its accepted values, or a chosen prefix that reaches ``c``
(R3 either way). Liveness after a removal: a removed node stops
campaigning once it applied the change; one that missed it runs phase 1
with its old configuration, whose members ignore prepares and pre-votes of
nodes outside their configuration, or (not yet knowing) show it a longer
chosen prefix: it catches up, sees it was removed and stops.

Liveness. A leader that removes itself stays on as a lame duck (no new
commands) until a majority of the new voters know the change durably (with
reconfiguration, accept replies report the chosen prefix a replica's records
prove), then hands leadership to the one furthest along (``TimeoutNow``, as
``transfer_leadership``) and steps down: its data may go only once others
know what it knew. A replica that applied a configuration that no longer
lists it (a leader: once it stepped down) is retired: it stops taking part
(it still serves catch-up) and ``PaxosNode.retired_groups`` tells the shell
it may drop the group's data. Leaders keep sending commits to the replicas
the last change removed until they acknowledge it (``Proposer.gone``); a
learner that hears no leader asks a voter for the log; a node asked for its
vote by a node outside its configuration answers with the log the asker
lacks, or catches up from the asker if that one is ahead; and a leader
waiting (R3) for a prefix that makes no progress for two election timeouts
runs phase 1 again. Until every replica has applied a change, the older
configuration is still in use: losing a majority of it (a dropped member
counts as lost) can stall the group, as for any configuration.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dsnode.core.commands import ConfChange

CONF_REFUSED = "conf_refused"  # the error code of a refused change (a definite answer)
CONF_PENDING = "conf_pending"  # another change is queued or in flight at this leader


@dataclass(frozen=True, slots=True)
class GroupConf:
    voters: tuple[str, ...]  # in preference order; quorum is a majority of them
    learners: tuple[str, ...] = ()
    epoch: int = 0
    # the slot of the change that made it (0: the group's first); every slot up to it
    # is chosen once anyone applied it. Not part of the configuration's identity.
    slot: int = field(default=0, compare=False)

    @property
    def quorum(self) -> int:
        return len(self.voters) // 2 + 1

    def hosts(self, node: str) -> bool:
        return node in self.voters or node in self.learners

    def to_list(self) -> list:
        return [list(self.voters), list(self.learners), self.epoch, self.slot]

    @classmethod
    def from_list(cls, x: list) -> GroupConf:
        return cls(tuple(x[0]), tuple(x[1]), x[2], x[3] if len(x) > 3 else 0)

    def command(self) -> ConfChange:
        return ConfChange(self.voters, self.learners, self.epoch)


def refusal(cur: GroupConf, cmd: ConfChange) -> str | None:
    """Why ``cmd`` may not follow ``cur`` (None: it may). A function of the two
    alone, so every replica answers the same."""
    voters, learners = cmd.voters, cmd.learners
    if cmd.epoch != cur.epoch + 1:
        return f"configuration epoch {cmd.epoch} does not follow the current {cur.epoch}"
    if not voters:
        return "a group keeps at least one voter"
    if len(set(voters)) != len(voters) or len(set(learners)) != len(learners):
        return "a node is listed twice"
    if set(voters) & set(learners):
        return "a node is both a voter and a learner"
    if set(voters) == set(cur.voters) and set(learners) == set(cur.learners):
        return "the change changes no member"
    added = set(voters) - set(cur.voters)
    removed = set(cur.voters) - set(voters)
    if len(added) + len(removed) > 1:
        return (f"one voter at a time: adds {sorted(added)}, removes {sorted(removed)}")
    for n in added:
        if n not in cur.learners:
            return f"{n} is not a learner of the group: add it as a learner first"
    return None


def add_learner(cur: GroupConf, node: str) -> GroupConf:
    return GroupConf(cur.voters, (*cur.learners, node), cur.epoch + 1)


def promote(cur: GroupConf, node: str) -> GroupConf:
    return GroupConf((*cur.voters, node), tuple(m for m in cur.learners if m != node),
                     cur.epoch + 1)


def remove(cur: GroupConf, node: str) -> GroupConf:
    return GroupConf(tuple(m for m in cur.voters if m != node),
                     tuple(m for m in cur.learners if m != node), cur.epoch + 1)
