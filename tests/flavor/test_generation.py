"""Batched generation (`loraflow.generation`): ragged prefill and compaction change how a batch is
computed, never its tokens. The reference is plain `generate` on one unpadded prompt at a time.

The model runs in float64 so that batching (different matmul shapes, hence different float rounding)
cannot flip a near-tie in greedy decoding: any difference found here is a real one.
"""

from __future__ import annotations

import pytest
import torch
from model_helpers import generate_texts

from loraflow.flavor import generation

pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")

MAX_NEW = 12
# Varied lengths; with the tiny adapter below, some answers end after 2-9 tokens, others run to 12.
PROMPTS = [
    "a",
    "Hello",
    "The sky",
    "Question: Why?\nAnswer:",
    "LoRA adapters are small",
    "In the beginning the data was",
    "Question: What is the capital?\nAnswer:",
    "Once upon a time there was a small model that",
    "The quick brown fox jumps over the lazy dog and then",
    "Training loss went down",
    "Question: How many layers does the model have?\nAnswer:",
    "x y z",
    "A long time ago in a galaxy far, far away, a language model was trained on",
    "Why",
    "The answer is",
    "Tokens per second",
    "Question: What does LoRA stand for?\nAnswer:",
    "Once",
    # builtin:tiny's corpus has paragraphs of several sentences: continuations that run past MAX_NEW
    "Let us talk about the duck. The duck says quack. A duck lives in a pond. The",
    "Here is something about France. People in France speak French. The capital of",
    "Think of the cow. A baby cow is called a calf. The cow eats grass. A cow",
]


@pytest.fixture(scope="module")
def tokenizer(tiny_path):
    from loraflow.flavor.bases import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture
def model(base_model):
    import copy

    from model_helpers import make_peft_model

    return make_peft_model(copy.deepcopy(base_model)).to(torch.float64)


def plain(model, rows: list[list[int]], pad_token_id: int, **kwargs) -> list[list[int]]:
    """`generate` on each row alone (no padding, no cache tricks); the tokens up to the first EOS."""
    out = []
    with torch.inference_mode():
        for row in rows:
            tokens = model.generate(torch.tensor([row]), max_new_tokens=MAX_NEW, do_sample=False,
                                    pad_token_id=pad_token_id, **kwargs)[0, len(row):].tolist()
            eos = model.generation_config.eos_token_id
            eos = {eos} if isinstance(eos, int) else set(eos or ())  # builtin:tiny has EOS and <|im_end|>
            end = next((k for k, t in enumerate(tokens) if t in eos), None)
            out.append(tokens[: end + 1] if end is not None else tokens)
    return out


def batched(model, rows: list[list[int]], pad_token_id: int) -> list[list[int]]:
    with torch.inference_mode():
        got = generation.generate_batch(model, rows, MAX_NEW, pad_token_id=pad_token_id, do_sample=False)
    return [t.tolist() for t in got]


@pytest.fixture
def calls(model, monkeypatch):
    """Counts of `model.generate` and `_prefill` calls (the real functions still run)."""
    counts = {"generate": 0, "prefill": 0}
    real_generate, real_prefill = model.generate, generation._prefill

    def generate(*args, **kwargs):
        counts["generate"] += 1
        return real_generate(*args, **kwargs)

    def prefill(*args, **kwargs):
        counts["prefill"] += 1
        return real_prefill(*args, **kwargs)

    monkeypatch.setattr(model, "generate", generate)
    monkeypatch.setattr(generation, "_prefill", prefill)
    return counts


def sorted_rows(tokenizer) -> list[list[int]]:
    return sorted(tokenizer(PROMPTS)["input_ids"], key=len)


@pytest.mark.parametrize("static", [True, False], ids=["static-cache", "dynamic-cache"])
def test_prefill_and_compaction_give_the_tokens_of_one_prompt_at_a_time(static, model, tokenizer, calls, monkeypatch):
    monkeypatch.setattr(generation, "_static_cache_pays", lambda model, device: static)
    rows = sorted_rows(tokenizer)
    expected = plain(model, rows, tokenizer.pad_token_id)
    lengths = {len(t) for t in expected}
    assert min(lengths) < MAX_NEW and MAX_NEW in lengths and len(lengths) >= 3  # answers end at different steps
    assert {len(r) for r in rows} != {len(rows[0])}  # prompts of different lengths

    calls.update(generate=0, prefill=0)
    assert batched(model, rows, tokenizer.pad_token_id) == expected
    assert calls["prefill"] == 1
    assert calls["generate"] >= 2  # compacted at least once


@pytest.mark.parametrize("trick", ["ragged_prefill", "compaction", "static_cache"])
def test_each_trick_switched_off_gives_the_same_tokens(trick, model, tokenizer, calls, monkeypatch):
    from transformers import StaticCache

    from loraflow.flavor import switches

    caches = []
    real_new_cache = generation._new_cache
    monkeypatch.setattr(generation, "_new_cache", lambda *a: caches.append(real_new_cache(*a)) or caches[-1])
    monkeypatch.setenv(switches.ENV, trick)
    rows = sorted_rows(tokenizer)
    expected = plain(model, rows, tokenizer.pad_token_id)
    calls.update(generate=0, prefill=0)
    assert batched(model, rows, tokenizer.pad_token_id) == expected
    off = {"ragged_prefill": calls["prefill"] == 0, "compaction": calls["generate"] == 1,
           "static_cache": not isinstance(caches[-1], StaticCache)}
    assert off[trick], calls
    assert calls["prefill"] == (trick != "ragged_prefill") and (calls["generate"] >= 2) == (trick != "compaction")


def test_a_batch_of_one_prompt_is_plain_generate(model, tokenizer, calls):
    rows = sorted_rows(tokenizer)[-1:]
    got = batched(model, rows, tokenizer.pad_token_id)
    assert calls == {"generate": 1, "prefill": 0}  # nothing to regroup
    assert got == plain(model, rows, tokenizer.pad_token_id)


def test_prompts_of_one_token_next_to_long_ones(model, tokenizer):
    """A one-token prompt has nothing to prefill: its cache rows stay padding."""
    long = sorted_rows(tokenizer)[-generation.PREFILL_ROWS:]
    rows = [[tokenizer.bos_token_id]] * 3 + long
    assert batched(model, rows, tokenizer.pad_token_id) == plain(model, rows, tokenizer.pad_token_id)



def test_settings_counted_from_the_call_start_turn_compaction_off(model, tokenizer, calls):
    """`min_new_tokens` counts from where a `generate` call starts: a second call would count anew."""
    model.generation_config.min_new_tokens = 5
    rows = sorted_rows(tokenizer)
    expected = plain(model, rows, tokenizer.pad_token_id)
    assert min(len(t) for t in expected) >= 5 and min(len(t) for t in expected) < MAX_NEW
    calls.update(generate=0)
    assert batched(model, rows, tokenizer.pad_token_id) == expected
    assert calls["generate"] == 1


def test_a_batch_stopped_by_another_setting_is_not_continued(model, tokenizer, calls):
    """`max_time` stops `generate` before any row ends: that is the answer, not a cue to go on."""
    model.generation_config.max_time = 1e-9
    rows = sorted_rows(tokenizer)
    got = batched(model, rows, tokenizer.pad_token_id)
    assert calls["generate"] == 1
    assert max(len(t) for t in got) < MAX_NEW


def test_without_an_eos_every_row_runs_to_max_new_tokens(model, tokenizer, calls):
    model.generation_config.eos_token_id = None
    rows = sorted_rows(tokenizer)
    got = batched(model, rows, tokenizer.pad_token_id)
    assert got == plain(model, rows, tokenizer.pad_token_id)
    assert {len(t) for t in got} == {MAX_NEW}


def test_sampling_with_a_seed_is_reproducible_and_the_seed_matters(model, tokenizer):
    def sample(seed):
        return generate_texts(model, tokenizer, PROMPTS, batch_size=8, max_new_tokens_cap=64,
                              max_new_tokens=MAX_NEW, do_sample=True, temperature=1.5, seed=seed)

    first = sample(1)
    assert sample(1) == first
    assert sample(2) != first


def test_texts_come_back_in_input_order_whatever_the_batch_size(model, tokenizer):
    rows = tokenizer(PROMPTS)["input_ids"]
    expected = tokenizer.batch_decode(plain(model, rows, tokenizer.pad_token_id), skip_special_tokens=True)
    for batch_size in (1, 5, len(PROMPTS)):
        got = generate_texts(model, tokenizer, PROMPTS, batch_size=batch_size, max_new_tokens_cap=64,
                             max_new_tokens=MAX_NEW)
        assert got == expected, batch_size


def test_a_sliding_window_model_is_generated_in_one_call(tokenizer, monkeypatch):
    """Sliding-window layers keep only the last positions: no prefill into them, no compaction."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=0, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    model = Qwen2ForCausalLM(config).to(torch.float64).eval()
    rows = sorted_rows(tokenizer)
    prefilled = []
    monkeypatch.setattr(generation, "_prefill", lambda *args: prefilled.append(args))
    assert batched(model, rows, tokenizer.pad_token_id) == plain(model, rows, tokenizer.pad_token_id)
    assert prefilled == []


def test_prefill_is_grouped_only_where_it_saves_padding():
    same = [[1] * 9] * 20
    assert not generation._prefill_pays(same)
    few = [[1] * n for n in range(2, 2 + generation.PREFILL_ROWS)]
    assert not generation._prefill_pays(few)  # one group: the same as all at once
    assert generation._prefill_pays([[1] * n for n in range(2, 30)])


def test_tokens_after_the_first_eos_are_dropped():
    eos = torch.tensor([2, 7])
    assert generation._until_eos(torch.tensor([5, 7, 0, 0]), eos).tolist() == [5, 7]
    assert generation._until_eos(torch.tensor([5, 6, 2, 7]), eos).tolist() == [5, 6, 2]
    assert generation._until_eos(torch.tensor([5, 6]), eos).tolist() == [5, 6]
    assert generation._until_eos(torch.tensor([5, 2]), None).tolist() == [5, 2]
