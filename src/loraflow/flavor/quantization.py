"""A quantized base (QLoRA, https://arxiv.org/abs/2305.14314) loaded through bitsandbytes, as its record says.

A model trained on a quantized base stores the *unquantized* base and a plain record in its flavor
config (`quantization`), e.g. `{"method": "nf4", "compute_dtype": "float32", "double_quant": true}`;
`bnb_config` rebuilds transformers' `BitsAndBytesConfig` from it, so the base is quantized again at
load exactly as it was for training. bitsandbytes is optional (`pip install 'loraflow[quantization]'`).
Training's side (the record of a run, preparing the base) is `trainable`'s.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import BitsAndBytesConfig, PreTrainedModel

QUANTIZATIONS = ("none", "nf4", "fp4", "int8")
INSTALL_HINT = "pip install 'loraflow[quantization]'"

# Lines nobody can act on: the optional Hub kernel bitsandbytes tries on import on a CPU with
# AVX512-BF16 (its failure, and `kernels` skipping its publisher check when the Hub is offline), and
# the int8 matmul announcing its fp16 cast on every forward (how LLM.int8() works).
_BNB_KERNEL = "kernels-community/quantization-bitsandbytes"
_QUIET = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
          ("kernels._internals.hf_hub", f"Skipping publisher trust check for '{_BNB_KERNEL}'"),
          ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"))


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_bitsandbytes() -> None:
    """Attach the filters to bitsandbytes' loggers (once). Importing loraflow calls it, and so does
    the pyfunc loader where only the shipped code is importable: peft imports bitsandbytes whenever it
    is installed, quantized model or not."""
    for name, prefix in _QUIET:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in log.filters):
            log.addFilter(_DropMessage(prefix))


def bitsandbytes_problem() -> str | None:
    """Why quantization cannot run here (bitsandbytes missing or broken, with the fix), or None."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a broken native library
        return f"needs bitsandbytes, which cannot be imported here ({err}): {INSTALL_HINT}"
    return None


def bnb_config(record: dict[str, Any]) -> "BitsAndBytesConfig":
    """transformers' `BitsAndBytesConfig` for a record (`trainable.quantization_record`)."""
    import torch
    from transformers import BitsAndBytesConfig

    if record["method"] == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=record["method"],
        bnb_4bit_use_double_quant=bool(record.get("double_quant", True)),
        bnb_4bit_compute_dtype=getattr(torch, record.get("compute_dtype", "float32")),
    )


def load_kwargs(record: dict[str, Any], device: "str | torch.device | None" = None) -> dict[str, Any]:
    """`from_pretrained` arguments that quantize the base as `record` says, on `device` (default: the
    first GPU, else the CPU). A quantized model is placed by `from_pretrained` and never moved.

    Raises:
        ImportError: bitsandbytes is missing (the message names the extra to install).
    """
    import torch

    if problem := bitsandbytes_problem():
        raise ImportError(f"{record['method']} quantization {problem}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return {"quantization_config": bnb_config(record), "device_map": {"": device}}


def keep_trainable_layout(model: "PreTrainedModel") -> "PreTrainedModel":
    """Keep bitsandbytes' 4-bit layers in one layout on the CPU, so the model that serves computes as
    the one that trained.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit`'s weight at its first no-grad
    eval forward into a bf16 layout with no backward, and never packs it back
    (tests/flavor/test_quantization.py shows training after it going wrong).
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def own_unquantized_tensors(model: "PreTrainedModel") -> "PreTrainedModel":
    """Copy the CPU tensors bitsandbytes left unquantized (embeddings, norms) out of the mapped
    checkpoint file, which otherwise stays resident while the model lives (benchmarks/bench_qlora.py)."""
    seen: set[int] = set()
    for param in model.parameters():
        if type(param).__name__ == "Parameter" and param.device.type == "cpu" and id(param) not in seen:
            seen.add(id(param))  # a tied matrix is one Parameter: copied once
            param.data = param.data.clone()
    return model


@contextlib.contextmanager
def dequantizing() -> Iterator[None]:
    """Around transformers' `dequantize`: its note of the dtype it dequantizes in is dropped."""
    log = logging.getLogger("transformers.integrations.bitsandbytes")
    note = _DropMessage("The modules are dequantized in")
    log.addFilter(note)
    try:
        yield
    finally:
        log.removeFilter(note)
