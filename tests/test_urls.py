"""Call URL formatting: byte-exact seed format for any ID value."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.urls import MissingId, call_url

ids = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)


@given(st.lists(ids, min_size=1, max_size=3), st.sampled_from(["https://h.example/p", "https://h.example/p?x=1",
                                                                "https://h.example/p?", "http://[::1]:81/a/b"]))
def test_any_id_values_give_a_parseable_query_that_round_trips(values, base):
    params = ["AccountID", "CaseID", "FollowupID"][: len(values)]
    url = call_url(base, params, values)
    query = urlsplit(url).query
    pairs = parse_qsl(query, keep_blank_values=True)
    assert pairs[-len(values):] == list(zip(params, values, strict=True))
    assert "#" not in url and " " not in url
    assert url.startswith(base)


def test_seed_format_is_byte_exact():
    assert call_url("https://h/x", ["AccountID", "CaseID"], ["aaa", "ccc"]) == "https://h/x?AccountID=aaa&CaseID=ccc"
    assert call_url("https://h/x?k=v", ["AccountID"], ["aaa"]) == "https://h/x?k=v&AccountID=aaa"
    assert call_url("https://h/x?k=v&", ["AccountID"], ["a b"]) == "https://h/x?k=v&AccountID=a%20b"


def test_null_id_is_an_error_naming_the_parameter():
    with pytest.raises(MissingId, match="ID CaseID is NULL"):
        call_url("https://h/x", ["AccountID", "CaseID"], ["a", None])
