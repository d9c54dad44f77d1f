"""HTTP Range parsing (RFC 9110 section 14)."""

from __future__ import annotations

import pytest

from services.web_services.ranges import RangeNotSatisfiable, content_range, parse_range


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, 100, None),
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=10-", 100, (10, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-1000", 100, (0, 99)),  # suffix longer than the content: all of it
        ("bytes=50-1000", 100, (50, 99)),  # last-pos clamped
        ("bytes=99-99", 100, (99, 99)),
        ("BYTES = 1 - 2", 100, (1, 2)),
        ("bytes=0-0", 1, (0, 0)),
        # ignored (serve 200): other units, several ranges, garbage, invalid order
        ("items=0-1", 100, None),
        ("bytes=0-1,5-6", 100, None),
        ("bytes=", 100, None),
        ("bytes=-", 100, None),
        ("bytes=a-b", 100, None),
        ("bytes=5-3", 100, None),
        ("0-10", 100, None),
    ],
)
def test_parse_range(header: str | None, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(
    ("header", "size"),
    [
        ("bytes=100-", 100),
        ("bytes=100-200", 100),
        ("bytes=-0", 100),
        ("bytes=0-", 0),
        ("bytes=-5", 0),
        ("bytes=99999999999999999999-", 100),
    ],
)
def test_unsatisfiable(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, size)
    assert info.value.size == size


def test_content_range() -> None:
    assert content_range(0, 9, 100) == "bytes 0-9/100"
