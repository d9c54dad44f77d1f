"""HTTP byte ranges (RFC 9110 section 14) for audio playback.

Only a single ``bytes`` range is honoured. A header that is not a syntactically valid single byte
range is ignored, as RFC 9110 section 14.2 allows (the full content is served with 200); a valid
range that lies outside the content is "416 Range Not Satisfiable".
"""

from __future__ import annotations

import re

_SPEC_RE = re.compile(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", re.IGNORECASE)


class RangeNotSatisfiable(ValueError):
    """The range lies outside the content; answer 416 with ``Content-Range: bytes */size``."""

    def __init__(self, size: int) -> None:
        super().__init__(f"range not satisfiable for content of {size} bytes")
        self.size = size


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Parse a Range header against content of ``size`` bytes.

    Returns ``(first, last)`` (inclusive, clamped to the content), or None when the header is
    absent or to be ignored (malformed, another unit, several ranges). Raises RangeNotSatisfiable.
    """
    if header is None:
        return None
    m = _SPEC_RE.fullmatch(header)
    if not m:
        return None  # several ranges, another unit or garbage: serve everything
    first_s, last_s = m.groups()
    if not first_s and not last_s:
        return None
    if len(first_s) > 18 or len(last_s) > 18:
        raise RangeNotSatisfiable(size)
    if not first_s:  # suffix range: the last N bytes (section 14.1.2)
        n = int(last_s)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable(size)
        return max(0, size - n), size - 1
    first = int(first_s)
    if last_s:
        last = int(last_s)
        if last < first:
            return None  # invalid range-spec: ignore the header
    else:
        last = size - 1
    if first >= size:
        raise RangeNotSatisfiable(size)
    return first, min(last, size - 1)


def content_range(first: int, last: int, size: int) -> str:
    return f"bytes {first}-{last}/{size}"
