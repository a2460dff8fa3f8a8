"""Tokenizing with loss masks, and over-long rows (loraflow.data.tokenize)."""

from __future__ import annotations

import json
import logging
import random
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from data_helpers import PC, TEXT, example_index, sample_rows, write_jsonl
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from loraflow import data
from loraflow.data import Columns, Table, TokenizedExamples
from loraflow.errors import ConfigError, DataError


# ---------------------------------------------------------------------------------------------
# Tokenizing.


def test_prompt_tokens_and_bos_are_masked(tiny_tokenizer):
    frame = pd.DataFrame(sample_rows(3))
    tokenized = data.tokenize_examples(frame, tiny_tokenizer, PC, max_seq_length=64)
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    for row, ids, labels in zip(sample_rows(3), tokenized.input_ids, tokenized.labels):
        prompt = tiny_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        completion = tiny_tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        assert ids == [bos] + prompt + completion + [eos]
        assert labels == [-100] * (1 + len(prompt)) + completion + [eos]
    assert tokenized.num_tokens == sum(map(len, tokenized.input_ids))
    assert tokenized.num_label_tokens == sum(sum(t != -100 for t in lab) for lab in tokenized.labels)
    assert tokenized.n_truncated == tokenized.n_dropped == 0


def test_plain_text_trains_on_every_token_after_bos(tiny_tokenizer):
    frame = pd.DataFrame({"text": ["The cat sat.", "A cow says moo."]})
    tokenized = data.tokenize_examples(frame, tiny_tokenizer, TEXT, max_seq_length=64)
    for text, ids, labels in zip(frame.text, tokenized.input_ids, tokenized.labels):
        # the tokenizer adds BOS itself with add_special_tokens=True
        assert ids == tiny_tokenizer(text)["input_ids"] + [tiny_tokenizer.eos_token_id]
        assert labels == [-100] + ids[1:]


def test_overflow_truncate_keeps_the_first_tokens_and_warns(tiny_tokenizer, caplog):
    frame = pd.DataFrame(sample_rows(4) + [{"prompt": "Q:", "completion": " word" * 50}] * 2)
    full = data.tokenize_examples(frame, tiny_tokenizer, PC, max_seq_length=1000)
    with caplog.at_level(logging.WARNING, logger="loraflow.data"):
        cut = data.tokenize_table(Table(frame, role="train_data", source="long.jsonl"), tiny_tokenizer, PC, 30)
    assert (cut.n_truncated, cut.n_dropped, len(cut)) == (2, 0, 6)
    assert cut.input_ids[4] == full.input_ids[4][:30] and cut.labels[4] == full.labels[4][:30]
    assert "train_data 'long.jsonl': 2 of 6 rows are longer than max_seq_length=30" in caplog.text
    assert "truncated them to their first 30 tokens" in caplog.text


def test_overflow_drop_removes_the_rows_and_warns(tiny_tokenizer, caplog):
    frame = pd.DataFrame(sample_rows(4) + [{"prompt": "Q:", "completion": " word" * 50}] * 2)
    with caplog.at_level(logging.WARNING, logger="loraflow.data"):
        kept = data.tokenize_examples(frame, tiny_tokenizer, PC, max_seq_length=30, overflow="drop")
    assert (kept.n_truncated, kept.n_dropped, len(kept)) == (0, 2, 4)
    assert "2 of 6 rows are longer than max_seq_length=30" in caplog.text and "dropped them" in caplog.text


def test_a_prompt_that_fills_max_seq_length_is_dropped_even_when_truncating(tiny_tokenizer, caplog):
    frame = pd.DataFrame(sample_rows(2) + [{"prompt": "Question" * 40, "completion": " yes"}])
    with caplog.at_level(logging.WARNING, logger="loraflow.data"):
        kept = data.tokenize_examples(frame, tiny_tokenizer, PC, max_seq_length=40)
    assert (kept.n_truncated, kept.n_dropped, len(kept)) == (0, 1, 2)
    assert "1 of them kept no completion token and were dropped" in caplog.text


def test_dropping_every_row_is_an_error_naming_the_file(tiny_tokenizer):
    frame = pd.DataFrame(sample_rows(3))
    with pytest.raises(DataError, match=r"^eval_data 'x.jsonl': every one of the 3 rows was dropped.*"
                                        r"raise --max-seq-length to at least \d+"):
        data.tokenize_examples(frame, tiny_tokenizer, PC, max_seq_length=4, overflow="drop",
                               role="eval_data", source="x.jsonl")


def test_bad_tokenize_settings(tiny_tokenizer):
    frame = pd.DataFrame(sample_rows(1))
    with pytest.raises(ConfigError, match="`overflow` must be one of truncate, drop, got 'cut'"):
        data.tokenize_examples(frame, tiny_tokenizer, PC, 64, overflow="cut")
    with pytest.raises(ConfigError, match="`max_seq_length` must be at least 2"):
        data.tokenize_examples(frame, tiny_tokenizer, PC, 1)
