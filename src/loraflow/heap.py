"""Giving glibc's kept heap back to the system while a quantized model trains on the CPU.

Training-only: `loraflow.speed.heap_trim` installs the hooks for a run and removes them after it.

On the CPU, bitsandbytes dequantizes every quantized weight into a new full-precision buffer on each
matmul: three times per weight and step with gradient checkpointing (forward, recompute, backward).
glibc serves buffers of that size from its heap, and small tensors that live on (the layer outputs
checkpointing keeps, the adapter's gradients) land between the freed ones, so the heap cannot
shrink: it keeps pages nobody uses. `malloc_trim(0)` hands those pages back.

It lowers a quantized run's peak RSS for some of its speed (trading the two is measured by
`benchmarks/bench_qlora.py`): the pages given back are faulted in again by the next layer.

On a GPU none of this applies: PyTorch's CUDA allocator caches its blocks, and the weights are not
on the heap. Other C libraries (musl) have no `malloc_trim`; there nothing is done.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel


@functools.cache
def malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none. Looked up among the symbols the
    process has loaded already (`CDLL(None)`), which holds the C library: `find_library` would run
    `ldconfig` in a subprocess."""
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)
    except (OSError, TypeError):  # no dlopen(NULL), e.g. on Windows
        return None


def decoder_layers(model: "PreTrainedModel") -> list:
    """The model's repeated blocks: modules of the classes transformers keeps whole on one device
    (`_no_split_modules`, e.g. `Qwen2DecoderLayer`); empty when the model names none."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    return [module for module in model.modules() if type(module).__name__ in names]


def trim_after_each_layer(model: "PreTrainedModel") -> list["torch.utils.hooks.RemovableHandle"]:
    """On the CPU, call `malloc_trim(0)` after each decoder layer's forward; the hooks' handles
    (none on a GPU or without glibc), for the caller to remove.

    Evaluation is trimmed too (untrimmed, it held the heap up to the run's peak). Generating one
    token at a time is not: each step would give back and fault in every dequantized weight again.
    Checkpointing recomputes a layer by calling its `forward`, which runs no hooks, so the backward
    pass is not trimmed.
    """
    trim = malloc_trim()
    if trim is None or model.device.type != "cpu":
        return []

    def after_forward(layer: "torch.nn.Module", args: tuple, kwargs: dict, output: object) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        if layer.training or getattr(hidden, "ndim", 0) < 2 or hidden.shape[-2] > 1:  # not a one-token step
            trim(0)
        # returns None: a value returned by a forward hook replaces the layer's output

    return [layer.register_forward_hook(after_forward, with_kwargs=True) for layer in decoder_layers(model)]
