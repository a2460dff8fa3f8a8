"""Tokenizing training rows, with the loss mask, and what happens to rows longer than the context.

A completion row becomes `[bos] + prompt + completion + [eos]` with the loss on the completion and
EOS only; a text row becomes `[bos] + text + [eos]` with the loss on every token after BOS; a
conversation is rendered with its chat template, with the loss where `train_on` says
(`loraflow.data.chat.tokenize_conversation`). Rows longer than `max_seq_length` are truncated or
dropped (`overflow`), and a row whose trained tokens were all cut is always dropped; a warning
counts both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from loraflow.config import OVERFLOWS
from loraflow.data.tables import IGNORE_INDEX, Columns, Table, _where
from loraflow.errors import ConfigError, DataError

if TYPE_CHECKING:
    import pandas as pd

logger = logging.getLogger(__name__)

MAX_CHARS_PER_TOKEN = 100  # no real tokenizer has longer tokens; cells beyond this are cut early


@dataclass
class TokenizedExamples:
    """Token ids and labels per example (unpadded), and what happened to over-long rows."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    """Same length as input_ids; -100 where no loss is computed (BOS, prompt)."""
    n_truncated: int = 0
    """Rows kept, cut to their first max_seq_length tokens."""
    n_dropped: int = 0
    """Rows removed: too long with overflow=drop, or nothing left to learn after truncation."""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.input_ids]

    @property
    def num_tokens(self) -> int:
        """Total tokens (there is no padding here)."""
        return sum(self.lengths)

    @property
    def num_label_tokens(self) -> int:
        """Tokens the loss is computed on (label != -100)."""
        return sum(sum(1 for t in labels if t != IGNORE_INDEX) for labels in self.labels)


@dataclass
class _Encoded:
    """Each row's full ids and labels, and whether a cell was cut before tokenizing."""

    ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    cut: list[bool] = field(default_factory=list)


def tokenize_table(table: Table, tokenizer: Any, columns: Columns, max_seq_length: int, overflow: str = "truncate",
                   *, chat_template: str | None = None, train_on: str = "assistant") -> TokenizedExamples:
    """`tokenize_examples` of a table (or of its conversations, rendered with `chat_template`),
    its messages naming the table's parameter and file."""
    if not columns.is_chat:
        return tokenize_examples(table.frame, tokenizer, columns, max_seq_length, overflow,
                                 role=table.role, source=table.source)
    from loraflow.data import chat

    _check_length_settings(overflow, max_seq_length)
    rows = table.frame[columns.messages].tolist()
    ids, labels = chat.tokenize_conversations(tokenizer, rows, table.where, train_on, chat_template)
    return _fit(_Encoded(ids, labels, [False] * len(ids)), max_seq_length, overflow, table.where)


def tokenize_examples(
    df: "pd.DataFrame",
    tokenizer: Any,
    columns: Columns,
    max_seq_length: int,
    overflow: str = "truncate",
    *,
    role: str = "train_data",
    source: str | None = None,
) -> TokenizedExamples:
    """Tokenize every row into `[bos] + prompt + completion + [eos]` (or `[bos] + text + [eos]`).

    Labels are the ids with -100 on BOS and the prompt; the model shifts them internally. BOS is
    never a prediction target anyway, and masking it keeps packed rows from learning to predict
    one example's BOS from the previous example. BOS/EOS are skipped if the tokenizer has none.

    Args:
        df: rows from `load_examples` (its `.frame`).
        tokenizer: a Hugging Face tokenizer.
        columns: which columns to use.
        max_seq_length: longest example in tokens.
        overflow: "truncate" keeps the first max_seq_length tokens; "drop" removes the row.
            Either way a warning says how many rows were affected.
        role, source: the parameter and file named in messages.

    Raises:
        DataError: no rows are left to train on.
        ConfigError: an unknown `overflow` or a max_seq_length below 2.
    """
    _check_length_settings(overflow, max_seq_length)
    where = _where(role, source)
    if len(df) == 0:
        raise DataError(f"{where}: has no rows to tokenize")
    encoded = _encode(df, tokenizer, columns, max_seq_length * MAX_CHARS_PER_TOKEN)
    return _fit(encoded, max_seq_length, overflow, where)


def _check_length_settings(overflow: str, max_seq_length: int) -> None:
    if overflow not in OVERFLOWS:
        raise ConfigError(f"`overflow` must be one of {', '.join(OVERFLOWS)}, got {overflow!r}")
    if max_seq_length < 2:
        raise ConfigError(f"`max_seq_length` must be at least 2 (BOS + one token), got {max_seq_length}")


def _fit(encoded: _Encoded, max_seq_length: int, overflow: str, where: str) -> TokenizedExamples:
    """Apply `overflow` to over-long rows, warn with the counts, and refuse a result with no row."""
    result, too_long, unlearnable = _fit_to_length(encoded, max_seq_length, overflow)
    if too_long:
        _warn_overflow(where, encoded, too_long, unlearnable, max_seq_length, overflow)
    if not result.input_ids:
        shortest = min(len(ids) for ids in encoded.ids)
        raise DataError(
            f"{where}: every one of the {len(encoded.ids)} rows was dropped: they are longer than "
            f"max_seq_length={max_seq_length} tokens (shortest: {shortest}) with overflow={overflow}"
            + (", or their prompt fills the whole max_seq_length" if unlearnable else "")
            + f"; raise --max-seq-length to at least {shortest}."
        )
    return result


def _encode(df: "pd.DataFrame", tokenizer: Any, columns: Columns, char_cap: int) -> _Encoded:
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def encode(name: str) -> tuple[list[list[int]], list[bool]]:
        # Cut giant cells to a length that is over max_seq_length tokens for any real tokenizer,
        # so a 10 MB cell costs milliseconds, not a quadratic BPE merge over 10 MB.
        texts = [str(v) for v in df[name].tolist()]
        ids = tokenizer([t[:char_cap] for t in texts], add_special_tokens=False)["input_ids"]
        return ids, [len(t) > char_cap for t in texts]

    if columns.is_prompt_completion:
        prompts, cut_p = encode(columns.prompt)  # type: ignore[arg-type]
        completions, cut_c = encode(columns.completion)  # type: ignore[arg-type]
        ids = [bos + p + c + eos for p, c in zip(prompts, completions)]
        masked = [len(bos) + len(p) for p in prompts]
        cut = [a or b for a, b in zip(cut_p, cut_c)]
    else:
        texts, cut = encode(columns.text)  # type: ignore[arg-type]
        ids, masked = [bos + t + eos for t in texts], [len(bos)] * len(texts)
    return _Encoded(ids, [[IGNORE_INDEX] * n + row[n:] for row, n in zip(ids, masked)], cut)


def _fit_to_length(encoded: _Encoded, max_seq_length: int, overflow: str) -> tuple[TokenizedExamples, int, int]:
    """Apply `overflow` to rows beyond `max_seq_length`; returns the kept rows and the counts of
    rows too long and of rows left with nothing to learn."""
    result = TokenizedExamples([], [])
    too_long = unlearnable = 0
    for ids, labels, was_cut in zip(encoded.ids, encoded.labels, encoded.cut):
        long = len(ids) > max_seq_length or was_cut
        too_long += long
        if long and overflow == "drop":
            continue
        ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if all(label == IGNORE_INDEX for label in labels):  # truncation left no trained token to learn from
            unlearnable += 1
            continue
        result.n_truncated += long
        result.input_ids.append(ids)
        result.labels.append(labels)
    result.n_dropped = len(encoded.ids) - len(result.input_ids)
    return result, too_long, unlearnable


def _warn_overflow(where: str, encoded: _Encoded, too_long: int, unlearnable: int, max_seq_length: int,
                   overflow: str) -> None:
    longest = max(len(ids) for ids in encoded.ids)
    action = f"truncated them to their first {max_seq_length} tokens" if overflow == "truncate" else "dropped them"
    lost = f"; {unlearnable} of them kept no completion token and were dropped" if unlearnable else ""
    logger.warning(
        "%s: %d of %d rows are longer than max_seq_length=%d tokens (longest: %s); %s%s. "
        "Raise --max-seq-length to keep them whole.",
        where, too_long, len(encoded.ids), max_seq_length, f"{longest:,}" + ("+" if any(encoded.cut) else ""),
        action, lost,
    )
