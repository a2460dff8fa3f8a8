"""The `loraflow` MLflow flavor: save, log, load and serve PEFT LoRA models without losing a bit.

This module is the flavor's fixed surface, shaped like MLflow's own flavor modules
(`mlflow/spacy/__init__.py`, `mlflow/lightgbm/__init__.py`): `FLAVOR_NAME`,
`get_default_pip_requirements`, `save_model`, `log_model`, `load_model`, and the private
`_load_pyfunc` that `mlflow.pyfunc.load_model` and `mlflow models serve` call. Each function
imports its implementation when called, so importing the package (or one of its light modules) costs
nothing; torch, transformers and peft are imported inside functions throughout.

The package, module by module (each one says what it owns):

- `layout`: where things are in a saved model, and the flavor configuration;
- `files`: writing files and folders atomically, and file digests;
- `bases`: the base model's sources (built-in, local folder, Hub) and loading it and its tokenizer;
- `fingerprint`: base and adapter digests, and the digest cache;
- `load`: loading a saved model, with every check, as a `PeftModel`;
- `pyfunc`: the python_function wrapper: requests in, generations out;
- `generation`: batched generation;
- `quantization`: QLoRA's quantized base (bitsandbytes): the recipe, and the record a model keeps;
- `stored_base`: a base's files, embedded in a model or logged once per fingerprint and downloaded once;
- `mlflow_private`: every private MLflow name the flavor uses, in one place;
- `save`: writing a model.

Why a custom flavor: `mlflow.transformers` round-trips a LoRA model on a local base with different
logits and reloads the adapter frozen. This one reloads the exact weights (max abs logit diff 0.0 in
fp32 on CPU) and can reload them trainable, with the same trainable/total parameter counts.

The package ships inside every saved model (`code/loraflow/flavor`, via MLflow's `code_paths`)
instead of being pinned as a requirement: loraflow is usually installed editable from a checkout, so
a `loraflow==X` pin would not resolve in a fresh serving environment, and the code that wrote a model
is the code that loads it. So it imports nothing from the rest of loraflow, except the built-in
recipe (`loraflow.builtin`, shipped beside it) to rebuild a referenced built-in base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraflow.flavor.layout import FLAVOR_NAME, FLAVOR_VERSION

if TYPE_CHECKING:
    from loraflow.flavor.load import LoadedModel
    from loraflow.flavor.pyfunc import LoraflowPyfunc

__all__ = ["FLAVOR_NAME", "FLAVOR_VERSION", "get_default_pip_requirements", "load_model", "log_model", "save_model"]


def get_default_pip_requirements() -> list[str]:
    """Third-party pins of a saved model (loraflow itself travels as code, see the package docstring)."""
    from loraflow.flavor import save

    return save.get_default_pip_requirements()


def save_model(peft_model: Any, path: Any, tokenizer: Any, **kwargs: Any) -> None:
    """Save a PEFT LoRA model, its tokenizer and its base model to a new local directory.

    The keyword arguments (`base_model`, `base_mode`, `signature`, `input_example`, ...) are
    documented on `loraflow.flavor.save.save_model`.
    """
    from loraflow.flavor import save

    save.save_model(peft_model, path, tokenizer, **kwargs)


def log_model(peft_model: Any, name: str, tokenizer: Any, **kwargs: Any) -> Any:
    """Log a PEFT LoRA model to the active MLflow run; returns its `ModelInfo`.

    The keyword arguments (`registered_model_name`, `base_model`, ...) are documented on
    `loraflow.flavor.save.log_model`.
    """
    from loraflow.flavor import save

    return save.log_model(peft_model, name, tokenizer, **kwargs)


def load_model(model_uri: str, **kwargs: Any) -> "LoadedModel":
    """Load a loraflow model as `(model, tokenizer)`: the verified base with the adapter applied.

    The keyword arguments (`is_trainable`, `device`, `dtype`, `dst_path`, `trust_remote_code`,
    `quantization`) are documented on `loraflow.flavor.load.load_model`.
    """
    from loraflow.flavor import load

    return load.load_model(model_uri, **kwargs)


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> "LoraflowPyfunc":
    """Called by `mlflow.pyfunc.load_model` and `mlflow models serve` with the model's local directory."""
    from loraflow.flavor import pyfunc

    return pyfunc.load_pyfunc(path, model_config)
