"""Reading, checking and splitting data files (loraflow.data.tables)."""

from __future__ import annotations

import json
import logging
import random
import re
from pathlib import Path

import pandas as pd
import pytest
import torch
from data_helpers import PC, TEXT, example_index, fake_examples, sample_rows, write_jsonl
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from loraflow import data
from loraflow.data import Columns, Table, TokenizedExamples
from loraflow.errors import ConfigError, DataError


# ---------------------------------------------------------------------------------------------
# Columns.


def test_columns_need_text_or_prompt_and_completion():
    assert Columns(text="t").names == ("t",)
    assert Columns(prompt="p", completion="c").names == ("p", "c")
    with pytest.raises(ConfigError, match="not both"):
        Columns(text="t", prompt="p", completion="c")
    with pytest.raises(ConfigError, match="give `text_column`"):
        Columns()
    with pytest.raises(ConfigError, match="completion_column=None"):
        Columns(prompt="p")


# ---------------------------------------------------------------------------------------------
# Reading: each format round trips, the sample ships.


def test_the_sample_dataset_ships_and_loads():
    table = data.load_examples(data.SAMPLE_DATA, PC)
    assert data.SAMPLE_DATA.name == "sample.jsonl" and len(table) == 261
    assert list(table.frame.columns) == ["prompt", "completion"]
    assert (table.source, table.role, table.split) == (str(data.SAMPLE_DATA), "train_data", None)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".json", ".parquet", ".json-array"])
def test_every_format_round_trips(tmp_path, suffix):
    expected = pd.DataFrame(sample_rows(5) + [{"prompt": "NA", "completion": " 007, \"quoted\"\nnext line"}])
    expected["extra"] = range(len(expected))
    if suffix == ".csv":
        expected.to_csv(path := tmp_path / "d.csv", index=False)
    elif suffix == ".parquet":
        expected.to_parquet(path := tmp_path / "d.parquet")
    elif suffix == ".json-array":
        (path := tmp_path / "d.json").write_text(json.dumps(expected.to_dict("records")))
    else:
        expected.to_json(path := tmp_path / f"d{suffix}", orient="records", lines=True)
    table = data.load_examples(path, PC)
    assert list(table.frame.columns) == ["prompt", "completion"]  # only the needed columns
    assert table.frame.to_dict("records") == expected[["prompt", "completion"]].to_dict("records")
    assert table.source == str(path)


def test_text_column_is_read_alone(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one two", "id": 1}, {"text": "three", "id": 2}])
    assert data.load_examples(path, TEXT).frame.to_dict("list") == {"text": ["one two", "three"]}


# ---------------------------------------------------------------------------------------------
# Bad data: each case is a DataError that names the parameter, the file and the problem.


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"^eval_data '.*nope\.jsonl': file not found"):
        data.load_examples(tmp_path / "nope.jsonl", PC, role="eval_data")


def test_unsupported_extension_lists_the_supported_ones(tmp_path):
    (path := tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"d\.xlsx': unsupported file extension '\.xlsx'; use one of \.csv, \.jsonl"):
        data.read_table(path)


def test_a_directory_is_not_a_data_file(tmp_path):
    (path := tmp_path / "dir.csv").mkdir()
    with pytest.raises(DataError, match="dir.csv': is a directory"):
        data.read_table(path)


def test_missing_column_lists_the_columns_that_exist(tmp_path):
    path = write_jsonl(tmp_path / "foo.jsonl", [{"question": "q", "answer": "a"}])
    expected = (
        f"train_data '{path}': column 'prompt' not found; columns are: ['question', 'answer']. "
        "Pass --prompt-column with one of them."
    )
    with pytest.raises(DataError) as info:
        data.load_examples(path, PC)
    assert str(info.value) == expected
    with pytest.raises(DataError, match="Pass --text-column"):
        data.load_examples(path, TEXT)


def test_null_cells_are_counted_with_their_first_rows(tmp_path):
    rows = sample_rows(20)
    for i in (3, 8, 16):
        rows[i]["completion"] = None
    del rows[18]["completion"]
    path = write_jsonl(tmp_path / "x.jsonl", rows)
    with pytest.raises(DataError) as info:
        data.load_examples(path, PC)
    assert str(info.value).startswith(
        f"train_data '{path}': column 'completion' has 4 null or non-string cells (first rows: 4, 9, 17, 19; "
    )
    assert str(info.value).endswith("fix or remove those rows.")


def test_mixed_types_in_a_column_are_reported(tmp_path):
    rows = sample_rows(8)
    rows[2]["prompt"], rows[5]["prompt"], rows[6]["prompt"] = 42, ["a", "list"], 42
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with pytest.raises(DataError, match=r"mixed\.jsonl': column 'prompt' has 3 null or non-string cells "
                                        r"\(first rows: 3, 6, 7; found int x2, list x1\)"):
        data.load_examples(path, PC)


def test_a_numeric_parquet_column_is_not_text(tmp_path):
    pd.DataFrame({"prompt": ["a", "b"], "completion": [1, 2]}).to_parquet(path := tmp_path / "n.parquet")
    with pytest.raises(DataError, match=r"n\.parquet': column 'completion' has 2 null or non-string.*int x2"):
        data.load_examples(path, PC)


def test_empty_completions_are_reported_but_empty_prompts_are_allowed(tmp_path):
    rows = sample_rows(4)
    rows[0]["prompt"] = ""
    rows[2]["completion"] = "   "
    path = write_jsonl(tmp_path / "e.jsonl", rows)
    with pytest.raises(DataError, match=r"column 'completion' has 1 empty cells \(first rows: 3\)"):
        data.load_examples(path, PC)


def test_csv_reads_text_as_text(tmp_path):
    (path := tmp_path / "t.csv").write_text("prompt,completion\nNA,007\nnull,1e3\n")
    assert data.load_examples(path, PC).frame.to_dict("list") == {"prompt": ["NA", "null"], "completion": ["007", "1e3"]}


def _random_bytes(n: int) -> bytes:
    return random.Random(0).randbytes(n)


BAD_FILES = {
    # name: (file name, contents, what the message must say)
    "empty csv": ("e.csv", b"", r"the file is empty \(0 bytes, no data\)"),
    "blank jsonl": ("e.jsonl", b"\n\n  \n", r"the file is empty"),
    "empty parquet": ("e.parquet", b"", r"the file is empty \(0 bytes, no data\)"),
    "header only csv": ("h.csv", b"prompt,completion\n", r"has no rows"),
    "truncated csv (open quote)": (
        "cut.csv", b'prompt,completion\n"a","b"\n"c","d is cut in the mid', r"could not be parsed as CSV \(.*EOF"),
    "truncated csv (missing field)": (
        "cut2.csv", b"prompt,completion\na,b\nc,d\ne", r"'completion' has 1 null.*rows: 3"),
    "csv with too many fields": ("wide.csv", b"prompt,completion\na,b\nc,d,e,f\n", r"could not be parsed as CSV"),
    "invalid json lines": (
        "bad.jsonl", b'{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": \n',
        r"line 2 is not valid JSON \(Expecting value at column 31\)"),
    "json lines that are not objects": ("list.jsonl", b'["a", "b"]\n', r"record 1 is a JSON list, not an object"),
    "binary garbage as csv": ("garbage.csv", _random_bytes(4096), r"looks like a binary file.*not CSV text"),
    "binary garbage without NUL": (
        "garbage2.csv", bytes(b for b in _random_bytes(4096) if b), r"is not valid UTF-8 text \(byte 0x"),
    "garbage parquet": ("g.parquet", _random_bytes(4096), r"is not a readable Parquet file"),
    "latin-1 csv": (
        "latin.csv", "prompt,completion\nok,fine\ncafé,crème\n".encode("latin-1"),
        r"is not valid UTF-8 text \(byte 0xe9 at line 3, offset \d+\); re-save it as UTF-8"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_get_a_clear_error_naming_the_file(tmp_path, case):
    name, contents, expected = BAD_FILES[case]
    (path := tmp_path / name).write_bytes(contents)
    with pytest.raises(DataError) as info:
        data.load_examples(path, PC)
    message = str(info.value)
    assert message.startswith(f"train_data '{path}': "), message
    assert len(message) < 600, message
    assert re.search(expected, message), message


def test_a_parquet_file_with_no_rows(tmp_path):
    pd.DataFrame({"prompt": pd.Series([], dtype=str), "completion": pd.Series([], dtype=str)}).to_parquet(
        path := tmp_path / "zero.parquet"
    )
    with pytest.raises(DataError, match=r"zero\.parquet': has no rows"):
        data.load_examples(path, PC)


@pytest.mark.parametrize("name", ["huge.csv", "huge.jsonl"])
def test_a_10mb_single_line_fails_with_a_short_message(tmp_path, name):
    (path := tmp_path / name).write_bytes(b"x" * 10_000_000)
    with pytest.raises(DataError) as info:
        data.load_examples(path, PC)
    assert str(info.value).startswith(f"train_data '{path}': ") and len(str(info.value)) < 600


class _Recording:
    """A tokenizer that records the longest text it was handed."""

    def __init__(self, tokenizer):
        self._tokenizer, self.longest = tokenizer, 0

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def __call__(self, texts, **kwargs):
        self.longest = max([self.longest, *map(len, texts)])
        return self._tokenizer(texts, **kwargs)


def test_a_10mb_cell_is_cut_before_it_is_tokenized(tmp_path, tiny_tokenizer, caplog):
    """The tokenizer never sees the 10 MB (BPE over it would take seconds): cells are cut to
    `MAX_CHARS_PER_TOKEN` characters per token of `max_seq_length` first."""
    from loraflow.data.tokenize import MAX_CHARS_PER_TOKEN

    rows = sample_rows(3) + [{"prompt": "Question: long?\nAnswer:", "completion": " word" * 2_000_000}]
    frame = data.load_examples(write_jsonl(tmp_path / "big.jsonl", rows), PC).frame
    recording = _Recording(tiny_tokenizer)
    with caplog.at_level(logging.WARNING, logger="loraflow.data"):
        tokenized = data.tokenize_examples(frame, recording, PC, max_seq_length=64)
    assert recording.longest == 64 * MAX_CHARS_PER_TOKEN
    assert tokenized.n_truncated == 1 and max(tokenized.lengths) == 64
    assert "1 of 4 rows are longer than max_seq_length=64" in caplog.text


# ---------------------------------------------------------------------------------------------
# Splitting.


def test_split_is_seeded_disjoint_and_covering():
    frame = pd.DataFrame({"text": [f"row {i}" for i in range(50)]})
    table = Table(frame, role="train_data", source="s.jsonl")
    train, evaluation = data.split_examples(table, 0.2, seed=3)
    again_train, again_eval = data.split_examples(table, 0.2, seed=3)
    assert len(evaluation) == 10 and len(train) == 40
    assert (set(train.frame.text) | set(evaluation.frame.text) == set(frame.text)
            and not set(train.frame.text) & set(evaluation.frame.text))
    assert train.frame.equals(again_train.frame) and evaluation.frame.equals(again_eval.frame)
    assert not data.split_examples(table, 0.2, seed=4)[1].frame.equals(evaluation.frame)
    assert train.source == evaluation.source == "s.jsonl"
    assert "eval_fraction=0.2" in evaluation.split and evaluation.split.endswith("eval part")


def test_split_keeps_at_least_one_row_on_each_side():
    table = Table(pd.DataFrame({"text": ["a", "b", "c"]}), role="train_data", source="t.jsonl")
    assert [len(part) for part in data.split_examples(table, 0.01, seed=0)] == [2, 1]
    assert [len(part) for part in data.split_examples(table, 0.99, seed=0)] == [1, 2]
    with pytest.raises(DataError, match="train_data 't.jsonl': has 1 row, too few to hold out"):
        data.split_examples(Table(table.frame.iloc[:1], role="train_data", source="t.jsonl"), 0.1, seed=0)
