"""Wire error codes (PROTOCOL.md, "Requests and responses")."""

from __future__ import annotations

BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
TOO_LARGE = "too_large"
UNAUTHENTICATED = "unauthenticated"
UNAVAILABLE = "unavailable"
TIMEOUT = "timeout"
CONFLICT = "conflict"
OVERLOADED = "overloaded"
INTERNAL = "internal"
# a retried write whose request id the deduplication table no longer holds: it may have
# been applied, cannot tell (always indeterminate; retrying the same id gives the same)
EXPIRED = "expired"
# a membership change the cluster does not allow (now): one change at a time, an unknown
# member, the last member, an id bound to another data directory; definite
REFUSED = "refused"

ALL_CODES = (
    BAD_REQUEST,
    UNKNOWN_OP,
    TOO_LARGE,
    UNAUTHENTICATED,
    UNAVAILABLE,
    TIMEOUT,
    CONFLICT,
    OVERLOADED,
    INTERNAL,
    EXPIRED,
    REFUSED,
)

RETRYABLE = frozenset({UNAVAILABLE, TIMEOUT, CONFLICT, OVERLOADED})


def error_body(code: str, message: str, *, indeterminate: bool = False) -> dict:
    """The ``error`` map of a failure response."""
    return {
        "code": code,
        "message": message,
        "retryable": code in RETRYABLE,
        "indeterminate": indeterminate,
    }


def error_response(req_id: int, code: str, message: str, *, indeterminate: bool = False) -> dict:
    return {"id": req_id, "ok": False, "error": error_body(code, message, indeterminate=indeterminate)}
