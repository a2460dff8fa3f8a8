"""What a training run starts from: the accelerator (devices, precision, the seeded RNG) and the model
it trains, with its tokenizer and the LoRA settings in effect.

The model is a base with LoRA applied (`loraflow.base_models.load_for_training`, `loraflow.lora`),
or a logged loraflow model to continue from (`init_model`), whose own LoRA settings and
quantization win (`with_init_quantization` reads the quantization from its MLmodel file, before
anything loads).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from loraflow import speed
from loraflow.config import LoraSettings, ModelSettings, field_names, lora_settings_of
from loraflow.errors import ConfigError

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)


def with_init_quantization(settings: ModelSettings, explicit: set[str]) -> ModelSettings:
    """The model settings with the quantization its `init_model` was trained with (read from the MLmodel file):
    the model's wins, as its LoRA settings do, and a different one given explicitly is an error."""
    import dataclasses

    from mlflow.exceptions import MlflowException
    from mlflow.models import get_model_info

    try:
        flavors = get_model_info(settings.init_model).flavors
    except (MlflowException, OSError) as err:
        if getattr(err, "error_code", "RESOURCE_DOES_NOT_EXIST") != "RESOURCE_DOES_NOT_EXIST":
            raise  # e.g. the tracking server is down: reported as such by the CLI
        raise ConfigError(f"`init_model`: no loraflow model at {settings.init_model!r}: "
                          f"{getattr(err, 'message', err)}") from err
    record = (flavors.get("loraflow") or {}).get("quantization") or {}
    method = record.get("method", "none")
    if "quantization" in explicit and settings.quantization != method:
        raise ConfigError(f"`quantization` is {settings.quantization!r} but init_model {settings.init_model!r} was "
                          f"trained with {method!r}; leave it out (the model's is used) or start a new adapter "
                          "without init_model")
    return dataclasses.replace(settings, quantization=method)


def make_accelerator(precision: str, grad_accum_steps: int, seed: int) -> "Accelerator":
    """The accelerator for `precision` (`loraflow.flavor.dtypes`), with the RNG of every library seeded:
    `seed` plus the process index, so each process draws its own dropout masks (the adapter's first
    weights are process 0's: DDP broadcasts them; data order comes from seeded generators of its own)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    from loraflow.base_models import training_plan_or_error

    mixed = training_plan_or_error(precision).mixed_precision
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:  # an earlier run in this process:
        AcceleratorState._reset_state()  # accelerate refuses another precision (its process state is kept)
    accelerator = Accelerator(  # without a GPU, accelerate goes multi-process (gloo) only when told it runs on the CPU
        cpu=torch.accelerator.current_accelerator() is None, mixed_precision=mixed,
        gradient_accumulation_steps=grad_accum_steps)
    set_seed(seed, device_specific=True)
    if unknown := speed.unknown_names():  # a typo there would silently leave a trick on
        logger.warning("%s names no speed trick: %s (known: %s)", speed.ENV, ", ".join(unknown), ", ".join(speed.TRICKS))
    return accelerator


def load_model_and_tokenizer(lora: LoraSettings, model: ModelSettings, explicit: set[str]):
    """The PEFT model to train, its tokenizer, and the LoRA settings actually in effect.

    `explicit`: the setting names the user gave; with `init_model`, a LoRA setting given that
    differs from the model's own is an error.
    """
    from loraflow.base_models import load_for_training, training_plan_or_error
    from loraflow.flavor.trainable import keep_adapter_fp32
    from loraflow.lora import apply_lora

    if model.init_model:  # its base in `precision`'s dtype (a quantized one as it was trained)
        dtype = training_plan_or_error(model.precision).base if model.quantization == "none" else None
        peft_model, tokenizer, lora = _continue_from(model.init_model, lora, explicit, model.trust_remote_code, dtype)
    else:
        base, tokenizer = load_for_training(model.base_model, revision=model.revision,
                                            trust_remote_code=model.trust_remote_code,
                                            quantization=model.quantization, precision=model.precision)
        peft_model = apply_lora(base, lora)
    return keep_adapter_fp32(peft_model), tokenizer, lora


def _continue_from(uri: str, requested: LoraSettings, explicit: set[str], trust_remote_code: bool = False,
                   dtype: str | None = None):
    """Load a logged model trainable (in `dtype`); its LoRA settings win, and a conflicting request is an error."""
    from loraflow import flavor

    loaded = flavor.load_model(uri, is_trainable=True, trust_remote_code=trust_remote_code, dtype=dtype)
    from_model = lora_settings_of(loaded.model.peft_config["default"])
    defaults = LoraSettings()
    conflicts = [
        f"`{n}` is {getattr(requested, n)!r} but init_model {uri!r} was trained with {getattr(from_model, n)!r}; "
        f"omit `{n}` (the model's value is used) or start a new adapter without init_model"
        for n in field_names(LoraSettings)
        if n in explicit and getattr(requested, n) != getattr(defaults, n) and getattr(requested, n) != getattr(from_model, n)
    ]
    if conflicts:
        raise ConfigError(conflicts)
    return loaded.model, loaded.tokenizer, from_model
