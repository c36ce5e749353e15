"""Client-side exceptions: one class per wire error code (PROTOCOL.md), plus three failures
the client detects itself and names with codes of its own, never sent on the wire:

- ``connect_failed`` (:class:`ConnectFailed`): no endpoint accepted a connection within the
  dial timeout. Nothing was sent.
- ``connection_lost`` (:class:`ConnectionLost`): the connection closed before the answer.
- ``deadline_exceeded`` (:class:`DeadlineExceeded`): the call's deadline passed before any
  answer arrived (the server's own ``timeout`` is :class:`Timeout`).

Every exception carries three facts a caller needs to decide what to do next:

- ``code``: the wire error code (``"unavailable"``...) or one of the client-side codes above.
- ``retryable``: the condition is transient; trying again later may succeed.
- ``indeterminate``: only meaningful for writes (``put``, ``delete``, ``txn``). ``False``
  promises the request had no effect and never will; ``True`` means it may or may not take
  effect. A caller that retries an indeterminate write must make the retry safe itself (for
  example a conditional put with ``if_version``), because the first attempt may still land.

Rule of thumb: retrying is safe when ``retryable and not indeterminate``.
"""

from __future__ import annotations

from typing import Any, ClassVar

from dsnode.wire import errors as codes

__all__ = [
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
    "Refused",
    "ConnectFailed",
    "DeadlineExceeded",
    "CONNECTION_LOST",
    "CONNECT_FAILED",
    "DEADLINE_EXCEEDED",
    "CLIENT_CODES",
    "error_from_wire",
]

CONNECTION_LOST = "connection_lost"
CONNECT_FAILED = "connect_failed"
DEADLINE_EXCEEDED = "deadline_exceeded"
CLIENT_CODES = frozenset({CONNECTION_LOST, CONNECT_FAILED, DEADLINE_EXCEEDED})
"""Codes of failures the client detects itself; no server sends them."""

# Codes the protocol defines as always definite: the server never applied the request.
_ALWAYS_DEFINITE = frozenset(
    {
        codes.BAD_REQUEST,
        codes.UNKNOWN_OP,
        codes.TOO_LARGE,
        codes.UNAUTHENTICATED,
        codes.CONFLICT,
        codes.OVERLOADED,
        codes.REFUSED,
    }
)


class DsnodeError(Exception):
    """Base class of every error the dsnode client raises for a failed request.

    ``str(err)`` is ``"<code>: <message>"``, with a note appended when the outcome is unknown,
    so it can be shown to a user as is.
    """

    code: str = codes.INTERNAL
    default_retryable: ClassVar[bool] = False

    def __init__(
        self,
        message: str = "",
        *,
        retryable: bool | None = None,
        indeterminate: bool = False,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.retryable = self.default_retryable if retryable is None else retryable
        self.indeterminate = indeterminate

    def __str__(self) -> str:
        text = f"{self.code}: {self.message}" if self.message else self.code
        if self.indeterminate:
            text += " (outcome unknown: the write may or may not have happened)"
        return text

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.message!r}, code={self.code!r}, "
            f"retryable={self.retryable}, indeterminate={self.indeterminate})"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only constructor arguments need explicit pickling support.
        return (
            _rebuild,
            (type(self), self.message, self.retryable, self.indeterminate, self.code),
        )


def _rebuild(
    cls: type[DsnodeError], message: str, retryable: bool, indeterminate: bool, code: str
) -> DsnodeError:
    return cls(message, retryable=retryable, indeterminate=indeterminate, code=code)


class BadRequest(DsnodeError):
    """A field was missing, unknown or wrongly typed; the message names it. Definite."""

    code = codes.BAD_REQUEST


class UnknownOp(DsnodeError):
    """The server does not know the op. Definite."""

    code = codes.UNKNOWN_OP


class TooLarge(DsnodeError):
    """A frame, key or value exceeded a limit (possibly refused client-side). Definite."""

    code = codes.TOO_LARGE


class Unauthenticated(DsnodeError):
    """Missing or wrong token in ``hello``. Definite."""

    code = codes.UNAUTHENTICATED


class Unavailable(DsnodeError):
    """No quorum or leader reachable, or (client-side) no endpoint reachable."""

    code = codes.UNAVAILABLE
    default_retryable = True


class Timeout(DsnodeError):
    """The deadline passed: the server said so, or the client stopped waiting."""

    code = codes.TIMEOUT
    default_retryable = True


class Conflict(DsnodeError):
    """A transaction lost to a concurrent one. No effect; retryable."""

    code = codes.CONFLICT
    default_retryable = True


class Overloaded(DsnodeError):
    """Load was shed before any effect. Retryable."""

    code = codes.OVERLOADED
    default_retryable = True


class Internal(DsnodeError):
    """A server-side bug or unexpected failure, or a malformed response."""

    code = codes.INTERNAL


class Expired(DsnodeError):
    """A retried write whose request id the server's deduplication table had already
    dropped: it may have been applied, the server cannot tell. Always indeterminate; not
    retryable (the same id would get the same answer)."""

    code = codes.EXPIRED

    def __init__(self, message: str = "", **kw: Any) -> None:
        kw["indeterminate"] = True
        super().__init__(message, **kw)


class Refused(DsnodeError):
    """A membership change the cluster does not allow now (another change's replicas are
    still moving, no such member, the last member, an id bound to another data
    directory). Definite: nothing changed."""

    code = codes.REFUSED


class ConnectionLost(DsnodeError):
    """The connection closed before the answer arrived (client-side; not a wire code).

    ``indeterminate`` is ``True`` for a write that had been sent: it may have been applied.
    """

    code = CONNECTION_LOST
    default_retryable = True


class ConnectFailed(Unavailable):
    """No endpoint accepted a connection within the dial timeout (client-side; not a wire
    code). Nothing was sent, so it is always definite. ``tried`` lists the endpoints with
    what went wrong for each."""

    code = CONNECT_FAILED

    def __init__(self, message: str = "", *, tried: list[str] | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.tried = list(tried or [])


class DeadlineExceeded(Timeout):
    """The call's deadline passed with no answer from the server (client-side; not a wire
    code). ``indeterminate`` is ``True`` for a write that had been sent."""

    code = DEADLINE_EXCEEDED


_BY_CODE: dict[str, type[DsnodeError]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        UnknownOp,
        TooLarge,
        Unauthenticated,
        Unavailable,
        Timeout,
        Conflict,
        Overloaded,
        Internal,
        Expired,
        Refused,
    )
}


def error_from_wire(body: object, default_indeterminate: bool) -> DsnodeError:
    """Map the ``error`` map of a failure response to an exception instance.

    ``default_indeterminate`` is used when the server omitted ``indeterminate`` for a code
    that may carry it (``unavailable``, ``timeout``, ``internal``, unknown codes); pass
    ``True`` for writes and ``False`` for reads. Codes the protocol defines as always definite
    default to ``False``. An unknown code yields a plain :class:`DsnodeError` carrying that
    code; a malformed body yields :class:`Internal`. Never raises.
    """
    if not isinstance(body, dict):
        return Internal(
            f"malformed error response: {body!r:.200}", indeterminate=default_indeterminate
        )
    code = body.get("code")
    if not isinstance(code, str):
        code = codes.INTERNAL
    message = body.get("message")
    if not isinstance(message, str):
        message = "" if message is None else str(message)
    retryable = body.get("retryable")
    if not isinstance(retryable, bool):
        retryable = code in codes.RETRYABLE
    indeterminate = body.get("indeterminate")
    if not isinstance(indeterminate, bool):
        indeterminate = False if code in _ALWAYS_DEFINITE else default_indeterminate
    cls = _BY_CODE.get(code)
    if cls is None:
        return DsnodeError(message, retryable=retryable, indeterminate=indeterminate, code=code)
    return cls(message, retryable=retryable, indeterminate=indeterminate)
