"""Tests for loraflow.metrics: answer normalisation, exact match and token F1."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from loraflow.metrics import exact_match, normalize_answer, token_f1

texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
words = st.lists(st.text(alphabet=string.ascii_letters + "-'", min_size=1, max_size=8), max_size=6)
padding = st.text(alphabet=string.whitespace + string.punctuation, max_size=4)


@pytest.mark.parametrize(
    "text, expected",
    [
        (" Quack.", "quack"),
        ("  A   duck\tsays\nquack!  ", "a duck says quack"),
        ("(Paris)", "paris"),
        ("ice-cream", "ice-cream"),
        ("a, b", "a, b"),
        ("...", ""),
        ("", ""),
        (" . quack . ", "quack"),
    ],
)
def test_normalize_answer_examples(text, expected):
    assert normalize_answer(text) == expected


@pytest.mark.parametrize(
    "prediction, reference, em, f1",
    [
        (" quack", "quack", 1.0, 1.0),
        ("QUACK!", " quack.", 1.0, 1.0),
        ("moo", "quack", 0.0, 0.0),
        ("a duck says quack", "quack", 0.0, 2 * (1 / 4) * 1 / (1 / 4 + 1)),
        ("the the cat", "the cat", 0.0, 2 * (2 / 3) * 1 / (2 / 3 + 1)),
        ("", "", 1.0, 1.0),
        ("", "quack", 0.0, 0.0),
        ("...", "", 1.0, 1.0),
    ],
)
def test_metric_examples(prediction, reference, em, f1):
    assert exact_match(prediction, reference) == em
    assert token_f1(prediction, reference) == pytest.approx(f1)


@given(texts)
def test_normalisation_is_idempotent(text):
    once = normalize_answer(text)
    assert normalize_answer(once) == once


@given(texts, texts)
def test_exact_match_implies_full_f1(a, b):
    assert exact_match(a, b) in (0.0, 1.0)
    if exact_match(a, b):
        assert token_f1(a, b) == 1.0
    assert exact_match(a, a) == 1.0 and token_f1(a, a) == 1.0


@given(texts, texts)
def test_f1_is_symmetric_and_bounded(a, b):
    f1 = token_f1(a, b)
    assert 0.0 <= f1 <= 1.0
    assert f1 == token_f1(b, a)
    assert exact_match(a, b) == exact_match(b, a)


@given(words, padding, padding, st.data())
def test_insensitive_to_case_spacing_and_outer_punctuation(tokens, left, right, data):
    answer = " ".join(tokens)
    gaps = [data.draw(st.text(alphabet=" \t\n", min_size=1, max_size=3)) for _ in tokens]
    spaced = "".join(g + t for g, t in zip(gaps, tokens))
    variant = left + spaced.swapcase() + right
    assert normalize_answer(variant) == normalize_answer(answer)
    assert exact_match(variant, answer) == 1.0
    assert token_f1(variant, answer) == 1.0
