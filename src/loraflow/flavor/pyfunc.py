"""The python_function model: what `mlflow.pyfunc.load_model(...).predict` and `mlflow models serve` run.

`predict` takes a DataFrame with a `prompt` column (or a list of strings, a dict, a string) and
params (`max_new_tokens`, `temperature`, `top_p`, `do_sample`, `repetition_penalty`, `seed`), and
returns a DataFrame with a `text` column: the continuation only. Settings of the served model itself
are its `model_config` (`PYFUNC_DEFAULTS`; override with `mlflow.pyfunc.load_model(uri,
model_config={...})`), checked by `pyfunc_config` at save time and at load time alike.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT

from loraflow.flavor.layout import invalid
from loraflow.flavor.load import LoadedModel, device_problem, load_local

if TYPE_CHECKING:
    import pandas as pd

PYFUNC_DEFAULTS: dict[str, Any] = {
    "batch_size": 32,  # prompts generated together (sorted by length; see `loraflow.flavor.generation`)
    "max_new_tokens_cap": 4096,  # larger requests are refused rather than tying up a server
    # Served requests only (`mlflow models serve`): MLflow's scoring server (uvicorn) has no body
    # size limit and keeps computing after its timeout answers 504, so the model refuses oversized
    # requests with a 400 before tokenizing. In-process predict (batch-predict) is not limited.
    "max_request_prompts": 256,
    "max_request_chars": 1_000_000,
    "device": None,  # None: CUDA when available, else CPU
}


def _prompts_from_input(data: Any) -> list[str]:
    """Accept a DataFrame with a `prompt` column, a list of strings, a dict or a single string."""
    import numpy as np
    import pandas as pd

    if isinstance(data, str):
        prompts: Any = [data]
    elif isinstance(data, pd.DataFrame):
        if "prompt" in data.columns:
            prompts = data["prompt"].tolist()
        elif list(data.columns) == [0]:  # how MLflow's schema enforcement passes a list or a string
            prompts = data[0].tolist()
        else:
            raise invalid(
                f"the input has no `prompt` column (columns: {[str(c) for c in data.columns]}); "
                'send e.g. {"dataframe_records": [{"prompt": "..."}]}'
            )
        if len(prompts) == 1 and isinstance(prompts[0], (list, tuple, np.ndarray)):
            prompts = list(prompts[0])  # {"prompt": [...]} arrives as one row holding the list
    elif isinstance(data, dict):
        if "prompt" not in data:
            raise invalid(f"the input dict has no `prompt` key (keys: {sorted(map(str, data))})")
        value = data["prompt"]
        prompts = [value] if isinstance(value, str) else list(value)
    elif isinstance(data, (list, tuple, pd.Series, np.ndarray)):
        prompts = list(data)
    else:
        raise invalid(
            f"unsupported input type {type(data).__name__}: pass a DataFrame with a `prompt` column, "
            "a list of strings, a dict or a string"
        )
    if not prompts:
        raise invalid("the input holds no prompts: send at least one")
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise invalid(f"every `prompt` must be a string; not strings (row, type): {bad[:5]}")
    return [str(p) for p in prompts]


class LoraflowPyfunc:
    """The pyfunc model: a DataFrame with a `prompt` column in, a DataFrame with `text` out."""

    def __init__(self, loaded: LoadedModel, config: dict[str, Any]):
        self.loaded = loaded
        self.config = config

    def get_raw_model(self) -> LoadedModel:
        return self.loaded

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> "pd.DataFrame":
        import pandas as pd

        from loraflow.flavor.generation import generate_texts  # here, not at load: loading never needs it

        prompts = _prompts_from_input(data)
        if _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get():  # set by MLflow's scoring server
            self._check_request_size(prompts)
        texts = generate_texts(
            self.loaded.model,
            self.loaded.tokenizer,
            prompts,
            batch_size=self.config["batch_size"],
            max_new_tokens_cap=self.config["max_new_tokens_cap"],
            **(params or {}),
        )
        return pd.DataFrame({"text": texts})

    def _check_request_size(self, prompts: list[str]) -> None:
        problems = []
        limit, chars = self.config["max_request_prompts"], sum(map(len, prompts))
        if len(prompts) > limit:
            problems.append(f"it holds {len(prompts)} prompts; the limit is {limit} (model_config `max_request_prompts`)")
        if chars > (limit := self.config["max_request_chars"]):
            problems.append(f"its prompts total {chars} characters; the limit is {limit} (model_config `max_request_chars`)")
        if problems:
            raise invalid("the request is too large: " + "; ".join(problems) + ". Split it into smaller requests")


def pyfunc_config(model_config: dict[str, Any] | None) -> dict[str, Any]:
    """`PYFUNC_DEFAULTS` with `model_config` over them, every value checked (at save and at load).

    Raises:
        MlflowException: an unknown key, a count that is not a positive integer (a bool is not one),
            or a device that does not exist on this machine.
    """
    config = {**PYFUNC_DEFAULTS, **(model_config or {})}
    problems = [f"unknown model_config key `{k}`; known: {sorted(PYFUNC_DEFAULTS)}" for k in config if k not in PYFUNC_DEFAULTS]
    for key in ("batch_size", "max_new_tokens_cap", "max_request_prompts", "max_request_chars"):
        value = config[key]
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
            problems.append(f"model_config `{key}` must be a positive integer, got {value!r}")
    if config["device"] is not None and (problem := device_problem(config["device"])):
        problems.append(f"model_config {problem}")
    if problems:
        raise invalid("; ".join(problems))
    return config


def load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> LoraflowPyfunc:
    """The pyfunc model of the model saved at `path` (what `loraflow.flavor._load_pyfunc` returns)."""
    import torch

    config = pyfunc_config(model_config)
    device = config["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_local(Path(path), device=device)  # in eval mode: peft sets it unless trainable
    return LoraflowPyfunc(loaded, config)
