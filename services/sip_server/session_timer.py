"""Session timers (RFC 4028) for the B2BUA's two legs: header parsing and negotiation; pure.

The SIP Server terminates session timers on each leg separately (it is a B2BUA, not a proxy):

- A leg (we are UAS, section 9): a Session-Expires below our Min-SE is refused with 422 when A
  supports ``timer``, else raised to Min-SE; without Session-Expires we use our configured
  interval. A's ``refresher=uac`` makes A the refresher; otherwise (``uas`` or absent) we refresh.
- B leg (we are UAC, section 7): we offer A's interval with ``refresher=uac`` and accept what B's
  2xx says; a 2xx without Session-Expires means B does not do timers, and we keep refreshing
  anyway (a refresh that fails tells us B is gone).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.sip.message import Message
from services.sip_server.call import SessionTimer


class SessionTimerError(ValueError):
    """A malformed Session-Expires or Min-SE header."""


@dataclass(frozen=True)
class SessionExpires:
    """A parsed ``Session-Expires: 1800;refresher=uac`` (RFC 4028 4)."""

    interval: int
    refresher: str | None = None  # "uac", "uas" or None

    def __str__(self) -> str:
        return f"{self.interval};refresher={self.refresher}" if self.refresher else str(self.interval)


def _delta(text: str, what: str) -> int:
    text = text.strip()
    if not text.isdigit() or len(text) > 10:
        raise SessionTimerError(f"{what} is not a number of seconds: {text[:20]!r}")
    return int(text)


def parse_session_expires(message: Message) -> SessionExpires | None:
    """Session-Expires (compact form ``x``) of a message, None when absent."""
    value = message.headers.get("Session-Expires") or message.headers.get("x")
    if value is None:
        return None
    number, _, params = value.partition(";")
    refresher = None
    for param in params.split(";"):
        name, _, v = param.partition("=")
        if name.strip().lower() == "refresher":
            refresher = v.strip().lower()
            if refresher not in ("uac", "uas"):
                raise SessionTimerError(
                    f"Session-Expires refresher must be uac or uas, not {refresher[:10]!r}"
                )
    return SessionExpires(_delta(number, "Session-Expires"), refresher)


def parse_min_se(message: Message) -> int | None:
    value = message.headers.get("Min-SE")
    if value is None:
        return None
    return _delta(value.partition(";")[0], "Min-SE")


def supports_timer(message: Message) -> bool:
    """True when the message lists ``timer`` in Supported (``k``) or Require."""
    options = [*message.headers.get_all("Supported"), *message.headers.get_all("Require")]
    return any(o.strip().lower() == "timer" for o in options)


@dataclass(frozen=True)
class UasDecision:
    """Outcome of :func:`negotiate_uas`: either reject with 422 or the timer and response headers."""

    reject_min_se: int | None = None  # 422 with this Min-SE
    timer: SessionTimer | None = None
    headers: tuple[tuple[str, str], ...] = ()


def negotiate_uas(request: Message, *, default_interval: int, min_se: int) -> UasDecision:
    """RFC 4028 9: what to answer an INVITE (or a refresh) with, as the UAS of the A leg.

    Raises :class:`SessionTimerError` for malformed headers (answer 400).
    """
    offered = parse_session_expires(request)
    peer_min = parse_min_se(request) or 0
    supported = supports_timer(request)
    floor = max(min_se, peer_min)
    if offered is None:
        interval = max(default_interval, floor)
        refresher = "uas"
    else:
        interval = offered.interval
        if interval < min_se:
            if supported:
                return UasDecision(reject_min_se=min_se)
            interval = floor
        refresher = offered.refresher or "uas"
        if not supported:
            refresher = "uas"  # the UAC cannot refresh if it does not know the extension
    headers = [("Session-Expires", f"{interval};refresher={refresher}")]
    if supported:
        headers.append(("Require", "timer"))
    timer = SessionTimer(interval=interval, refresher="local" if refresher == "uas" else "remote")
    return UasDecision(timer=timer, headers=tuple(headers))


def uac_request_headers(interval: int, min_se: int) -> list[tuple[str, str]]:
    """Headers of a request we send as UAC offering to refresh ourselves (RFC 4028 7.1)."""
    return [
        ("Supported", "timer"),
        ("Session-Expires", f"{interval};refresher=uac"),
        ("Min-SE", str(min_se)),
    ]


def timer_from_uac_response(response: Message, requested: int) -> SessionTimer:
    """The leg's timer after a 2xx to our INVITE/refresh (RFC 4028 7.2)."""
    try:
        answered = parse_session_expires(response)
    except SessionTimerError:
        answered = None
    if answered is None:
        return SessionTimer(interval=requested, refresher="local")
    refresher = "remote" if answered.refresher == "uas" else "local"
    return SessionTimer(interval=answered.interval, refresher=refresher)
