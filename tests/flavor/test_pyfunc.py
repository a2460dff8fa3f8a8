"""The pyfunc model: params, input forms, bad requests (loraflow.flavor.pyfunc)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from model_helpers import PROMPTS, base_args, logits, make_peft_model, mlmodel, perturb_safetensors, write_mlmodel

from loraflow import flavor
from loraflow.flavor import fingerprint, generation, layout, load, pyfunc, save
from loraflow.flavor.files import file_sha256

INVALID = ErrorCode.Name(INVALID_PARAMETER_VALUE)
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")


# ---------------------------------------------------------------------------------------------
# Bad input: every case is an MlflowException with INVALID_PARAMETER_VALUE (HTTP 400 when served).


@pytest.fixture
def pyfunc_model(saved):
    return mlflow.pyfunc.load_model(str(saved))


LONG_PROMPT = "word " * 400  # the built-in model's context is 256 tokens


@pytest.mark.parametrize(
    ("data", "params", "match"),
    [
        (pd.DataFrame({"question": ["hi"]}), None, "no `prompt` column"),
        (pd.DataFrame({"prompt": ["hi", None]}), None, "must be a string"),
        ([1, 2], None, "must be a string"),
        (pd.DataFrame({"prompt": pd.Series([], dtype=object)}), None, "no prompts"),
        ([], None, "no prompts"),
        (["hi"], {"max_new_tokens": 0}, "`max_new_tokens` must be an integer in 1..4096, got 0"),
        (["hi"], {"max_new_tokens": -3}, "`max_new_tokens`"),
        (["hi"], {"max_new_tokens": 5000}, "`max_new_tokens` must be an integer in 1..4096, got 5000"),
        (["hi"], {"temperature": 0.0, "do_sample": True}, "`temperature`"),
        (["hi"], {"top_p": 1.5}, "`top_p`"),
        (["hi"], {"temperature": float("nan"), "do_sample": True}, "`temperature` must be a number > 0"),
        (["hi"], {"temperature": float("inf"), "do_sample": True}, "`temperature` must be a number > 0"),
        (["hi"], {"top_p": float("nan")}, "`top_p` must be a number in"),
        (["hi"], {"repetition_penalty": float("inf")}, "`repetition_penalty` must be a number > 0"),
        (["hi"], {"seed": -1}, "`seed` must be an integer in 0..9223372036854775807"),
        (["hi"], {"seed": 2**64}, "`seed` must be an integer in 0.."),
        ([LONG_PROMPT], None, "exceeds the model's context of 256 tokens"),
        (["hi", "hi " * 220], {"max_new_tokens": 64}, "prompt 1 has .* tokens; with max_new_tokens=64"),
    ],
)
def test_bad_input_is_rejected_clearly(pyfunc_model, data, params, match):
    # Through MLflow's PyFuncModel (its schema enforcement runs first and may word a wrong type
    # itself), then through our wrapper alone, whose message is checked.
    with pytest.raises(MlflowException) as err:
        pyfunc_model.predict(data, params=params)
    assert err.value.error_code == INVALID, err.value.message
    with pytest.raises(MlflowException, match=match) as err:
        pyfunc_model._model_impl.predict(data, params=params)
    assert err.value.error_code == INVALID


def test_unknown_params_get_a_did_you_mean(pyfunc_model):
    with pytest.raises(MlflowException, match="did you mean `max_new_tokens`"):
        pyfunc_model._model_impl.predict(["hi"], params={"max_new_token": 3})


def test_max_new_tokens_cap_is_configurable(pyfunc_model, saved):
    capped = mlflow.pyfunc.load_model(str(saved), model_config={"max_new_tokens_cap": 8})
    with pytest.raises(MlflowException, match=r"1\.\.8, got 9"):
        capped.predict(["hi"], params={"max_new_tokens": 9})


def test_openai_max_tokens_is_read_in_params_and_in_a_completions_body(pyfunc_model):
    short = pyfunc_model.predict(["Question: What does a duck say?\nAnswer:"], params={"max_new_tokens": 1})["text"][0]
    assert pyfunc_model.predict(["Question: What does a duck say?\nAnswer:"], params={"max_tokens": 1})["text"][0] == short
    body = {"prompt": "Question: What does a duck say?\nAnswer:", "max_tokens": 1}
    answer = pyfunc_model.predict(body)
    assert answer["object"] == "text_completion" and [c["text"] for c in answer["choices"]] == [short]
    with pytest.raises(MlflowException, match=r"unknown request keys \['bogus'\]"):
        pyfunc_model.predict({**body, "bogus": 1})


def test_a_completions_body_with_a_list_prompt_gets_one_choice_per_prompt_in_order(pyfunc_model):
    prompts = PROMPTS[:3]
    texts = pyfunc_model.predict(prompts, params={"max_new_tokens": 3})["text"].tolist()
    answer = pyfunc_model.predict({"prompt": prompts, "max_tokens": 3})
    assert [(c["index"], c["text"]) for c in answer["choices"]] == list(enumerate(texts))
    assert all(c["finish_reason"] in ("stop", "length") and c["logprobs"] is None for c in answer["choices"])
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] and usage["completion_tokens"] <= 9


@pytest.mark.parametrize("data", [
    [[PROMPTS[0], PROMPTS[1]]],  # MLflow's enforcement of the old input schema kept only the first
    pd.DataFrame({"prompt": [[PROMPTS[0], PROMPTS[1]]]}),  # one row, two prompts
    pd.DataFrame({"prompt": ["hi", ["a", "b"]]}),
])
def test_a_row_holding_several_prompts_is_refused_naming_the_row(pyfunc_model, data):
    with pytest.raises(MlflowException, match=r"rows \[\d\] hold a list of prompts .*send one prompt per row") as err:
        pyfunc_model.predict(data, params={"max_new_tokens": 1})
    assert err.value.error_code == INVALID


@pytest.mark.parametrize("params", [{"n": 2}, {"stream": True}, {"logprobs": 1}, {"stop": "END"},
                                    {"presence_penalty": 0.5}, {"user": "me"}])
def test_openai_parameters_loraflow_does_not_implement_are_refused_by_name(pyfunc_model, params):
    (name,) = params
    with pytest.raises(MlflowException, match=f"unsupported OpenAI parameters \\['{name}'\\]"):
        pyfunc_model.predict(["hi"], params=params)
    with pytest.raises(MlflowException, match=f"unsupported OpenAI parameters \\['{name}'\\]"):
        pyfunc_model.predict({"prompt": "hi", **params})
    # their OpenAI defaults say "not used", and are accepted
    assert len(pyfunc_model.predict({"prompt": "hi", "n": 1, "echo": False, "stream": False, "max_tokens": 1})["choices"]) == 1


def test_served_error_messages_keep_their_start_and_end_within_the_budget():
    text = "Failed to predict data '" + "x" * 2_000_000 + "'. \nError: the reason"
    short = pyfunc.capped(text)
    assert len(json.dumps(short)) <= pyfunc.MAX_ERROR_BYTES
    assert short.startswith("Failed to predict data 'xx") and short.endswith("Error: the reason")
    assert "characters left out" in short
    assert len(json.dumps(pyfunc.capped("é" * 10_000))) <= pyfunc.MAX_ERROR_BYTES  # escapes count
    assert pyfunc.capped("short") == "short"
