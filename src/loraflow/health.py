"""The promotion health gate: a version must load through pyfunc and answer its own input example."""

from __future__ import annotations

import tempfile
from typing import Any

from loraflow.flavor.layout import short

MAX_REASON_LENGTH = 500  # an exception text can be pages long; a tag should stay readable


def _texts(output: Any) -> list[Any]:
    """The answers in a model's output: a `text` column, a list, or chat completion objects."""
    import pandas as pd

    if isinstance(output, pd.DataFrame):
        column = "text" if "text" in output.columns else output.columns[0]
        return output[column].tolist()
    if isinstance(output, (pd.Series, list, tuple)):
        return [_chat_content(o) for o in output]
    return [_chat_content(output)]


def _chat_content(answer: Any) -> Any:
    """A chat model's `chat.completion` object: its reply's content; anything else as it is."""
    if isinstance(answer, dict) and isinstance(answer.get("choices"), list) and answer["choices"]:
        return (answer["choices"][0].get("message") or {}).get("content")
    return answer


def _error_text(err: BaseException) -> str:
    """`Type: message` of `err`, at most `MAX_REASON_LENGTH` characters of it (a tag stays readable)."""
    return short(f"{type(err).__name__}: {err}".strip(), MAX_REASON_LENGTH, quote=False)


def health_check(model_uri: str) -> str | None:
    """Load a model through pyfunc and ask it its own logged input example.

    Healthy means: the artifacts download, the model loads, it answers the input example (with the
    example's params) without raising, and every answer has non-whitespace text.

    Args:
        model_uri: any model URI, e.g. `models:/NAME/3`.

    Returns:
        None if the model is healthy, else the reason it is not (one sentence).
    """
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="loraflow-health-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        except Exception as err:
            return f"its artifacts cannot be downloaded ({_error_text(err)})"
        try:
            meta = Model.load(local)
            example = meta.load_input_example(local)
            params = meta.load_input_example_params(local)
        except Exception as err:
            return f"its logged input example cannot be read ({_error_text(err)})"
        if example is None:
            return "it has no logged input example to check it against"
        try:
            model = mlflow.pyfunc.load_model(local)
        except Exception as err:
            return f"it does not load through pyfunc ({_error_text(err)})"
        try:
            texts = _texts(model.predict(example, params=params))
        except Exception as err:
            return f"it fails on its logged input example ({_error_text(err)})"
        finally:
            del model
    if not texts:
        return "it answered its logged input example with no rows"
    empty = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if empty:
        return (f"it answered {len(empty)} of {len(texts)} prompts of its logged input example with empty text "
                f"(rows {empty[:5]})")
    return None
