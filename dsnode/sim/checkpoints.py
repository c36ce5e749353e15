"""Checkpoint and recovery agree (issue 7.4).

A node's WAL may drop every record before a checkpoint (``PaxosNode.checkpoint``)
and keep only the blob and the records after it. Recovering from those must
rebuild the same acceptor state, log and state machine as recovering from the
full record stream. :func:`disagreement` recovers both ways and names the
first difference; the simulator calls it on every restart that has a
checkpoint, and tests/core/test_checkpoint_property.py over generated histories.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from dsnode.core.paxos import PaxosConfig, PaxosNode
from dsnode.core.paxos.outputs import StoredSnapshot


def recovered_state(
    node_id: str,
    groups: Mapping[Any, Sequence[str]],
    cfg: PaxosConfig,
    records: list[bytes],
    snapshots: Mapping[Any, StoredSnapshot] | None = None,
    metadata: Any = None,
) -> dict[Any, dict[str, Any]]:
    """Per group: what a node recovered from ``records`` (and the snapshot
    files ``snapshots``) holds, field by field. ``metadata``: the metadata
    group's id (a partitioned node, which creates its partitions in recovery)."""
    core = PaxosNode(node_id, groups, random.Random(0), cfg, metadata=metadata)
    core.recover(records, snapshots)
    out = {}
    for gid, g in core.groups.items():
        log, sm, acc = g.log, g.sm, g.acceptor
        out[gid] = {
            "promised": acc.promised,
            "accepted": sorted(acc.accepted.items()),
            "chosen": sorted(log.chosen.items()),
            "chosen_through": log.chosen_through,
            "snap_index": log.snap_index,
            "applied": log.applied,
            "kv": sorted(sm.kv.items()),
            "revision": sm.kv.revision,
            "dedup": sm.dedup_state(),
            "cluster_uuid": sm.cluster_uuid,
            "conf": g.conf,
        }
    return out


def disagreement(
    node_id: str,
    groups: Mapping[Any, Sequence[str]],
    cfg: PaxosConfig,
    full: list[bytes],
    checkpoint: bytes,
    after: list[bytes],
    snapshots: Mapping[Any, StoredSnapshot] | None = None,
    metadata: Any = None,
) -> str | None:
    """None if ``checkpoint`` plus the records ``after`` it recover what the
    ``full`` record stream does (both from the same snapshot files); else the
    first group and field that differ."""
    whole = recovered_state(node_id, groups, cfg, full, snapshots, metadata)
    short = recovered_state(
        node_id, groups, cfg, msgpack.unpackb(checkpoint) + list(after), snapshots, metadata
    )
    if set(whole) != set(short):
        return (f"{node_id}: groups recovered from the full log {sorted(whole, key=str)}, "
                f"from checkpoint + {len(after)} records {sorted(short, key=str)}")
    for gid in whole:
        for field, value in whole[gid].items():
            other = short[gid][field]
            if other != value:
                return (
                    f"{node_id} group {gid}: {field} recovered from the full log is "
                    f"{_short(value)}, from checkpoint + {len(after)} records {_short(other)}"
                )
    return None


def _short(x: Any) -> str:
    s = repr(x)
    return s if len(s) <= 200 else s[:200] + "..."
