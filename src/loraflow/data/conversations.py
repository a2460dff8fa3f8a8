"""Conversations in OpenAI `messages` format: read them from a table cell, and check them before any model loads.

A conversation is a list of `{"role": ..., "content": ...}` with roles `system`, `user`,
`assistant` and `tool`. Rows come as lists (JSON Lines), numpy arrays of dicts (Parquet) or JSON
strings (CSV); `as_conversation` turns each into a plain list of dicts.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from loraflow.config import TRAIN_ON
from loraflow.errors import ConfigError, DataError, row_list
from loraflow.flavor.layout import short

logger = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant", "tool")


def check_train_on(train_on: str) -> None:
    """Refuse an unknown `train_on`."""
    if train_on not in TRAIN_ON:
        raise ConfigError(f"`train_on` must be one of {', '.join(TRAIN_ON)}, got {train_on!r}")


# ---------------------------------------------------------------------------------------------
# Checking.


def as_conversation(value: Any) -> list[dict[str, Any]]:
    """A row as a list of message dicts.

    Accepts a list or tuple (JSON Lines), a numpy array of dicts (Parquet list-of-struct
    columns), or a JSON string holding a list (CSV). Keys whose value is None are dropped (a
    Parquet struct has every field of the schema, None where a message lacks it), and nested
    numpy arrays become lists. Anything else is returned unchanged, for the checks to report.
    """
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value  # type: ignore[return-value]
    value = _plain(value)
    if not isinstance(value, list):
        return value
    return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in value]


def _plain(value: Any) -> Any:
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        value = value.tolist() if getattr(value, "dtype", None) != object else list(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value


def message_problem(message: Any) -> tuple[str, str] | None:
    """What is wrong with one message, as (kind, description), or None when it is usable."""
    if not isinstance(message, dict):
        return "not a mapping", f"is a {type(message).__name__}, not a mapping with 'role' and 'content': {short(message)}"
    role = message.get("role")
    if role is None:
        return "no role", f"has no 'role' (keys: {sorted(map(str, message))}); add one of {', '.join(ROLES)}"
    if role not in ROLES:
        return "unknown role", f"has an unknown role {short(role)}; roles are {', '.join(ROLES)}"
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        return "content not a string", (
            f"has {type(content).__name__} content, not a string: {short(content)}; "
            "content must be text (content parts such as images are not supported)"
        )
    if role == "assistant" and not (content or "").strip() and not message.get("tool_calls"):
        return "assistant without content", (
            "is an assistant message with no content; there is nothing to learn from it: fill or remove it"
        )
    if content is None and role != "assistant":
        return "no content", f"is a {role} message with no 'content'; add the text (an empty string is allowed)"
    return None


def row_problem(row: Any) -> tuple[str, str] | None:
    """What is wrong with one conversation (its first bad message), as (kind, description), or None."""
    if row is None or (isinstance(row, float) and row != row):  # an empty cell: None or NaN
        return "not a list", "is null (an empty cell), not a list of messages"
    if not isinstance(row, list):
        kind = "string that is not a JSON list" if isinstance(row, str) else type(row).__name__
        return "not a list", f"is a {kind}, not a list of messages: {short(row)}"
    if not row:
        return "empty", "is an empty list; a conversation needs at least one message"
    for number, message in enumerate(row, start=1):
        problem = message_problem(message)
        if problem:
            return problem[0], f"message {number} {problem[1]}"
    return None


def check_conversations(values: Sequence[Any], where: str, train_on: str = "assistant") -> list[int]:
    """Check a column of conversations before any model loads; return the rows to keep.

    Args:
        values: one conversation per row (see `as_conversation` for the accepted forms).
        where: the start of every message, naming the parameter and file, e.g.
            "train_data 'chat.jsonl'".
        train_on: with `assistant` or `last`, rows without an assistant reply have nothing to
            train and are dropped, with a warning giving their count.

    Returns:
        The 0-based positions of the rows to keep, in order.

    Raises:
        ConfigError: an unknown `train_on`.
        DataError: rows that are not lists, messages that are not mappings, missing or unknown
            roles, non-string content, assistant messages without content (the message gives
            the count, the first row numbers, 1-based, and the first problem of each kind); no
            rows; or no row left to train on.
    """
    check_train_on(train_on)
    values = list(values)
    if not values:
        raise DataError(f"{where}: has no conversations; add at least one row")
    conversations = [as_conversation(v) for v in values]
    bad: dict[str, list[tuple[int, str]]] = {}
    for number, row in enumerate(conversations, start=1):
        problem = row_problem(row)
        if problem:
            bad.setdefault(problem[0], []).append((number, problem[1]))
    if bad:
        raise DataError(_bad_rows_message(where, len(values), bad))
    if train_on == "all":
        return list(range(len(values)))
    keep = [i for i, row in enumerate(conversations) if any(m["role"] == "assistant" for m in row)]
    dropped = [i + 1 for i in range(len(values)) if i not in set(keep)]
    if not keep:
        raise DataError(
            f"{where}: none of the {len(values)} conversations has an assistant message, so there is "
            f"nothing to train with train_on={train_on!r}; add assistant replies, or use train_on='all'"
        )
    if dropped:
        logger.warning(
            "%s: dropped %d of %d conversations with no assistant message (rows %s): nothing to train "
            "with train_on=%r", where, len(dropped), len(values), row_list(dropped), train_on,
        )
    return keep


def _bad_rows_message(where: str, total: int, bad: dict[str, list[tuple[int, str]]]) -> str:
    lines = []
    for rows in bad.values():
        numbers = [n for n, _ in rows]
        lines.append(f"  - {len(rows)} rows (first rows: {row_list(numbers)}); row {rows[0][0]} {rows[0][1]}")
    count = sum(len(r) for r in bad.values())
    return (
        f"{where}: {count} of {total} conversations are not valid chat messages "
        '(each row must be a list of {"role": ..., "content": ...}):\n' + "\n".join(lines)
    )
