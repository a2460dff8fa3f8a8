"""LoRA dropout on CPU: nn.Dropout's distribution and gradient, swapped in for training only."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from loraflow import dropout
from loraflow.lora import apply_lora

N = 1 << 21


def assert_fraction(mask: torch.Tensor, expected: float) -> None:
    """The share of True in `mask` is within 6 standard deviations of a Bernoulli(expected) draw."""
    n = mask.numel()
    sigma = math.sqrt(expected * (1 - expected) / n)
    assert abs(float(mask.float().mean()) - expected) <= 6 * sigma + 1e-12


@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_keep_mask_keeps_each_element_with_probability_one_minus_p(p):
    torch.manual_seed(0)
    mask = dropout.keep_mask((N,), p)
    assert mask.dtype == torch.bool and mask.shape == (N,)
    assert_fraction(mask, 1 - p)
    # both 32-bit halves of every 64-bit draw are used, and each is uniform on its own
    assert_fraction(mask[0::2], 1 - p)
    assert_fraction(mask[1::2], 1 - p)


def test_keep_mask_halves_of_a_draw_are_independent():
    torch.manual_seed(1)
    mask = dropout.keep_mask((N,), 0.5)
    pairs = mask.view(-1, 2)
    assert_fraction(pairs[:, 0] & pairs[:, 1], 0.25)


def test_keep_mask_edges_and_odd_sizes():
    assert bool(dropout.keep_mask((7, 3), 0.0).all())
    assert not bool(dropout.keep_mask((5,), 1.0).any())
    assert dropout.keep_mask((3, 5, 7), 0.1).shape == (3, 5, 7)
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        dropout.keep_mask((4,), 1.5)


def test_keep_mask_follows_the_seed():
    torch.manual_seed(3)
    first = dropout.keep_mask((1000,), 0.2)
    torch.manual_seed(3)
    assert torch.equal(first, dropout.keep_mask((1000,), 0.2))
    assert not torch.equal(first, dropout.keep_mask((1000,), 0.2))


def test_cpu_dropout_zeroes_and_rescales_like_nn_dropout_and_so_does_its_gradient():
    torch.manual_seed(0)
    x = (torch.rand(64, 512) + 0.5).requires_grad_()  # no zeros, so a zero output means dropped
    layer = dropout.CpuDropout(0.25).train()
    out = layer(x)
    kept = out != 0
    assert_fraction(kept, 0.75)
    assert torch.allclose(out[kept], x.detach()[kept] / 0.75)
    out.backward(torch.full_like(out, 2.0))
    assert torch.allclose(x.grad, kept.float() * 2.0 / 0.75)


def test_cpu_dropout_is_the_identity_when_evaluating():
    x = torch.randn(8, 16)
    assert torch.equal(dropout.CpuDropout(0.5).eval()(x), x)
    with pytest.raises(ValueError, match="0 <= p < 1, got 1.0"):
        dropout.CpuDropout(1.0)


def lora_dropouts(model: nn.Module) -> list[nn.Module]:
    return [d for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.ModuleDict)
            for d in m.lora_dropout.values()]


def test_on_cpu_swaps_peft_dropouts_for_the_block_and_puts_them_back(model):
    peft_model = apply_lora(model, {"r": 4, "lora_dropout": 0.1, "target_modules": ["q_proj", "v_proj"]})
    originals = lora_dropouts(peft_model)
    assert originals and all(type(d) is nn.Dropout for d in originals)
    peft_model.train()
    with pytest.raises(RuntimeError, match="boom"):
        with dropout.on_cpu(peft_model) as swapped:
            assert swapped == len(originals)
            assert all(isinstance(d, dropout.CpuDropout) and d.p == 0.1 and d.training for d in lora_dropouts(peft_model))
            peft_model.eval()  # a mode change inside reaches the originals too
            raise RuntimeError("boom")
    restored = lora_dropouts(peft_model)
    assert all(a is b for a, b in zip(restored, originals)) and len(restored) == len(originals)
    assert not any(d.training for d in restored)


def test_on_cpu_leaves_a_model_without_lora_dropout_alone(model):
    peft_model = apply_lora(model, {"r": 4, "lora_dropout": 0.0, "target_modules": ["q_proj"]})
    with dropout.on_cpu(peft_model) as swapped:
        assert swapped == 0
        assert all(isinstance(d, nn.Identity) for d in lora_dropouts(peft_model))


def test_training_on_cpu_draws_its_lora_dropout_masks_with_cpu_dropout(tracking_uri, monkeypatch):
    from loraflow.config import parse_settings
    from loraflow.train import run_training

    calls = []
    forward = dropout.CpuDropout.forward

    def counted(self, x):
        calls.append(self.training)
        return forward(self, x)

    monkeypatch.setattr(dropout.CpuDropout, "forward", counted)
    raw = {"max_steps": "2", "eval_steps": "2", "batch_size": "4", "r": "4", "lora_dropout": "0.1"}
    lora, settings = parse_settings(raw)
    result = run_training(lora, settings, explicit=set(raw))
    assert result.ok
    assert True in calls  # the training steps went through CpuDropout
