"""What a core asks its shell to do: the ``Ready`` batch.

Ordering contract (both shells keep it: ``runtime/driver.py`` holds sends and
replies until the WAL is durable, and the simulator's world does the same with
its disk, whose crashes drop every record not yet synced; tests/runtime checks
the driver with a held fsync):

1. every record in ``persist`` is appended to the write-ahead log and made
   durable (fsync, group-committed) before any message in ``send`` leaves the
   process and before any reply in ``reply`` is released: a promise, an
   accept or an acknowledged write must never outrun the disk;
2. a reply is also held until every record persisted by *earlier* ``Ready``
   batches is durable, so a read never reports state that a crash could
   still take back;
3. ``send`` messages go out in list order per peer;
4. ``reply`` entries are released in list order.

``apply`` carries notices only (which slots were applied, snapshots
installed): the cores apply chosen commands to their own state machines, so
the shell has nothing to do with them beyond logging and metrics.

``snapshots`` hands out work the core does not do inside one input: each entry
(``SnapshotWanted``) carries a writer over a point-in-time capture of a state
machine (or, for a snapshot installed from a peer, its bytes). The shell
advances ``writer.step(n)`` a bounded piece at a time (one piece per
event-loop turn, so no turn stalls) until it returns True, stores
``writer.pieces()`` durably as the group's snapshot file for that index, then
calls the core's ``snapshot_ready(group, index, blob, crc)``; only then does
the core persist the record naming the file and compact. A shell that crashes
or drops the work loses nothing but the compaction. On restart the shell
passes each group's newest valid snapshot file to ``recover``.

``restores`` hands out the decoding of a snapshot received from a peer: each
entry (``SnapshotRestore``) carries the checked bytes and ``restore``, a pure
function from bytes to a fresh state machine. The shell runs it outside the
event loop's turn (a worker thread: it touches nothing the core owns) and
calls the core's ``snapshot_restored(group, index, sm)``, with ``None`` if it
raised; the core installs it then, unless it applied past ``index``
meanwhile. Until then the group does not ask its peers for more. A shell that
crashes or drops the work loses nothing: catch-up asks again.

Cores never perform these effects themselves and never read a clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class Reply:
    """The answer to one client request.

    ``token`` is whatever the shell passed in with the request (the core does
    not look inside it). Exactly one of ``result`` (wire result fields) or
    ``error`` (code, message, indeterminate) is set.
    """

    token: Any
    result: dict | None = None
    error: tuple[str, str, bool] | None = None


@dataclass(slots=True)
class Ready:
    persist: list[bytes] = field(default_factory=list)
    send: list[tuple[str, Any]] = field(default_factory=list)
    apply: list[Any] = field(default_factory=list)
    reply: list[Reply] = field(default_factory=list)
    snapshots: list[Any] = field(default_factory=list)
    restores: list[Any] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.persist or self.send or self.apply or self.reply or self.snapshots
                    or self.restores)
