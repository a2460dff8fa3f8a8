"""Tests for loraflow.builtin: the offline `builtin:tiny` base model is reproducible and usable."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import independent_tiny_dir

from loraflow.builtin import VOCAB_SIZE, build_tiny
from loraflow.flavor.bases import builtin_dir as builtin_path
from loraflow.flavor.bases import is_builtin

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_fresh_build_is_byte_identical_to_the_cached_one(tiny_path, tmp_path, tmp_path_factory):
    """Two builds of the recipe give the same bytes, so a base's fingerprint holds across rebuilds. The
    fresh one is built here, or was built by another pytest-xdist worker while the cached one was
    (`conftest._independent_tiny_build`, on an empty cache)."""
    fresh = independent_tiny_dir(tmp_path_factory)
    if fresh is None or not (fresh / "config.json").is_file():
        fresh = tmp_path / "tiny"
        fresh.mkdir()
        build_tiny(fresh)
    cached = Path(tiny_path)
    assert fresh != cached
    weights = sorted(p.name for p in cached.glob("*.safetensors"))
    assert weights == sorted(p.name for p in fresh.glob("*.safetensors")) == ["model.safetensors"]
    for name in weights + ["tokenizer.json"]:
        assert sha256(fresh / name) == sha256(cached / name), name
    assert json.loads((fresh / "config.json").read_text()) == json.loads((cached / "config.json").read_text())


def test_processes_that_ask_at_once_wait_for_one_build(tmp_path, monkeypatch):
    """Two callers on an empty cache (torchrun's processes, a second terminal): one builds, the other
    waits for it and gets the same folder, instead of building a second time."""
    import threading
    import time

    from loraflow import builtin

    builds = []

    def slow_build(name: str, out_dir: Path) -> None:
        builds.append(name)
        time.sleep(0.5)  # long enough for the second caller to arrive while the first builds
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setenv("LORAFLOW_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(builtin, "build", slow_build)
    results: list[Path] = []
    callers = [threading.Thread(target=lambda: results.append(builtin_path("builtin:tiny"))) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert builds == ["tiny"]
    assert results[0] == results[1] and (results[0] / "config.json").is_file()


def test_it_is_a_small_tied_llama_with_every_projection(tiny_model):
    from transformers import LlamaForCausalLM

    assert isinstance(tiny_model, LlamaForCausalLM)
    assert tiny_model.config.num_hidden_layers == 2
    assert tiny_model.config.tie_word_embeddings is True
    assert tiny_model.lm_head.weight is tiny_model.model.embed_tokens.weight
    short_names = {name.rsplit(".", 1)[-1] for name, _ in tiny_model.named_modules()}
    assert set(PROJECTIONS) <= short_names
    assert tiny_model.config.vocab_size == tiny_model.lm_head.out_features


def test_the_tokenizer_round_trips_text(tiny_tokenizer):
    text = "The capital of France is Paris. LoRA adapts q_proj and v_proj!"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert 0 < len(ids) < len(text)  # a real BPE merges characters
    assert tiny_tokenizer.decode(ids) == text
    with_special = tiny_tokenizer(text)["input_ids"]
    assert with_special[0] == tiny_tokenizer.bos_token_id
    assert tiny_tokenizer.pad_token is not None and tiny_tokenizer.eos_token is not None
    assert len(tiny_tokenizer) <= VOCAB_SIZE


def test_the_model_has_learned_its_corpus(tiny_model, tiny_tokenizer):
    """Pre-training made it much better than uniform guessing over the vocabulary."""
    import math

    import torch

    from loraflow.builtin import RESOURCES

    line = next(l for l in (RESOURCES / "corpus.txt").read_text(encoding="utf-8").splitlines() if len(l) > 40)
    batch = tiny_tokenizer(line, return_tensors="pt")
    with torch.no_grad():
        loss = tiny_model(**batch, labels=batch["input_ids"]).loss.item()
    assert loss < 0.5 * math.log(len(tiny_tokenizer))


def test_builtin_names():
    assert is_builtin("builtin:tiny") and not is_builtin("meta-llama/Llama-3.2-1B")
    with pytest.raises(ValueError, match="builtin:huge.*builtin:tiny"):
        builtin_path("builtin:huge")


def test_the_tokenizer_has_chatml_turn_tokens_and_template(tiny_tokenizer, tiny_model):
    messages = [
        {"role": "system", "content": "Reply with a single sentence."},
        {"role": "user", "content": "What does a duck say?"},
        {"role": "assistant", "content": "A duck says quack."},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tokenize=False)
    assert text == (
        "<|im_start|>system\nReply with a single sentence.<|im_end|>\n"
        "<|im_start|>user\nWhat does a duck say?<|im_end|>\n"
        "<|im_start|>assistant\nA duck says quack.<|im_end|>\n"
    )
    prompt = tiny_tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nWhat does a duck say?<|im_end|>\n<|im_start|>assistant\n")
    for marker in ("<|im_start|>", "<|im_end|>"):
        ids = tiny_tokenizer(marker, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and marker in tiny_tokenizer.all_special_tokens, marker
    end_of_turn = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn != tiny_tokenizer.eos_token_id
    # generation stops at EOS (plain text) and at the end of a turn (chat)
    assert set(tiny_model.generation_config.eos_token_id) == {tiny_tokenizer.eos_token_id, end_of_turn}
