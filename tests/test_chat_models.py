"""Chat models end to end: trained on conversations, saved with their template, answering OpenAI chat
requests in process and over a real `mlflow models serve`."""

from __future__ import annotations

import json
import shutil
import subprocess

import mlflow
import pytest
import torch
from helpers import BIN, env_with_venv, free_port, fresh_store, stop, wait_for_http
from test_serving import post
from test_serving_faults import post_raw

from loraflow import flavor
from loraflow.config import parse_settings
from loraflow.errors import ConfigError
from loraflow.train import run_training

pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
FAST = {"max_steps": "4", "eval_steps": "2", "batch_size": "4", "r": "4", "eval_samples": "4"}
QUESTION = [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "What does a duck say?"}]


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("chat-run")
    uri = fresh_store(tmp / 'mlflow.db')
    mlflow.set_tracking_uri(uri)
    import os

    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        result = run_training(*parse_settings({**FAST, "train_data": "builtin:chat", "output_dir": str(tmp / "out")}))
    finally:
        os.chdir(cwd)
    yield result, uri
    mlflow.set_tracking_uri(None)


def test_a_run_on_conversations_logs_a_chat_model_with_its_template(chat_run):
    from mlflow.models import Model

    result, uri = chat_run
    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(result.model_uri)
    conf = Model.load(local).flavors["loraflow"]
    assert conf["task"] == "chat" and conf["chat"]["end_of_turn_text"] == "<|im_end|>\n"
    model, tokenizer = flavor.load_model(result.model_uri)
    assert tokenizer.convert_ids_to_tokens(conf["chat"]["end_of_turn_ids"]) == ["<|im_end|>"]
    assert "<|im_start|>" in tokenizer.chat_template  # the template training used travels with the model
    assert {"eval_exact_match", "eval_token_f1"} <= set(result.history)
    assert [step for step, _ in result.history["eval_exact_match"]] == [0, 2, 4]


def test_chat_pyfunc_answers_openai_requests_like_the_native_model(chat_run):
    result, uri = chat_run
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(result.model_uri)
    answer = pyfunc.predict({"messages": QUESTION, "max_tokens": 12})
    assert answer["object"] == "chat.completion" and answer["id"].startswith("chatcmpl-")
    assert isinstance(answer["created"], int) and answer["model"]
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
    usage = answer["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    # greedy content equals what the natively loaded model generates from apply_chat_template
    model, tokenizer = flavor.load_model(result.model_uri)
    ids = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False,
                             eos_token_id=[tokenizer.eos_token_id, end], pad_token_id=tokenizer.pad_token_id)
    native = tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)
    assert choice["message"]["content"] == native
    assert usage["prompt_tokens"] == len(ids)
    stopped = out[0, -1].item() in (tokenizer.eos_token_id, end)
    assert choice["finish_reason"] == ("stop" if stopped else "length")


def test_chat_pyfunc_takes_batches_stop_strings_and_refuses_bad_requests_by_name(chat_run):
    from mlflow.exceptions import MlflowException

    result, uri = chat_run
    mlflow.set_tracking_uri(uri)
    pyfunc = mlflow.pyfunc.load_model(result.model_uri)
    # Lengths are chosen from answers generated here, not from what a trained model happens to say.
    answers = [pyfunc.predict({"messages": q, "max_tokens": 12}) for q in (QUESTION, QUESTION[1:])]
    lengths = [a["usage"]["completion_tokens"] for a in answers]
    cut_at = [max(1, n - 1) for n in lengths]  # one token short of each full answer
    one = pyfunc.predict({"messages": QUESTION, "max_tokens": cut_at[0]})
    assert one["usage"]["completion_tokens"] == min(cut_at[0], lengths[0])
    if lengths[0] > 1:
        assert one["choices"][0]["finish_reason"] == "length"
    requests = [{"messages": QUESTION, "max_tokens": cut_at[0]}, {"messages": QUESTION[1:], "max_tokens": cut_at[1]}]
    batch = pyfunc.predict(requests)
    assert len(batch) == 2  # one answer per request, each with its own settings
    assert [b["choices"][0]["message"] for b in batch] == [pyfunc.predict(r)["choices"][0]["message"] for r in requests]
    assert [b["usage"]["completion_tokens"] for b in batch] == [min(c, n) for c, n in zip(cut_at, lengths)]
    full = answers[0]["choices"][0]["message"]["content"]
    if len(full) > 3:
        cut = pyfunc.predict({"messages": QUESTION, "max_tokens": 12, "stop": [full[2:4]]})["choices"][0]
        assert cut["message"]["content"] == full[: full.index(full[2:4])] and cut["finish_reason"] == "stop"
    for bad, match in [({"messages": [{"role": "wizard", "content": "hi"}]}, "role 'wizard'"),
                       ({"messages": "hi"}, "messages"),  # MLflow's schema check, or ours
                       ({"messages": QUESTION, "frequency_penalty": 1.0}, "unknown request keys"),
                       ({"messages": QUESTION, "n": 2}, "`n` must be 1"),
                       ({"messages": QUESTION, "max_tokens": 0}, "`max_new_tokens` must be an integer")]:
        with pytest.raises(MlflowException, match=match):
            pyfunc.predict(bad)


def test_the_promotion_health_gate_passes_a_healthy_chat_model(chat_run):
    from loraflow.health import health_check

    result, uri = chat_run
    mlflow.set_tracking_uri(uri)
    assert health_check(result.model_uri) is None  # its logged input example is a chat request it answers


def test_auto_chat_template_without_one_fails_before_training_naming_the_fix(tmp_path, tiny_path, tracking_uri):
    base = tmp_path / "no-template"
    shutil.copytree(tiny_path, base)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    (base / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="--chat-template chatml"):
        run_training(*parse_settings({**FAST, "train_data": "builtin:chat", "base_model": str(base)}))


@pytest.mark.slow
def test_mlflow_models_serve_answers_an_openai_chat_body(chat_run, tmp_path):
    result, uri = chat_run
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", result.model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env_with_venv(MLFLOW_TRACKING_URI=uri, CUDA_VISIBLE_DEVICES=""),
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", proc, timeout=180)
        mlflow.set_tracking_uri(uri)
        expected = mlflow.pyfunc.load_model(result.model_uri).predict({"messages": QUESTION, "max_tokens": 8})
        status, body = post(url, {"messages": QUESTION, "max_tokens": 8})
        assert status == 200, body
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == expected["choices"][0]["message"]
        assert body["usage"] == expected["usage"]
        status, body = post(url, {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 4})
        assert 400 <= status < 500 and "role 'wizard'" in body["message"]
        status, body = post(url, {"messages": QUESTION, "max_tokens": 2, "logprobs": True})  # a declared param
        assert status == 400 and "unknown request keys ['logprobs']" in body["message"], body
        status, body = post(url, {"messages": QUESTION, "max_tokens": 2, "bogus": 1})  # MLflow drops it, and says so
        assert status == 200
        assert "extra inputs in the model input that are not defined in the model signature: `['bogus']`" in (
            tmp_path / "serve.log").read_text(errors="replace")
        big = "word " * 400_000
        for payload in ({"messages": big, "max_tokens": 2}, b'{"messages": [{"role": "user", "content": "' + big.encode()):
            status, raw = post_raw(url, payload)
            assert status == 400 and len(raw) <= 4096 and "characters left out" in json.loads(raw)["message"], len(raw)
        status, body = post(url, {"messages": QUESTION, "max_tokens": 2})
        assert status == 200 and body["usage"]["completion_tokens"] == 2  # still answering
    finally:
        stop(proc)
        log.close()


@pytest.mark.parametrize("samples", [1, 3])
def test_loraflow_evaluate_scores_a_chat_model_on_conversations(chat_run, samples):
    from loraflow.evaluation import evaluate_model

    result, uri = chat_run
    mlflow.set_tracking_uri(uri)
    scored = evaluate_model(result.model_uri, "builtin:chat", samples=samples)
    assert len(scored.rows) == samples and set(scored.metrics) == {"eval_exact_match", "eval_token_f1"}
    assert all(isinstance(row["generated"], str) for row in scored.rows)
