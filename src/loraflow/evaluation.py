"""Generation metrics: does the model answer better, not only is the loss lower.

At every evaluation of a run (step 0 included) a fixed, seeded subset of the eval set
(`eval_samples` rows) is answered greedily by the model in memory, with the flavor's batched
generation, and scored against the expected answers with `loraflow.metrics` (normalised exact
match, SQuAD-style token F1). For a completion row the prompt is its `prompt` and the expected
answer its `completion`; for a conversation, everything before its last assistant reply is the
prompt (rendered with the run's chat template) and that reply is the expected answer.

`loraflow evaluate MODEL_URI --data FILE` scores a logged model the same way, through pyfunc.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraflow import metrics

if TYPE_CHECKING:
    from loraflow.data import Columns, Table

MAX_NEW_TOKENS = 64  # the most an eval answer is given; each set gets its longest answer + SLACK
SLACK_TOKENS = 8


@dataclass(frozen=True)
class Samples:
    """The eval rows a run generates for: what is shown, what the model is given, what is expected."""

    shown: list[str]
    """The question as a person reads it: the prompt, or a conversation's last user message."""
    prompts: list[str]
    """What the model is given: the prompt, or the conversation rendered up to the reply."""
    expected: list[str]
    chat: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    conversations: list[list[dict]] = field(default_factory=list)
    """For chat samples: each conversation up to (not including) the reply that is expected."""

    def answer_budget(self, tokenizer: Any) -> int:
        """New tokens each answer gets: the longest expected answer + `SLACK_TOKENS`, at most `MAX_NEW_TOKENS`."""
        longest = max(len(ids) for ids in tokenizer(self.expected, add_special_tokens=False)["input_ids"])
        return min(MAX_NEW_TOKENS, longest + SLACK_TOKENS)


def pick_samples(table: "Table", columns: "Columns", n: int, seed: int, tokenizer: Any,
                 chat_template: str | None = None) -> Samples:
    """A seeded subset of at most `n` rows of `table`, in file order (the same at every evaluation)."""
    import numpy as np

    rows = sorted(np.random.default_rng(seed).permutation(len(table))[: min(n, len(table))].tolist())
    frame = table.frame.iloc[rows]
    if not columns.is_chat:
        if columns.is_prompt_completion:
            prompts, expected = frame[columns.prompt].tolist(), frame[columns.completion].tolist()
        else:  # plain text: nothing is asked; no generation metrics
            return Samples([], [], [])
        return Samples([str(p) for p in prompts], [str(p) for p in prompts], [str(c) for c in expected])
    return _chat_samples(frame[columns.messages].tolist(), tokenizer, chat_template)


def _chat_samples(conversations: list[list[dict]], tokenizer: Any, template: str | None) -> Samples:
    from loraflow.flavor import chat

    shown, prompts, expected, before = [], [], [], []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        asked = [m for m in messages[:last] if m["role"] == "user"]
        shown.append(asked[-1]["content"] if asked else "")
        before.append(list(messages[:last]))
        prompts.append(chat.render_prompt(tokenizer, before[-1], template))
        expected.append(messages[last]["content"])
    return Samples(shown, prompts, expected, chat=True, stop_token_ids=chat.end_of_turn_ids(tokenizer, template),
                   conversations=before)


def answer(model: Any, tokenizer: Any, samples: Samples, batch_size: int = 32) -> list[str]:
    """Greedy answers of `model` (kept in eval mode while it generates) to `samples`."""
    from loraflow.flavor.generation import generate

    if not samples.prompts:
        return []
    was_training = model.training
    model.eval()
    try:
        generated = generate(model, tokenizer, samples.prompts, batch_size=batch_size,
                             max_new_tokens_cap=MAX_NEW_TOKENS, max_new_tokens=samples.answer_budget(tokenizer),
                             stop_token_ids=samples.stop_token_ids or None, add_special_tokens=not samples.chat)
    finally:
        model.train(was_training)
    return [g.text for g in generated]


def score(answers: list[str], expected: list[str]) -> dict[str, float]:
    """`eval_exact_match` and `eval_token_f1`: means over the samples (`loraflow.metrics`)."""
    if not expected:
        return {}
    return {
        "eval_exact_match": sum(map(metrics.exact_match, answers, expected)) / len(expected),
        "eval_token_f1": sum(map(metrics.token_f1, answers, expected)) / len(expected),
    }


def table_rows(step: int, samples: Samples, answers: list[str]) -> list[dict[str, Any]]:
    """One row per sample for the MLflow table `eval_samples.json`."""
    return [
        {"step": step, "prompt": shown, "expected": expected, "generated": generated,
         "exact_match": metrics.exact_match(generated, expected)}
        for shown, expected, generated in zip(samples.shown, samples.expected, answers)
    ]


# ---------------------------------------------------------------------------------------------
# Scoring a logged model: `loraflow evaluate`.


@dataclass
class Evaluation:
    """What `evaluate_model` measured: the metrics, the rows behind them, and where they were logged."""

    metrics: dict[str, float]
    rows: list[dict[str, Any]]
    run_id: str | None = None


def evaluate_model(model_uri: str, data_path: str, *, settings: Any = None, samples: int | None = None,
                   seed: int = 42, max_new_tokens: int | None = None, log_to: str | None = None) -> Evaluation:
    """Score a logged loraflow model on a data file with the training run's generation metrics.

    Args:
        model_uri: a logged loraflow model (`models:/NAME@champion`, `runs:/ID/model`, a folder).
        data_path: a data file with `prompt` + `completion` or `messages` columns (or `builtin:qa`).
        settings: the data settings (`config.DataSettings`) naming other columns; default: the defaults.
        samples: score a seeded subset of this many rows; default: every row.
        seed: the subset's seed.
        max_new_tokens: the most each answer gets; default: the longest expected answer + 8.
        log_to: log the metrics and the samples table to this run id, or to a new run with "new".

    Raises:
        DataError, ConfigError: a bad data file or settings (before the model loads).
        MlflowException: a URI with no loraflow model.
    """
    import mlflow

    from loraflow import data as data_lib
    from loraflow.config import DataSettings

    settings = settings or DataSettings()
    path = data_lib.resolve_data(data_path)
    frame = data_lib.read_table(path, "data")
    columns = data_lib.columns_of(settings, [str(c) for c in frame.columns])
    table = data_lib.check_examples(frame, path, columns, "data", settings.train_on)
    model = mlflow.pyfunc.load_model(model_uri)
    tokenizer = model.get_raw_model().tokenizer
    chosen = pick_samples(table, columns, samples or len(table), seed, tokenizer)
    answers = _pyfunc_answers(model, chosen, max_new_tokens or chosen.answer_budget(tokenizer))
    result = Evaluation(score(answers, chosen.expected), table_rows(0, chosen, answers))
    if log_to:
        result.run_id = _log_evaluation(result, model_uri, path, log_to)
    return result


def _pyfunc_answers(model: Any, chosen: Samples, max_new_tokens: int) -> list[str]:
    """The model's answers through pyfunc, as `mlflow models serve` would give them."""
    if not chosen.chat:
        return [str(t) for t in model.predict(chosen.prompts, params={"max_new_tokens": max_new_tokens})["text"]]
    answers = model.predict([{"messages": messages, "max_tokens": max_new_tokens} for messages in chosen.conversations])
    answers = [answers] if isinstance(answers, dict) else answers  # one request: MLflow answers one object
    return [a["choices"][0]["message"]["content"] for a in answers]


def _log_evaluation(result: Evaluation, model_uri: str, data_path: str, log_to: str) -> str:
    """Log into a new run, or into an existing one without touching its status (a run that failed
    stays FAILED: promotion reads it)."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    tags = {"loraflow.evaluate.model_uri": model_uri, "loraflow.evaluate.data": str(data_path)}
    if log_to == "new":
        with mlflow.start_run(run_name="evaluate") as run:
            run_id = run.info.run_id
            mlflow.set_tags(tags)
    else:
        run_id = MlflowClient().get_run(log_to).info.run_id  # an unknown id fails here, before logging
    client = MlflowClient()
    for key, value in result.metrics.items():
        client.log_metric(run_id, key, value)
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    mlflow.log_table(pd.DataFrame(result.rows), "evaluate_samples.json", run_id=run_id)
    return run_id
