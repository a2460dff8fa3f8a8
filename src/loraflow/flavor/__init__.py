"""The `loraflow` MLflow flavor: save, log, load and serve PEFT LoRA models without losing a bit.

This module is the flavor's fixed surface, shaped like MLflow's own flavor modules
(`mlflow/spacy/__init__.py`): `FLAVOR_NAME`, `get_default_pip_requirements`, `save_model`,
`log_model`, `load_model`, and the private `_load_pyfunc` that `mlflow.pyfunc.load_model` and
`mlflow models serve` call. Each function imports its implementation when called.

A saved model ships the modules that load and serve it (`save.SHIPPED`: `load`, `pyfunc`,
`generation`, `chat`, `bases`, `fingerprint` and the small ones they use), which import nothing
else of loraflow but the built-in recipe; its `loader_module` is `loraflow.flavor.pyfunc`. This
module (the surface with its docstrings), writing a model (`save`, `signatures`, `stored_base`) and
training's side (`trainable`) are not shipped. The code travels with the model instead of a
`loraflow==X` pin, which would not resolve for an editable install: where loraflow is installed its
flavor loads the model, elsewhere the shipped code does.

Why a custom flavor: `mlflow.transformers` round-trips a LoRA model on a local base with different
logits and reloads the adapter frozen; this one reloads the exact weights, trainable if asked.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraflow.flavor.layout import FLAVOR_NAME, FLAVOR_VERSION

if TYPE_CHECKING:
    import os

    import torch
    from mlflow.models import Model, ModelSignature
    from mlflow.models.model import ModelInfo
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from loraflow.flavor.load import LoadedModel
    from loraflow.flavor.pyfunc import LoraflowPyfunc
    from loraflow.flavor.save import BaseMode

__all__ = ["FLAVOR_NAME", "FLAVOR_VERSION", "get_default_pip_requirements", "load_model", "log_model", "save_model"]


def get_default_pip_requirements() -> list[str]:
    """Third-party pins of a saved model (loraflow itself travels as code, see the package docstring)."""
    from loraflow.flavor import save

    return save.get_default_pip_requirements()


def save_model(
    peft_model: "PeftModel",
    path: "str | os.PathLike",
    tokenizer: "PreTrainedTokenizerBase",
    *,
    base_model: str | None = None,
    base_mode: "BaseMode" = "auto",
    mlflow_model: "Model | None" = None,
    signature: "ModelSignature | None" = None,
    input_example: Any = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    code_paths: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    generation_defaults: dict[str, Any] | None = None,
    batch_size: int = 32,
    max_new_tokens_cap: int = 4096,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    validate_serving_input: bool = True,
    base_section: dict[str, Any] | None = None,
) -> None:
    """Save a PEFT LoRA model, its tokenizer and its base model (embedded or referenced) to `path`.

    Args:
        peft_model: a `peft.PeftModel` with one adapter.
        path: a new (or empty) local directory.
        tokenizer: the tokenizer to save with it.
        base_model: `builtin:*`, a local directory, a GGUF file or a Hub id; default: the adapter
            config's `base_model_name_or_path`.
        base_mode: `"embedded"` copies the base's files into the model; `"reference"` records the
            Hub id + resolved commit (or a local path); `"logged"` (`log_model`'s; here it embeds)
            logs the base once per fingerprint to the tracking store; `"auto"`: reference for a Hub
            id, embedded for a built-in base, else logged by `log_model` and embedded here.
        mlflow_model: the `mlflow.models.Model` this flavor is added to (set by `log_model`).
        signature: default: `signatures.default_signature(generation_defaults)`, with a params schema.
        input_example: default: `signatures.default_input_example()` when no signature is given.
        pip_requirements: replace the default requirements.
        extra_pip_requirements: add to the default requirements.
        code_paths: extra code to ship; loraflow's own loading code is always added.
        metadata: custom metadata for the MLmodel file.
        generation_defaults: defaults for the generation params (`generation.GENERATION_DEFAULTS` keys).
        batch_size: how many prompts pyfunc generates together.
        max_new_tokens_cap: the largest `max_new_tokens` pyfunc accepts.
        trust_remote_code: whether the base was loaded with its own code; recorded (loading such a
            model needs permission again).
        chat_template: for a model trained on conversations, the template training used: saved with
            the tokenizer, and the model answers OpenAI chat requests (`task: chat`).
        validate_serving_input: read by `log_model`; saving ignores it.
        base_section: the `base` record `log_model` prepared, replacing `base_model` and `base_mode`.

    Raises:
        MlflowException: an invalid argument, a non-empty `path`, or a base model that cannot be
            embedded or referenced.
    """
    from loraflow.flavor import save

    save.save_model(
        peft_model, path, tokenizer, base_model=base_model, base_mode=base_mode, mlflow_model=mlflow_model,
        signature=signature, input_example=input_example, pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements, code_paths=code_paths, metadata=metadata,
        generation_defaults=generation_defaults, batch_size=batch_size, max_new_tokens_cap=max_new_tokens_cap,
        trust_remote_code=trust_remote_code, chat_template=chat_template,
        validate_serving_input=validate_serving_input, base_section=base_section)


def log_model(
    peft_model: "PeftModel",
    name: str,
    tokenizer: "PreTrainedTokenizerBase",
    *,
    registered_model_name: str | None = None,
    signature: "ModelSignature | None" = None,
    input_example: Any = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    code_paths: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    base_model: str | None = None,
    base_mode: "BaseMode" = "auto",
    generation_defaults: dict[str, Any] | None = None,
    batch_size: int = 32,
    max_new_tokens_cap: int = 4096,
    trust_remote_code: bool = False,
    chat_template: str | None = None,
    validate_serving_input: bool = True,
    **kwargs: Any,
) -> "ModelInfo":
    """Log a PEFT LoRA model to the active run (one is started if none is active).

    Arguments not listed are as for `save_model`; `base_mode` "logged" (what "auto" means for a
    local folder or a GGUF file) logs the base to the tracking store once per fingerprint.

    Args:
        peft_model: a `peft.PeftModel` with one adapter.
        name: the logged model's name (MLflow 3).
        tokenizer: the tokenizer to log with it.
        registered_model_name: also register a version under this name.
        validate_serving_input: let MLflow check the input example by loading the logged model again
            in this process (a second copy in memory meanwhile; a failure is only a warning).
        kwargs: passed to `mlflow.models.Model.log` (e.g. `params`, `tags`, `step`).

    Returns:
        The `ModelInfo` of the logged model (`.model_uri` loads it).
    """
    from loraflow.flavor import save

    return save.log_model(
        peft_model, name, tokenizer, registered_model_name=registered_model_name, signature=signature,
        input_example=input_example, pip_requirements=pip_requirements,
        extra_pip_requirements=extra_pip_requirements, code_paths=code_paths, metadata=metadata,
        base_model=base_model, base_mode=base_mode, generation_defaults=generation_defaults,
        batch_size=batch_size, max_new_tokens_cap=max_new_tokens_cap, trust_remote_code=trust_remote_code,
        chat_template=chat_template, validate_serving_input=validate_serving_input, **kwargs)


def load_model(
    model_uri: str,
    is_trainable: bool = False,
    device: "str | torch.device | None" = None,
    dtype: "torch.dtype | str | None" = None,
    dst_path: str | None = None,
    trust_remote_code: bool | None = None,
    quantization: str | None = None,
) -> "LoadedModel":
    """Load a model saved by this flavor: the base (verified by fingerprint) plus the adapter.

    Args:
        model_uri: `runs:/...`, `models:/...`, a local path, or any MLflow artifact URI.
        is_trainable: reload LoRA (and modules_to_save) parameters as trainable, to continue training.
        device: where to put the model; default: the CPU.
        dtype: the dtype the whole model computes in (a torch dtype or its name, or fp32/bf16/fp16).
            Default (None or "auto"): the device's (`dtypes`: fp32 on a CPU, bf16 on a GPU that has
            it, else fp16), the adapter staying in fp32.
        dst_path: where to download the artifacts; default: a temporary directory.
        trust_remote_code: allow a base recorded with `trust_remote_code` to run its code; default
            (None): the `LORAFLOW_TRUST_REMOTE_CODE` environment variable, else not allowed. Never
            turns remote code on for a model that did not record it.
        quantization: None (default): a model trained on a quantized base (QLoRA) is quantized again
            as it was trained, on `device`, else the first GPU, else the CPU; `"none"`: on the
            unquantized base (no bitsandbytes needed; outputs change slightly).

    Returns:
        `LoadedModel(model, tokenizer)`: use `.model`/`.tokenizer` or unpack it.

    Raises:
        MlflowException: a bad argument (or bitsandbytes missing for a quantized model), a URI with
            no model, a newer flavor version, a missing or corrupt adapter, remote code not allowed,
            or a base that cannot be loaded or does not match the recorded fingerprint.
    """
    from pathlib import Path

    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    from loraflow.flavor.load import load_local
    from loraflow.flavor.mlflow_private import _download_artifact_from_uri

    _check_load_arguments(is_trainable=is_trainable, trust_remote_code=trust_remote_code, device=device)
    try:
        local_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise MlflowException(f"no loraflow model at {model_uri!r}: {e.message}", RESOURCE_DOES_NOT_EXIST) from e
    return load_local(Path(local_path), is_trainable=is_trainable, device=device, dtype=dtype,
                      trust_remote_code=trust_remote_code, quantization=quantization)


def _check_load_arguments(*, is_trainable: Any, trust_remote_code: Any, device: Any) -> None:
    """Refuse arguments that would silently mean something else (`is_trainable="no"` is truthy)."""
    from loraflow.flavor.layout import invalid
    from loraflow.flavor.load import device_problem

    problems = []
    if not isinstance(is_trainable, bool):
        problems.append(f"`is_trainable` must be True or False, got {is_trainable!r}")
    if trust_remote_code is not None and not isinstance(trust_remote_code, bool):
        problems.append(f"`trust_remote_code` must be True, False or None, got {trust_remote_code!r}")
    if device is not None and (problem := device_problem(device)):
        problems.append(problem)
    if problems:
        raise invalid("; ".join(problems))


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> "LoraflowPyfunc":
    """What `mlflow.pyfunc.load_model` calls for a model whose `loader_module` is `loraflow.flavor`
    (loraflow 0.1.0's earlier models); `pyfunc._load_pyfunc` does the work, and is the loader of the
    models saved by this code."""
    from loraflow.flavor import pyfunc

    return pyfunc._load_pyfunc(path, model_config)
