"""LoRA dropout on CPU with the distribution of `nn.Dropout` and masks drawn in under half the time.

peft applies `nn.Dropout(lora_dropout)` to the input of every adapted layer, so each training
step draws one random number per input element per adapted module; on CPU, `nn.Dropout`'s
`bernoulli_` costs more than the LoRA matmuls it feeds (benchmarks/bench_train.py).

`CpuDropout` draws 32 random bits per element as int64 words (`random_` over the whole int64
range), keeps an element when its bits are at least `p * 2**32` above the bottom of the int32
range (exact up to p's rounding to a multiple of 2**-32, finer than float32 resolution), and
applies mask and scale in one op whose gradient is the same op, so autograd keeps only the
1-byte mask, as `nn.Dropout` does.

Only the training loop uses it (`on_cpu`), and only on CPU: CUDA's dropout is a fused kernel already.
Masks come from torch's default CPU generator, so `set_seed` and a checkpoint's RNG state reproduce
them exactly. Afterwards the model has peft's own `nn.Dropout` modules back.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

_INT32_MIN = -(2**31)


def keep_mask(shape: torch.Size | tuple[int, ...], p: float) -> torch.Tensor:
    """A bool tensor of `shape`, each element independently True with probability 1 - p.

    p is rounded to the nearest multiple of 2**-32; draws come from torch's default CPU generator.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability must be in [0, 1], got {p}")
    count = math.prod(shape)
    words = torch.empty((count + 1) // 2, dtype=torch.int64).random_(-(2**63), None)  # all 64 bits random
    shares = words.view(torch.int32)[:count]
    threshold = _INT32_MIN + round(p * 2**32)  # P(share < threshold) = p
    if threshold > torch.iinfo(torch.int32).max:  # p == 1: drop everything
        return torch.zeros(shape, dtype=torch.bool)
    return (shares >= threshold).view(shape)


class CpuDropout(nn.Module):
    """`nn.Dropout(p)` with cheaper random draws on CPU; elsewhere, or when evaluating, the same op."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"CpuDropout needs 0 <= p < 1, got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0 or x.device.type != "cpu":
            return F.dropout(x, self.p, self.training)
        # x * keep / (1 - p) in one pass; autograd's rule for this op applies the same mask and scale
        return torch.ops.aten.native_dropout_backward(x, keep_mask(x.shape, self.p), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


@contextmanager
def on_cpu(model: nn.Module) -> Iterator[int]:
    """While inside, peft's LoRA dropout modules (`nn.Dropout`, 0 < p < 1) of `model` are
    `CpuDropout`s; yields how many were swapped. peft's modules are put back on exit."""
    swapped: list[tuple[nn.ModuleDict, str, nn.Dropout]] = []
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is nn.Dropout and 0.0 < dropout.p < 1.0:
                fast = CpuDropout(dropout.p)
                fast.train(dropout.training)
                dropouts[name] = fast
                swapped.append((dropouts, name, dropout))
    try:
        yield len(swapped)
    finally:
        for dropouts, name, original in swapped:
            original.train(dropouts[name].training)
            dropouts[name] = original
