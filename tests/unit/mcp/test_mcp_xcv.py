"""X-CV-* header parsing: what the MCP accepts and the 400 reason for what it does not."""

from __future__ import annotations

import base64
import json

import pytest

from services.config import IvrProfile
from services.mcp import xcv
from services.mcp.xcv import BridgeRequest, CallInfo, XcvError, parse_bridge_headers

CALL = CallInfo("a-leg@host", "sip:1001@acme", "Alice", "sip:1002@acme", "Bob", "internal", "1001", "1002")


def headers(**override: str | None) -> dict[str, str]:
    base = dict(
        BridgeRequest("acme", "0123abcd" * 4, 1, CALL, IvrProfile(channels=1, reorder_ms=60)).headers()
    )
    for name, value in override.items():
        key = "X-CV-" + name
        if value is None:
            base.pop(key)
        else:
            base[key] = value
    return base


def parse(h: dict[str, str]) -> BridgeRequest:
    return parse_bridge_headers(h.get)


def test_round_trip() -> None:
    b = parse(headers())
    assert (b.tenant, b.part, b.call, b.profile.channels, b.profile.reorder_ms) == ("acme", 1, CALL, 1, 60)


def test_encoding_is_unpadded_base64url_and_padding_is_accepted() -> None:
    value = xcv.b64json_encode({"x": "é?>"})
    assert "=" not in value and "+" not in value and "/" not in value
    padded = base64.urlsafe_b64encode(json.dumps({"x": 1}).encode()).decode()
    assert xcv.b64json_decode(padded, "H") == {"x": 1}


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"Tenant": None}, "X-CV-Tenant header is missing"),
        ({"Tenant": "Bad Tenant"}, "not a valid tenant id"),
        ({"Session": None}, "X-CV-Session header is missing"),
        ({"Session": "../etc"}, "not a valid session id"),
        ({"Part": "0"}, "positive integer"),
        ({"Part": "two"}, "positive integer"),
        ({"Call": None}, "X-CV-Call header is missing"),
        ({"Call": "!!!"}, "not base64url"),
        ({"Call": xcv.b64json_encode([1, 2])}, "must be a JSON object"),
        ({"Call": xcv.b64json_encode({"from_uri": "x"})}, "call_id is missing"),
        ({"Call": xcv.b64json_encode({"call_id": "c", "caller": 5})}, "caller must be a string"),
        ({"Call": base64.urlsafe_b64encode(b"\xff\xfe").decode()}, "not base64url of JSON"),
        ({"Profile": None}, "X-CV-Profile header is missing"),
        ({"Profile": xcv.b64json_encode({"channels": 3})}, "channels"),
        ({"Profile": xcv.b64json_encode({"channels": "2"})}, "channels must be an integer"),
        ({"Profile": xcv.b64json_encode({"format": "aac"})}, "format"),
        ({"Profile": xcv.b64json_encode({"reorder_ms": 5})}, "reorder_ms"),
    ],
)
def test_bad_headers_are_400_with_a_reason(override: dict[str, str | None], reason: str) -> None:
    with pytest.raises(XcvError) as err:
        parse(headers(**override))
    assert err.value.status == 400
    assert reason in err.value.reason


def test_unknown_profile_fields_are_ignored_and_missing_call_fields_default() -> None:
    h = headers(
        Profile=xcv.b64json_encode({"channels": 2, "future": True}), Call=xcv.b64json_encode({"call_id": "c"})
    )
    b = parse(h)
    assert b.profile == IvrProfile(channels=2)
    assert b.call == CallInfo("c")


def test_oversized_value_is_rejected() -> None:
    with pytest.raises(XcvError):
        xcv.b64json_decode("A" * 10000, "X-CV-Call")


def test_load_header() -> None:
    assert xcv.parse_load("3") == 3
    assert xcv.parse_load(" 0 ") == 0
    assert xcv.parse_load(None) is None
    assert xcv.parse_load("-1") is None
    assert xcv.parse_load("lots") is None
