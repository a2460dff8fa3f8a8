"""Models saved by earlier loraflow versions still load, with the same outputs.

`tests/fixtures/model-v1` was saved by loraflow at commit 83688db (before the flavor became a
package); `model-v1.expected.json` holds what that code generated and computed from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
import torch

from loraflow import flavor

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"


@pytest.fixture
def old_model(tmp_path) -> tuple[Path, dict]:
    import shutil

    copy = tmp_path / "model-v1"
    shutil.copytree(FIXTURES / "model-v1", copy)  # loading never writes, but a test must not risk the fixture
    return copy, json.loads((FIXTURES / "model-v1.expected.json").read_text())


def test_a_model_saved_before_the_flavor_package_loads_natively_with_the_same_logits(old_model):
    path, expected = old_model
    model, tokenizer = flavor.load_model(str(path))
    with torch.no_grad():
        last = model(**tokenizer(expected["prompt"], return_tensors="pt")).logits[0, -1]
    assert last[:32].tolist() == pytest.approx(expected["last_logits"], abs=1e-6)
    assert float(last.double().sum()) == pytest.approx(expected["last_logits_sum"], abs=1e-4)


def test_a_model_saved_before_the_flavor_package_generates_the_same_text_through_pyfunc(old_model):
    path, expected = old_model
    out = mlflow.pyfunc.load_model(str(path)).predict([expected["prompt"]],
                                                       params={"max_new_tokens": expected["max_new_tokens"]})
    assert out["text"].tolist() == [expected["greedy_text"]]


def test_a_model_saved_before_the_flavor_package_reloads_trainable(old_model):
    path, _ = old_model
    model, _ = flavor.load_model(str(path), is_trainable=True)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
