"""The recording event document: engine stats mapped to streams, valid per the metadata schema."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from services.config import IvrProfile
from services.mcp.events import build_event, check_event, stream_entry
from services.mcp.xcv import BridgeRequest, CallInfo
from services.storage.metadata import validate_document

BRIDGE = BridgeRequest(
    "acme",
    "f" * 32,
    2,
    CallInfo("a-leg@pbx", "sip:1001@acme", "Alice", "sip:1002@acme", "Bob", "internal", "1001", "1002"),
    IvrProfile(channels=2),
)
LEG = {
    "ssrc": 0xDEADBEEF, "packets": 250, "bytes": 40000, "lost": 2, "late": 1, "duplicates": 0, "reordered": 3,
    "jitter_ms": 1.23456, "gap_total_ms": 40.0, "longest_gap_ms": 20.0, "invalid": 0, "codec": "PCMU", "dtmf": "",
}  # fmt: skip
START = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)


def event(**kw):
    args = dict(
        recording_id="r" * 32,
        bridge=BRIDGE,
        start=START,
        end=START + timedelta(seconds=5.2),
        close_stats={"duration": 5.0, "samples": 40000, "channels": 2, "legs": [LEG, dict(LEG, ssrc=7)]},
        stored={
            "kind": "disk",
            "key": "acme/2024/05/06/" + "r" * 32 + ".wav",
            "size": 160044,
            "sha256": "a" * 64,
        },
        mcp="mcp1",
        dtmf=("12#", ""),
    )
    args.update(kw)
    return build_event(**args)


def test_document_fields() -> None:
    e = event()
    assert e["id"] == "r" * 32 and e["tenant"] == "acme" and e["session_id"] == "f" * 32 and e["part"] == 2
    assert (e["call_id"], e["from_uri"], e["from_display"], e["to_uri"], e["to_display"]) == (
        "a-leg@pbx", "sip:1001@acme", "Alice", "sip:1002@acme", "Bob",
    )  # fmt: skip
    assert (e["caller"], e["callee"], e["direction"]) == ("1001", "1002", "internal")
    assert e["start"] == "2024-05-06T07:08:09.123456Z" and e["end"] == "2024-05-06T07:08:14.323456Z"
    assert e["duration"] == 5.0 and e["codec"] == "PCMU" and e["format"] == "wav"
    assert (e["channels"], e["sample_rate"], e["size"], e["sha256"]) == (2, 8000, 160044, "a" * 64)
    assert e["storage"] == {"kind": "disk", "key": "acme/2024/05/06/" + "r" * 32 + ".wav"}
    assert e["mcp"] == "mcp1"
    caller, callee = e["streams"]
    assert caller == {
        "label": "caller", "ssrc": 0xDEADBEEF, "packets": 250, "bytes": 40000, "lost": 2, "late": 1,
        "duplicates": 0, "reordered": 3, "invalid": 0, "jitter_ms": 1.235, "gap_total_ms": 40.0,
        "longest_gap_ms": 20.0, "dtmf": "12#",
    }  # fmt: skip
    assert callee["label"] == "callee" and callee["ssrc"] == 7 and callee["dtmf"] == ""
    assert check_event(e) is None
    validate_document(e)


def test_engine_failure_still_gives_a_valid_document() -> None:
    e = event(close_stats=None, codec="PCMA")
    assert e["duration"] == 5.2  # wall clock
    assert e["channels"] == 2 and e["codec"] == "PCMA"
    assert [s["packets"] for s in e["streams"]] == [0, 0]
    assert e["streams"][0]["ssrc"] is None
    assert check_event(e) is None


def test_end_before_start_is_clamped_and_naive_times_are_utc() -> None:
    naive = datetime(2024, 1, 1, 0, 0, 0)
    e = event(start=naive, end=naive - timedelta(seconds=3))
    assert e["start"] == e["end"] == "2024-01-01T00:00:00.000000Z"


def test_stream_entry_sanitises_engine_values() -> None:
    s = stream_entry("caller", {"packets": -5, "jitter_ms": float("nan"), "lost": -1, "dtmf": "5"})
    assert s["packets"] == 0 and s["jitter_ms"] == 0.0 and s["lost"] == -1 and s["dtmf"] == "5"


def test_invalid_datagram_counts_per_leg() -> None:
    """rtp_core's per-leg count of junk datagrams (neither RTP nor RTCP) is in each stream."""
    e = event(
        close_stats={"duration": 5.0, "channels": 2, "legs": [dict(LEG, invalid=17), dict(LEG, invalid=0)]}
    )
    assert [s["invalid"] for s in e["streams"]] == [17, 0]
    assert check_event(e) is None
    assert validate_document(e)["streams"][0]["invalid"] == 17
    # An engine without the counter, or a nonsense value: 0, never a broken document.
    assert stream_entry("caller", {})["invalid"] == 0
    assert stream_entry("caller", {"invalid": -3})["invalid"] == 0
    assert stream_entry("caller", {"invalid": "junk"})["invalid"] == 0


def test_defect_is_reported_not_raised() -> None:
    e = event()
    e["direction"] = "Not Valid!"
    assert "direction" in (check_event(e) or "")
