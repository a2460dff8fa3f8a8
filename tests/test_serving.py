"""End to end: `mlflow models serve` answers /invocations with the same generations as pyfunc."""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request

import mlflow
import pandas as pd
import pytest
from helpers import BIN, env_with_venv, free_port, stop, wait_for_http
from model_helpers import PROMPTS, base_args, generate_texts, make_peft_model

from loraflow import flavor
from loraflow.flavor import layout

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`"),
]


def post(url: str, payload: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"{url}/invocations", data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.parametrize("mode", ["embedded", "reference"])
def test_served_model_answers_like_pyfunc(mode, tmp_path, monkeypatch, tiny_model, tiny_tokenizer, tiny_path, tracking_uri):
    monkeypatch.chdir(tmp_path)  # a sqlite store puts artifacts under ./mlruns
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)  # in-process pyfunc on the CPU too
    peft_model = make_peft_model(tiny_model)
    with mlflow.start_run():
        info = flavor.log_model(peft_model, "model", tiny_tokenizer, **base_args(mode, tiny_path), batch_size=2)
    params = {"max_new_tokens": 6}
    expected = mlflow.pyfunc.load_model(info.model_uri).predict(pd.DataFrame({"prompt": PROMPTS}), params=params)
    expected = expected["text"].tolist()
    # Exact against the in-memory model too, through the same batching (see test_flavor for why).
    assert expected == generate_texts(peft_model, tiny_tokenizer, PROMPTS, batch_size=2, max_new_tokens_cap=64, **params)

    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", info.model_uri, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=env_with_venv(CUDA_VISIBLE_DEVICES=""), start_new_session=True,  # CPU, as the expected texts
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/ping", proc, timeout=180)
        payloads = {
            "dataframe_records": {"dataframe_records": [{"prompt": p} for p in PROMPTS], "params": params},
            "dataframe_split": {"dataframe_split": {"columns": ["prompt"], "data": [[p] for p in PROMPTS]},
                                "params": params},
            "inputs": {"inputs": PROMPTS, "params": params},
        }
        for kind, payload in payloads.items():
            status, body = post(url, payload)
            assert status == 200, (kind, body)
            assert [row["text"] for row in body["predictions"]] == expected, kind

        # The params schema is honoured over HTTP too: a longer generation starts with the shorter one.
        status, body = post(url, {"inputs": PROMPTS, "params": {"max_new_tokens": 12}})
        longer = [row["text"] for row in body["predictions"]]
        assert status == 200 and all(l.startswith(s) for l, s in zip(longer, expected))
        assert sum(map(len, longer)) > sum(map(len, expected))  # some rows may stop early at EOS

        status, body = post(url, {"dataframe_records": [{"prompt": "hi"}], "params": {"max_new_tokens": 0}})
        assert status == 400 and "`max_new_tokens` must be an integer" in body["message"]
        assert body["error_code"] == "INVALID_PARAMETER_VALUE"
        status, body = post(url, {"dataframe_records": [{"question": "hi"}]})
        assert status == 400 and "no `prompt` column" in body["message"]
        # OpenAI's spelling is honoured, not dropped: in params, and beside `prompt` in a completions body
        status, body = post(url, {"inputs": PROMPTS[:1], "params": {"max_tokens": 1}})
        one_token = [row["text"] for row in body["predictions"]]
        assert status == 200 and len(one_token) == 1 and expected[0].startswith(one_token[0])
        status, body = post(url, {"prompt": PROMPTS[0], "max_tokens": 1})  # answered OpenAI's way, unwrapped
        assert status == 200 and body["object"] == "text_completion", body
        assert [choice["text"] for choice in body["choices"]] == one_token
        status, body = post(url, {"inputs": ["hi"], "params": {"temperature": float("nan"), "do_sample": True}})
        assert status == 400 and "`temperature` must be a number > 0" in body["message"], body
    finally:
        stop(proc)
        log.close()
    assert proc.poll() is not None
