"""Quantizing the frozen base through bitsandbytes (QLoRA): the one recipe training and loading share.

QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) trains a LoRA adapter on a base
whose frozen weights are quantized: NF4 (or FP4) with double quantization of the scales, computing
in 16 or 32 bits; LLM.int8() is the 8-bit variant. A quantized model is described by a small plain
record, stored in the flavor config (`quantization`):

    {"method": "nf4", "compute_dtype": "float32", "double_quant": true}

`bnb_config` rebuilds transformers' `BitsAndBytesConfig` from it, so a saved model holds the
*unquantized* base and is quantized again at load exactly as it was for training. bitsandbytes is
optional (`pip install 'loraflow[quantization]'`); `bitsandbytes_problem` says when it is missing.

Two lines bitsandbytes 0.50 logs that nobody can act on are dropped here, and only those: on a CPU
with AVX512-BF16 it tries an optional Hub kernel when imported ("Failed to load CPU
gemm_4bit_forward from kernels-community"), and the int8 matmul announces on every forward that it
casts its fp32 inputs to fp16 ("MatMul8bitLt: inputs will be cast"), which is how LLM.int8() works.
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
EXTRA = "loraflow[quantization]"
INSTALL_HINT = f"pip install '{EXTRA}'"
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}

# (logger, start of the message) of the bitsandbytes lines dropped, see the module docstring
_QUIET = (("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
          ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast"))


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefix)


def quiet_bitsandbytes() -> None:
    """Attach the two filters to bitsandbytes' loggers (once). `import loraflow` calls it: peft imports
    bitsandbytes whenever it is installed, so the kernel line would come with every run, quantized or not."""
    for name, prefix in _QUIET:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropMessage) and f.prefix == prefix for f in log.filters):
            log.addFilter(_DropMessage(prefix))


def bitsandbytes_problem() -> str | None:
    """Why quantization cannot run here (bitsandbytes missing or broken, with the fix), or None."""
    quiet_bitsandbytes()  # before the import, which may log the kernel line
    try:
        import bitsandbytes  # noqa: F401
    except Exception as err:  # ImportError, or a broken native library
        return f"needs bitsandbytes, which cannot be imported here ({err}): {INSTALL_HINT}"
    return None


def compute_dtype(precision: str) -> str:
    """The dtype quantized layers compute in: `precision`'s on this machine (`loraflow.flavor.dtypes`;
    auto: bf16 where CUDA has it, fp16 on an older GPU, else fp32)."""
    from loraflow.flavor.dtypes import device_facts, plan_dtypes

    try:
        return plan_dtypes(precision, device_facts()).compute
    except ValueError:  # refused for training (fp16 on a CPU): training reports it; the record keeps the name
        return PRECISION_DTYPES[precision]


def quantization_record(method: str, precision: str = "auto") -> dict[str, Any] | None:
    """The plain record of a quantization (None for `none`): what the flavor config stores."""
    if method == "none":
        return None
    if method not in QUANTIZATIONS:
        raise ValueError(f"unknown quantization {method!r}; known: {', '.join(QUANTIZATIONS)}")
    if method == "int8":
        return {"method": method}
    return {"method": method, "compute_dtype": compute_dtype(precision), "double_quant": True}


def bnb_config(record: dict[str, Any]) -> "BitsAndBytesConfig":
    """transformers' `BitsAndBytesConfig` for a record (`quantization_record`)."""
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
    """`from_pretrained` arguments that quantize the base as `record` says, on `device`.

    A quantized model is placed by `from_pretrained` (`device_map`), never moved afterwards: the
    quantization happens on the device that computes. Default device: the first GPU, else the CPU.

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


def record_of(model: "PreTrainedModel") -> dict[str, Any] | None:
    """The record of a model quantized by bitsandbytes (as `quantization_record` builds it), else None."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if config is None or str(getattr(config, "quant_method", "")).split(".")[-1].lower() not in (
            "bitsandbytes", "bits_and_bytes"):
        return None
    if config.load_in_8bit:
        return {"method": "int8"}
    dtype = config.bnb_4bit_compute_dtype
    return {"method": config.bnb_4bit_quant_type, "compute_dtype": str(dtype).removeprefix("torch."),
            "double_quant": bool(config.bnb_4bit_use_double_quant)}


def keep_trainable_layout(model: "PreTrainedModel") -> "PreTrainedModel":
    """Keep bitsandbytes' 4-bit layers in their one layout on the CPU, for training and serving alike.

    On a CPU with AVX512-BF16, bitsandbytes 0.50 repacks a `Linear4bit`'s weight at its first
    no-grad forward in eval mode (an evaluation) into a layout whose kernel computes in bf16 and has
    no backward, and never packs it back: training after an evaluation then backpropagates through
    that kernel, which torch warns "may lead to silently incorrect behavior" (and the eval loss
    rose instead of falling: tests/flavor/test_quantization.py). Turned off, every
    forward computes in the compute dtype, so the model that serves is the model that trained.
    """
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    return model


def own_unquantized_tensors(model: "PreTrainedModel") -> "PreTrainedModel":
    """Copy the CPU tensors bitsandbytes left unquantized (embeddings, norms) out of the checkpoint file,
    after a load through transformers' own reader (`bases.load_base_model` reads local files itself).

    `from_pretrained` maps the safetensors file and those tensors still point into it, so every page
    read while quantizing stays resident for as long as the model lives (benchmarks/bench_qlora.py
    measures the peak). On a GPU they are in device memory already.
    """
    seen: set[int] = set()
    for param in model.parameters():
        if type(param).__name__ == "Parameter" and param.device.type == "cpu" and id(param) not in seen:
            seen.add(id(param))  # a tied matrix is one Parameter: copied once
            param.data = param.data.clone()
    return model


def prepare_for_training(model: "PreTrainedModel") -> "PreTrainedModel":
    """peft's `prepare_model_for_kbit_training` (base frozen, norms in fp32) with gradient
    checkpointing, as the QLoRA recipe has it.

    Checkpointing keeps a quantized forward's memory growth a fraction of what it is without
    (benchmarks/bench_qlora.py). No hook is installed: training adds its own for the run
    (`loraflow.speed.heap_trim`).
    Non-reentrant checkpointing restores the CPU generator before recomputing, so LoRA dropout draws
    the same masks twice.
    """
    import inspect
    import warnings

    from peft import prepare_model_for_kbit_training

    # peft 0.22 renamed the keyword (the old one warns); older releases know only the old one.
    params = inspect.signature(prepare_model_for_kbit_training).parameters
    keyword = next(k for k in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs") if k in params)
    with warnings.catch_warnings():  # peft calls transformers' deprecated name for it
        warnings.filterwarnings("ignore", message=r"`gradient_checkpointing_enable` is deprecated",
                                category=FutureWarning)
        model = prepare_model_for_kbit_training(keep_trainable_layout(model), use_gradient_checkpointing=True,
                                                **{keyword: {"use_reentrant": False}})
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


def parameter_count(param: "torch.Tensor") -> int:
    """Elements of a parameter as it was before quantization: a packed 4-bit weight holds two per
    byte, and bitsandbytes records its original shape in `quant_state`."""
    import math

    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None and getattr(state, "shape", None) else param.numel()
