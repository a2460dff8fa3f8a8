"""The base model as training and validation see it: its configuration, its meta skeleton, and loading it.

The loading itself is `loraflow.flavor.bases` (one loader for training and serving); this module
turns its refusals into the settings errors a user fixes (`ConfigError`, exit code 2), and builds
the module tree on the meta device so that settings are checked against the architecture before
any weight is loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from loraflow.errors import ConfigError
from loraflow.flavor import bases, dtypes
from loraflow.flavor.fingerprint import convert_base
from loraflow.flavor.quantization import load_kwargs
from loraflow.flavor.trainable import prepare_for_training, quantization_record, record_of, training_plan

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


@contextlib.contextmanager
def base_model_errors(name_or_path: str) -> Iterator[None]:
    """Turn `bases`' refusals into `ConfigError`s naming the `base_model` setting and the fix."""
    try:
        yield
    except bases.NeedsRemoteCode as err:
        raise ConfigError(
            f"`base_model` {name_or_path!r} ships its own Python code (`auto_map` in its config), which "
            "loraflow runs only when you allow it: pass --trust-remote-code (`trust_remote_code: true`) "
            "after reading that code"
        ) from err
    except (bases.UnknownBuiltin, bases.BadGguf) as err:
        raise ConfigError(f"`base_model` {err}") from err


def load_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> "PretrainedConfig":
    """Load only the base's `config.json` (no weights).

    Raises:
        ConfigError: an unknown built-in name, or a config that needs remote code not allowed.
    """
    from transformers import AutoConfig

    if bases.is_gguf(name_or_path):  # its metadata holds the config
        with base_model_errors(name_or_path):
            return bases.gguf_config(name_or_path)
    # bool(): transformers *prompts on stdin* when trust_remote_code is None and the model has code.
    with base_model_errors(name_or_path), bases.remote_code_refused(name_or_path):
        return AutoConfig.from_pretrained(
            bases.resolve_base(name_or_path), revision=revision, trust_remote_code=bool(trust_remote_code)
        )


def load_skeleton(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> "PreTrainedModel":
    """Build the model's module tree on the meta device from its config: no weights, no memory.

    Used to check target module names and ranks against a large model in well under a second.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    with base_model_errors(name_or_path), bases.remote_code_refused(name_or_path), init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=bool(trust_remote_code))
    skeleton.tie_weights()  # as from_pretrained does, so tied matrices are counted once
    return skeleton


def load_for_training(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False,
    quantization: str = "none", precision: str = "auto",
) -> tuple["PreTrainedModel", "PreTrainedTokenizerBase"]:
    """The base model, held in the dtype `precision` gives on this device (`loraflow.flavor.dtypes`:
    fp32 on a CPU whatever the checkpoint's dtype), and its tokenizer, to train on.

    The base is loaded as stored and cast afterwards, remembering its stored dtypes, so that the
    fingerprint recorded with the model is that of the stored weights. With `quantization` (nf4,
    fp4, int8) the base is quantized as it loads, by the standard QLoRA recipe
    (`loraflow.flavor.quantization`: `BitsAndBytesConfig`, double quantization for 4-bit, the
    plan's compute dtype), then prepared with peft's `prepare_model_for_kbit_training`.

    Raises:
        ConfigError: an unknown built-in name, a base that needs remote code not allowed, a
            `precision` this device cannot compute in, or quantization without bitsandbytes installed.
    """
    plan = training_plan_or_error(precision)
    record = quantization_record(quantization, precision)
    if record and bases.is_gguf(name_or_path):
        raise ConfigError(f"`quantization` {quantization} cannot re-quantize the GGUF base {name_or_path!r}: it is "
                          "dequantized as it loads; use --quantization none, or the model's Hugging Face folder")
    try:
        kwargs = load_kwargs(record) if record else {}
    except ImportError as err:
        raise ConfigError(f"`quantization`: {err}") from err
    with base_model_errors(name_or_path):
        tokenizer = bases.load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        model = bases.load_base_model(name_or_path, revision=revision, trust_remote_code=trust_remote_code,
                                      **({"dtype": plan.base} if bases.is_gguf(name_or_path) else {}), **kwargs)
    if record:
        return prepare_for_training(model), tokenizer
    return convert_base(model, plan.base), tokenizer


def training_plan_or_error(precision: str) -> dtypes.DtypePlan:
    """The dtype plan for `precision` on this machine (its cost note logged once).

    Raises:
        ConfigError: fp16 without a GPU, or bf16 on a GPU without it.
    """
    try:
        return training_plan(precision)
    except dtypes.PrecisionRefused as err:
        raise ConfigError(str(err)) from err


def effective_dtypes(model: Any, mixed_precision: str) -> dict[str, str]:
    """`base_dtype` and `compute_dtype` of a model being trained (for the run's params): the frozen
    base's weights (a quantized base: its method, e.g. nf4) and what its forward computes in."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if record := record_of(base):
        return {"base_dtype": record["method"], "compute_dtype": record.get("compute_dtype", "float16")}
    frozen = [p.dtype for p in base.parameters() if not p.requires_grad and p.is_floating_point()]
    base_dtype = str(max(set(frozen), key=frozen.count) if frozen else base.dtype).removeprefix("torch.")
    compute = {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision, base_dtype)
    return {"base_dtype": base_dtype, "compute_dtype": compute}
