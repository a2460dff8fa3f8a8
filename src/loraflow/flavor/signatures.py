"""What a request looks like: the signatures and input examples saved with a model, and its
generation defaults, checked at save time (`save`; loading reads them from MLmodel).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraflow.flavor.generation import GENERATION_DEFAULTS, generation_settings
from loraflow.flavor.layout import invalid
from loraflow.flavor.pyfunc import OPENAI_UNSUPPORTED, PYFUNC_DEFAULTS

if TYPE_CHECKING:
    from mlflow.models import ModelSignature

# OpenAI chat keys outside MLflow's chat schema, and their types: MLflow's server drops a key that is in
# neither the input nor the params schema (with only a warning in its log), so these are declared as
# params (`chat_signature`) to reach `predict`, where any that is set is refused by name.
OPENAI_PARAMS = {"logprobs": "boolean", "top_logprobs": "long", "user": "string", "max_completion_tokens": "long",
                 "parallel_tool_calls": "boolean", "tool_choice": "string", "store": "boolean",
                 "service_tier": "string", "reasoning_effort": "string"}


def validated_generation_defaults(
    overrides: dict[str, Any] | None, max_new_tokens_cap: int = PYFUNC_DEFAULTS["max_new_tokens_cap"]
) -> dict[str, Any]:
    """`GENERATION_DEFAULTS` with `overrides` over them, every value checked as a request's would be.

    Raises:
        MlflowException: an unknown key or an invalid value.
    """
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in GENERATION_DEFAULTS]
    if unknown:
        raise invalid(
            f"`generation_defaults` has unknown keys {unknown}; known: {sorted(GENERATION_DEFAULTS)}"
        )
    defaults = {**GENERATION_DEFAULTS, **overrides}
    generation_settings(defaults, max_new_tokens_cap=max_new_tokens_cap)
    return defaults


def default_signature(
    generation_defaults: dict[str, Any] | None = None, max_new_tokens_cap: int = PYFUNC_DEFAULTS["max_new_tokens_cap"]
) -> "ModelSignature":
    """No input schema; output `text` (string); and a params schema for generation.

    Without a params schema MLflow silently drops the params of a request. The input schema is left
    out on purpose: MLflow's enforcement of one would keep only a frame's first column (a nested
    prompt list `[["a", "b"]]` would lose "b", a completions body its unknown keys) and quote the
    whole request in its errors. `predict` checks every input itself: a `prompt` column, a list of
    strings, a string, or OpenAI's completions body, which then arrives as the dict it is.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    d = validated_generation_defaults(generation_defaults, max_new_tokens_cap)
    return ModelSignature(
        inputs=None,
        outputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", int(d["max_new_tokens"])),
            ParamSpec("temperature", "double", float(d["temperature"])),
            ParamSpec("top_p", "double", float(d["top_p"])),
            ParamSpec("do_sample", "boolean", bool(d["do_sample"])),
            ParamSpec("repetition_penalty", "double", float(d["repetition_penalty"])),
            ParamSpec("seed", "long", int(d["seed"])),
            # OpenAI's name for max_new_tokens: without a spec MLflow's server drops it unseen
            ParamSpec("max_tokens", "long", None),
            *(ParamSpec(name, dtype, None) for name, (dtype, _) in OPENAI_UNSUPPORTED.items()),
        ]),
    )


def chat_signature() -> "ModelSignature":
    """A chat model's signature: MLflow's chat schema (`mlflow.types.llm`), plus `seed`.

    `messages` in and an OpenAI `chat.completion` object out; the generation settings travel in
    the request itself (`max_tokens`, `temperature`, `top_p`, `stop`, `seed`), as OpenAI sends them.
    OpenAI's other keys are params (`OPENAI_PARAMS`), so that a request using one is refused.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.types.llm import CHAT_MODEL_INPUT_SCHEMA, CHAT_MODEL_OUTPUT_SCHEMA

    inputs = Schema([*CHAT_MODEL_INPUT_SCHEMA.inputs, ColSpec("long", "seed", required=False)])
    params = ParamSchema([ParamSpec(name, dtype, None) for name, dtype in OPENAI_PARAMS.items()]
                         # loraflow's own: answer a list of reply texts, one per row (batch-predict, Spark)
                         + [ParamSpec("content_only", "boolean", False)])
    return ModelSignature(inputs=inputs, outputs=CHAT_MODEL_OUTPUT_SCHEMA, params=params)


def chat_input_example() -> dict[str, Any]:
    """A small chat request; short `max_tokens` keeps MLflow's log-time validation quick."""
    return {"messages": [{"role": "user", "content": "What is LoRA?"}], "max_tokens": 8}


def default_input_example() -> tuple[list[str], dict[str, Any]]:
    """A small example request; short `max_new_tokens` keeps MLflow's log-time validation quick.

    A list of prompts rather than a DataFrame: `mlflow.pyfunc.load_model` reads the example on
    every load, and pandas' JSON reader makes a DataFrame example the slower one to read.
    """
    return ["Question: What is LoRA?\nAnswer:"], {"max_new_tokens": 8}
