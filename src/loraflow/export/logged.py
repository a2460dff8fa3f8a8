"""`--format transformers`: the merged model logged with MLflow's built-in `transformers` flavor into a
new run (tagged with its source), optionally registered; the task is `llm/v1/chat` for a model
recorded as a chat model, else `text-generation` (continuation only, generation params at predict).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from loraflow.export import EXPORT_RECORD, ExportError, ExportResult
from loraflow.export.merged import load_source
from loraflow.export.source import Source, provenance, target_dtype

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TAG_PREFIX = "loraflow.export."


def chat_task(source: Source, tokenizer: "PreTrainedTokenizerBase") -> str:
    """`llm/v1/chat` for a model recorded as a chat model (flavor conf `task: chat`), else `text-generation`."""
    task = source.conf.get("task")
    if task == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ExportError(f"the model {source.uri!r} records `task` 'chat' but its tokenizer has no chat "
                              "template: re-log it with a tokenizer that has one")
        return "llm/v1/chat"
    return "text-generation"


def export_transformers(
    source: Source,
    *,
    dtype: str = "auto",
    registered_model_name: str | None = None,
    name: str = "model",
    progress: bool = True,
    force: bool = False,
) -> ExportResult:
    """Log the merged model with `mlflow.transformers.log_model` into a new run; tag the run with the source.
    `force`: merge a QLoRA model (`merged.load_source`).

    The run is new, nested under an active run if there is one; under `mlflow run . -e export` it is
    the project's run (MLflow starts it for the entry point). MLflow's transformers pyfunc strips
    whitespace around every generated text, so its continuations can lack the loraflow model's
    leading space; the tokens are the same (greedy).
    """
    import mlflow
    import torch
    from tqdm.auto import tqdm

    torch_dtype = target_dtype(source, dtype)
    with tqdm(total=3, desc="export transformers", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("load")
        model, tokenizer, _ = load_source(source, force)
        model.to(getattr(torch, torch_dtype))
        bar.update()
        task = chat_task(source, tokenizer)
        record = provenance(source, "transformers", torch_dtype)
        record["task"] = task
        bar.set_postfix_str("log")
        with mlflow.start_run(run_name="loraflow-export", nested=mlflow.active_run() is not None) as run:
            mlflow.set_tags(_tags(record))
            mlflow.log_dict(record, EXPORT_RECORD)
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name=name,
                task=task,
                registered_model_name=registered_model_name or None,
                pip_requirements=_transformers_requirements(),
                **_text_generation_arguments(source, task),
            )
        bar.update(2)
    version = str(info.registered_model_version) if getattr(info, "registered_model_version", None) else None
    served = f"models:/{registered_model_name}/{version}" if version else info.model_uri
    notes = [f"task {task}; serve it with: mlflow models serve -m {served}"]
    return ExportResult("transformers", info.model_uri, record, notes, run_id=run.info.run_id,
                        registered_version=version)


def _tags(record: dict[str, Any]) -> dict[str, str]:
    """The `loraflow.export.*` run tags: the source model, base fingerprint and adapter digest."""
    return {
        f"{TAG_PREFIX}source_model_uri": record["source_model_uri"],
        f"{TAG_PREFIX}base_fingerprint": str(record["base_fingerprint"]),
        f"{TAG_PREFIX}adapter_sha256": str(record["adapter_sha256"].get("adapter_model.safetensors")),
        f"{TAG_PREFIX}format": "transformers",
    }


def _transformers_requirements() -> list[str]:
    """transformers, torch, accelerate pinned to this environment. (`mlflow.transformers`' default
    also pins torchvision, which a text model does not need and which may not be installed.)"""
    import importlib.util

    from loraflow.flavor.mlflow_private import _get_pinned_requirement

    return [_get_pinned_requirement(p) for p in ("transformers", "torch", "accelerate")
            if importlib.util.find_spec(p) is not None]


def _text_generation_arguments(source: Source, task: str) -> dict[str, Any]:
    """For `text-generation`: return only the continuation, and accept generation params at predict time."""
    if task != "text-generation":
        return {}
    from mlflow.models import infer_signature

    defaults = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0}
    recorded = source.conf.get("generation_defaults") or {}
    params = {key: type(value)(recorded.get(key, value)) for key, value in defaults.items()}
    return {
        "model_config": {"return_full_text": False},
        "signature": infer_signature(["prompt"], ["text"], params=params),
    }
