"""Fixtures of the flavor tests: a LoRA model, a saved model, artifacts in tmp_path and the CPU only."""

from __future__ import annotations

import pytest
import torch
from model_helpers import make_peft_model

from loraflow import flavor
from loraflow.flavor import fingerprint


@pytest.fixture
def peft_model(tiny_model):
    return make_peft_model(tiny_model)


@pytest.fixture(autouse=True)
def _artifacts_in_tmp_and_cpu_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a sqlite store puts artifacts under ./mlruns: keep them out of the repo
    # pyfunc picks CUDA when it can; exactness is compared against the in-memory model on the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(fingerprint, "_digest_cache_dir", lambda: tmp_path / "digest-cache")


@pytest.fixture
def saved(tmp_path, peft_model, tiny_tokenizer):
    path = tmp_path / "model"
    flavor.save_model(peft_model, path, tiny_tokenizer, base_model="builtin:tiny")
    return path
