"""The base model as training and validation see it: its configuration, its meta skeleton, and loading it.

The loading itself is `loraflow.flavor.bases` (one loader for training and serving); this module
turns its refusals into the settings errors a user fixes (`ConfigError`, exit code 2), and builds
the module tree on the meta device so that settings are checked against the architecture before
any weight is loaded.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from loraflow.errors import ConfigError
from loraflow.flavor import bases
from loraflow.flavor.quantization import load_kwargs, prepare_for_training, quantization_record

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
    except bases.UnknownBuiltin as err:
        raise ConfigError(f"`base_model` {err}") from err


def load_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False) -> "PretrainedConfig":
    """Load only the base's `config.json` (no weights).

    Raises:
        ConfigError: an unknown built-in name, or a config that needs remote code not allowed.
    """
    from transformers import AutoConfig

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
    """The base model (in the dtype it was saved in, else fp32) and its tokenizer, to train on.

    With `quantization` (nf4, fp4, int8) the base is quantized as it loads, by the standard QLoRA
    recipe (`loraflow.flavor.quantization`: `BitsAndBytesConfig`, double quantization for 4-bit, a
    compute dtype that follows `precision`), then prepared with peft's `prepare_model_for_kbit_training`.

    Raises:
        ConfigError: an unknown built-in name, a base that needs remote code not allowed, or
            quantization without bitsandbytes installed.
    """
    record = quantization_record(quantization, precision)
    try:
        kwargs = load_kwargs(record) if record else {}
    except ImportError as err:
        raise ConfigError(f"`quantization`: {err}") from err
    with base_model_errors(name_or_path):
        tokenizer = bases.load_tokenizer(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        model = bases.load_base_model(name_or_path, revision=revision, trust_remote_code=trust_remote_code, **kwargs)
    return (prepare_for_training(model) if record else model), tokenizer
