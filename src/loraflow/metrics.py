"""Answer-quality metrics for generated text: exact match and token F1 (stdlib only).

Both compare a prediction with a reference after `normalize_answer`, so " Quack." and "quack"
count as the same answer. Token F1 is the SQuAD-style overlap of whitespace tokens: it gives
partial credit to an answer that has some of the reference's words.
"""

from __future__ import annotations

import string
from collections import Counter

__all__ = ["PUNCTUATION", "normalize_answer", "exact_match", "token_f1"]

PUNCTUATION = string.punctuation
"""The characters stripped from both ends of an answer: ASCII punctuation (`string.punctuation`)."""

_STRIP = PUNCTUATION + string.whitespace


def normalize_answer(text: str) -> str:
    """The canonical form of an answer, which the metrics compare.

    Exactly these steps, in this order:

    1. lowercase (`str.lower`);
    2. collapse whitespace: every run of whitespace characters (`str.split()` with no argument)
       becomes one space, which also drops leading and trailing whitespace;
    3. strip, from both ends, every character that is ASCII punctuation (`string.punctuation`)
       or whitespace, repeatedly, so " quack. " and "(quack)!" both become "quack".

    Punctuation inside the answer is kept ("ice-cream" stays "ice-cream", "a, b" stays "a, b").
    The result is a fixed point: `normalize_answer(normalize_answer(t)) == normalize_answer(t)`.
    """
    collapsed = " ".join(text.lower().split())
    return collapsed.strip(_STRIP)


def exact_match(prediction: str, reference: str) -> float:
    """1.0 if the two answers are equal after `normalize_answer`, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD-style token F1 of the normalised answers, in [0, 1].

    Tokens are the whitespace-separated words of `normalize_answer(...)`; the overlap counts each
    token as often as it occurs in both (a multiset intersection). F1 is the harmonic mean of
    precision (overlap / prediction tokens) and recall (overlap / reference tokens). Both empty:
    1.0; exactly one empty: 0.0. Symmetric in its arguments.
    """
    pred = normalize_answer(prediction).split()
    ref = normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    overlap = sum((Counter(pred) & Counter(ref)).values())
    if overlap == 0:
        return 0.0
    precision, recall = overlap / len(pred), overlap / len(ref)
    return 2 * precision * recall / (precision + recall)
