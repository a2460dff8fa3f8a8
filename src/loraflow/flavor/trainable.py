"""The flavor's rules as training uses them, which a saved model does not ship: the dtype plan of a
run, the quantization record a run keeps, and a quantized base prepared for training (QLoRA).

Serving reads the same tables (`dtypes`, `quantization`); what only training and
`load_model(is_trainable=True)` need lives here, so the code a model ships stays what loads and
serves it (`save.SHIPPED`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from loraflow.flavor.dtypes import PRECISION_DTYPES, DtypePlan, device_facts, plan_dtypes
from loraflow.flavor.quantization import QUANTIZATIONS, keep_trainable_layout

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

_warned: set[str] = set()


# ---------------------------------------------------------------------------------------------
# Dtypes.


def warn_once(plan: DtypePlan) -> DtypePlan:
    """Log the plan's note, once per process; return the plan."""
    if plan.note and plan.note not in _warned:
        _warned.add(plan.note)
        logger.warning(plan.note)
    return plan


def training_plan(precision: str, device: "str | torch.device | None" = None) -> DtypePlan:
    """The plan for training with `precision` on `device` (default: the first GPU, else the CPU),
    its note given once.

    Raises:
        PrecisionRefused: see `dtypes.plan_dtypes`.
    """
    return warn_once(plan_dtypes(precision, device_facts(device)))


def keep_adapter_fp32(model: "torch.nn.Module") -> "torch.nn.Module":
    """Hold every trainable parameter (the adapter) in fp32, whatever the base's dtype."""
    import torch

    for param in model.parameters():
        if param.requires_grad and param.is_floating_point() and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


# ---------------------------------------------------------------------------------------------
# Quantization (QLoRA).


def compute_dtype(precision: str) -> str:
    """The dtype quantized layers compute in: `precision`'s on this machine (`dtypes`; auto: bf16
    where CUDA has it, fp16 on an older GPU, else fp32)."""
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
