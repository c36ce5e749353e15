"""dsnode client library: asyncio :class:`Client`, blocking :class:`SyncClient`, errors.

See :mod:`dsnode.client.client` for connection handling, deadlines and the retry rule, and
:mod:`dsnode.client.errors` for what ``retryable`` and ``indeterminate`` promise.
"""

from dsnode.client import errors
from dsnode.client.client import (
    Client,
    Compare,
    DeleteResult,
    GetResult,
    Op,
    PutResult,
    SyncClient,
    TxnResult,
    parse_endpoints,
)
from dsnode.client.errors import (
    BadRequest,
    Conflict,
    ConnectFailed,
    ConnectionLost,
    DeadlineExceeded,
    DsnodeError,
    Expired,
    Internal,
    Overloaded,
    Timeout,
    TooLarge,
    Unauthenticated,
    Unavailable,
    UnknownOp,
    error_from_wire,
)

__all__ = [
    "Client",
    "SyncClient",
    "Op",
    "Compare",
    "GetResult",
    "PutResult",
    "DeleteResult",
    "TxnResult",
    "parse_endpoints",
    "errors",
    "DsnodeError",
    "BadRequest",
    "UnknownOp",
    "TooLarge",
    "Unauthenticated",
    "Unavailable",
    "Timeout",
    "Conflict",
    "Overloaded",
    "Internal",
    "Expired",
    "ConnectionLost",
    "ConnectFailed",
    "DeadlineExceeded",
    "error_from_wire",
]
