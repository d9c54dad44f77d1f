"""The metadata document: validation with errors naming the field, normal form."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.storage.metadata import FIELDS, DocumentError, parse_time, split_unknown, validate_document


def doc(**changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "id": "r1",
        "tenant": "acme",
        "session_id": "s1",
        "part": 1,
        "call_id": "abc@host",
        "from_uri": "sip:1001@acme.example",
        "from_display": "Alice",
        "to_uri": "sip:1002@acme.example",
        "to_display": "Bob",
        "caller": "1001",
        "callee": "1002",
        "direction": "internal",
        "start": "2024-05-01T10:00:00+02:00",
        "end": "2024-05-01T08:00:12.5Z",
        "codec": "PCMU",
        "format": "wav",
        "channels": 2,
        "sample_rate": 8000,
        "size": 1000,
        "sha256": "a" * 64,
        "storage": {"kind": "disk", "key": "acme/2024/05/01/r1.wav"},
        "mcp": "mcp1",
        "streams": [
            {
                "label": "caller",
                "ssrc": 1,
                "packets": 10,
                "bytes": 1600,
                "lost": 0,
                "late": 0,
                "duplicates": 0,
                "reordered": 0,
                "invalid": 3,
                "jitter_ms": 1.5,
                "gap_total_ms": 0,
                "longest_gap_ms": 0,
                "dtmf": "12#",
            }
        ],
    }
    d.update(changes)
    return {k: v for k, v in d.items() if v is not ...}


def test_normal_form() -> None:
    out = validate_document(doc())
    assert out["start"] == "2024-05-01T08:00:00.000000Z"
    assert out["end"] == "2024-05-01T08:00:12.500000Z"
    assert out["duration"] == 12.5
    assert out["labels"] == [] and out["extra"] == {} and out["encryption"] is None
    assert validate_document(out) == out  # idempotent


def test_defaults_for_optional_fields() -> None:
    minimal = {
        "id": "r2",
        "tenant": "acme",
        "call_id": "c",
        "start": "2024-05-01T08:00:00",
        "end": "2024-05-01T08:00:01",
        "storage": {"kind": "disk", "key": "acme/2024/05/01/r2.wav"},
    }
    out = validate_document(minimal)
    assert out["part"] == 1 and out["channels"] == 2 and out["format"] == "wav" and out["caller"] == ""
    assert out["duration"] == 1.0


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"id": "../x"}, "id"),
        ({"tenant": "ACME"}, "tenant"),
        ({"start": "yesterday"}, "start"),
        ({"end": "2024-05-01T07:00:00Z"}, "end"),
        ({"channels": 3}, "channels"),
        ({"part": 0}, "part"),
        ({"size": -1}, "size"),
        ({"size": True}, "size"),
        ({"sha256": "xyz"}, "sha256"),
        ({"storage": {"kind": "tape", "key": "a/b.wav"}}, "storage.kind"),
        ({"storage": {"kind": "disk", "key": "../../etc/passwd"}}, "storage.key"),
        ({"streams": [{"label": "caller", "packets": "many"}]}, "streams[0].packets"),
        ({"streams": [{"label": "caller", "jitter_ms": float("nan")}]}, "streams[0].jitter_ms"),
        ({"streams": [{"label": "caller", "invalid": -1}]}, "streams[0].invalid"),
        ({"streams": [{"label": "caller", "invalid": 2.5}]}, "streams[0].invalid"),
        ({"streams": [{"label": "caller", "invalid": True}]}, "streams[0].invalid"),
        ({"call_id": ...}, "call_id"),
        ({"surprise": 1}, "surprise"),
        ({"caller": 1001}, "caller"),
        ({"direction": "In Bound"}, "direction"),
        ({"labels": ["", "x"]}, "labels"),
        ({"extra": []}, "extra"),
    ],
)
def test_errors_name_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(DocumentError) as info:
        validate_document(doc(**changes))
    assert info.value.field == field
    assert str(info.value).startswith(field)


def test_stream_invalid_count_is_optional() -> None:
    """rtp_core's junk-datagram count per stream: kept when present, not required (older events)."""
    assert validate_document(doc())["streams"][0]["invalid"] == 3
    older = doc()
    del older["streams"][0]["invalid"]
    assert "invalid" not in validate_document(older)["streams"][0]
    assert (
        validate_document(doc(streams=[{"label": "callee", "invalid": None}]))["streams"][0]["invalid"]
        is None
    )


def test_not_an_object() -> None:
    with pytest.raises(DocumentError):
        validate_document([1])


def test_split_unknown() -> None:
    known, unknown = split_unknown(doc(siprec={"x": 1}))
    assert "siprec" not in known and unknown == {"siprec": {"x": 1}}
    validate_document({**known, "extra": unknown})


def test_parse_time_query_plus_decoded_as_space() -> None:
    assert parse_time("2024-05-01T10:00:00 02:00", "t") == parse_time("2024-05-01T08:00:00Z", "t")


def test_time_out_of_range() -> None:
    with pytest.raises(DocumentError):
        parse_time("9999-12-31T23:59:59-23:59", "start")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(FIELDS)), json_values)
def test_any_field_value_is_valid_or_a_document_error(field: str, value: Any) -> None:
    try:
        out = validate_document(doc(**{field: value}))
    except DocumentError as exc:
        assert exc.field.split(".")[0].split("[")[0] in (field, "end", "document")
    else:
        assert validate_document(out) == out
