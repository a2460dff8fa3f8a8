"""What a run says about itself in the MLflow UI: its name, the tags people filter on, and the
Markdown description (`mlflow.note.content`) of the run and of a registered version.

Pure functions of settings and results; `loraflow.tracking` writes what they return.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from loraflow.flavor.layout import BUILTIN_PREFIX

NOTE_TAG = "mlflow.note.content"  # the run's description in the MLflow UI
DEFAULT_TASK = "completion"
MAX_NAME_LENGTH = 250  # MLflow's limit on a run name (the mlflow.runName tag) is 250 characters
SAMPLE_DATA_NAME = "qa"  # the bundled default sample, `builtin:qa` (src/loraflow/resources/sample.jsonl)


def short_model_name(base_model: str) -> str:
    """`builtin:tiny` -> `tiny`, `Qwen/Qwen2.5-0.5B` -> `Qwen2.5-0.5B`, `/models/llama/` -> `llama`."""
    text = str(base_model).strip().rstrip("/\\")
    text = text.removeprefix(BUILTIN_PREFIX)
    return _slug(re.split(r"[/\\]", text)[-1]) or "model"


def short_data_name(train_data: str | None) -> str:
    """The training file's stem (`data/qa.jsonl` -> `qa`); a bundled dataset's name (`builtin:chat`
    -> `chat`; `qa` for the default sample)."""
    if not train_data:
        return SAMPLE_DATA_NAME
    if str(train_data).startswith(BUILTIN_PREFIX):
        return _slug(str(train_data).removeprefix(BUILTIN_PREFIX)) or SAMPLE_DATA_NAME
    name = PurePath(str(train_data).rstrip("/\\")).name
    for suffix in (".gz", ".jsonl", ".json", ".csv", ".parquet"):
        name = name[: -len(suffix)] if name.lower().endswith(suffix) else name
    return _slug(name) or "data"


def _slug(text: str) -> str:
    return re.sub(r"-{2,}", "-", re.sub(r"[^A-Za-z0-9._-]+", "-", text)).strip("-.")


def run_name(r: int, base_model: str, train_data: str | None) -> str:
    """`lora-r<rank>-<base short name>-<data short name>`, e.g. `lora-r16-tiny-qa`."""
    return f"lora-r{r}-{short_model_name(base_model)}-{short_data_name(train_data)}"[:MAX_NAME_LENGTH]


def is_generated_name(name: str | None) -> bool:
    """Whether `name` is one MLflow made up (`brave-fox-123`), as for a run `mlflow run` started unnamed."""
    if not name:
        return True
    match = re.fullmatch(r"([a-z]+)-([a-z]+)-(\d+)", name)
    if not match:
        return False
    from loraflow.flavor.mlflow_private import run_name_words

    words = run_name_words()
    if words is None:  # without MLflow's lists, any name of that shape counts as generated
        return True
    return match.group(1) in words[0] and match.group(2) in words[1]


def _modules_text(target_modules: Any) -> str:
    if isinstance(target_modules, (list, tuple)):
        return ",".join(str(m) for m in target_modules)
    return str(target_modules)


def run_tags(base_model: str, r: int, target_modules: Any, task: str | None = None,
             quantization: str = "none", digests: Mapping[str, str] | None = None,
             base_fingerprint: str | None = None) -> dict[str, str]:
    """The tags of a training run: `base_model`, `task`, `lora.r`, `lora.target_modules`,
    `quantization`, `dataset.<name>.digest` per dataset and, once known, `base_fingerprint`."""
    tags = {
        "base_model": str(base_model),
        "task": task or DEFAULT_TASK,
        "lora.r": str(r),
        "lora.target_modules": _modules_text(target_modules),
        "quantization": quantization,
    }
    tags.update({f"dataset.{name}.digest": str(digest) for name, digest in (digests or {}).items()})
    if base_fingerprint:
        tags["base_fingerprint"] = base_fingerprint
    return tags


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def metric_line(metrics: Mapping[str, tuple[float | None, float | None]]) -> str:
    """`**eval_loss** 5.316 → 2.725 · **eval_exact_match** 0 → 0.5`: each metric before and after training."""
    return " · ".join(f"**{name}** {_number(before)} → {_number(after)}" for name, (before, after) in metrics.items())


def run_description(*, base_model: str, train_data: str | None, r: int, target_modules: Any,
                    task: str | None, steps: int | None, metrics: Mapping[str, tuple[float | None, float | None]],
                    model_uri: str | None, registered_model_name: str | None = None,
                    registered_version: str | None = None) -> str:
    """The run's Markdown description: what was trained on what, the metrics before and after,
    the model and whether it is registered, then how to load, serve and promote (or first register) it.

    The UI shows the first few lines until "Show more": what matters comes first.
    """
    data = f"`{train_data}`" if train_data else "the bundled sample (`src/loraflow/resources/sample.jsonl`)"
    trained = f"{steps} optimizer steps" if steps else "training"
    lines = [
        f"**LoRA** (r={r}, `{_modules_text(target_modules)}`) on **`{base_model}`**, task `{task or DEFAULT_TASK}`, "
        f"{trained} on {data}.",
        "",
        f"Before → after training: {metric_line(metrics)}",
        "",
    ]
    if not model_uri:
        lines.append("The model was **not logged** to MLflow (see the training output for where it was saved).")
        return "\n".join(lines)
    if registered_model_name:
        status = f"registered as `{registered_model_name}` version {registered_version or '?'}"
    else:
        status = ("not registered, hence \"Registered models: None\": no `registered_model_name` was given "
                  "(how to register: below)")
    lines += [f"Model: `{model_uri}`, {status}.", "", "```", "# load",
              f"mlflow.pyfunc.load_model(\"{model_uri}\").predict([\"Question: ...\\nAnswer:\"])",
              "# serve",
              f"mlflow models serve -m {model_uri} --env-manager local --port 5001"]
    if registered_model_name:
        lines += ["# promote (gives it @champion if it beats the current champion)",
                  f"loraflow promote --model-name {registered_model_name}", "```"]
    else:
        lines += ["# promote: register first, by training with a name ...",
                  "mlflow run . -P registered_model_name=NAME   # or: loraflow train --registered-model-name NAME",
                  "# ... then",
                  "loraflow promote --model-name NAME", "```"]
    return "\n".join(lines)


def version_description(*, run_id: str | None, run_name: str | None, base_model: str, train_data: str | None,
                        r: int, metric: str, before: float | None, after: float | None) -> str:
    """A registered version's description: where it came from and its headline metric."""
    data = f"`{train_data}`" if train_data else "the bundled sample"
    return (f"LoRA r={r} on `{base_model}`, trained on {data} in run `{run_name or run_id}` "
            f"(run id `{run_id}`). **{metric}** {_number(before)} → {_number(after)}.")


def before_after(history: Sequence[tuple[int, float]]) -> tuple[float | None, float | None]:
    """The value at the first and at the last step of a metric's `(step, value)` history."""
    if not history:
        return None, None
    ordered = sorted(history, key=lambda point: point[0])
    return ordered[0][1], ordered[-1][1]
