"""Off switches of the shipped code's speed tricks (`loraflow.flavor.switches`); generation's are
tested in test_generation.py, the digest cache's in test_fingerprint.py."""

from __future__ import annotations

import pytest
import torch

from loraflow.flavor import bases, switches
from model_helpers import PROMPTS


def test_every_trick_is_on_unless_named_or_all(monkeypatch):
    monkeypatch.delenv(switches.ENV, raising=False)
    assert all(switches.enabled(name) for name in switches.TRICKS)
    monkeypatch.setenv(switches.ENV, "compaction, pread_load")
    assert [n for n in switches.TRICKS if not switches.enabled(n)] == ["compaction", "pread_load"]
    monkeypatch.setenv(switches.ENV, "all")
    assert not any(switches.enabled(name) for name in switches.TRICKS)


def test_the_shipped_switches_are_in_the_one_list_of_tricks():
    from loraflow import speed

    assert set(switches.TRICKS) <= set(speed.TRICKS) and speed.ENV == switches.ENV


def test_a_quantized_load_without_pread_gives_the_same_logits(monkeypatch):
    pytest.importorskip("bitsandbytes")
    from loraflow.base_models import load_for_training

    def logits() -> torch.Tensor:
        model, tokenizer = load_for_training("builtin:tiny", quantization="nf4", precision="fp32")
        batch = tokenizer(PROMPTS, padding=True, return_tensors="pt")
        with torch.no_grad():
            return model.eval()(**batch).logits

    pread = []
    real = bases._load_quantized
    monkeypatch.setattr(bases, "_load_quantized", lambda *a: pread.append(a) or real(*a))
    fast = logits()
    monkeypatch.setenv(switches.ENV, "pread_load")
    plain = logits()
    assert len(pread) == 1  # only the first load read with pread
    assert torch.equal(fast, plain)
