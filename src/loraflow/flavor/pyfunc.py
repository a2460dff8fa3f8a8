"""The python_function model: what `mlflow.pyfunc.load_model(...).predict` and `mlflow models serve` run.

A completion model takes prompts (a `prompt` column, a list of strings, a string) and generation
params, and answers a `text` column, one row per row in; OpenAI's completions body gets a
`text_completion` object. A chat model (`task: chat`) takes OpenAI chat bodies and answers
`chat.completion` objects (`chat`). The served model's own settings are its `model_config`
(`PYFUNC_DEFAULTS`), checked at save and at load.
"""

from __future__ import annotations

import numbers
from pathlib import Path
from typing import Any

from loraflow.flavor.dtypes import SERVING_DTYPES
from loraflow.flavor.layout import invalid, short
from loraflow.flavor.load import LoadedModel, device_problem, load_local
from loraflow.flavor.mlflow_private import _MLFLOW_IS_IN_SERVING_ENVIRONMENT

PYFUNC_DEFAULTS: dict[str, Any] = {
    "batch_size": 32,  # prompts generated together (sorted by length; see `loraflow.flavor.generation`)
    "max_new_tokens_cap": 4096,  # larger requests are refused rather than tying up a server
    # Served requests only: MLflow's server has no body limit and computes on after its timeout's 504.
    "max_request_prompts": 256,
    "max_request_chars": 1_000_000,
    "device": None,  # None: CUDA when available, else CPU
    # The dtype the base computes in. None: the device's (`dtypes`).
    "dtype": None,
}


# OpenAI's completions body, `{"prompt": ..., "max_tokens": N}`: its generation keys, by their OpenAI names.
OPENAI_COMPLETION_KEYS = {"max_tokens": "max_new_tokens", "temperature": "temperature", "top_p": "top_p",
                          "seed": "seed"}
# OpenAI completions parameters loraflow does not implement, with the value that means "unused":
# declared in the params schema (MLflow's server drops unknown ones) so `predict` can refuse them.
OPENAI_UNSUPPORTED = {"n": ("long", 1), "best_of": ("long", 1), "echo": ("boolean", False),
                      "stream": ("boolean", False), "logprobs": ("long", None), "suffix": ("string", None),
                      "stop": ("string", None), "presence_penalty": ("double", 0), "frequency_penalty": ("double", 0),
                      "user": ("string", None)}


def _prompts_and_params(data: Any, params: dict[str, Any] | None) -> tuple[list[str], dict[str, Any]]:
    """The prompts of a request, and its params: `params`, and for OpenAI's completions body the
    generation keys beside `prompt` (by their OpenAI names); an unknown or unsupported key is refused
    by name."""
    params = dict(params or {})
    if (max_tokens := params.pop("max_tokens", None)) is not None:  # the OpenAI spelling, in `params`
        params["max_new_tokens"] = max_tokens
    if isinstance(data, dict) and "prompt" in data:
        unknown = sorted(set(data) - {"prompt", *OPENAI_COMPLETION_KEYS, *OPENAI_UNSUPPORTED})
        if unknown:
            raise invalid(f"unknown request keys {short(unknown, 200)}; a completion request takes `prompt` and "
                          f"{sorted(OPENAI_COMPLETION_KEYS)}")
        from loraflow.flavor.chat import openai_temperature

        for theirs, ours in OPENAI_COMPLETION_KEYS.items():
            if data.get(theirs) is not None and theirs != "temperature":
                params[ours] = data[theirs]
        params.update(openai_temperature(data.get("temperature"), {}))
        params.update({k: v for k, v in data.items() if k in OPENAI_UNSUPPORTED})
        data = data["prompt"]
        data = [data] if isinstance(data, str) else data
    used = {k: params.pop(k) for k in OPENAI_UNSUPPORTED if k in params}
    used = sorted(k for k, v in used.items() if v is not None and v != OPENAI_UNSUPPORTED[k][1])
    if used:
        raise invalid(f"unsupported OpenAI parameters {used}: loraflow generates one continuation per prompt, "
                      "without streaming, log probabilities, penalties or stop strings; leave them out")
    return _prompts_from_input(data), params


def _prompts_from_input(data: Any) -> list[str]:
    """One prompt per row of a DataFrame with a `prompt` column, a list of strings, or a string (a
    row holding several prompts is refused: rows in equal rows out)."""
    import numpy as np
    import pandas as pd

    if isinstance(data, str):
        prompts: Any = [data]
    elif isinstance(data, pd.DataFrame):
        if "prompt" in data.columns:
            prompts = data["prompt"].tolist()
        elif list(map(str, data.columns)) == ["0"]:  # a list or a string after MLflow's enforcement, or spark_udf
            prompts = data[data.columns[0]].tolist()
        else:
            raise invalid(
                f"the input has no `prompt` column (columns: {short([str(c) for c in data.columns], 200)}); "
                'send e.g. {"dataframe_records": [{"prompt": "..."}]}'
            )
    elif isinstance(data, dict):
        raise invalid(f"the input dict has no `prompt` key (keys: {short(sorted(map(str, data)), 200)})")
    elif isinstance(data, (list, tuple, pd.Series, np.ndarray)):
        prompts = list(data)
    else:
        raise invalid(
            f"unsupported input type {type(data).__name__}: pass a DataFrame with a `prompt` column, "
            "a list of strings, a dict or a string"
        )
    if not prompts:
        raise invalid("the input holds no prompts: send at least one")
    nested = [i for i, p in enumerate(prompts) if isinstance(p, (list, tuple, np.ndarray))]
    if nested:
        raise invalid(f"rows {nested[:5]} hold a list of prompts (row {nested[0]}: {len(prompts[nested[0]])} "
                      'values); send one prompt per row, e.g. {"inputs": ["first", "second"]}')
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise invalid(f"every `prompt` must be a string; not strings (row, type): {bad[:5]}")
    return [str(p) for p in prompts]


class LoraflowPyfunc:
    """The pyfunc model: prompts in, continuations out; or, for a chat model, chat completions."""

    def __init__(self, loaded: LoadedModel, config: dict[str, Any], flavor_conf: dict[str, Any] | None = None):
        self.loaded = loaded
        self.config = config
        flavor_conf = flavor_conf or {}
        self.task = flavor_conf.get("task", "completion")
        self.end_of_turn_ids = list((flavor_conf.get("chat") or {}).get("end_of_turn_ids") or [])
        self.generation_defaults = dict(flavor_conf.get("generation_defaults") or {})
        self.model_name = str((flavor_conf.get("base") or {}).get("name") or "loraflow")

    def get_raw_model(self) -> LoadedModel:
        return self.loaded

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """Continuations of the prompts in `data` as a `text` column (one row per input row), or for
        OpenAI's completions body (a dict with `prompt`) a `text_completion` object with one choice per
        prompt; for a chat model, `chat.completion` objects."""
        import pandas as pd

        from loraflow.flavor.generation import generate  # here, not at load: loading never needs it

        if self.task == "chat":
            return self._predict_chat(data, params)
        body = isinstance(data, dict)
        prompts, params = _prompts_and_params(data, params)
        if _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get():  # set by MLflow's scoring server
            self._check_request_size(prompts)
        generated = generate(self.loaded.model, self.loaded.tokenizer, prompts, batch_size=self.config["batch_size"],
                             max_new_tokens_cap=self.config["max_new_tokens_cap"], **params)
        if not body:
            return pd.DataFrame({"text": [g.text for g in generated]})
        from loraflow.flavor.chat import text_completion_object

        return text_completion_object(generated, model=self.model_name)

    def _predict_chat(self, data: Any, params: dict[str, Any] | None = None) -> Any:
        """OpenAI chat requests in, `chat.completion` objects out (one object for one request).

        `params` holds the OpenAI keys declared in the chat signature's params schema (MLflow's server
        moves them out of the body): each one that is set is refused by name with the request. With
        `content_only`, the answer is the list of reply texts, one per request (a table's rows)."""
        from loraflow.flavor import chat
        from loraflow.flavor.generation import generate

        params = dict(params or {})
        content_only = params.pop("content_only", False)
        requests, single = chat.chat_requests(data)
        extra = {k: v for k, v in params.items() if v is not None}
        parsed = [chat.request_settings({**r, **extra}, self.generation_defaults) for r in requests]
        tokenizer = self.loaded.tokenizer
        prompts = [chat.render_prompt(tokenizer, messages) for messages, _, _ in parsed]
        if _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get():
            self._check_request_size(prompts)
        answers: list[Any] = [None] * len(parsed)
        groups: dict[str, list[int]] = {}
        for i, (_, settings, _) in enumerate(parsed):  # one generation per distinct setting
            groups.setdefault(repr(sorted(settings.items())), []).append(i)
        for rows in groups.values():
            generated = generate(self.loaded.model, tokenizer, [prompts[i] for i in rows],
                                 batch_size=self.config["batch_size"], max_new_tokens_cap=self.config["max_new_tokens_cap"],
                                 stop_token_ids=self.end_of_turn_ids, add_special_tokens=False, **parsed[rows[0]][1])
            for i, g in zip(rows, generated):
                text, cut = chat.cut_at_stop(g.text, parsed[i][2])
                answers[i] = chat.completion_object(
                    text, prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                    finish_reason="stop" if g.stopped or cut else "length", model=self.model_name)
        if content_only:  # tables: one reply per row, whatever the row count
            return [a["choices"][0]["message"]["content"] for a in answers]
        return answers[0] if single else answers

    def _check_request_size(self, prompts: list[str]) -> None:
        problems = []
        limit, chars = self.config["max_request_prompts"], sum(map(len, prompts))
        if len(prompts) > limit:
            problems.append(f"it holds {len(prompts)} prompts; the limit is {limit} (model_config `max_request_prompts`)")
        if chars > (limit := self.config["max_request_chars"]):
            problems.append(f"its prompts total {chars} characters; the limit is {limit} (model_config `max_request_chars`)")
        if problems:
            raise invalid("the request is too large: " + "; ".join(problems) + ". Split it into smaller requests")


MAX_ERROR_BYTES = 3000  # an error message's size in a served response, as JSON


def cap_served_errors() -> None:
    """Keep the error bodies of MLflow's scoring server short (it quotes the whole request): its
    `invocations` is wrapped once so an error keeps its start and end within `MAX_ERROR_BYTES`."""
    import functools
    import sys

    from mlflow.exceptions import MlflowException

    server = sys.modules.get("mlflow.pyfunc.scoring_server")
    if server is None or getattr(server.invocations, "loraflow_capped", False):
        return
    original = server.invocations

    @functools.wraps(original)
    def invocations(*args: Any, **kwargs: Any) -> Any:
        try:
            return original(*args, **kwargs)
        except MlflowException as err:
            err.message = capped(err.message)
            if isinstance(err.json_kwargs.get("stack_trace"), str):
                err.json_kwargs["stack_trace"] = capped(err.json_kwargs["stack_trace"])
            raise

    invocations.loraflow_capped = True  # type: ignore[attr-defined]
    server.invocations = invocations


def capped(text: str, budget: int = MAX_ERROR_BYTES) -> str:
    """`text`, or its start and its end with the count of characters left out, in `budget` bytes of JSON."""
    import json

    keep = budget - 60
    while len(json.dumps(text)) > budget and keep > 0:
        head, tail = text[: keep // 3], text[-(keep - keep // 3):]
        shorter = f"{head} [... {len(text) - len(head) - len(tail):,} characters left out ...] {tail}"
        if len(json.dumps(shorter)) <= budget:
            return shorter
        keep //= 2
    return text if len(json.dumps(text)) <= budget else text[: budget // 12]


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
    if config["dtype"] is not None and config["dtype"] not in SERVING_DTYPES:
        problems.append(f"model_config `dtype` must be None (the device's default) or one of {list(SERVING_DTYPES)}, "
                        f"got {short(config['dtype'], 60)}")
    if problems:
        raise invalid("; ".join(problems))
    return config


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> LoraflowPyfunc:
    """The pyfunc model of the model saved at `path`: called by `mlflow.pyfunc.load_model` and
    `mlflow models serve` (this module is the model's `loader_module`) with its local directory."""
    import torch

    from loraflow.flavor.layout import read_flavor_conf
    from loraflow.flavor.quantization import quiet_bitsandbytes

    quiet_bitsandbytes()  # before peft imports bitsandbytes

    config = pyfunc_config(model_config)
    device = config["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    conf = read_flavor_conf(Path(path))
    # in eval mode: peft sets it unless trainable
    loaded = load_local(Path(path), device=device, dtype=config["dtype"], conf=conf)
    cap_served_errors()
    return LoraflowPyfunc(loaded, config, conf)
