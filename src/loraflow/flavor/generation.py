"""Generating text for many prompts at once: what the pyfunc model's `predict` runs.

`generate` tokenizes every prompt once, checks that it fits the model's context, sorts the prompts
by length and generates `batch_size` of them together, left-padded; every token comes from
`model.generate`. Three tricks keep a batch from computing more than its prompts and answers need
(each can be turned off, `switches`; figures in benchmarks/bench_infer.py):

- **ragged prefill**: the prompts (all but their last token) run `PREFILL_ROWS` at a time, each
  group padded only to its own longest, into the batch's KV cache;
- **compaction**: once `COMPACT_FRACTION` of the live rows have finished, they leave the batch and
  its cache, and the rest continue from the cache;
- **static cache**: on CPU, a preallocated KV cache (`_static_cache_pays`).

They regroup the work only: the tokens are those of one `generate` call per batch (up to float
rounding). Models whose cache is not plain full attention, or whose generation config counts from
a call's start (`_COUNTED_FROM_CALL_START`), are generated in one call per batch.
"""

from __future__ import annotations

import difflib
import math
import numbers
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple

from transformers import StoppingCriteria

from loraflow.flavor.layout import MAX_SEED, invalid
from loraflow.flavor.switches import enabled

if TYPE_CHECKING:
    import torch
    from transformers import GenerationConfig, PreTrainedTokenizerBase
    from transformers.cache_utils import Cache

# Generation settings a request may pass as `params`; their defaults become the params schema.
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 64,
    "temperature": 1.0,
    "top_p": 1.0,
    "do_sample": False,
    "repetition_penalty": 1.0,
    "seed": 0,
}
# Prompts per prefill forward pass: enough for efficient matmuls, few enough for little padding.
PREFILL_ROWS = 8
# Compact a batch once this fraction of its live rows has finished.
COMPACT_FRACTION = 0.25
# Generation-config settings that count from a `generate` call's start: with one set, no compaction.
_COUNTED_FROM_CALL_START = ("min_new_tokens", "max_time", "stop_strings", "begin_suppress_tokens",
                            "exponential_decay_length_penalty")


def generation_settings(params: dict[str, Any] | None, *, max_new_tokens_cap: int) -> dict[str, Any]:
    """Merge `params` over the defaults and check every value; one error lists every problem."""
    import numpy as np
    params = dict(params or {})
    unknown = [k for k in params if k not in GENERATION_DEFAULTS]
    problems = []
    for key in unknown:
        close = difflib.get_close_matches(key, GENERATION_DEFAULTS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        problems.append(f"unknown param `{key}`{hint}; known: {sorted(GENERATION_DEFAULTS)}")
    s = {**GENERATION_DEFAULTS, **{k: v for k, v in params.items() if v is not None and k not in unknown}}

    def is_int(v: Any) -> bool:  # numpy integers too, as MLflow may pass them; never bools
        return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))

    def is_number(v: Any) -> bool:  # finite: NaN and infinity would reach torch's sampling
        return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_)) and math.isfinite(v)

    if not is_int(s["max_new_tokens"]) or not 0 < s["max_new_tokens"] <= max_new_tokens_cap:
        problems.append(
            f"`max_new_tokens` must be an integer in 1..{max_new_tokens_cap}, got {s['max_new_tokens']!r}"
        )
    if not is_number(s["temperature"]) or s["temperature"] <= 0:
        problems.append(f"`temperature` must be a number > 0, got {s['temperature']!r} (greedy: do_sample=false)")
    if not is_number(s["top_p"]) or not 0 < s["top_p"] <= 1:
        problems.append(f"`top_p` must be a number in (0, 1], got {s['top_p']!r}")
    if not is_number(s["repetition_penalty"]) or s["repetition_penalty"] <= 0:
        problems.append(f"`repetition_penalty` must be a number > 0, got {s['repetition_penalty']!r} (off: 1.0)")
    if not is_int(s["seed"]) or not 0 <= s["seed"] <= MAX_SEED:
        problems.append(f"`seed` must be an integer in 0..{MAX_SEED} (a 64-bit signed seed), got {s['seed']!r}")
    if isinstance(s["do_sample"], np.bool_):
        s["do_sample"] = bool(s["do_sample"])
    if not isinstance(s["do_sample"], bool):
        problems.append(f"`do_sample` must be true or false, got {s['do_sample']!r}")
    if problems:
        raise invalid("invalid generation params:\n" + "\n".join(f"  - {p}" for p in problems))
    return {**s, "max_new_tokens": int(s["max_new_tokens"]), "seed": int(s["seed"])}


def context_length(model: "torch.nn.Module", tokenizer: "PreTrainedTokenizerBase") -> int | None:
    """The longest sequence (prompt + generation) the model takes, when it says."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(value := getattr(config, key, None), int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**8 else None


class Generated(NamedTuple):
    """One prompt's generation: the text, and what an OpenAI-style response reports about it."""

    text: str
    """The generated text only (no prompt), special tokens removed."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated, the one that stopped generation included."""
    stopped: bool
    """True when an EOS or stop token ended it, False when it ran to `max_new_tokens`."""


def generate(
    model: "torch.nn.Module",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: list[str],
    *,
    batch_size: int,
    max_new_tokens_cap: int,
    stop_token_ids: list[int] | None = None,
    add_special_tokens: bool = True,
    **params: Any,
) -> list[Generated]:
    """Generate a continuation for each prompt, in input order: its text (without the prompt, up to
    the first EOS), its token counts and whether it stopped by itself.

    Args:
        params: generation settings (`GENERATION_DEFAULTS` keys).
        stop_token_ids: tokens that end a generation besides the model's EOS (a chat template's
            end-of-turn token).
        add_special_tokens: False for prompts a chat template rendered (it writes BOS itself).

    Raises:
        MlflowException: (INVALID_PARAMETER_VALUE) an invalid param, an empty prompt or one that
            does not fit the model's context with `max_new_tokens` more tokens.
    """
    import torch

    settings = generation_settings(params, max_new_tokens_cap=max_new_tokens_cap)
    encoded = tokenizer(prompts, add_special_tokens=add_special_tokens)["input_ids"]
    _check_lengths(encoded, settings["max_new_tokens"], context_length(model, tokenizer))
    kwargs: dict[str, Any] = {
        "do_sample": settings["do_sample"],
        "repetition_penalty": float(settings["repetition_penalty"]),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if settings["do_sample"]:  # passing these to greedy search only makes transformers warn
        kwargs.update(temperature=float(settings["temperature"]), top_p=float(settings["top_p"]))
    device = next(model.parameters()).device
    eos = _eos_ids(model.generation_config, device, stop_token_ids)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    results: list[Generated | None] = [None] * len(encoded)
    with torch.inference_mode(), _seeded(settings["seed"] if settings["do_sample"] else None, device):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            tokens = generate_batch(model, [encoded[i] for i in batch], settings["max_new_tokens"],
                                    stop_token_ids=stop_token_ids, **kwargs)
            for i, row, text in zip(batch, tokens, tokenizer.batch_decode(tokens, skip_special_tokens=True)):
                stopped = eos is not None and len(row) > 0 and bool(torch.isin(row[-1:], eos).any())
                results[i] = Generated(text, len(encoded[i]), len(row), stopped)
    return results  # type: ignore[return-value]  (every position is filled)


def _check_lengths(encoded: list[list[int]], max_new_tokens: int, limit: int | None) -> None:
    problems = []
    for i, ids in enumerate(encoded):
        if not ids:
            problems.append(f"prompt {i} is empty after tokenization")
        elif limit is not None and len(ids) + max_new_tokens > limit:
            problems.append(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} "
                f"that exceeds the model's context of {limit} tokens (shorten it or lower max_new_tokens)"
            )
    if problems:
        raise invalid("prompts that cannot be generated from:\n" + "\n".join(f"  - {p}" for p in problems[:10]))


def generate_batch(
    model: "torch.nn.Module", rows: list[list[int]], max_new_tokens: int, *,
    stop_token_ids: list[int] | None = None, **kwargs: Any
) -> list["torch.Tensor"]:
    """The generated token ids of each row of prompt ids, up to and including its first EOS (or
    stop token).

    `kwargs` go to `model.generate` (`pad_token_id` is required). Rows are best sorted by length.
    """
    device = next(model.parameters()).device
    input_ids, attention_mask = _left_pad(rows, kwargs["pad_token_id"], device)
    eos = _eos_ids(model.generation_config, device, stop_token_ids)
    if stop_token_ids:  # `generate` stops at these too
        kwargs["eos_token_id"] = eos.tolist()
    cache = _new_cache(model, device, input_ids.shape[1] + max_new_tokens)
    if not _plain_attention(cache):  # as one `generate` call; its own cache unless a static one pays
        passed = {"cache": cache} if _static_cache_pays(model, device) else {}
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask,
                                max_new_tokens=max_new_tokens, **passed, **kwargs)
        return [_until_eos(row, eos) for row in output[:, input_ids.shape[1]:]]
    if _prefill_pays(rows):
        _prefill(model, cache, rows, kwargs["pad_token_id"], device)
    compact = enabled("compaction") and eos is not None and _restartable(model.generation_config)
    return _decode(model, cache, input_ids, attention_mask, max_new_tokens, eos, compact, **kwargs)


def _decode(
    model: "torch.nn.Module",
    cache: "Cache",
    input_ids: "torch.Tensor",
    attention_mask: "torch.Tensor",
    max_new_tokens: int,
    eos: "torch.Tensor | None",
    compact: bool,
    **kwargs: Any,
) -> list["torch.Tensor"]:
    """`generate` from `cache` until every row is done; with `compact`, finished rows leave the batch."""
    import torch

    width = input_ids.shape[1]
    done: list[torch.Tensor | None] = [None] * len(input_ids)
    live = list(range(len(input_ids)))
    while True:
        stop = [_QuorumFinished(width, eos, _quorum(len(live)))] if compact and len(live) > 1 else []
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, cache=cache,
                                max_new_tokens=max_new_tokens - (input_ids.shape[1] - width),
                                stopping_criteria=stop, **kwargs)
        new = output[:, width:]
        finished = _finished(new, eos) | (new.shape[1] >= max_new_tokens)
        if not compact or not finished.any():  # stopped for another reason (a setting of the model's): done
            finished[:] = True
        for row, tokens, is_done in zip(live, new, finished.tolist()):
            if is_done:
                done[row] = _until_eos(tokens, eos)
        keep = (~finished).nonzero().flatten()
        if len(keep) == 0:
            return done  # type: ignore[return-value]  (every row is set once all are finished)
        cache.reorder_cache(keep)
        grown = attention_mask.new_ones((len(attention_mask), output.shape[1] - attention_mask.shape[1]))
        attention_mask = torch.cat([attention_mask, grown], dim=1)[keep]
        input_ids = output[keep]
        live = [live[j] for j in keep.tolist()]


def _quorum(live: int) -> int:
    return max(1, math.ceil(live * COMPACT_FRACTION))


def _finished(new_tokens: "torch.Tensor", eos: "torch.Tensor | None") -> "torch.Tensor":
    """Per row: has it generated an EOS? (rows that did are padded after it)."""
    import torch

    if eos is None:
        return torch.zeros(len(new_tokens), dtype=torch.bool, device=new_tokens.device)
    return torch.isin(new_tokens, eos).any(dim=-1)


def _until_eos(tokens: "torch.Tensor", eos: "torch.Tensor | None") -> "torch.Tensor":
    """A row's tokens up to and including its first EOS (what follows is padding)."""
    import torch

    if eos is None:
        return tokens
    hits = torch.isin(tokens, eos).nonzero()
    return tokens[: int(hits[0]) + 1] if len(hits) else tokens


def _eos_ids(config: "GenerationConfig", device: "torch.device",
             extra: list[int] | None = None) -> "torch.Tensor | None":
    """The ids that end a generation: the model's EOS, and `extra` stop tokens."""
    import torch

    eos = config.eos_token_id
    ids = ([] if eos is None else [eos] if isinstance(eos, int) else list(eos)) + list(extra or [])
    return torch.tensor(list(dict.fromkeys(ids)), device=device) if ids else None


def _restartable(config: "GenerationConfig") -> bool:
    """Whether a batch may be generated in several `generate` calls with the same tokens as in one."""
    single = (config.num_beams or 1) == 1 and (config.num_return_sequences or 1) == 1
    return single and not any(getattr(config, name, None) for name in _COUNTED_FROM_CALL_START)


class _QuorumFinished(StoppingCriteria):
    """A stopping criterion: stop every row once `quorum` rows have generated an EOS."""

    def __init__(self, width: int, eos: "torch.Tensor", quorum: int):
        self.width, self.eos, self.quorum = width, eos, quorum

    def __call__(self, input_ids: "torch.Tensor", scores: Any, **kwargs: Any) -> "torch.Tensor":
        finished = _finished(input_ids[:, self.width:], self.eos)
        return finished if int(finished.sum()) < self.quorum else finished.new_ones(finished.shape)


def _prefill_pays(rows: list[list[int]]) -> bool:
    """Whether prefilling `PREFILL_ROWS` at a time computes fewer padded positions than at once."""
    if not enabled("ragged_prefill"):
        return False
    longest = max(map(len, rows)) - 1
    grouped = sum(len(group) * (max(map(len, group)) - 1) for group in _groups(rows))
    return grouped < len(rows) * longest


def _groups(rows: list[list[int]]) -> list[list[list[int]]]:
    return [rows[start : start + PREFILL_ROWS] for start in range(0, len(rows), PREFILL_ROWS)]


def _prefill(model: "torch.nn.Module", cache: "Cache", rows: list[list[int]], pad_token_id: int,
             device: "torch.device") -> None:
    """Put the keys and values of every row's prompt but its last token into `cache`, left-padded,
    computed `PREFILL_ROWS` rows at a time."""
    width = max(map(len, rows)) - 1
    blocks: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: the batch's keys and values
    logits = _last_logits_only(model)
    start = 0
    for group in _groups(rows):
        heads = [row[:-1] for row in group]
        span = max(map(len, heads))
        if span:
            ids, mask = _left_pad(heads, pad_token_id, device)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as `generate` numbers left-padded rows
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **logits)
            for i, layer in enumerate(out.cache.layers):
                if i == len(blocks):
                    blocks.append(tuple(t.new_zeros((len(rows), t.shape[1], width, t.shape[3]))
                                        for t in (layer.keys, layer.values)))
                blocks[i][0][start : start + len(group), :, width - span:] = layer.keys
                blocks[i][1][start : start + len(group), :, width - span:] = layer.values
        start += len(group)
    for i, (keys, values) in enumerate(blocks):
        cache.update(keys, values, i)


def _last_logits_only(model: "torch.nn.Module") -> dict[str, int]:
    """Prefill needs no logits: where the model can, compute them for one position only."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(base.forward).parameters else {}


def _left_pad(rows: list[list[int]], pad_id: int, device: "torch.device") -> tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


@contextmanager
def _seeded(seed: int | None, device: "torch.device") -> Iterator[None]:
    """Seed torch for one sampling call without changing the caller's random state."""
    import torch

    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _new_cache(model: "torch.nn.Module", device: "torch.device", length: int) -> "Cache":
    """A fresh KV cache for one batch: static (`length` positions) where `_static_cache_pays`, else dynamic."""
    from transformers import DynamicCache, StaticCache

    config = model.config.get_text_config(decoder=True)
    if _static_cache_pays(model, device):
        return StaticCache(config=config, max_cache_len=length)
    return DynamicCache(config=config)


def _plain_attention(cache: "Cache") -> bool:
    """Whether every layer of `cache` is plain full attention (keys and values per position)."""
    from transformers.cache_utils import DynamicLayer, StaticLayer

    return all(type(layer) in (DynamicLayer, StaticLayer) for layer in cache.layers)


def _static_cache_pays(model: "torch.nn.Module", device: "torch.device") -> bool:
    """Generate with a static KV cache: on CPU (a dynamic one concatenates at every token), for models
    that support one; not on GPUs, where transformers compiles the model for a static cache."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return device.type == "cpu" and enabled("static_cache") and bool(getattr(base, "_can_compile_fullgraph", False))
