"""RFC 4028 negotiation helpers of the SIP Server and the SessionTimer deadlines."""

from __future__ import annotations

import pytest

from services.sip.message import Message
from services.sip_server import session_timer as st
from services.sip_server.call import SessionTimer


def msg(*headers: tuple[str, str]) -> Message:
    return Message(list(headers))


def test_parse_session_expires_and_compact_form() -> None:
    assert st.parse_session_expires(msg(("Session-Expires", "1800;refresher=uac"))) == st.SessionExpires(
        1800, "uac"
    )
    assert st.parse_session_expires(msg(("x", "90"))) == st.SessionExpires(90, None)
    assert st.parse_session_expires(msg()) is None
    with pytest.raises(st.SessionTimerError):
        st.parse_session_expires(msg(("Session-Expires", "soon")))
    with pytest.raises(st.SessionTimerError):
        st.parse_session_expires(msg(("Session-Expires", "90;refresher=both")))


def test_uas_without_session_expires_uses_default_and_refreshes_itself() -> None:
    d = st.negotiate_uas(msg(), default_interval=1800, min_se=90)
    assert d.reject_min_se is None
    assert d.timer == SessionTimer(1800, "local")
    assert d.headers == (("Session-Expires", "1800;refresher=uas"),)


def test_uas_honours_uac_refresher_when_supported() -> None:
    d = st.negotiate_uas(
        msg(("Supported", "timer"), ("Session-Expires", "600;refresher=uac")),
        default_interval=1800,
        min_se=90,
    )
    assert d.timer == SessionTimer(600, "remote")
    assert ("Require", "timer") in d.headers


def test_uas_422_when_too_small_and_supported() -> None:
    d = st.negotiate_uas(
        msg(("Supported", "timer"), ("Session-Expires", "30")), default_interval=1800, min_se=90
    )
    assert d.reject_min_se == 90


def test_uas_raises_too_small_interval_when_timer_unsupported() -> None:
    d = st.negotiate_uas(msg(("Session-Expires", "30;refresher=uac")), default_interval=1800, min_se=90)
    assert d.timer == SessionTimer(90, "local")  # the UAC cannot refresh without the extension


def test_uac_response_without_session_expires_keeps_us_refreshing() -> None:
    assert st.timer_from_uac_response(msg(), 1800) == SessionTimer(1800, "local")
    assert st.timer_from_uac_response(msg(("Session-Expires", "900;refresher=uas")), 1800) == SessionTimer(
        900, "remote"
    )


def test_deadlines() -> None:
    t = SessionTimer(1800, "local")
    t.start(1000.0)
    assert t.deadline == 1900.0  # refresh at half the interval
    t = SessionTimer(1800, "remote")
    t.start(1000.0)
    assert t.deadline == 1000.0 + 1800 - 32  # RFC 4028 10: min(32, interval/3) before expiry
    t = SessionTimer(90, "remote")
    t.start(0.0)
    assert t.deadline == 60.0
    t = SessionTimer()
    t.start(5.0)
    assert t.deadline == 0.0
