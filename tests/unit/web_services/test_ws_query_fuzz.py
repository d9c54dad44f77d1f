"""Search query parsing never fails with anything but a 400 ApiError, whatever the input."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from services.web_services.app import SEARCH_PARAMS, ApiError, parse_search

names = st.one_of(st.sampled_from(SEARCH_PARAMS), st.text(max_size=8))
values = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"-?[0-9]{1,25}", fullmatch=True),
    st.datetimes().map(lambda d: d.isoformat()),
    st.from_regex(
        r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(:[0-9]{2})?([+ -][0-9]{2}:[0-9]{2}|Z)?", fullmatch=True
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(names, values), max_size=5))
def test_parse_search_only_raises_400(pairs: list[tuple[str, str]]) -> None:
    try:
        filters, limit, _ = parse_search(MultiDict(pairs))
    except ApiError as exc:
        assert exc.status == 400 and exc.message
    else:
        assert 1 <= limit <= 500
        if filters.start_after and filters.start_before:
            assert filters.start_after < filters.start_before
