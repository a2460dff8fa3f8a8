"""Chat fine-tuning: check conversations, pick a chat template, and tokenize with loss masks.

Rendering at inference (the built-in templates, `render_prompt`, end-of-turn tokens) is
`loraflow.flavor.chat`'s, so the model serves with the code that trained it.

Conversations are in OpenAI `messages` format: a list of `{"role": ..., "content": ...}` with
roles `system`, `user`, `assistant` and `tool` (when the template renders tool messages).

How the loss mask is found (`tokenize_conversation`): from the rendering itself, so any chat
template works, with or without `{% generation %}` markers.

1. Render the whole conversation as text (`tokenize=False`) and tokenize that text exactly as
   `apply_chat_template(tokenize=True)` does (`add_special_tokens=False`), with offsets.
2. For each assistant message `i`, render `messages[:i]` with `add_generation_prompt=True`
   (where the reply starts) and `messages[:i + 1]` (where it ends, after the end-of-turn
   text such as `<|im_end|>\\n` or `<|eot_id|>`). Both must be string prefixes of the full
   rendering; the characters between them are the reply plus its end-of-turn text.
3. A token is trained when its character range overlaps a reply span. Token boundaries come
   from the full rendering only, so BPE merges across a boundary never shift the ids.

Limits: a template that renders earlier turns differently once later turns exist (e.g. one that
drops past reasoning, or that adds a block only to the last reply) is not prefix-stable; those
turns cannot be located, and `tokenize_conversation` raises `DataError` saying so. Use
`train_on="last"` (only the last reply must be located) or `expand_turns` (one row per reply,
each trained with `train_on="last"`). A template that ignores `add_generation_prompt` gets its
assistant header trained too. Control-token strings inside message content (a user writing
`<|im_end|>`) are encoded as control tokens, as `apply_chat_template` does by default.

transformers is used through the tokenizer's own methods.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.data.conversations import as_conversation, check_train_on
from loraflow.data.tables import IGNORE_INDEX
from loraflow.errors import ConfigError, DataError, row_list
from loraflow.flavor.chat import BUILTIN_TEMPLATES, PROBE, render

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_MARKER = "\u2063loraflow-reply\u2063"  # a reply content that no real data contains


# ---------------------------------------------------------------------------------------------
# Templates.


def resolve_chat_template(tokenizer: "PreTrainedTokenizerBase", choice: str = "auto") -> str:
    """The chat template text for `--chat-template CHOICE`.

    Args:
        tokenizer: the base model's tokenizer.
        choice: `auto` (the tokenizer's own template), a built-in name (`chatml`), or the path
            of a `.jinja` file.

    Raises:
        ConfigError: `auto` with a tokenizer that has no template, an unknown name, a missing or
            unreadable file, or a template that fails to render a probe conversation.
    """
    choice = str(choice)
    if choice == "auto":
        template = _own_template(tokenizer)
    elif choice in BUILTIN_TEMPLATES:
        template = BUILTIN_TEMPLATES[choice]
    elif choice.endswith(".jinja") or "/" in choice or "\\" in choice:
        template = _read_template_file(choice)
    else:
        names = ", ".join(["auto", *BUILTIN_TEMPLATES])
        raise ConfigError(
            f"`chat_template` {choice!r} is not a known template name or a .jinja file; "
            f"use one of {names}, or the path of a .jinja file"
        )
    _check_renders(tokenizer, template, choice)
    return template


def _own_template(tokenizer: "PreTrainedTokenizerBase") -> str:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: use the default one
        own = own.get("default")
    if not own:
        raise ConfigError(
            "`chat_template` is 'auto' but the base model's tokenizer has no chat template "
            "(a base model, not an instruct one); pass --chat-template chatml for the built-in "
            "ChatML template, or --chat-template path/to/template.jinja"
        )
    return str(own)


def _read_template_file(choice: str) -> str:
    path = Path(choice).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"`chat_template` file {choice!r} not found (looked at {str(path.resolve())!r}); "
            "check the path, or use a built-in name: " + ", ".join(BUILTIN_TEMPLATES)
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"`chat_template` file {choice!r} could not be read as UTF-8 text: {e}") from e
    if not text.strip():
        raise ConfigError(f"`chat_template` file {choice!r} is empty; it must hold a Jinja chat template")
    return text


def _check_renders(tokenizer: "PreTrainedTokenizerBase", template: str, choice: str) -> None:
    try:
        with_prompt = render(tokenizer, PROBE[1:2], template, add_generation_prompt=True)
        without = render(tokenizer, PROBE[1:2], template)
    except Exception as e:  # jinja2 syntax/undefined errors, raise_exception() in the template
        raise ConfigError(
            f"`chat_template` {_label(choice)} fails to render a user message: {type(e).__name__}: {e}"
        ) from e
    if with_prompt == without:
        logger.warning(
            "chat template %s ignores add_generation_prompt: inference prompts get no assistant header "
            "and training also trains the header tokens", _label(choice),
        )


def _label(choice: str) -> str:
    return repr(choice) if choice != "auto" else "'auto' (the tokenizer's own)"


# ---------------------------------------------------------------------------------------------
# Tokenizing.


def tokenize_conversation(
    tokenizer: "PreTrainedTokenizerBase",
    messages: Sequence[Mapping[str, Any]],
    train_on: str = "assistant",
    template: str | None = None,
) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation, and labels that train only the chosen tokens.

    `input_ids` equals `tokenizer.apply_chat_template(messages, chat_template=template,
    tokenize=True)["input_ids"]`. `labels` equals `input_ids` on trained tokens and is -100
    elsewhere. See the module docstring for how reply spans are found.

    Args:
        tokenizer: a fast tokenizer (offsets are needed).
        messages: one conversation; check it first with `check_conversations`.
        train_on: `assistant`: every assistant reply and the end-of-turn text that closes it;
            `last`: the last assistant reply only; `all`: every token.
        template: the chat template text; None for the tokenizer's own.

    Raises:
        ConfigError: an unknown `train_on`, or a tokenizer without offsets (not a fast one).
        DataError: the template is not prefix-stable at a reply that must be trained.
    """
    check_train_on(train_on)
    messages = list(messages)
    full = render(tokenizer, messages, template)
    ids, offsets = _encode_with_offsets(tokenizer, full)
    if train_on == "all":
        return ids, list(ids)
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if train_on == "last":
        turns = turns[-1:]
    spans = [_reply_span(tokenizer, messages, i, template, full) for i in turns]
    trained = _overlapping(offsets, spans)
    return ids, [t if keep else IGNORE_INDEX for t, keep in zip(ids, trained)]


def _encode_with_offsets(tokenizer: "PreTrainedTokenizerBase", text: str) -> tuple[list[int], list[tuple[int, int]]]:
    # Exactly the call apply_chat_template(tokenize=True) makes on the rendered text, plus offsets.
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            f"chat training needs a fast tokenizer (with offsets); {type(tokenizer).__name__} is not one. "
            "Load the tokenizer with use_fast=True (the default) or convert it with `tokenizers`"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def _reply_span(
    tokenizer: "PreTrainedTokenizerBase", messages: list, i: int, template: str | None, full: str
) -> tuple[int, int]:
    """Character range of assistant message `i` in `full`: its reply and end-of-turn text."""
    start = _reply_start(tokenizer, messages, i, template)
    upto = render(tokenizer, messages[: i + 1], template)
    for name, prefix in (("the prompt before it", start), ("the conversation up to it", upto)):
        if not full.startswith(prefix):
            at = len(os.path.commonprefix([prefix, full]))
            raise DataError(
                f"the chat template is not prefix-stable at message {i + 1} (assistant): {name} renders "
                f"differently from the start of the whole conversation (from character {at}: "
                f"{prefix[at:at + 30]!r} vs {full[at:at + 30]!r}), so the reply's tokens cannot be located. "
                "Templates that render past turns differently (e.g. dropping reasoning) need train_on='last', "
                "or one row per reply (loraflow.data.chat.expand_turns), or a prefix-stable --chat-template"
            )
    return len(start), len(upto)


def _reply_start(tokenizer: "PreTrainedTokenizerBase", messages: list, i: int, template: str | None) -> str:
    if i > 0:
        return render(tokenizer, messages[:i], template, add_generation_prompt=True)
    # An empty conversation cannot be rendered, so render the first reply open-ended with a
    # marker content, and keep what comes before the marker.
    probe = [{**messages[0], "content": _MARKER}]
    text = render(tokenizer, probe, template, continue_final_message=True)
    return text[: text.rindex(_MARKER)]


def _overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token: does its character range overlap any span? (A zero-width token counts when inside.)"""
    def hit(s: int, e: int) -> bool:
        if e > s:
            return any(s < b and e > a for a, b in spans)
        return any(a <= s < b for a, b in spans)

    return [hit(s, e) for s, e in offsets]


def tokenize_conversations(
    tokenizer: "PreTrainedTokenizerBase",
    rows: Sequence[Any],
    where: str,
    train_on: str = "assistant",
    template: str | None = None,
    row_numbers: Sequence[int] | None = None,
) -> tuple[list[list[int]], list[list[int]]]:
    """`tokenize_conversation` over rows already kept by `check_conversations`.

    Args:
        row_numbers: the 1-based file row number of each of `rows`, for messages (e.g.
            `[k + 1 for k in keep]` after `check_conversations`); default 1, 2, 3, ...

    Raises:
        DataError: naming `where`, the failing rows and the first failure's reason (a template
            error such as an unsupported role, or a template that is not prefix-stable).
    """
    from jinja2 import TemplateError

    check_train_on(train_on)
    all_ids: list[list[int]] = []
    all_labels: list[list[int]] = []
    failed: list[tuple[int, str]] = []
    numbers = list(row_numbers) if row_numbers is not None else range(1, len(rows) + 1)
    for number, row in zip(numbers, rows):
        try:
            ids, labels = tokenize_conversation(tokenizer, as_conversation(row), train_on, template)
        except ConfigError:
            raise
        except (DataError, TemplateError, ValueError, TypeError) as e:  # masking, the template, transformers
            failed.append((number, f"{type(e).__name__}: {e}"))
            continue
        all_ids.append(ids)
        all_labels.append(labels)
    if failed:
        numbers = [n for n, _ in failed]
        raise DataError(
            f"{where}: {len(failed)} of {len(rows)} conversations cannot be rendered with the chat template "
            f"(first rows: {row_list(numbers)}); row {failed[0][0]}: {failed[0][1]}"
        )
    return all_ids, all_labels


def expand_turns(messages: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """One conversation per assistant reply, each ending with that reply.

    For templates that are not prefix-stable: train each with `train_on="last"`, so every reply
    is trained as the template renders a final reply.
    """
    messages = list(messages)
    return [messages[: i + 1] for i, m in enumerate(messages) if m.get("role") == "assistant"]
