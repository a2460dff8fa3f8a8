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

    shown, prompts, expected = [], [], []
    for messages in conversations:
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        asked = [m for m in messages[:last] if m["role"] == "user"]
        shown.append(asked[-1]["content"] if asked else "")
        prompts.append(chat.render_prompt(tokenizer, messages[:last], template))
        expected.append(messages[last]["content"])
    return Samples(shown, prompts, expected, chat=True, stop_token_ids=chat.end_of_turn_ids(tokenizer, template))


def answer(model: Any, tokenizer: Any, samples: Samples, batch_size: int = 32) -> list[str]:
    """Greedy answers of `model` (kept in eval mode while it generates) to `samples`."""
    from loraflow.flavor.generation import generate

    if not samples.prompts:
        return []
    longest = max(len(ids) for ids in tokenizer(samples.expected, add_special_tokens=False)["input_ids"])
    was_training = model.training
    model.eval()
    try:
        generated = generate(model, tokenizer, samples.prompts, batch_size=batch_size,
                             max_new_tokens_cap=MAX_NEW_TOKENS, max_new_tokens=min(MAX_NEW_TOKENS, longest + SLACK_TOKENS),
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
