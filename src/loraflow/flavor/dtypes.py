"""The dtype policy: which dtype the frozen base is held in and computes in, on each device.

One table (`PRECISION_DTYPES`, `plan_dtypes`) for training (`precision`, `trainable.training_plan`)
and serving (`load_model(dtype=...)`, the pyfunc's `model_config` `dtype`), whatever dtype the
checkpoint was saved in; docs/devices.md shows it. The LoRA weights stay in fp32, and a CPU holds
the base in fp32 even for a bf16 checkpoint (without AVX512-BF16 or AMX, bf16 matmuls are emulated,
tens of times slower). The base is loaded as stored, fingerprinted, and only then cast
(`fingerprint.convert_base`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    import torch

PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
MIXED_PRECISION = {"float32": "no", "bfloat16": "bf16", "float16": "fp16"}
# what `load_model(dtype=...)` and model_config `dtype` take: a torch dtype name, or our precision names
SERVING_DTYPES = ("auto", "float32", "bfloat16", "float16", *PRECISION_DTYPES)


class PrecisionRefused(ValueError):
    """A `precision` this device cannot compute in; the message names the setting and the fix."""


class DeviceFacts(NamedTuple):
    """What the policy needs to know of a device (tests build these by hand)."""

    type: str
    """`cpu` or `cuda`."""
    cuda_bf16: bool = False
    """The GPU computes in bf16 natively (Ampere and later)."""
    cuda_capability: tuple[int, int] = (0, 0)
    """The GPU's compute capability; fp16 mixed precision needs 7.0 (tensor cores)."""
    cpu_native_bf16: bool = False
    """The CPU has AVX512-BF16 or AMX."""
    cpu_name: str = ""
    """The instruction set torch dispatches to on this CPU (e.g. AVX2), for messages."""


class DtypePlan(NamedTuple):
    """The dtypes a run uses: torch dtype names, and accelerate's `mixed_precision`."""

    base: str
    """The frozen base's weights."""
    compute: str
    """What the forward computes in (the autocast dtype)."""
    mixed_precision: str
    """accelerate's `mixed_precision` setting."""
    note: str | None = None
    """A warning to give (once): what the choice costs on this device."""


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bf16 matmul instructions (AVX512-BF16 or AMX-BF16)."""
    import torch

    if "AMX" in torch.backends.cpu.get_cpu_capability().upper():
        return True
    try:  # torch names only its dispatch level (AVX2, AVX512); Linux lists the bf16 extensions
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def device_facts(device: "str | torch.device | None" = None) -> DeviceFacts:
    """The facts of `device` (default: the first GPU, else the CPU)."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DeviceFacts("cuda", cuda_bf16=torch.cuda.is_bf16_supported(),
                           cuda_capability=tuple(torch.cuda.get_device_capability(index)))
    return DeviceFacts(device.type, cpu_native_bf16=cpu_has_native_bf16(),
                       cpu_name=torch.backends.cpu.get_cpu_capability())


def plan_dtypes(precision: str, facts: DeviceFacts) -> DtypePlan:
    """The dtypes for `precision` (auto, fp32, bf16, fp16) on a device (the table above).

    Raises:
        PrecisionRefused: fp16 without a CUDA GPU, or bf16 on a GPU without bf16.
    """
    if precision not in ("auto", *PRECISION_DTYPES):
        raise PrecisionRefused(f"`precision` must be one of auto, fp32, bf16, fp16, got {precision!r}")
    if facts.type != "cuda":
        if precision == "fp16":
            raise PrecisionRefused("`precision` fp16 needs a CUDA GPU, none is available; use auto, fp32 or bf16")
        if precision == "bf16":
            return _plan("bfloat16", None if facts.cpu_native_bf16 else _slow_bf16_note(facts))
        return _plan("float32")
    if precision == "bf16" and not facts.cuda_bf16:
        raise PrecisionRefused(f"`precision` bf16: this GPU (compute capability {facts.cuda_capability[0]}."
                               f"{facts.cuda_capability[1]}) has no bf16; use auto, fp16 or fp32")
    if precision == "auto":
        if facts.cuda_bf16:
            return _plan("bfloat16")
        return _plan("float16" if facts.cuda_capability >= (7, 0) else "float32")
    return _plan(PRECISION_DTYPES[precision])


def _plan(dtype: str, note: str | None = None) -> DtypePlan:
    return DtypePlan(dtype, dtype, MIXED_PRECISION[dtype], note)


def _slow_bf16_note(facts: DeviceFacts) -> str:
    return (f"`precision` bf16 on this CPU ({facts.cpu_name or 'unknown'}, without AVX512-BF16 or AMX): it has no "
            "bf16 matmul instructions, so every matmul is emulated, tens of times slower than fp32. Use `precision` auto or fp32 here: the base is then held in fp32, "
            "twice the memory of bf16")


def serving_dtype(requested: "str | torch.dtype | None", device: "str | torch.device | None" = None) -> str:
    """The dtype a loaded base computes in on `device`: `requested` when given (a torch dtype, its
    name, or fp32/bf16/fp16), else the policy's for `precision` auto.

    Raises:
        ValueError: an unknown dtype name (the message lists the known ones).
    """
    import torch

    if requested is None or requested == "auto":
        return plan_dtypes("auto", device_facts(device)).base
    name = PRECISION_DTYPES.get(str(requested), str(requested).removeprefix("torch."))
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(f"`dtype` must be a floating-point torch dtype such as {', '.join(SERVING_DTYPES[1:4])} "
                         f"(or fp32, bf16, fp16; None or auto: the device's default), got {requested!r}")
    return str(found).removeprefix("torch.")
