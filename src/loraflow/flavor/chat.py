"""Chat at inference: render a conversation with the template training used (saved with the
tokenizer), find the tokens that end a turn, and read and answer OpenAI chat requests. Choosing a
template and masking the loss for training are `loraflow.data.chat`'s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from loraflow.flavor.layout import invalid, short

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML: `<|im_start|>role\\ncontent<|im_end|>\\n` per message; renders every role, `tool` too."""

BUILTIN_TEMPLATES = {"chatml": CHATML_TEMPLATE}
"""Chat templates selectable by name with `--chat-template NAME`."""

PROBE = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "content": "A1"},
    {"role": "user", "content": "Q2"},
]


def end_of_turn_text(tokenizer: "PreTrainedTokenizerBase", template: str | None = None) -> str:
    """The text the template (None: the tokenizer's) writes after an assistant reply, up to the next
    message, e.g. `<|im_end|>\\n` for ChatML: found by rendering a probe conversation."""
    reply = PROBE[2]["content"]
    try:
        head, full = render(tokenizer, PROBE[:3], template), render(tokenizer, PROBE, template)
    except Exception:  # templates such as Gemma's refuse a system message: probe without one
        head, full = render(tokenizer, PROBE[1:3], template), render(tokenizer, PROBE[1:], template)
    if not full.startswith(head):  # not prefix-stable: the end of the last reply is all we have
        full = head
    content_end = head.rindex(reply) + len(reply)
    return full[content_end : len(head)]


def end_of_turn_ids(tokenizer: "PreTrainedTokenizerBase", template: str | None = None) -> list[int]:
    """The control-token ids in `end_of_turn_text` (not the whitespace after them, which would stop
    every newline): the ids to stop generation at. Empty when turns end with plain text only."""
    text = end_of_turn_text(tokenizer, template)
    control = _control_ids(tokenizer)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
    return list(dict.fromkeys(i for i in ids if i in control))


def _control_ids(tokenizer: "PreTrainedTokenizerBase") -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    ids.update(i for i, token in decoder.items() if not str(token).isspace())
    return ids


def render_prompt(
    tokenizer: "PreTrainedTokenizerBase", messages: Sequence[Mapping[str, Any]], template: str | None = None
) -> str:
    """The inference prompt for `messages` (`add_generation_prompt=True`); tokenize it with
    `add_special_tokens=False`, as the template writes any BOS itself."""
    return render(tokenizer, list(messages), template, add_generation_prompt=True)


def render(tokenizer: "PreTrainedTokenizerBase", messages: list, template: str | None, **kwargs: Any) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# OpenAI-shaped chat requests and responses (what the pyfunc model of a chat model takes and gives).

# Request keys; any other is refused by name rather than silently ignored.
REQUEST_KEYS = ("messages", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "model")


def chat_requests(data: Any) -> tuple[list[dict[str, Any]], bool]:
    """The requests in `data` (a dict, a list of them, or the DataFrame MLflow's schema enforcement
    makes of them), and whether it was one request (answered with one object)."""
    import pandas as pd

    if isinstance(data, dict):
        return [data], True
    if isinstance(data, pd.DataFrame):
        records = [{k: v for k, v in row.items() if not _missing(v)} for row in data.to_dict("records")]
        return [_plain(r) for r in records], len(records) == 1
    if isinstance(data, (list, tuple)) and all(isinstance(r, dict) for r in data) and data:
        return [dict(r) for r in data], False
    raise invalid(
        f"a chat model takes {{'messages': [...], 'max_tokens': N, ...}} (or a list of them), got {type(data).__name__}"
    )


def request_settings(request: Mapping[str, Any], defaults: Mapping[str, Any]) -> tuple[list, dict[str, Any], list[str]]:
    """A request's messages, its generation settings (`generation.GENERATION_DEFAULTS` keys) and stop strings.

    Raises:
        MlflowException: unknown keys, `n` other than 1, `stream`, or messages that are not a
            conversation (each problem named).
    """
    unknown = sorted(set(request) - set(REQUEST_KEYS))
    problems = [f"unknown request keys {short(unknown, 200)}; known: {list(REQUEST_KEYS)}"] if unknown else []
    if request.get("n", 1) != 1:
        problems.append(f"`n` must be 1 (one choice per request), got {request.get('n')!r}")
    if request.get("stream"):
        problems.append("`stream` is not supported: send stream=false")
    messages = request.get("messages")
    problems += conversation_problems(messages)
    stop = request.get("stop") or []
    stop = [stop] if isinstance(stop, str) else list(stop)
    if not all(isinstance(s, str) and s for s in stop):
        problems.append(f"`stop` must be a string or a list of non-empty strings, got {request.get('stop')!r}")
    if problems:
        raise invalid("invalid chat request:\n" + "\n".join(f"  - {p}" for p in problems))
    settings = dict(defaults)
    for ours, theirs in (("max_new_tokens", "max_tokens"), ("top_p", "top_p"), ("seed", "seed")):
        if request.get(theirs) is not None:
            settings[ours] = request[theirs]
    settings.update(openai_temperature(request.get("temperature"), defaults))
    return list(messages), settings, stop


def openai_temperature(temperature: Any, defaults: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's `temperature` as our settings: None keeps the defaults, 0 is greedy, above 0 samples."""
    if temperature is None:
        return {}
    if isinstance(temperature, (int, float)) and not isinstance(temperature, bool) and temperature == 0:
        return {"do_sample": False, "temperature": defaults.get("temperature", 1.0)}
    return {"do_sample": True, "temperature": temperature}


def conversation_problems(messages: Any) -> list[str]:
    """What keeps `messages` from being rendered as a conversation (empty when it can be)."""
    if not isinstance(messages, list) or not messages:
        return [f"`messages` must be a non-empty list of {{'role', 'content'}} messages, got {short(messages, 80)}"]
    problems = []
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, Mapping):
            problems.append(f"message {number} is a {type(message).__name__}, not a mapping with role and content")
        elif message.get("role") not in ("system", "user", "assistant", "tool"):
            problems.append(f"message {number} has role {short(message.get('role'), 80)}; roles are system, user, "
                            "assistant, tool")
        elif not isinstance(message.get("content", ""), str):
            problems.append(f"message {number} has {type(message.get('content')).__name__} content, not a string")
    return problems


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """`text` up to the first of the `stop` strings, and whether one was found."""
    cuts = [text.index(s) for s in stop if s in text]
    return (text[: min(cuts)], True) if cuts else (text, False)


def completion_object(text: str, *, prompt_tokens: int, completion_tokens: int, finish_reason: str,
                      model: str) -> dict[str, Any]:
    """An OpenAI `chat.completion` object for one generated reply."""
    import time
    import uuid

    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def text_completion_object(generated: Sequence[Any], *, model: str) -> dict[str, Any]:
    """An OpenAI `text_completion` object: one choice per prompt (`generation.Generated`), in order."""
    import time
    import uuid

    prompt_tokens = sum(g.prompt_tokens for g in generated)
    completion_tokens = sum(g.completion_tokens for g in generated)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"text": g.text, "index": i, "logprobs": None, "finish_reason": "stop" if g.stopped else "length"}
                    for i, g in enumerate(generated)],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


def _missing(value: Any) -> bool:
    try:
        import pandas as pd

        return value is None or (pd.api.types.is_scalar(value) and bool(pd.isna(value)))
    except (TypeError, ValueError):
        return False


def _plain(value: Any) -> Any:
    """numpy arrays and scalars (what pandas hands over) as plain lists, dicts and numbers."""
    if type(value).__module__ == "numpy":
        return _plain(value.tolist()) if hasattr(value, "tolist") else value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    return value
