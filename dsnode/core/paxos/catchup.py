"""Catch-up and snapshots of ``PaxosGroup`` (a mixin; the group owns the state).

A replica missing chosen slots pulls them from a peer: ``CatchupReq`` ->
``Learn`` (chosen values, bounded by count and bytes) or, below the peer's
compaction point, its snapshot in checksummed ``SnapChunk`` pieces that the
asker reassembles and installs. Snapshots of the group's own state machine
are captured here and encoded by the shell (``SnapshotWanted``), then
persisted and used to compact (``snapshot_ready``).
"""

from __future__ import annotations

import zlib
from typing import Any

from dsnode.core.paxos import records as rec
from dsnode.core.paxos.messages import CatchupReq, Learn, SnapChunk
from dsnode.core.paxos.outputs import (
    BlobWriter,
    SnapshotInstalled,
    SnapshotRestore,
    SnapshotWanted,
    unavailable,
)


class CatchUp:
    def _take_snapshot(self) -> None:
        """Capture the state machine at ``applied`` (shallow copies, cheap) and
        hand its encoding and storage to the shell; ``snapshot_ready`` records
        the file and compacts.

        Applying goes on meanwhile. ``log.snap_index``/``snap_blob`` (served to
        catching-up peers, named by checkpoints) keep the previous snapshot
        until then, so they always form a consistent pair.
        """
        index = self.log.applied
        self.snap_pending = index
        self.out.snapshots.append(SnapshotWanted(self.group, index, self.sm.snapshot_writer()))

    def restore_sm(self, blob: Any) -> Any:
        """A fresh state machine from a snapshot (any thread: reads only config)."""
        return self.sm_cls.restore(blob, shards=self.cfg.kv_shards)

    def request_snapshot(self) -> bool:
        """The shell asks for a snapshot now (its log grew large on disk): taken
        unless one is in progress or nothing was applied since the last."""
        if self.snap_pending is not None or self.log.applied <= self.log.snap_index:
            return False
        self._take_snapshot()
        return True

    def snapshot_ready(self, index: int, blob: bytes, crc: int | None = None) -> None:
        """The shell stored the snapshot requested at ``index`` durably in its
        own file (``blob``: its bytes, or a bytes-like view of the file; ``crc``:
        their CRC-32, computed here if None). Record in the WAL which file is
        current, then compact the log and the acceptor up to it."""
        if index != self.snap_pending:
            # Requested by an earlier incarnation, or overtaken by an installed snapshot.
            self.out.dropped["snapshot_not_pending"] += 1
            return
        self.snap_pending = None
        if index < self.log.snap_index:
            return
        if crc is None:
            crc = zlib.crc32(blob)
        self.out.persist.append(rec.snapfile(self.group, index, len(blob), crc))
        self.snap_file_index = index
        if index > self.log.snap_index:
            self.log.compact(index, blob, crc)
            self.acceptor.compact(index)
    def _reset_catchup(self) -> None:
        self.catchup_peer = None
        self.catchup_target = 0

    def _want_catchup(self, peer: str, target: int) -> None:
        self.catchup_peer = peer
        self.catchup_target = max(self.catchup_target, target)
        if self.now - self.catchup_sent_at >= self.cfg.catchup_retry_ticks:
            self._send_catchup()

    def _send_catchup(self, to: str | None = None) -> None:
        """Ask ``to`` (default: the catch-up peer) for what comes next."""
        to = to or self.catchup_peer
        if to is None:
            return  # catch-up was called off (a role change) while a reply was on its way
        if self.snap_restoring is not None:
            return  # a peer's snapshot is being restored: ask for what follows it after
        self.catchup_sent_at = self.now
        idx, off = 0, 0
        if self.snap_in is not None:
            idx, off = self.snap_in[0], len(self.snap_buf)
        self._send(to, CatchupReq(self.group, self.log.chosen_through + 1, idx, off))

    def _on_catchup_req(self, frm: str, m: CatchupReq) -> None:
        log = self.log
        if m.from_slot <= log.snap_index and log.snap_blob is not None:
            blob = log.snap_blob
            off = m.offset if m.snap_index == log.snap_index and m.offset < len(blob) else 0
            data = blob[off : off + self.cfg.snapshot_chunk_bytes]
            self._send(
                frm, SnapChunk(self.group, log.snap_index, len(blob), off, bytes(data), log.snap_crc)
            )
            return
        # An empty Learn tells the asker we cannot help (we restarted, or lag).
        entries = log.entries(m.from_slot, self.cfg.catchup_entries_max)
        self._send(frm, Learn(self.group, tuple(next(self._chunks(list(entries)), ()))))

    def _on_learn(self, frm: str, m: Learn) -> None:
        if not m.entries:
            if frm == self.catchup_peer:
                self._reset_catchup()
            return
        for slot, value in m.entries:
            self._learn(slot, value)
        if self.catchup_peer is None and self.cfg.reconfig:
            self._adopt_catchup(frm, m.entries[-1][0] + 1)
        self._after_catchup_progress()

    def _adopt_catchup(self, peer: str, target: int) -> None:
        """Unasked catch-up data (a peer answering a stale node's phase 1 or pre-vote
        with the log it lacks, ``PaxosGroup.step``): go on asking that peer, retried
        on ticks like any catch-up, until it has nothing more."""
        self.catchup_peer = peer
        self.catchup_target = max(self.catchup_target, target)

    def _after_catchup_progress(self) -> None:
        before = self.log.chosen_through
        self._advance()
        if self.log.chosen_through < self.catchup_target and self.log.chosen_through > before:
            self._send_catchup()

    def _on_snap_chunk(self, frm: str, m: SnapChunk) -> None:
        if (self.cfg.reconfig and self.snap_in is not None and self.catchup_peer is not None
                and frm != self.catchup_peer):
            # a transfer from our catch-up peer is under way: a piece of another peer's
            # snapshot (answering a stale node's pre-vote) would restart it from zero
            self.out.dropped["snap_chunk_other_peer"] += 1
            return
        if m.index <= self.log.applied or (
            self.snap_restoring is not None and m.index <= self.snap_restoring
        ):
            return
        if (
            self.snap_in is not None
            and self.snap_in[0] == m.index
            and m.offset < len(self.snap_buf)
        ):
            self.out.dropped["snap_chunk_duplicate"] += 1
            if self.catchup_peer is None and self.cfg.reconfig:
                # unasked (a stale node's phase 1 answered with the log it lacks) while
                # nobody feeds the snapshot we have started: go on from where it stands
                self._adopt_catchup(frm, m.index + 1)
                self._send_catchup(frm)
            return
        if self.catchup_peer is None and self.cfg.reconfig:
            self._adopt_catchup(frm, m.index + 1)
        if self.snap_in is None or self.snap_in[0] != m.index or m.offset != len(self.snap_buf):
            if m.offset != 0:
                self.snap_in = None
                self.snap_buf = bytearray()
                self.out.dropped["snap_chunk_out_of_order"] += 1
                return
            self.snap_in = (m.index, m.total, m.crc)
            self.snap_buf = bytearray()
        self.snap_buf += m.data
        if len(self.snap_buf) < m.total:
            self._send_catchup(self.catchup_peer or frm)
            return
        blob = bytes(self.snap_buf)
        self.snap_in = None
        self.snap_buf = bytearray()
        if zlib.crc32(blob) != m.crc or len(blob) != m.total:
            self.out.dropped["snap_bad_checksum"] += 1
            return
        # Decoding a large snapshot is the shell's (off the event loop's turn): it
        # comes back through snapshot_restored.
        self.snap_restoring = m.index
        self._restoring_blob = (blob, m.crc)
        self.out.restores.append(
            SnapshotRestore(self.group, m.index, blob, m.crc, self.restore_sm)
        )

    def snapshot_restored(self, index: int, sm: object | None) -> None:
        """The shell decoded the peer's snapshot at ``index`` (``SnapshotRestore``)
        into ``sm`` (None: it could not). Installed unless stale: the group
        applied past ``index`` meanwhile, or another restore was asked for."""
        if index != self.snap_restoring:
            self.out.dropped["snap_restore_unexpected"] += 1
            return
        job_blob, job_crc = self._restoring_blob
        self.snap_restoring = None
        self._restoring_blob = (b"", 0)
        if sm is None:
            self.out.dropped["snap_restore_failed"] += 1
        elif index <= self.log.applied:
            self.out.dropped["snap_restore_stale"] += 1
        else:
            self.install_snapshot(index, job_blob, job_crc, persist=True, sm=sm)
        self._after_catchup_progress()

    def install_snapshot(
        self, index: int, blob: bytes, crc: int, persist: bool, sm: object | None = None
    ) -> None:
        """Jump the state machine to the snapshot at ``index``. With ``persist``
        the shell is asked to store it as the group's snapshot file (as for our
        own snapshots: ``SnapshotWanted``, then ``snapshot_ready`` records it);
        until it has, checkpoints wait (``PaxosNode.checkpoint``), since the
        records before ``index`` are the only durable copy of that state."""
        if index <= self.log.applied:
            return
        self.sm = sm if sm is not None else self.restore_sm(blob)
        self.log.install(index, blob, crc)
        self.snap_pending = None  # an own snapshot in progress is older than this state
        if persist:
            self.snap_pending = index
            self.out.snapshots.append(SnapshotWanted(self.group, index, BlobWriter(blob)))
        self.acceptor.compact(index)
        self.out.apply.append(SnapshotInstalled(self.group, index))
        p = self.proposer
        if p is not None:
            for s in [s for s in p.proposals if s <= index]:
                del p.proposals[s]
                p.batches.pop(s, None)
                self.learner.votes.pop(s, None)
            for key in [k for k in p.tokens if k[0] <= index]:
                self.out.reply.append(unavailable(p.tokens.pop(key), "outcome unknown", True))
