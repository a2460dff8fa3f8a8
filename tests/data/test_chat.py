"""Tests for loraflow.data.chat (loss masks from the rendering, conversation checks, template choice) and
loraflow.flavor.chat (rendering prompts, end-of-turn tokens)."""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraflow.data import chat
from loraflow.data import conversations as checks
from loraflow.flavor import chat as templates
from loraflow.data import IGNORE_INDEX
from loraflow.errors import ConfigError, DataError

LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
"""Llama 3 style: a BOS, a header per message, content trimmed, `<|eot_id|>` closing each turn."""

QWEN25_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) or message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.index0 == 0 or messages[loop.index0 - 1].role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
"""Qwen2.5 style: a default system prompt when the first message is not a system one, and tool
results grouped into one user turn."""

LAST_TURN_THINKS_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message.role == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + message.content + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""Qwen3 style, not prefix-stable: only a final reply gets an (empty) reasoning block."""

CONTROL_TOKENS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"]

# name: (template, assistant header, end-of-turn text, end-of-turn control token, content as rendered)
STYLES = {
    "chatml": (templates.CHATML_TEMPLATE, "<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>", lambda c: c),
    "llama3": (LLAMA3_TEMPLATE, "<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>", "<|eot_id|>",
               str.strip),
    "qwen25": (QWEN25_TEMPLATE, "<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>", lambda c: c),
    "chatml-merges": (templates.CHATML_TEMPLATE, "<|im_start|>assistant\n", "<|im_end|>\n", "<|im_end|>", lambda c: c),
}


def whitespace_merging_tokenizer():
    """A byte-level BPE tokenizer whose vocabulary merges runs of newlines and spaces (as real ones
    do; the built-in one has no such merges), so tokens straddle the header/reply boundary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["\n\n\n", "\n\n", "\n  ", "\n ", "  ", "Hello there.", "assistant\n"] * 50, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


@functools.cache
def tokenizer_for(style: str | None):
    """A BPE tokenizer with the control tokens added and `style`'s template set: the built-in
    one, or for `*-merges` styles `whitespace_merging_tokenizer`."""
    from loraflow.builtin import build_tokenizer

    tokenizer = whitespace_merging_tokenizer() if style and style.endswith("-merges") else build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": CONTROL_TOKENS})
    tokenizer.chat_template = STYLES[style][0] if style else None
    return tokenizer


def decode(tokenizer, ids: list[int]) -> str:
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def trained_runs(ids: list[int], labels: list[int]) -> list[list[int]]:
    """The maximal runs of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(ids, labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


# ---------------------------------------------------------------------------------------------
# The contract, as properties over random conversations.

pieces = st.one_of(
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=8),
    st.sampled_from(["<|im_end|>", "<|eot_id|>", "<|im_start|>assistant\n", "\n", "\n\n", "  ", "assistant",
                     "{{ messages }}", "é中🙂", "Hello there.", "<think>"]),
)
# Leading whitespace makes BPE merge the template's last whitespace with the reply's first.
leading = st.sampled_from(["", "", "", "\n\n", "  ", "\n \n"])
contents = st.builds(lambda lead, parts: lead + "".join(parts), leading, st.lists(pieces, max_size=4))
messages = st.builds(lambda role, content: {"role": role, "content": content},
                     st.sampled_from(checks.ROLES), contents)
conversations = st.lists(messages, min_size=1, max_size=6).filter(
    lambda conv: any(m["role"] == "assistant" for m in conv)
)


@pytest.mark.parametrize("style", list(STYLES))
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conversation=conversations)
def test_masks_follow_the_rendering(style, conversation):
    template, header, end_text, _, rendered = STYLES[style]
    tokenizer = tokenizer_for(style)
    expected_ids = tokenizer.apply_chat_template(conversation, tokenize=True)["input_ids"]

    ids, labels = chat.tokenize_conversation(tokenizer, conversation)
    assert ids == expected_ids
    assert len(labels) == len(ids)
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels))

    # Each reply is one run of trained tokens: (part of) the assistant header's last piece when
    # BPE merges across it, then the reply as rendered, then the end-of-turn text. Nothing else.
    replies = [rendered(m["content"]) for m in conversation if m["role"] == "assistant"]
    runs = trained_runs(ids, labels)
    assert len(runs) == len(replies)
    for run, reply in zip(runs, replies):
        text = decode(tokenizer, run)
        assert text.endswith(reply + end_text), (text, reply)
        assert header.endswith(text[: len(text) - len(reply + end_text)])

    last_ids, last_labels = chat.tokenize_conversation(tokenizer, conversation, "last")
    assert last_ids == ids
    assert all(b == IGNORE_INDEX or a == b for a, b in zip(labels, last_labels))  # a subset
    assert trained_runs(last_ids, last_labels) == runs[-1:]

    assert chat.tokenize_conversation(tokenizer, conversation, "all") == (ids, ids)


@pytest.mark.parametrize("style", list(STYLES))
def test_end_of_turn_and_prompt_match_training(style):
    template, header, end_text, end_token, _ = STYLES[style]
    tokenizer = tokenizer_for(style)
    assert templates.end_of_turn_text(tokenizer, template) == end_text
    assert templates.end_of_turn_ids(tokenizer, template) == [tokenizer.convert_tokens_to_ids(end_token)]

    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    prompt = templates.render_prompt(tokenizer, conversation[:1], template)
    assert prompt.endswith(header)
    ids, labels = chat.tokenize_conversation(tokenizer, conversation, template=template)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    assert ids[: len(prompt_ids)] == prompt_ids  # the prompt is exactly the untrained start
    assert set(labels[: len(prompt_ids)]) == {IGNORE_INDEX}
    assert IGNORE_INDEX not in labels[len(prompt_ids):]


def test_a_chatml_example_by_hand():
    tokenizer = tokenizer_for("chatml")
    conversation = [
        {"role": "system", "content": ""},
        {"role": "user", "content": "2+2? <|im_end|>"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3+3?"},
        {"role": "assistant", "content": "6"},
    ]
    ids, labels = chat.tokenize_conversation(tokenizer, conversation)
    texts = [decode(tokenizer, run) for run in trained_runs(ids, labels)]
    assert texts == ["4<|im_end|>\n", "6<|im_end|>\n"]
    ids, labels = chat.tokenize_conversation(tokenizer, conversation, "last")
    assert [decode(tokenizer, run) for run in trained_runs(ids, labels)] == ["6<|im_end|>\n"]


def test_a_first_message_from_the_assistant_trains_after_the_default_system_prompt():
    tokenizer = tokenizer_for("qwen25")
    conversation = [{"role": "assistant", "content": "Hi, how can I help?"}, {"role": "user", "content": "x"}]
    ids, labels = chat.tokenize_conversation(tokenizer, conversation)
    assert [decode(tokenizer, run) for run in trained_runs(ids, labels)] == ["Hi, how can I help?<|im_end|>\n"]
    assert decode(tokenizer, ids).startswith("<|im_start|>system\nYou are a helpful assistant.")


def test_apply_chat_template_return_types_in_this_transformers():
    tokenizer = tokenizer_for("chatml")
    conversation = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    as_dict = tokenizer.apply_chat_template(conversation, tokenize=True)
    as_list = tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=False)
    assert not isinstance(as_dict, list) and set(as_dict) == {"input_ids", "attention_mask"}
    assert as_list == as_dict["input_ids"]
    assert isinstance(tokenizer.apply_chat_template(conversation, tokenize=False), str)
    # Without {% generation %} markers the built-in assistant mask is all zeros (and only warns).
    masked = tokenizer.apply_chat_template(conversation, return_assistant_tokens_mask=True)
    assert set(masked["assistant_masks"]) == {0}


# ---------------------------------------------------------------------------------------------
# Templates that are not prefix-stable.


def test_a_template_that_is_not_prefix_stable_is_refused_per_turn_but_works_for_the_last():
    tokenizer = tokenizer_for("chatml")
    conversation = [
        {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "A2"},
    ]
    with pytest.raises(DataError, match=r"not prefix-stable at message 2.*train_on='last'.*expand_turns"):
        chat.tokenize_conversation(tokenizer, conversation, template=LAST_TURN_THINKS_TEMPLATE)

    ids, labels = chat.tokenize_conversation(tokenizer, conversation, "last", LAST_TURN_THINKS_TEMPLATE)
    assert [decode(tokenizer, r) for r in trained_runs(ids, labels)] == ["<think>\n\n</think>\n\nA2<|im_end|>\n"]

    turns = chat.expand_turns(conversation)
    assert [t[-1]["content"] for t in turns] == ["A1", "A2"]
    first = chat.tokenize_conversation(tokenizer, turns[0], "last", LAST_TURN_THINKS_TEMPLATE)
    assert [decode(tokenizer, r) for r in trained_runs(*first)] == ["<think>\n\n</think>\n\nA1<|im_end|>\n"]


def test_tokenize_conversations_names_the_rows_a_template_cannot_render():
    tokenizer = tokenizer_for("chatml")
    strict = (
        "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('tool messages are not supported') }}"
        "{% endif %}{{ m.role + ': ' + m.content + '\n' }}{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}"
    )
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    bad = good + [{"role": "tool", "content": "c"}, {"role": "assistant", "content": "d"}]
    ids, labels = chat.tokenize_conversations(tokenizer, [good, json.dumps(good)], "train_data 'c.jsonl'",
                                              template=strict)
    assert len(ids) == 2 and ids[0] == ids[1]
    with pytest.raises(DataError, match=r"train_data 'c.jsonl': 1 of 2 conversations .*rows: 2\).*tool messages are"):
        chat.tokenize_conversations(tokenizer, [good, bad], "train_data 'c.jsonl'", template=strict)
    with pytest.raises(DataError, match=r"\(first rows: 7\); row 7: TemplateError: tool messages are not supported"):
        chat.tokenize_conversations(tokenizer, [good, bad], "train_data 'c.jsonl'", template=strict, row_numbers=[3, 7])


def test_a_slow_tokenizer_or_a_bad_train_on_is_a_config_error():
    tokenizer = tokenizer_for("chatml")
    with pytest.raises(ConfigError, match="`train_on` must be one of assistant, last, all, got 'replies'"):
        chat.tokenize_conversation(tokenizer, [{"role": "assistant", "content": "x"}], "replies")


# ---------------------------------------------------------------------------------------------
# Checking conversations.

WHERE = "train_data 'chat.jsonl'"


def conv(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": r, "content": c} for r, c in pairs]


def test_valid_conversations_are_kept():
    rows = [conv(("user", "a"), ("assistant", "b")), conv(("system", ""), ("user", "a"), ("assistant", "b"))]
    assert checks.check_conversations(rows, WHERE) == [0, 1]


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"role": "user"}, r"row 2 is a dict, not a list of messages"),
        (None, r"row 2 is null \(an empty cell\)"),
        (float("nan"), r"row 2 is null"),
        ("not json", r"row 2 is a string that is not a JSON list"),
        ([], r"row 2 is an empty list"),
        (["hello"], r"row 2 message 1 is a str, not a mapping"),
        ([{"content": "x"}], r"row 2 message 1 has no 'role' \(keys: \['content'\]\)"),
        ([{"role": "bot", "content": "x"}], r"row 2 message 1 has an unknown role 'bot'; roles are system, user"),
        ([{"role": "user", "content": 3}], r"row 2 message 1 has int content, not a string: 3"),
        ([{"role": "user", "content": [{"type": "text", "text": "x"}]}], r"has list content, not a string"),
        ([{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}],
         r"row 2 message 2 is an assistant message with no content"),
        ([{"role": "user", "content": "x"}, {"role": "assistant"}], r"message 2 is an assistant message with no"),
        ([{"role": "user"}, {"role": "assistant", "content": "y"}], r"message 1 is a user message with no 'content'"),
    ],
)
def test_each_problem_names_the_file_the_row_and_the_fix(row, expected):
    rows = [conv(("user", "a"), ("assistant", "b")), row]
    with pytest.raises(DataError, match=expected) as info:
        checks.check_conversations(rows, WHERE)
    assert str(info.value).startswith(f"{WHERE}: 1 of 2 conversations are not valid chat messages")


def test_problems_are_grouped_by_kind_with_the_first_rows():
    rows = [conv(("user", "a"), ("assistant", "b"))] + [conv(("bot", "x"))] * 7 + ["x"]
    with pytest.raises(DataError) as info:
        checks.check_conversations(rows, WHERE)
    message = str(info.value)
    assert "8 of 9 conversations" in message
    assert "7 rows (first rows: 2, 3, 4, 5, 6, ...); row 2 message 1 has an unknown role 'bot'" in message
    assert "1 rows (first rows: 9); row 9 is a string that is not a JSON list" in message


def test_rows_without_a_reply_are_dropped_with_a_warning(caplog):
    rows = [conv(("user", "a")), conv(("user", "a"), ("assistant", "b")), conv(("system", "s"))]
    with caplog.at_level(logging.WARNING, logger="loraflow.data.conversations"):
        assert checks.check_conversations(rows, WHERE) == [1]
        assert checks.check_conversations(rows, WHERE, "last") == [1]
    assert "dropped 2 of 3 conversations with no assistant message (rows 1, 3)" in caplog.text
    assert checks.check_conversations(rows, WHERE, "all") == [0, 1, 2]
    with pytest.raises(DataError, match=r"none of the 2 conversations has an assistant message.*train_on='all'"):
        checks.check_conversations(rows[:1] * 2, WHERE)
    with pytest.raises(DataError, match="has no conversations"):
        checks.check_conversations([], WHERE)


def test_tool_calls_without_content_are_allowed():
    row = [{"role": "user", "content": "weather?"},
           {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "w", "arguments": "{}"}}]},
           {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]
    assert checks.check_conversations([row], WHERE) == [0]


def test_parquet_rows_and_json_strings_are_conversations(tmp_path):
    import pandas as pd

    rows = [conv(("user", "a"), ("assistant", "b")), [{"role": "user", "content": "c", "name": "x"},
                                                      {"role": "assistant", "content": "d"}]]
    pd.DataFrame({"messages": rows}).to_parquet(tmp_path / "c.parquet")
    column = pd.read_parquet(tmp_path / "c.parquet")["messages"].tolist()
    assert isinstance(column[0], np.ndarray)  # what pandas gives for a list-of-struct column
    assert checks.check_conversations(column, WHERE) == [0, 1]
    assert checks.as_conversation(column[0]) == rows[0]  # name=None filled in by Parquet is dropped
    assert checks.as_conversation(column[1]) == rows[1]
    assert checks.check_conversations([json.dumps(r) for r in rows], WHERE) == [0, 1]
    tokenizer = tokenizer_for("chatml")
    from_parquet, _ = chat.tokenize_conversations(tokenizer, column, WHERE)
    from_lists, _ = chat.tokenize_conversations(tokenizer, rows, WHERE)
    assert from_parquet == from_lists


# ---------------------------------------------------------------------------------------------
# Choosing a template.


def test_auto_uses_the_tokenizers_own_template():
    assert chat.resolve_chat_template(tokenizer_for("llama3")) == LLAMA3_TEMPLATE


def test_auto_without_a_template_says_which_option_fixes_it():
    with pytest.raises(ConfigError, match=r"has no chat template.*--chat-template chatml.*\.jinja"):
        chat.resolve_chat_template(tokenizer_for(None), "auto")


def test_builtin_and_file_templates(tmp_path):
    tokenizer = tokenizer_for(None)
    assert chat.resolve_chat_template(tokenizer, "chatml") == templates.CHATML_TEMPLATE
    (path := tmp_path / "llama3.jinja").write_text(LLAMA3_TEMPLATE, encoding="utf-8")
    assert chat.resolve_chat_template(tokenizer, str(path)) == LLAMA3_TEMPLATE


def test_bad_template_choices_are_config_errors(tmp_path):
    tokenizer = tokenizer_for(None)
    with pytest.raises(ConfigError, match=r"'chatlm' is not a known template name.*auto, chatml"):
        chat.resolve_chat_template(tokenizer, "chatlm")
    with pytest.raises(ConfigError, match=r"file 'missing.jinja' not found \(looked at"):
        chat.resolve_chat_template(tokenizer, "missing.jinja")
    (empty := tmp_path / "empty.jinja").write_text(" \n")
    with pytest.raises(ConfigError, match="is empty"):
        chat.resolve_chat_template(tokenizer, str(empty))
    (broken := tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(ConfigError, match=r"broken.jinja' fails to render a user message: TemplateSyntaxError"):
        chat.resolve_chat_template(tokenizer, str(broken))


def test_chatml_on_a_tokenizer_without_its_tokens_has_no_stop_token():
    plain = whitespace_merging_tokenizer()  # no <|im_start|> / <|im_end|> tokens
    assert templates.end_of_turn_text(plain, templates.CHATML_TEMPLATE) == "<|im_end|>\n"
    assert templates.end_of_turn_ids(plain, templates.CHATML_TEMPLATE) == []


def test_end_of_turn_of_a_template_that_refuses_system_messages():
    no_system = (
        "{{ '<bos>' }}{% for m in messages %}{% if m.role == 'system' %}{{ raise_exception('System role not supported') }}"
        "{% endif %}{{ '<start_of_turn>' + m.role + '\n' + m.content + '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )
    assert templates.end_of_turn_text(tokenizer_for("chatml"), no_system) == "<end_of_turn>\n"


def test_masks_equal_transformers_assistant_masks_where_a_template_marks_generation():
    # With {% generation %} around reply + end-of-turn, transformers' own mask is the same one.
    marked = (
        "{% for m in messages %}{% if m.role == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
        "{% generation %}{{ m.content + '<|im_end|>\n' }}{% endgeneration %}"
        "{% else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    tokenizer = tokenizer_for("chatml-merges")
    conversation = conv(("system", ""), ("user", "Hi <|im_end|>"), ("assistant", "\n\nHello there."),
                        ("user", "\n"), ("assistant", "  é中🙂"))
    ids, labels = chat.tokenize_conversation(tokenizer, conversation, template=marked)
    theirs = tokenizer.apply_chat_template(conversation, chat_template=marked, return_assistant_tokens_mask=True)
    assert theirs["input_ids"] == ids
    assert theirs["assistant_masks"] == [int(label != IGNORE_INDEX) for label in labels]


def test_a_template_without_a_generation_prompt_is_warned_about(caplog, tmp_path):
    no_prompt = "{% for m in messages %}{{ m.role + ': ' + m.content + '\\n' }}{% endfor %}"
    (path := tmp_path / "plain.jinja").write_text(no_prompt, encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="loraflow.data.chat"):
        assert chat.resolve_chat_template(tokenizer_for(None), str(path)) == no_prompt
    assert "ignores add_generation_prompt" in caplog.text


def test_nested_numpy_arrays_become_lists_before_rendering():
    # transformers renders a numpy array inside a message as the placeholder "<ndarray>".
    tool_calls = np.array([{"function": {"name": "w", "arguments": "{}"}}], dtype=object)
    row = np.array([{"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b", "tool_calls": tool_calls}], dtype=object)
    template = "{% for m in messages %}{{ m.role }}{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}{% endfor %}"
    rendered = tokenizer_for("chatml").apply_chat_template(checks.as_conversation(row), tokenize=False,
                                                           chat_template=template)
    assert rendered == 'userassistant[{"function": {"name": "w", "arguments": "{}"}}]'
