"""Errors raised by the SIP core.

Two families, kept apart on purpose (the h11 habit): :class:`SipParseError` is a *remote*
protocol violation -- the peer sent something we cannot accept, and the error carries the
status code of the response to answer with (RFC 3261 8.2, 21.4) -- while
:class:`InvalidStateError` is *local* misuse of a state machine (a bug in our own code).
"""

from __future__ import annotations

__all__ = ["InvalidStateError", "SipError", "SipParseError"]


class SipError(Exception):
    """Base class of every error raised by ``services.sip``."""


class SipParseError(SipError, ValueError):
    """A remote protocol violation: a message or header that cannot be accepted.

    ``status`` is the response a server should answer with (400 Bad Request unless a more
    specific code applies: 413, 414, 416, 420, 505, 513 ...); ``reason`` names the defect
    ("Via header is missing") and is suitable as a reason phrase or Warning text.

    Both argument orders are accepted so call sites read naturally::

        SipParseError("Via header is missing")            # status 400
        SipParseError(505, "SIP version not supported")
        SipParseError("Unsupported URI scheme", status=416)
    """

    status: int
    reason: str

    def __init__(self, *args: object, status: int | None = None, reason: str | None = None) -> None:
        code = status
        text = reason
        for arg in args:
            if isinstance(arg, int) and not isinstance(arg, bool) and code is None:
                code = arg
            elif text is None:
                text = str(arg)
        self.status = 400 if code is None else code
        self.reason = text if text is not None else "Bad Request"
        super().__init__(self.status, self.reason)

    def __str__(self) -> str:
        return f"{self.status} {self.reason}"


class InvalidStateError(SipError, RuntimeError):
    """Local misuse of a state machine (an event that is illegal in the current state)."""
