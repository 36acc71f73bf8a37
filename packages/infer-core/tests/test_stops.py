"""Stop strings spanning tokens are found, cut and never emitted."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from infer.stops import StopMatcher

pytestmark = pytest.mark.unit


def feed_all(matcher, pieces):
    out, stopped = [], False
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            break
    if not stopped:
        out.append(matcher.flush())
    return "".join(out), stopped


def test_a_stop_string_split_over_tokens_is_found_and_not_emitted():
    assert feed_all(StopMatcher(["END"]), ["hello E", "N", "D more"]) == ("hello ", True)


def test_text_that_might_start_a_stop_string_is_held_back_until_it_cannot():
    matcher = StopMatcher(["###"])
    assert matcher.feed("ab#") == ("ab", False)
    assert matcher.feed("#x") == ("##x", False)


def test_the_earliest_of_several_stop_strings_wins():
    assert feed_all(StopMatcher(["world", "lo w"]), ["hel", "lo world"]) == ("hel", True)


def test_held_text_is_flushed_when_the_stream_ends_otherwise():
    assert feed_all(StopMatcher(["abc"]), ["xx", "ab"]) == ("xxab", False)


def test_no_stop_strings_pass_everything_through():
    assert StopMatcher([]).feed("anything") == ("anything", False)


@given(
    text=st.text(alphabet="abc#", max_size=40),
    stop=st.text(alphabet="abc#", min_size=1, max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=8),
)
def test_any_split_of_the_text_gives_the_same_output_as_searching_the_whole(text, stop, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    index = text.find(stop)
    expected = (text[:index], True) if index >= 0 else (text, False)
    assert feed_all(StopMatcher([stop]), pieces) == expected
