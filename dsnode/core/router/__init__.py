"""Pure request routing (issue 8 part 5): key -> partition -> target node.

``least_conn`` tracks requests in flight per target and picks among equally
eligible targets; ``router`` decides, per request, Local / Forward / Park /
Overloaded and lists what to re-send when a partition's leader changes. The
driver carries the decisions out; nothing here reads a clock or does I/O.
"""

from dsnode.core.router.least_conn import InFlight, pick
from dsnode.core.router.router import (
    Decision,
    Forward,
    Local,
    OpKind,
    Overloaded,
    Park,
    Router,
)

__all__ = [
    "Decision",
    "Forward",
    "InFlight",
    "Local",
    "OpKind",
    "Overloaded",
    "Park",
    "Router",
    "pick",
]
