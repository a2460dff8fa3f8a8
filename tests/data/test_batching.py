"""Padding, length grouping, sharding, packing and micro-batches (loraflow.data.batching)."""

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
from data_helpers import PC, TEXT, example_index, fake_examples, sample_rows, write_jsonl
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from loraflow import data
from loraflow.data import Columns, Table, TokenizedExamples
from loraflow.errors import ConfigError, DataError


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
    frame = data.load_examples(data.SAMPLE_DATA, PC).frame.iloc[:10]
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
