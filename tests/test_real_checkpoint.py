"""A real instruct model end to end: SmolLM2-135M-Instruct stored in bf16 (`real_model`), and as GGUF.

Chat training with its own template, the logged model through pyfunc and through both exports, QLoRA,
the dtypes the policy chose, and a GGUF file as the base. Short sequences, two steps, tiny batches.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import mlflow
import pytest
import torch
from helpers import BIN, env_with_venv, free_port, fresh_store, stop, wait_for_http
from real_model import real_checkpoint, real_gguf  # noqa: F401 (fixtures)
from test_serving import post

from loraflow import flavor
from loraflow.config import parse_settings
from loraflow.train import run_training

pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"), ("Egypt", "Cairo"),
            ("Peru", "Lima"), ("Kenya", "Nairobi"), ("Chile", "Santiago"), ("Norway", "Oslo"), ("Cuba", "Havana")]
QUESTION = [{"role": "user", "content": "What is the capital of Norway?"}]  # no system turn: the template adds one
FAST = {"max_steps": "2", "eval_steps": "2", "batch_size": "2", "r": "4", "eval_samples": "0",
        "max_seq_length": "64", "learning_rate": "0.001"}
NEW_TOKENS = 8


def conversation(country: str, capital: str) -> dict:
    return {"messages": [{"role": "user", "content": f"What is the capital of {country}?"},
                         {"role": "assistant", "content": f"{capital}."}]}


def write_chats(folder: Path) -> dict[str, str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"train_data": folder / "train.jsonl", "eval_data": folder / "eval.jsonl"}
    for key, rows in (("train_data", CAPITALS[:8]), ("eval_data", CAPITALS[8:])):
        paths[key].write_text("".join(json.dumps(conversation(*row)) + "\n" for row in rows))
    return {k: str(v) for k, v in paths.items()}


def train(tmp: Path, base: Path, **extra: str):
    """A short chat run on the real model in a fresh store; (result, tracking uri)."""
    uri = fresh_store(tmp / "mlflow.db")
    mlflow.set_tracking_uri(uri)
    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        settings = {**FAST, **write_chats(tmp / "data"), "base_model": str(base), "output_dir": str(tmp / "out")}
        return run_training(*parse_settings({**settings, **extra})), uri
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, real_checkpoint):  # noqa: F811
    result, uri = train(tmp_path_factory.mktemp("real-run"), real_checkpoint)
    yield result, uri
    mlflow.set_tracking_uri(None)


def native_greedy(model, tokenizer, messages) -> str:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             eos_token_id=[tokenizer.eos_token_id, end], pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def test_the_loss_mask_is_the_reply_of_the_rendering_with_the_default_system_prompt(real_checkpoint):  # noqa: F811
    from loraflow.data.chat import resolve_chat_template, tokenize_conversation
    from loraflow.flavor.bases import load_tokenizer

    tokenizer = load_tokenizer(str(real_checkpoint))
    template = resolve_chat_template(tokenizer, "auto")
    messages = conversation("Norway", "Oslo")["messages"]
    ids, labels = tokenize_conversation(tokenizer, messages, "assistant", template)
    assert ids == tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
    rendered = tokenizer.decode(ids)
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    trained = [t for t in labels if t != -100]
    assert tokenizer.decode(trained) == "Oslo.<|im_end|>\n"
    assert ids[len(ids) - len(trained):] == trained  # the reply closes the rendering


def test_a_bf16_stored_base_trains_and_serves_in_fp32_on_this_cpu(real_run, real_checkpoint):  # noqa: F811
    from mlflow.models import Model

    result, uri = real_run
    assert json.loads((real_checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    params = mlflow.get_run(result.run_id).data.params
    assert (params["base_dtype"], params["compute_dtype"]) == ("float32", "float32")
    conf = Model.load(mlflow.artifacts.download_artifacts(result.model_uri)).flavors["loraflow"]
    assert conf["base"]["dtype"] == "bfloat16" and conf["task"] == "chat"  # recorded as stored
    model, _ = flavor.load_model(result.model_uri)  # the fingerprint matched the stored bf16 weights
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    served = mlflow.pyfunc.load_model(result.model_uri, model_config={"dtype": "bfloat16"})
    assert {p.dtype for p in served.get_raw_model().model.get_base_model().parameters()} == {torch.bfloat16}


def test_the_chat_pyfunc_answers_as_native_greedy_generation(real_run):
    result, uri = real_run
    mlflow.set_tracking_uri(uri)
    answer = mlflow.pyfunc.load_model(result.model_uri).predict({"messages": QUESTION, "max_tokens": NEW_TOKENS})
    model, tokenizer = flavor.load_model(result.model_uri)
    assert answer["choices"][0]["message"]["content"] == native_greedy(model, tokenizer, QUESTION)


def test_mlflow_models_serve_answers_an_openai_chat_body_as_the_pyfunc_does(real_run, tmp_path):
    result, uri = real_run
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(
            [str(BIN / "mlflow"), "models", "serve", "-m", result.model_uri, "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env=env_with_venv(MLFLOW_TRACKING_URI=uri, CUDA_VISIBLE_DEVICES=""))
        try:
            wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=300)
            mlflow.set_tracking_uri(uri)
            request = {"messages": QUESTION, "max_tokens": NEW_TOKENS}
            expected = mlflow.pyfunc.load_model(result.model_uri).predict(request)
            status, body = post(f"http://127.0.0.1:{port}", request)
            assert status == 200, body
            assert body["choices"][0]["message"] == expected["choices"][0]["message"]
            assert body["usage"] == expected["usage"]
        finally:
            stop(proc)


def test_merged_and_adapter_exports_give_the_same_greedy_text(real_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraflow import export

    result, uri = real_run
    mlflow.set_tracking_uri(uri)
    model, tokenizer = flavor.load_model(result.model_uri)
    expected = native_greedy(model, tokenizer, QUESTION)
    export.export_model(result.model_uri, "merged", tmp_path / "merged", dtype="fp32", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert native_greedy(merged, AutoTokenizer.from_pretrained(tmp_path / "merged"), QUESTION) == expected
    export.export_model(result.model_uri, "adapter", tmp_path / "adapter", progress=False)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"], dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, str(tmp_path / "adapter")).eval()
    assert native_greedy(adapted, AutoTokenizer.from_pretrained(tmp_path / "adapter"), QUESTION) == expected


def test_nf4_qlora_trains_and_reloads_quantized(tmp_path, real_checkpoint):  # noqa: F811
    result, uri = train(tmp_path, real_checkpoint, quantization="nf4")
    try:
        params = mlflow.get_run(result.run_id).data.params
        assert (params["base_dtype"], params["compute_dtype"]) == ("nf4", "float32")
        assert math.isfinite(result.eval_loss_after)
        model, tokenizer = flavor.load_model(result.model_uri)  # quantized again, as trained
        assert any(type(m).__name__ == "Linear4bit" for m in model.modules())
        assert native_greedy(model, tokenizer, QUESTION)  # it answers
    finally:
        mlflow.set_tracking_uri(None)


def test_a_gguf_base_loads_dequantized_and_is_embedded_as_safetensors(tmp_path, real_gguf):  # noqa: F811
    from loraflow.base_models import load_for_training, load_skeleton
    from loraflow.config import lora_settings
    from loraflow.lora import apply_lora

    from click.testing import CliRunner

    from loraflow.cli import main

    assert type(load_skeleton(str(real_gguf))).__name__ == "LlamaForCausalLM"
    outcome = CliRunner().invoke(main, ["validate", "--base-model", str(real_gguf), "--train-data", "builtin:chat"])
    assert outcome.exit_code == 0 and "Parameter report" in outcome.output, outcome.output
    base, tokenizer = load_for_training(str(real_gguf))
    assert {p.dtype for p in base.parameters()} == {torch.float32} and tokenizer.chat_template
    model = apply_lora(base, lora_settings({"r": 4})).eval()
    expected = native_greedy(model, tokenizer, QUESTION)
    flavor.save_model(model, str(tmp_path / "model"), tokenizer, base_model=str(real_gguf))
    assert (tmp_path / "model" / "base" / "model.safetensors").is_file()
    reloaded, reloaded_tokenizer = flavor.load_model(str(tmp_path / "model"))  # the fingerprint matched
    assert native_greedy(reloaded, reloaded_tokenizer, QUESTION) == expected
    from loraflow import export

    adapter = export.export_model(str(tmp_path / "model"), "adapter", tmp_path / "adapter", progress=False)
    assert "GGUF file" in adapter.record["needs_base"] and "--format merged" in adapter.record["needs_base"]


def test_a_gguf_config_is_parsed_once_per_file_and_handed_out_as_copies(real_gguf, monkeypatch):  # noqa: F811
    from transformers import AutoConfig

    from loraflow.base_models import load_config, load_skeleton
    from loraflow.flavor import bases

    monkeypatch.setattr(bases, "_GGUF_CONFIGS", {})
    parses = []
    real = AutoConfig.from_pretrained
    monkeypatch.setattr(AutoConfig, "from_pretrained", lambda *a, **k: parses.append(k) or real(*a, **k))
    first = load_config(str(real_gguf))
    load_skeleton(str(real_gguf))
    second = load_config(str(real_gguf))
    assert len(parses) == 1 and parses[0]["gguf_file"] == real_gguf.name
    assert first is not second and first.to_dict() == second.to_dict()


@pytest.mark.parametrize("damage", ["truncated", "unsupported"])
def test_a_bad_gguf_is_one_message_and_exit_2(tmp_path, real_gguf, damage):  # noqa: F811
    from click.testing import CliRunner

    from loraflow.cli import main

    bad = tmp_path / f"{damage}.gguf"
    if damage == "truncated":
        with open(real_gguf, "rb") as src:
            bad.write_bytes(src.read(5_000_000))
        expected = "it is truncated or corrupt"
    else:
        import gguf
        import numpy as np

        writer = gguf.GGUFWriter(str(bad), "rwkv6")
        writer.add_block_count(1)
        writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        expected = "architecture 'rwkv6', which transformers cannot read"
    train_data = write_chats(tmp_path / "data")["train_data"]
    before = set(Path(tmp_path).rglob("*"))
    outcome = CliRunner().invoke(main, ["validate", "--base-model", str(bad), "--train-data", train_data])
    assert outcome.exit_code == 2, outcome.output
    assert expected in outcome.output and "Traceback" not in outcome.output
    assert set(Path(tmp_path).rglob("*")) == before
    shutil.rmtree(tmp_path / "data")
