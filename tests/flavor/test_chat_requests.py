"""OpenAI chat requests as generation settings (loraflow.flavor.chat)."""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException

from loraflow.flavor import chat

DEFAULTS = {"max_new_tokens": 64, "temperature": 1.0, "top_p": 1.0, "do_sample": False, "repetition_penalty": 1.0,
            "seed": 0}
ASK = [{"role": "user", "content": "hi"}]


def test_temperature_follows_openai_none_keeps_defaults_zero_is_greedy_above_samples():
    assert chat.openai_temperature(None, DEFAULTS) == {}
    assert chat.openai_temperature(0, DEFAULTS) == {"do_sample": False, "temperature": 1.0}
    assert chat.openai_temperature(0.7, DEFAULTS) == {"do_sample": True, "temperature": 0.7}


def test_a_request_becomes_messages_settings_and_stop_strings():
    messages, settings, stop = chat.request_settings(
        {"messages": ASK, "max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "seed": 3, "stop": "END"}, DEFAULTS)
    assert messages == ASK and stop == ["END"]
    assert settings == {**DEFAULTS, "max_new_tokens": 5, "temperature": 0.5, "do_sample": True, "top_p": 0.9, "seed": 3}
    assert chat.request_settings({"messages": ASK}, DEFAULTS)[1] == DEFAULTS  # the model's defaults: greedy


def test_every_problem_of_a_request_is_named_at_once():
    with pytest.raises(MlflowException) as err:
        chat.request_settings({"messages": [], "n": 3, "stream": True, "stop": [""], "logprobs": True}, DEFAULTS)
    message = err.value.message
    for part in ("unknown request keys ['logprobs']", "`n` must be 1", "`stream` is not supported",
                 "`messages` must be a non-empty list", "`stop` must be a string"):
        assert part in message


def test_stop_strings_cut_the_text_at_the_first_one():
    assert chat.cut_at_stop("a b STOP c END", ["END", "STOP"]) == ("a b ", True)
    assert chat.cut_at_stop("a b", ["END"]) == ("a b", False)
