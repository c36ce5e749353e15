"""What every shell does with a core's ``Ready``, in the order effects.py requires:
shared by the simulator (dsnode/sim/world.py) and the core tests (issue 7.8), so
that both carry out the same contract the runtime driver does.

``drain`` takes one ``Ready`` and hands its parts to the callbacks in order:
records to persist first, then apply notices, then the messages and replies
(which the shell must hold until the records before them are durable), then
the work done outside the core: snapshots received from peers to decode
(``restores``, handed back with ``snapshot_restored``) and snapshots to encode. ``step_snapshot`` advances one ``SnapshotWanted`` job by a
budget of entries and returns the finished snapshot, ready to be stored and
handed back with ``snapshot_ready``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from dsnode.core.effects import Ready
from dsnode.core.paxos.outputs import SnapshotWanted, StoredSnapshot


def drain(
    core: Any,
    *,
    persist: Callable[[list[bytes]], None],
    out: Callable[[list, list], None],
    applied: Callable[[list], None] | None = None,
    restores: Callable[[list], None] | None = None,
    snapshots: Callable[[list[SnapshotWanted]], None] | None = None,
) -> Ready:
    """Take ``core.ready()`` and carry it out through the callbacks; returns it."""
    r = core.ready()
    if not r:
        return r
    if r.persist:
        persist(r.persist)
    if r.apply and applied is not None:
        applied(r.apply)
    if r.send or r.reply:
        out(r.send, r.reply)
    if r.restores and restores is not None:
        restores(r.restores)
    if r.snapshots and snapshots is not None:
        snapshots(r.snapshots)
    return r


def step_snapshot(job: SnapshotWanted, budget: int | None) -> StoredSnapshot | None:
    """Encode ``job`` ``budget`` entries further (None: to the end). The finished
    snapshot (index, bytes, CRC-32), or None while entries remain."""
    w = job.writer
    if budget is None:
        while not w.step(1 << 30):
            pass
    elif not w.step(budget):
        return None
    blob = w.result()
    return StoredSnapshot(job.index, blob, zlib.crc32(blob))
