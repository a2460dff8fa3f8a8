"""Giving glibc's kept heap back during quantized CPU training (`loraflow.heap`, `loraflow.speed.heap_trim`)."""

from __future__ import annotations

import platform

import pytest
import torch

from loraflow.base_models import load_for_training
from loraflow.config import lora_settings
from loraflow import heap, speed
from loraflow.lora import apply_lora
from model_helpers import PROMPTS


class CountingTrim:
    """Stands in for `malloc_trim`: counts its calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, pad: int) -> int:
        self.calls.append(pad)
        return 1


def nf4_lora(monkeypatch, trim):
    """LoRA on the built-in base in nf4, loaded with `heap.malloc_trim` returning `trim`."""
    pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(heap, "malloc_trim", lambda: trim)
    base, tokenizer = load_for_training("builtin:tiny", quantization="nf4", precision="fp32")
    return apply_lora(base, lora_settings(r=4, lora_dropout=0.0, target_modules="q_proj,v_proj")), tokenizer


def test_quantized_cpu_training_and_evaluation_trim_after_every_layer_but_one_token_steps_do_not(monkeypatch):
    trim = CountingTrim()
    model, tokenizer = nf4_lora(monkeypatch, trim)
    layers = model.config.num_hidden_layers
    assert len(heap.decoder_layers(model)) == layers
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with speed.heap_trim(model) as hooked:
        assert hooked == layers
        model.train()
        model(**batch, labels=batch["input_ids"]).loss.backward()
        assert trim.calls == [0] * layers
        model.eval()
        with torch.no_grad():
            model(**batch)  # evaluation is trimmed
            assert trim.calls == [0] * (2 * layers)
            model.generate(**batch, max_new_tokens=4, do_sample=False)
        assert trim.calls == [0] * (3 * layers)  # the prompt's forward only, not the one-token steps
    with torch.no_grad():
        model(**batch)
    assert trim.calls == [0] * (3 * layers)  # the hooks left with the run
    assert all(not layer._forward_hooks for layer in heap.decoder_layers(model))


def test_a_quantized_model_prepared_for_training_carries_no_hook(monkeypatch):
    model, _ = nf4_lora(monkeypatch, CountingTrim())
    assert all(not layer._forward_hooks for layer in heap.decoder_layers(model))


def test_the_switch_turns_trimming_off(monkeypatch):
    model, _ = nf4_lora(monkeypatch, CountingTrim())
    monkeypatch.setenv(speed.ENV, "heap_trim")
    with speed.heap_trim(model) as hooked:
        assert hooked == 0 and all(not layer._forward_hooks for layer in heap.decoder_layers(model))


def test_trimming_leaves_the_logits_and_gradients_bit_identical(monkeypatch):
    def logits_and_grads(trim):
        torch.manual_seed(0)
        model, tokenizer = nf4_lora(monkeypatch, trim)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.fill_(0.01)
        batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        model.train()
        with speed.heap_trim(model) as hooked:
            assert hooked == (model.config.num_hidden_layers if trim else 0)
            out = model(**batch, labels=batch["input_ids"])
            out.loss.backward()
        grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        return out.logits.detach(), grads

    trimmed, trimmed_grads = logits_and_grads(CountingTrim())
    untrimmed, untrimmed_grads = logits_and_grads(None)
    assert torch.equal(trimmed, untrimmed)
    assert all(torch.equal(a, b) for a, b in zip(trimmed_grads, untrimmed_grads, strict=True))


def test_an_unquantized_base_is_not_trimmed(monkeypatch):
    trim = CountingTrim()
    monkeypatch.setattr(heap, "malloc_trim", lambda: trim)
    base, tokenizer = load_for_training("builtin:tiny")
    batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
    with speed.heap_trim(base) as hooked:
        base(**batch)
    assert hooked == 0 and trim.calls == []


def test_without_malloc_trim_nothing_is_hooked(monkeypatch):
    model, _ = nf4_lora(monkeypatch, None)
    assert heap.trim_after_each_layer(model) == []
    assert all(not layer._forward_hooks for layer in heap.decoder_layers(model))


def test_a_model_that_names_no_repeated_block_has_no_decoder_layers():
    assert heap.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2))) == []


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_on_glibc_malloc_trim_is_found_and_runs():
    trim = heap.malloc_trim()
    assert trim is not None
    assert trim(0) in (0, 1)  # 1: memory was given back, 0: there was none to give
