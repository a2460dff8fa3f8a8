"""Apply LoRA through peft, check target names against the real model, and report parameters.

LoRA (Hu et al., 2021, https://arxiv.org/abs/2106.09685) freezes a pretrained weight W and learns a
low-rank update, so a adapted linear layer computes

    h = W x + (lora_alpha / r) * B A x        with A: r x d_in, B: d_out x r, B initialised to 0

Only A and B (plus any `modules_to_save`, trained in full) are trainable. peft does the wrapping
(`config.build_lora_config` is the one bridge to it); this module adds what peft leaves out, checked
against the real model or its meta skeleton: that every requested name exists (peft raises only
when *none* match, so one typo silently adapts fewer layers), that the rank fits every targeted
layer, and an isolation report that proves nothing else is trainable. It logs nothing: recording
the settings and the report is the caller's job (`loraflow.tracking`).
"""

from __future__ import annotations

import copy
import difflib
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.config import ALL_LINEAR, LoraSettings, ModelSettings, TrainSettings, build_lora_config, lora_settings, parse_settings
from loraflow.errors import ConfigError
from loraflow.flavor.bases import peft_wrapping
from loraflow.flavor.layout import parse_bool, short

if TYPE_CHECKING:
    from peft import PeftModel
    from torch import nn

logger = logging.getLogger(__name__)

LORA_MARKERS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")
SAVED_MODULE_MARKER = ".modules_to_save."
DEFAULT_PROJECTOR_PATTERNS = ("projector",)
OUTPUT_LAYER_NAMES = ("lm_head",)  # peft's "all-linear" leaves the output layer out


class TrainabilityError(RuntimeError):
    """Parameters other than LoRA and declared extras are trainable."""


# ---------------------------------------------------------------------------------------------
# Checking names against the model.


def linear_module_names(model: "nn.Module") -> list[str]:
    """Short names of the linear layers LoRA could target (e.g. q_proj ... down_proj), sorted."""
    from torch import nn

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    try:  # GPT-2 style models use transformers' Conv1D for their projections
        from transformers.pytorch_utils import Conv1D

        names |= {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, Conv1D)}
    except ImportError:
        pass
    return sorted(names - set(OUTPUT_LAYER_NAMES))


def _matcher(key: str) -> "Callable[[str], bool]":
    """Whether a module name is matched by one `target_modules` entry, by peft's own function."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(target_modules=[key])
    return lambda module_name: bool(check_target_module_exists(config, module_name))


def saved_module_names(model: "nn.Module", key: str) -> list[str]:
    """The modules that peft itself copies for one `modules_to_save` entry, read off a meta copy of
    `model` wrapped by the installed peft (its matching rule changes between releases)."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import DUMMY_TARGET_MODULES

    config = LoraConfig(target_modules=DUMMY_TARGET_MODULES, modules_to_save=[key])
    try:
        with peft_wrapping(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a probe: peft's advice about the copy is not for the user
            wrapped = get_peft_model(_meta_copy(model), config)
    except ValueError:  # peft refuses an entry it cannot wrap (e.g. a LoRA layer's own name)
        return []
    marker = SAVED_MODULE_MARKER.rstrip(".")
    return sorted({name.split(marker)[0].removeprefix("base_model.model.")
                   for name, _ in wrapped.named_modules() if marker + "." in name})


def _meta_copy(model: "nn.Module") -> "nn.Module":
    """A deep copy of `model` whose parameters and buffers are empty meta tensors (no memory)."""
    import torch
    from torch import nn

    memo: dict[int, Any] = {}
    for tensor in (*model.parameters(), *model.buffers()):
        empty = torch.empty(tensor.shape, dtype=tensor.dtype, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) else empty
    return copy.deepcopy(model, memo)


def unmatched_module_problems(
    model: "nn.Module", target_modules: tuple[str, ...] | str, modules_to_save: tuple[str, ...] = ()
) -> list[str]:
    """One problem per `target_modules` / `modules_to_save` entry that matches no module.

    Works on a real model and on a meta-device skeleton alike: only module names are read.
    """
    module_names = [name for name, _ in model.named_modules() if name]
    short_names = sorted({name.rsplit(".", 1)[-1] for name in module_names})
    linear = linear_module_names(model)
    problems = []
    targets = () if target_modules == ALL_LINEAR else target_modules
    for field, keys in (("target_modules", targets), ("modules_to_save", modules_to_save)):
        for key in keys:
            if field == "target_modules" and any(map(_matcher(key), module_names)):
                continue
            if field == "modules_to_save" and saved_module_names(model, key):
                continue
            close = difflib.get_close_matches(key, short_names, n=3, cutoff=0.6)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            problems.append(
                f"`{field}` entry {key!r} matches no module of {type(model).__name__}.{hint} "
                f"Linear modules LoRA can target: {', '.join(linear)}"
            )
    return problems


def check_modules(model: "nn.Module", settings: LoraSettings, peft_config: Any = None) -> None:
    """Raise `ConfigError` listing every requested module name that the model lacks, or a rank too wide.

    `peft_config`: `settings` as a `peft.LoraConfig` (`config.build_lora_config`), when already built.
    """
    problems = unmatched_module_problems(model, settings.target_modules, settings.modules_to_save)
    problems = problems or rank_problems(model, settings.r, peft_config or build_lora_config(settings))
    if problems:
        raise ConfigError(problems)


def rank_problems(model: "nn.Module", r: int, peft_config: Any) -> list[str]:
    """The rank of a low-rank update cannot exceed min(in_features, out_features) of a layer it
    adapts: one problem naming the smallest such layer (works on a meta skeleton too).

    `peft_config`: the `peft.LoraConfig` whose `target_modules` choose the layers.
    """
    from torch import nn

    limits = [
        (min(module.in_features, module.out_features), name)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name and _is_target(peft_config, name)
    ]
    if not limits or r <= min(limits)[0]:
        return []
    limit, name = min(limits)
    return [f"`r` is {r}, but the targeted layer {name} ({type(model).__name__}) is only {limit} wide "
            f"(min of in and out features): a rank cannot exceed it; use r <= {limit}"]


def _is_target(config: Any, name: str) -> bool:
    if config.target_modules == ALL_LINEAR:
        return name.rsplit(".", 1)[-1] not in OUTPUT_LAYER_NAMES
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(config, name))


def validate_settings(raw: Mapping[str, Any]) -> tuple[LoraSettings, TrainSettings]:
    """Parse every setting and check names and rank against the base model's skeleton, together.

    The skeleton is built from `config.json` on the meta device (no weights), so this takes well
    under a second even for a large model. Value problems and architecture problems are reported in
    one `ConfigError`, so a user fixes everything in one go.

    Raises:
        ConfigError: every problem found.
    """
    problems: list[str] = []
    try:
        settings = parse_settings(raw)
    except ConfigError as err:
        problems, settings = err.problems, None
    names = {k: raw[k] for k in ("target_modules", "modules_to_save") if k in raw}
    try:
        partial = lora_settings(names)
    except ConfigError:
        partial = None  # already reported above
    if partial is not None:
        problems += _architecture_problems(raw, partial, settings[0] if settings else None)
    if problems:
        raise ConfigError(problems)
    return settings


def _architecture_problems(raw: Mapping[str, Any], names: LoraSettings, lora: LoraSettings | None) -> list[str]:
    from loraflow.base_models import load_skeleton

    base = str(raw.get("base_model") or ModelSettings().base_model)
    trust = parse_bool(raw.get("trust_remote_code", False)) is True
    try:
        skeleton = load_skeleton(base, revision=raw.get("revision") or None, trust_remote_code=trust)
    except ConfigError as err:  # an unknown built-in, or a base that needs remote code
        return err.problems
    except Exception as err:  # a missing path, an unknown Hub id offline, a broken config
        return [f"`base_model` {base!r} could not be read: {_reason(err, base)}"]
    problems = unmatched_module_problems(skeleton, names.target_modules, names.modules_to_save)
    if lora is not None and not problems:
        problems += rank_problems(skeleton, lora.r, build_lora_config(lora))
    return problems + quantization_problems(skeleton, raw, base, names.modules_to_save)


def quantization_problems(skeleton: "nn.Module", raw: Mapping[str, Any], base: str,
                          modules_to_save: tuple[str, ...]) -> list[str]:
    """What a quantized base cannot do, checked on its skeleton: a full copy of a layer that
    bitsandbytes quantizes (`modules_to_save` trains it in full, but its weights are 4 or 8 bits);
    and embedding a base that is quantized in its own files (the flavor embeds an unquantized base)."""
    from loraflow.flavor.bases import base_kind

    problems = []
    quantization = str(raw.get("quantization") or "none").strip()
    if quantization != "none" and modules_to_save:
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        skipped = get_keys_to_not_convert(skeleton)  # transformers' own rule: lm_head, tied and last layers stay
        linear = [name for name, module in skeleton.named_modules() if type(module).__name__ in ("Linear", "Conv1D")]
        for key in modules_to_save:
            saved = set(saved_module_names(skeleton, key))
            hit = [n for n in linear if n in saved and should_convert_module(n, skipped)]
            if hit:
                problems.append(f"`modules_to_save` entry {key!r} is a layer that --quantization {quantization} "
                                f"quantizes ({hit[0]}), so it cannot be trained in full; target it with LoRA "
                                "(`target_modules`) instead, or use --quantization none")
    mode = str(raw.get("base_mode") or "auto").strip()
    stored = mode in ("embedded", "logged") or (mode == "auto" and base_kind(base) != "hub")
    if stored and getattr(skeleton.config, "quantization_config", None) is not None:
        problems.append(f"`base_mode` {mode} stores the base with the model, but {base!r} is a pre-quantized checkpoint (its "
                        "config has a quantization_config); a loraflow model embeds only unquantized bases: use "
                        "--base-mode reference, or the unquantized original with --quantization")
    return problems


def _reason(err: Exception, base: str) -> str:
    """Why a base could not be read, in the user's terms (a missing folder, not a Hub-id rule)."""
    looks_local = base.startswith((".", "/", "~")) or base.count("/") > 1
    if looks_local and not Path(base).expanduser().exists():
        return f"no such folder ({str(Path(base).expanduser().resolve())!r}); check the path"
    return short(" ".join(str(err).split()), quote=False)


# ---------------------------------------------------------------------------------------------
# Applying LoRA.


def apply_lora(model: "nn.Module", settings: LoraSettings | Mapping[str, Any]) -> "PeftModel":
    """Wrap `model` with LoRA adapters through `peft.get_peft_model`. Logs nothing.

    Args:
        model: a transformers causal LM (or any module peft supports).
        settings: `LoraSettings`, or a mapping validated into one.

    Returns:
        The `PeftModel`; only LoRA and `modules_to_save` parameters are trainable.

    Raises:
        ConfigError: invalid settings, or names that match no module of `model`, or a rank wider
            than a targeted layer.
        RuntimeError: peft failed to apply the adapters.
    """
    from peft import get_peft_model

    settings = settings if isinstance(settings, LoraSettings) else lora_settings(settings)
    peft_config = build_lora_config(settings)
    check_modules(model, settings, peft_config)
    try:
        with peft_wrapping():
            return get_peft_model(model, peft_config)
    except Exception as err:  # peft raises ValueError/TypeError/KeyError for unsupported layers
        raise RuntimeError(f"peft could not apply LoRA to {type(model).__name__}: {err}") from err


# ---------------------------------------------------------------------------------------------
# Parameter report.


def _is_lora(name: str) -> bool:
    return any(marker in name for marker in LORA_MARKERS)


def _bias_allowed(model: "nn.Module") -> bool:
    configs = getattr(model, "peft_config", None) or {}
    return any(getattr(cfg, "bias", "none") != "none" for cfg in configs.values())


def parameter_count(param: "nn.Parameter") -> int:
    """Elements of a parameter as it was before quantization: a packed 4-bit weight holds two per
    byte, and bitsandbytes records its original shape in `quant_state`."""
    import math

    state = getattr(param, "quant_state", None)
    return math.prod(state.shape) if state is not None and getattr(state, "shape", None) else param.numel()


def parameter_report(
    model: "nn.Module",
    *,
    projector_patterns: Iterable[str] = DEFAULT_PROJECTOR_PATTERNS,
    allow_other_trainable: bool = False,
) -> dict[str, float | int]:
    """Count parameters, and check that only LoRA and declared extras are trainable.

    Shared (tied) tensors are counted once and a quantized weight counts the elements it stands for
    (a packed 4-bit tensor holds two per byte), so totals agree with peft's
    `get_nb_trainable_parameters`. Call it on the PeftModel or on an outer module that holds one
    (a multimodal model with a projector beside the LoRA-wrapped LLM).

    Args:
        model: the model to inspect.
        projector_patterns: substrings naming modules meant to be trained in full beside LoRA.
            `modules_to_save` copies always count as projector parameters.
        allow_other_trainable: report other trainable parameters instead of raising.

    Returns:
        total_params, trainable_params, frozen_params, lora_params, projector_params,
        other_trainable_params and trainable_percentage.

    Raises:
        TrainabilityError: other parameters are trainable, naming them.
    """
    patterns = tuple(projector_patterns)
    bias_ok = _bias_allowed(model)
    counts = dict.fromkeys(("total", "trainable", "lora", "projector", "other"), 0)
    others: list[str] = []
    for name, param in model.named_parameters():  # deduplicates tied weights
        n = parameter_count(param)  # a 4-bit weight still counts its unquantized elements
        counts["total"] += n
        if _is_lora(name):
            counts["lora"] += n
        if not param.requires_grad:
            continue
        counts["trainable"] += n
        if _is_lora(name):
            continue
        if bias_ok and name.endswith(".bias"):  # trained on purpose (bias="all"/"lora_only"): counted, allowed
            counts["other"] += n
        elif SAVED_MODULE_MARKER in name or any(p in name for p in patterns):
            counts["projector"] += n
        else:
            counts["other"] += n
            others.append(name)
    if others and not allow_other_trainable:
        shown = ", ".join(others[:10]) + (f" and {len(others) - 10} more" if len(others) > 10 else "")
        raise TrainabilityError(
            f"{len(others)} parameter tensors are trainable but are neither LoRA nor declared extras: {shown}. "
            "Freeze them, list their modules in `modules_to_save`, or pass allow_other_trainable=True."
        )
    total = counts["total"]
    return {
        "total_params": total,
        "trainable_params": counts["trainable"],
        "frozen_params": total - counts["trainable"],
        "lora_params": counts["lora"],
        "projector_params": counts["projector"],
        "other_trainable_params": counts["other"],
        "trainable_percentage": 100.0 * counts["trainable"] / total if total else 0.0,
    }


def format_report(report: Mapping[str, float | int]) -> str:
    """Human-readable one-per-line rendering of `parameter_report`."""
    lines = []
    for key, value in report.items():
        text = f"{value:.4f}%" if key == "trainable_percentage" else f"{int(value):,}"
        lines.append(f"  {key:<24}{text:>16}")
    return "\n".join(lines)
