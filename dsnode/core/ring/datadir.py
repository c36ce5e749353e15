"""P is fixed when a cluster is created: the number of partitions is recorded
in the data directory, and a later start asking for another P is refused
(changing P would move nearly every key). Pure: the runtime reads and writes
the record; this only decides."""

from __future__ import annotations

from dsnode.core.ring.ring import check_partitions_value


def check_partitions(recorded: int | None, configured: int) -> str | None:
    """None if a node whose data directory recorded ``recorded`` partitions
    (None: a new data directory, which then records ``configured``) may start
    with ``partitions = configured``; otherwise why not, in one line."""
    try:
        check_partitions_value(configured)
    except ValueError as e:
        return f"setting {e}"
    if recorded is None:
        return None
    try:
        check_partitions_value(recorded)
    except ValueError as e:
        return f"the data directory's record is corrupt: {e}"
    if recorded != configured:
        return (
            f"the data directory belongs to a cluster created with partitions = {recorded}, "
            f"but this start asks for partitions = {configured}: the number of partitions is "
            f"fixed when a cluster is created; start with partitions = {recorded} "
            "(or use a new data directory for a new cluster)"
        )
    return None
