"""Recording policy decisions and the X-CV-* bridge headers."""

from __future__ import annotations

from services.config import RecordingPolicy, Tenant
from services.sip_server.policy import CallInfo, b64json, bridge_headers, decide, unb64json


def tenant(mode: str, patterns: list[str] | None = None) -> Tenant:
    return Tenant(id="acme", api_key="k" * 16, policy=RecordingPolicy(mode=mode, patterns=patterns or []))


def test_all_and_none() -> None:
    assert decide(tenant("all"), "1001", "1002").record
    assert not decide(tenant("none"), "1001", "1002").record


def test_pattern_matches_caller_or_callee_fully() -> None:
    t = tenant("pattern", [r"10\d\d"])
    assert decide(t, "1001", "2002").record
    assert decide(t, "2001", "1002").record
    assert not decide(t, "2001", "2002").record
    assert not decide(t, "10011", "2002").record  # fullmatch, not search


def test_broken_policy_fails_towards_recording() -> None:
    t = tenant("pattern", ["("])  # never validated
    decision = decide(t, "1001", "1002")
    assert decision.record
    assert "policy error" in decision.reason


def test_b64json_round_trip_unpadded() -> None:
    value = {"call_id": "abc@host", "from_display": "Zoë"}
    text = b64json(value)
    assert "=" not in text and "+" not in text and "/" not in text
    assert unb64json(text) == value


def test_bridge_headers_order_and_content() -> None:
    info = CallInfo("cid@a", "sip:1001@acme.test", "Alice", "sip:1002@acme.test", "", "1001", "1002")
    headers = bridge_headers("acme", "f" * 32, 1, info)
    assert [n for n, _ in headers] == ["X-CV-Tenant", "X-CV-Session", "X-CV-Part", "X-CV-Call"]
    assert headers[2] == ("X-CV-Part", "1")
    call = unb64json(headers[3][1])
    assert call == {
        "call_id": "cid@a",
        "from_uri": "sip:1001@acme.test",
        "from_display": "Alice",
        "to_uri": "sip:1002@acme.test",
        "to_display": "",
        "direction": "internal",
        "caller": "1001",
        "callee": "1002",
    }
