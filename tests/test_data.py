"""Tests for loraflow.data: reading and checking files, tokenizing with loss masks, batching."""

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
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from loraflow import data
from loraflow.data import Columns, TokenizedExamples
from loraflow.errors import ConfigError, DataError

PC = Columns(prompt="prompt", completion="completion")
TEXT = Columns(text="text")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sample_rows(n: int = 6) -> list[dict]:
    return [{"prompt": f"Question: what is {i}?\nAnswer:", "completion": f" It is {i}."} for i in range(n)]


def fake_examples(lengths: list[int]) -> TokenizedExamples:
    """Examples whose ids encode their own index, so batches can be traced back to them."""
    ids = [[1] + [10 + i] * (n - 1) for i, n in enumerate(lengths)]
    return TokenizedExamples(ids, [[-100] + row[1:] for row in ids], 0, 0)


def example_index(row: torch.Tensor) -> int:
    return int(row[1]) - 10


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
    frame = data.load_examples(data.SAMPLE_DATA, PC)
    assert data.SAMPLE_DATA.name == "sample.jsonl" and len(frame) == 261
    assert list(frame.columns) == ["prompt", "completion"]
    assert frame.attrs == {"source": str(data.SAMPLE_DATA), "role": "train_data"}


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
    frame = data.load_examples(path, PC)
    assert list(frame.columns) == ["prompt", "completion"]  # only the needed columns
    assert frame.to_dict("records") == expected[["prompt", "completion"]].to_dict("records")
    assert frame.attrs["source"] == str(path)


def test_text_column_is_read_alone(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "one two", "id": 1}, {"text": "three", "id": 2}])
    assert data.load_examples(path, TEXT).to_dict("list") == {"text": ["one two", "three"]}


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
    assert data.load_examples(path, PC).to_dict("list") == {"prompt": ["NA", "null"], "completion": ["007", "1e3"]}


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
def test_a_10mb_single_line_fails_fast_with_a_short_message(tmp_path, name):
    (path := tmp_path / name).write_bytes(b"x" * 10_000_000)
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        data.load_examples(path, PC)
    assert time.perf_counter() - started < 5
    assert str(info.value).startswith(f"train_data '{path}': ") and len(str(info.value)) < 600


def test_a_10mb_cell_is_truncated_quickly(tmp_path, tiny_tokenizer, caplog):
    rows = sample_rows(3) + [{"prompt": "Question: long?\nAnswer:", "completion": " word" * 2_000_000}]
    frame = data.load_examples(write_jsonl(tmp_path / "big.jsonl", rows), PC)
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="loraflow.data"):
        tokenized = data.tokenize_examples(frame, tiny_tokenizer, PC, max_seq_length=64)
    assert time.perf_counter() - started < 5
    assert tokenized.n_truncated == 1 and max(tokenized.lengths) == 64
    assert "1 of 4 rows are longer than max_seq_length=64" in caplog.text


# ---------------------------------------------------------------------------------------------
# Splitting.


def test_split_is_seeded_disjoint_and_covering():
    frame = pd.DataFrame({"text": [f"row {i}" for i in range(50)]})
    frame.attrs["source"] = "s.jsonl"
    train, evaluation = data.split_examples(frame, 0.2, seed=3)
    again_train, again_eval = data.split_examples(frame, 0.2, seed=3)
    assert len(evaluation) == 10 and len(train) == 40
    assert set(train.text) | set(evaluation.text) == set(frame.text) and not set(train.text) & set(evaluation.text)
    assert train.equals(again_train) and evaluation.equals(again_eval)
    assert not data.split_examples(frame, 0.2, seed=4)[1].equals(evaluation)
    assert train.attrs["source"] == evaluation.attrs["source"] == "s.jsonl"


def test_split_keeps_at_least_one_row_on_each_side():
    frame = pd.DataFrame({"text": ["a", "b", "c"]})
    assert [len(part) for part in data.split_examples(frame, 0.01, seed=0)] == [2, 1]
    assert [len(part) for part in data.split_examples(frame, 0.99, seed=0)] == [1, 2]
    with pytest.raises(DataError, match="too few to hold out"):
        data.split_examples(frame.iloc[:1], 0.1, seed=0)


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
    frame.attrs.update(source="long.jsonl", role="train_data")
    full = data.tokenize_examples(frame, tiny_tokenizer, PC, max_seq_length=1000)
    with caplog.at_level(logging.WARNING, logger="loraflow.data"):
        cut = data.tokenize_examples(frame, tiny_tokenizer, PC, max_seq_length=30)
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
    frame.attrs.update(source="x.jsonl", role="eval_data")
    with pytest.raises(DataError, match=r"^eval_data 'x.jsonl': every one of the 3 rows was dropped.*"
                                        r"raise --max-seq-length to at least \d+"):
        data.tokenize_examples(frame, tiny_tokenizer, PC, max_seq_length=4, overflow="drop")


def test_bad_tokenize_settings(tiny_tokenizer):
    frame = pd.DataFrame(sample_rows(1))
    with pytest.raises(ConfigError, match="`overflow` must be one of truncate, drop, got 'cut'"):
        data.tokenize_examples(frame, tiny_tokenizer, PC, 64, overflow="cut")
    with pytest.raises(ConfigError, match="`max_seq_length` must be at least 2"):
        data.tokenize_examples(frame, tiny_tokenizer, PC, 1)


def test_describe():
    summary = data.describe(fake_examples([3, 5]))
    assert summary["rows"] == 2 and summary["tokens"] == 8 and summary["label_tokens"] == 6
    assert data.describe(pd.DataFrame({"a": [1, 2, 3]})) == {"rows": 3}


# ---------------------------------------------------------------------------------------------
# Batching: padding, length grouping, determinism.


def epoch_indices(loader) -> list[list[int]]:
    return [[example_index(row) for row in batch["input_ids"]] for batch in loader]


def test_batches_are_right_padded(tiny_tokenizer):
    loader = data.make_dataloader(fake_examples([3, 6, 4]), 3, pad_token_id=0, shuffle=False, seed=0)
    batch = next(iter(loader))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].tolist()[0] == [1, 10, 10, 0, 0, 0]
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0, 0]
    assert batch["labels"].tolist()[0] == [-100, 10, 10, -100, -100, -100]
    assert batch["input_ids"].dtype == torch.long


_rng = random.Random(1)
LENGTHS = [_rng.randint(2, 60) for _ in range(203)]


def test_every_example_appears_once_per_epoch_and_epochs_differ():
    loader = data.make_dataloader(fake_examples(LENGTHS), 8, pad_token_id=0, shuffle=True, seed=5)
    first, second = epoch_indices(loader), epoch_indices(loader)
    for epoch in (first, second):
        assert sorted(i for batch in epoch for i in batch) == list(range(len(LENGTHS)))
        assert len(epoch) == len(loader) == 26
    assert first != second


def test_batches_are_deterministic_given_the_seed():
    def run(seed):
        loader = data.make_dataloader(fake_examples(LENGTHS), 8, pad_token_id=0, shuffle=True, seed=seed)
        return epoch_indices(loader), epoch_indices(loader)

    assert run(5) == run(5)
    assert run(5) != run(6)
    loader = data.make_dataloader(fake_examples(LENGTHS), 8, pad_token_id=0, shuffle=True, seed=5)
    loader.batch_sampler.set_epoch(1)
    assert epoch_indices(loader) == run(5)[1]


def test_length_grouping_wastes_little_padding():
    def waste(batches):
        return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches) / sum(LENGTHS)

    loader = data.make_dataloader(fake_examples(LENGTHS), 8, pad_token_id=0, shuffle=True, seed=5)
    rng = random.Random(0)
    order = rng.sample(range(len(LENGTHS)), len(LENGTHS))
    random_batches = [order[s : s + 8] for s in range(0, len(order), 8)]
    grouped = waste(epoch_indices(loader))
    assert grouped < 0.1 < 0.5 < waste(random_batches)


def test_eval_batches_keep_the_file_order():
    loader = data.make_dataloader(fake_examples([5, 2, 9, 3, 4]), 2, pad_token_id=0, shuffle=False, seed=0)
    assert epoch_indices(loader) == [[0, 1], [2, 3], [4]]


def test_bad_loader_settings():
    with pytest.raises(ConfigError, match="`batch_size` must be a positive integer"):
        data.make_dataloader(fake_examples([3]), 0, pad_token_id=0, shuffle=False, seed=0)
    with pytest.raises(ConfigError, match=r"`rank` must be in \[0, num_replicas=2\), got 2"):
        data.make_dataloader(fake_examples([3]), 1, pad_token_id=0, shuffle=False, seed=0, num_replicas=2, rank=2)
    with pytest.raises(ConfigError, match="packing needs `max_seq_length` >= the longest example"):
        data.make_dataloader(fake_examples([3, 9]), 2, pad_token_id=0, shuffle=False, seed=0, packing=True,
                             max_seq_length=8)


# ---------------------------------------------------------------------------------------------
# Sharding across processes.


@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("replicas", [2, 3, 4])
def test_shards_are_disjoint_covering_and_equal(replicas, packing):
    examples = fake_examples(LENGTHS)
    per_rank, counts = [], []
    for rank in range(replicas):
        loader = data.make_dataloader(examples, 8, pad_token_id=0, shuffle=True, seed=2, packing=packing,
                                      max_seq_length=128, num_replicas=replicas, rank=rank)
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append([i for batch in batches for i in _indices_in(batch, packing)])
        counts.append(len(batches))
    assert len(set(counts)) == 1
    everything = [i for shard in per_rank for i in shard]
    assert sorted(everything) == list(range(len(LENGTHS)))  # covering, and disjoint (no repeats)


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=120),
    batch_size=st.integers(1, 9),
    replicas=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_batch_plans_cover_every_example_once_on_equal_shards(lengths, batch_size, replicas, seed):
    assume(len(lengths) >= replicas)
    sampler = data.EpochBatchSampler(lengths, batch_size, shuffle=True, seed=seed, num_replicas=replicas)
    for epoch in (0, 1):
        plan = sampler.plan(epoch)
        assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
        assert len(plan) % replicas == 0 and len(plan) // replicas == len(sampler)
        assert all(len(batch) >= 1 for batch in plan)
        leftover = len(lengths) % (batch_size * replicas)  # the last global batch, when it is short
        if not 0 < leftover < replicas:  # only a last batch too small to split is merged into another
            assert all(len(batch) <= batch_size for batch in plan)
    rows = data.pack_examples(lengths, 40, list(range(len(lengths))))
    assert [i for row in rows for i in row] == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 40 for row in rows)


def _indices_in(batch, packing: bool) -> list[int]:
    if not packing:
        return [example_index(row) for row in batch["input_ids"]]
    found = []
    for ids, positions in zip(batch["input_ids"], batch["position_ids"]):
        found += [int(ids[k + 1]) - 10 for k in range(len(ids) - 1) if positions[k] == 0 and ids[k] == 1]
    return found


def test_too_few_examples_to_split_are_merged_instead():
    shards = [list(data.make_dataloader(fake_examples([4, 5, 6]), 1, pad_token_id=0, shuffle=True, seed=0,
                                        num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert [len(s) for s in shards] == [1, 1]
    assert sorted(i for s in shards for i in _indices_in(s[0], False)) == [0, 1, 2]


def test_batches_survive_accelerate_prepare():
    from accelerate import Accelerator

    def loader():
        return data.make_dataloader(fake_examples(LENGTHS), 8, pad_token_id=0, shuffle=True, seed=5)

    plain, prepared = loader(), Accelerator(cpu=True).prepare(loader())
    expected = [epoch_indices(plain) for _ in range(2)]
    assert [epoch_indices(prepared) for _ in range(2)] == expected and expected[0] != expected[1]


def test_more_processes_than_examples_is_an_error():
    with pytest.raises(DataError, match="only 2 examples .* for 3 processes"):
        data.make_dataloader(fake_examples([4, 5]), 8, pad_token_id=0, shuffle=True, seed=0, num_replicas=3, rank=0)


# ---------------------------------------------------------------------------------------------
# Packing.


def test_packed_rows_hold_whole_examples_with_restarting_positions():
    lengths = LENGTHS[:40]
    loader = data.make_dataloader(fake_examples(lengths), 4, pad_token_id=0, shuffle=True, seed=0, packing=True,
                                  max_seq_length=128)
    seen = []
    for batch in loader:
        assert set(batch) == {"input_ids", "labels", "position_ids", "use_cache"} and batch["use_cache"] is False
        assert batch["input_ids"].shape[1] <= 128
        for ids, labels, positions in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                          batch["position_ids"].tolist()):
            starts = [k for k, p in enumerate(positions) if p == 0]
            for start, end in zip(starts, starts[1:] + [len(ids)]):
                if ids[start] == 0:  # the padding segment at the end of a row
                    assert set(ids[start:end]) == {0} and set(labels[start:end]) == {-100}
                    continue
                index = ids[start + 1] - 10
                seen.append(index)
                assert end - start == lengths[index] and positions[start:end] == list(range(lengths[index]))
                assert labels[start] == -100  # never predict one example's first token from another
    assert sorted(seen) == list(range(40))
    assert len(loader) == len(list(loader))  # packed once: the same number of batches every epoch


def _solo_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0]


PACKED_ROW = 96  # tokens per packed row: more than two sample rows (about 35 tokens each)


@pytest.fixture
def real_examples(tiny_tokenizer) -> TokenizedExamples:
    """The first 10 sample rows and a longer one; several fit in one packed row of PACKED_ROW tokens."""
    frame = data.load_examples(data.SAMPLE_DATA, PC).iloc[:10]
    frame = pd.concat([frame, pd.DataFrame([{"prompt": "A longer one:", "completion": " word" * 30}])])
    return data.tokenize_examples(frame, tiny_tokenizer, PC, max_seq_length=PACKED_ROW)


def test_packed_examples_do_not_see_each_other(tiny_model, tiny_tokenizer, real_examples):
    """Logits and loss of every packed example equal those of the example run alone."""
    loader = data.make_dataloader(real_examples, 2, pad_token_id=tiny_tokenizer.pad_token_id, shuffle=True, seed=0,
                                  packing=True, max_seq_length=PACKED_ROW)
    assert any(len(batch["input_ids"]) == 2 for batch in loader)  # batch size > 1 is covered
    solo = {tuple(ids): _solo_logits(tiny_model, ids) for ids in real_examples.input_ids}
    checked, packed_loss, solo_loss = 0, 0.0, 0.0
    for batch in loader:
        with torch.no_grad():
            out = tiny_model(**batch)
        for row in range(len(batch["input_ids"])):
            ids, positions = batch["input_ids"][row].tolist(), batch["position_ids"][row].tolist()
            starts = [k for k, p in enumerate(positions) if p == 0] + [len(ids)]
            for start, end in zip(starts, starts[1:]):
                if tuple(ids[start:end]) in solo:
                    expected = solo[tuple(ids[start:end])]
                    torch.testing.assert_close(out.logits[row, start:end], expected, atol=1e-5, rtol=0)
                    checked += 1
        n = (batch["labels"][:, 1:] != -100).sum()
        packed_loss += out.loss.item() * n.item()
    assert checked == len(real_examples)
    for ids, labels in zip(real_examples.input_ids, real_examples.labels):
        with torch.no_grad():
            out = tiny_model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        solo_loss += out.loss.item() * sum(t != -100 for t in labels[1:])
    assert packed_loss == pytest.approx(solo_loss, rel=1e-5)


def test_without_use_cache_false_packed_examples_would_leak(tiny_model, tiny_tokenizer, real_examples):
    """Why the batch carries use_cache=False: with the config's use_cache=True, transformers
    skips packed-sequence detection and the second example in a row attends to the first."""
    loader = data.make_dataloader(real_examples, 1, pad_token_id=tiny_tokenizer.pad_token_id, shuffle=False, seed=0,
                                  packing=True, max_seq_length=PACKED_ROW)
    batch = next(iter(loader))
    first = len(real_examples.input_ids[0])
    second = real_examples.input_ids[1]
    batch.pop("use_cache")
    tiny_model.train()
    with torch.no_grad():
        leaked = tiny_model(**batch).logits[0, first : first + len(second)]
    tiny_model.eval()
    assert not torch.allclose(leaked, _solo_logits(tiny_model, second), atol=1e-3)


def test_right_padded_examples_match_unpadded(tiny_model, tiny_tokenizer, real_examples):
    loader = data.make_dataloader(real_examples, 4, pad_token_id=tiny_tokenizer.pad_token_id, shuffle=True, seed=0)
    for batch in loader:
        with torch.no_grad():
            logits = tiny_model(**batch).logits
        for row, mask in zip(range(len(logits)), batch["attention_mask"]):
            n = int(mask.sum())
            ids = batch["input_ids"][row, :n].tolist()
            torch.testing.assert_close(logits[row, :n], _solo_logits(tiny_model, ids), atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------
# Micro-batches.


def _rows(part: dict) -> list[tuple[list[int], list[int]]]:
    """(ids, labels) of each row without its padding."""
    n = part["attention_mask"].sum(dim=1).tolist()
    return [(part["input_ids"][i, :k].tolist(), part["labels"][i, :k].tolist()) for i, k in enumerate(n)]


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=12), budget=st.integers(1, 200))
def test_split_batch_keeps_every_row_once_within_the_budget(lengths, budget):
    batch = data.collate_padded([(ids, labels) for ids, labels in zip(*_id_label_rows(lengths))], pad_token_id=0)
    parts = data.split_batch(batch, budget)
    assert [row for part in parts for row in _rows(part)] == _rows(batch)
    for part in parts:
        rows, width = part["input_ids"].shape
        assert rows >= 1
        assert rows == 1 or rows * width <= budget  # one row longer than the budget still runs alone
        assert width == int(part["attention_mask"].sum(dim=1).max())  # trimmed to its own longest row


def _id_label_rows(lengths: list[int]) -> tuple[list[list[int]], list[list[int]]]:
    ids = [[1] + [10 + i] * (n - 1) for i, n in enumerate(lengths)]
    return ids, [[-100] + row[1:] for row in ids]


def test_split_batch_returns_a_batch_within_the_budget_unchanged():
    batch = data.collate_padded(list(zip(*_id_label_rows([5, 4, 3]))), pad_token_id=0)
    assert data.split_batch(batch, 15) == [batch]


def test_split_batch_cuts_packed_rows_and_keeps_use_cache():
    loader = data.make_dataloader(fake_examples([5, 4, 3, 6, 2, 7]), 3, pad_token_id=0, shuffle=False, seed=0,
                                  packing=True, max_seq_length=8)
    batch = next(iter(loader))
    parts = data.split_batch(batch, 8)
    assert [p["input_ids"].shape[0] for p in parts] == [1] * batch["input_ids"].shape[0]
    assert all(p["use_cache"] is False for p in parts)
    torch.testing.assert_close(torch.cat([p["position_ids"] for p in parts]), batch["position_ids"])
