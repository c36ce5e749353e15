"""Durable records of the Paxos core (what goes into ``Ready.persist``).

Each record is msgpack bytes of a list whose first element is its type tag:

- ``["promise", group, [round, node]]``: the acceptor promised this ballot;
- ``["accept", group, slot, [round, node], value]``: it accepted ``value``
  for ``slot`` at that ballot (this also implies a promise of that ballot);
- ``["snapfile", group, index, size, crc]``: the group's state machine at
  ``index`` is durable in the shell's snapshot file for ``(group, index)``
  (``size`` bytes, CRC-32 ``crc``): the WAL records only which file is
  current, never the state itself; everything at or below ``index`` is chosen
  and may be dropped from the WAL once a checkpoint says so;
- ``["snapshot", group, index, blob]``: the same with the state inline (the
  format before snapshot files; still read on recovery, no longer written);
- ``["chosen", group, slot, value]``: ``value`` is chosen in ``slot``; written
  when this node learns a chosen value that its own acceptor does not hold
  (catch-up, or a leader whose own accept was overtaken);
- ``["commit", group, through]``: every slot up to ``through`` is chosen, and
  each one's value is in an earlier record (a ``chosen`` record, else the
  last ``accept`` record of that slot). Written lazily, at most once a tick
  per group, so a restarted node knows its chosen prefix without asking;
- ``["host", group, voters, learners, epoch, slot]``: from here on this node
  hosts ``group``, created with that configuration, made by the change in
  ``slot`` (a learner added after the group changed, ``PaxosNode.host_learner``);
  whatever came before it for the group is void;
- ``["drop", group]``: this node no longer hosts ``group`` (removed from its
  configuration; ``PaxosNode.remove_group(..., drop=True)``); the group's
  earlier records are void, and a later ``host`` starts it afresh.

Recovery (``PaxosNode.recover``) replays them in append order; a later
snapshot supersedes earlier accepts for the slots it covers. A ``commit``
record is valid where it stands because the log is append-only: a crash may
cut a suffix, never a record out of the middle.
"""

from __future__ import annotations

from typing import Any

import msgpack

from dsnode.core.paxos.messages import Ballot

# One packer for every record, its buffer kept: ``msgpack.packb`` makes a packer, and
# so a 1 MiB buffer, per call (malloc's mmap threshold is pinned at 128 KiB: an mmap and
# an munmap per record). The cores run on one thread.
_pack = msgpack.Packer(use_bin_type=True).pack

PROMISE = "promise"
ACCEPT = "accept"
SNAPSHOT = "snapshot"
SNAPFILE = "snapfile"
CHOSEN = "chosen"
COMMIT = "commit"
HOST = "host"
DROP = "drop"


def promise(group: Any, ballot: Ballot) -> bytes:
    return _pack([PROMISE, group, list(ballot)])


def accept(group: Any, slot: int, ballot: Ballot, value: bytes) -> bytes:
    return _pack([ACCEPT, group, slot, list(ballot), value])


def snapshot(group: Any, index: int, blob: bytes) -> bytes:
    return msgpack.packb([SNAPSHOT, group, index, blob], use_bin_type=True)  # huge, rare


def snapfile(group: Any, index: int, size: int, crc: int) -> bytes:
    return _pack([SNAPFILE, group, index, size, crc])


def chosen(group: Any, slot: int, value: bytes) -> bytes:
    return _pack([CHOSEN, group, slot, value])


def commit(group: Any, through: int) -> bytes:
    return _pack([COMMIT, group, through])


def host(group: Any, voters: tuple, learners: tuple, epoch: int, slot: int) -> bytes:
    return _pack([HOST, group, list(voters), list(learners), epoch, slot])


def drop(group: Any) -> bytes:
    return _pack([DROP, group])


def decode(raw: bytes) -> list:
    """The record as a list; ballots come back as ``(round, node)`` tuples."""
    rec = msgpack.unpackb(raw, raw=False)
    tag = rec[0]
    if tag == PROMISE:
        rec[2] = tuple(rec[2])
    elif tag == ACCEPT:
        rec[3] = tuple(rec[3])
    elif tag not in (SNAPSHOT, SNAPFILE, CHOSEN, COMMIT, HOST, DROP):
        raise ValueError(f"unknown record tag {tag!r}")
    return rec
