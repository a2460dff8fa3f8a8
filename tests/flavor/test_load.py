"""Loading a model: exact round trips, trainable reload, tampering (loraflow.flavor.load)."""

from __future__ import annotations

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
from model_helpers import (PROMPTS, base_args, generate_texts, logits, make_peft_model, mlmodel, perturb_safetensors,
                           write_mlmodel)

from loraflow import flavor
from loraflow.flavor import fingerprint, layout, load, pyfunc, save, signatures
from loraflow.flavor.files import file_sha256

INVALID = ErrorCode.Name(INVALID_PARAMETER_VALUE)
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")


# ---------------------------------------------------------------------------------------------
# Exact round trips.


@pytest.mark.parametrize("mode", ["embedded", "reference", "logged"])
def test_native_round_trip_is_exact(mode, tmp_path, peft_model, tiny_tokenizer, tiny_path, tracking_uri):
    expected = logits(peft_model, tiny_tokenizer)
    with mlflow.start_run():
        info = flavor.log_model(peft_model, "model", tiny_tokenizer, **base_args(mode, tiny_path))
    loaded = flavor.load_model(info.model_uri)
    model, tokenizer = loaded  # unpacking works as well as .model / .tokenizer
    assert loaded.model is model and type(model).__name__ == "PeftModelForCausalLM"
    assert (logits(model, tokenizer) - expected).abs().max().item() == 0.0
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id == tiny_tokenizer.pad_token_id


def test_load_model_casts_to_the_requested_dtype(saved):
    model, _ = flavor.load_model(str(saved), dtype="float64", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float64}


@pytest.mark.parametrize("mode", ["embedded", "reference", "logged"])
def test_pyfunc_round_trip_is_exact(mode, peft_model, tiny_tokenizer, tiny_path, tracking_uri):
    with mlflow.start_run():
        info = flavor.log_model(peft_model, "model", tiny_tokenizer, **base_args(mode, tiny_path), batch_size=2)
    params = {"max_new_tokens": 12}

    # 1. pyfunc vs the in-memory model through the same batching helper and micro-batch size: the
    #    same left-padded batches, so any difference could only come from the saved weights.
    served = mlflow.pyfunc.load_model(info.model_uri)
    got = served.predict(pd.DataFrame({"prompt": PROMPTS}), params=params)
    assert list(got.columns) == ["text"] and len(got) == len(PROMPTS)
    expected = generate_texts(peft_model, tiny_tokenizer, PROMPTS, batch_size=2, max_new_tokens_cap=64, **params)
    assert got["text"].tolist() == expected

    # 2. pyfunc with micro-batch size 1 vs plain `generate` on one unpadded prompt at a time: an
    #    independent check that nothing but the continuation is returned, in input order.
    single = mlflow.pyfunc.load_model(info.model_uri, model_config={"batch_size": 1})
    got_single = single.predict(pd.DataFrame({"prompt": PROMPTS}), params=params)["text"].tolist()
    plain = []
    for prompt in PROMPTS:
        ids = tiny_tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = peft_model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
        plain.append(tiny_tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert got_single == plain


def test_logged_signature_has_params_schema_and_input_example(peft_model, tiny_tokenizer, tracking_uri):
    with mlflow.start_run():
        info = flavor.log_model(peft_model, "model", tiny_tokenizer, base_model="builtin:tiny",
                                generation_defaults={"max_new_tokens": 16})
    params = {p.name: p.default for p in info.signature.params.params}
    unset = dict.fromkeys(["max_tokens", *pyfunc.OPENAI_UNSUPPORTED])  # OpenAI's names: declared to reach predict
    assert params == {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "do_sample": False,
                      "repetition_penalty": 1.0, "seed": 0, **unset}
    assert info.signature.inputs is None  # predict checks every input itself (MLflow's would drop data)
    assert info.signature.outputs.input_names() == ["text"]
    # The default example is read back as it was logged, and is a request the model answers.
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    meta = Model.load(local)
    example, example_params = meta.load_input_example(local), meta.load_input_example_params(local)
    assert (example, example_params) == signatures.default_input_example()
    texts = mlflow.pyfunc.load_model(info.model_uri).predict(example, params=example_params)["text"].tolist()
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_max_new_tokens_param_changes_the_output_length(saved, tiny_tokenizer):
    model = mlflow.pyfunc.load_model(str(saved))
    prompts = pd.DataFrame({"prompt": PROMPTS[:2]})
    short = model.predict(prompts, params={"max_new_tokens": 2})["text"].tolist()
    long = model.predict(prompts, params={"max_new_tokens": 16})["text"].tolist()
    for s, l in zip(short, long):
        assert len(tiny_tokenizer(s, add_special_tokens=False)["input_ids"]) <= 2
        assert l.startswith(s)
    assert sum(map(len, long)) > sum(map(len, short))  # a row may stop early at EOS, not all of them


def test_sampling_is_reproducible_with_a_seed(saved):
    model = mlflow.pyfunc.load_model(str(saved))
    params = {"do_sample": True, "temperature": 1.5, "top_p": 0.95, "max_new_tokens": 12}
    first = model.predict(PROMPTS[:2], params={**params, "seed": 7})["text"].tolist()
    again = model.predict(PROMPTS[:2], params={**params, "seed": 7})["text"].tolist()
    assert first == again


def test_every_accepted_input_form_gives_the_same_text(saved):
    model = mlflow.pyfunc.load_model(str(saved))
    params = {"max_new_tokens": 4}
    expected = model.predict(pd.DataFrame({"prompt": PROMPTS[:2]}), params=params)["text"].tolist()
    assert model.predict(PROMPTS[:2], params=params)["text"].tolist() == expected
    choices = model.predict({"prompt": PROMPTS[:2]}, params=params)["choices"]  # OpenAI's completions body
    assert [c["text"] for c in choices] == expected
    assert [c["text"] for c in model.predict({"prompt": PROMPTS[0]}, params=params)["choices"]] == expected[:1]
    assert model.predict(PROMPTS[0], params=params)["text"].tolist() == expected[:1]


# ---------------------------------------------------------------------------------------------
# Trainable reload.


def test_trainable_reload_matches_the_saved_parameter_counts(saved, peft_model):
    before = peft_model.get_nb_trainable_parameters()
    model, _ = flavor.load_model(str(saved), is_trainable=True)
    assert model.get_nb_trainable_parameters() == before
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any(".modules_to_save." in n for n in trainable)

    frozen, _ = flavor.load_model(str(saved), is_trainable=False)
    assert frozen.get_nb_trainable_parameters() == (0, before[1])


# ---------------------------------------------------------------------------------------------
# Tampering: a base that does not match, a missing or corrupt adapter, a newer format.


def test_reference_to_a_changed_base_fails_naming_both_fingerprints(tmp_path, peft_model, tiny_tokenizer, tiny_path):
    base_copy = tmp_path / "base-copy"
    shutil.copytree(tiny_path, base_copy)
    path = tmp_path / "model"
    flavor.save_model(peft_model, path, tiny_tokenizer, base_model=str(base_copy), base_mode="reference")
    assert flavor.load_model(str(path)).model is not None  # untouched: loads
    perturb_safetensors(base_copy / "model.safetensors")
    recorded = mlmodel(path)["flavors"]["loraflow"]["base"]["fingerprint"]
    with pytest.raises(MlflowException, match="does not match") as err:
        flavor.load_model(str(path))
    message = err.value.message
    assert recorded in message and message.count(f"{fingerprint.FINGERPRINT_SCHEME}:") == 2 and str(base_copy) in message


def test_embedded_base_with_modified_weights_fails(saved):
    perturb_safetensors(saved / "base" / "model.safetensors")
    with pytest.raises(MlflowException, match=f"does not match.*expected {fingerprint.FINGERPRINT_SCHEME}:"):
        flavor.load_model(str(saved))


def test_missing_base_directory_fails_clearly(saved):
    shutil.rmtree(saved / "base")
    with pytest.raises(MlflowException, match="cannot load the embedded base model"):
        flavor.load_model(str(saved))


def test_missing_adapter_file_fails(saved):
    (saved / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(MlflowException, match="adapter_model.safetensors.* is missing"):
        flavor.load_model(str(saved))
    with pytest.raises(MlflowException, match="is missing"):
        mlflow.pyfunc.load_model(str(saved))


def test_flipped_bytes_in_the_adapter_fail_even_if_safetensors_would_parse(saved):
    file = saved / "adapter" / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01  # last byte of the last tensor: still a valid safetensors file
    file.write_bytes(bytes(data))
    with pytest.raises(MlflowException, match="adapter_model.safetensors.* is corrupt: its sha256 is"):
        flavor.load_model(str(saved))


def test_an_unparseable_adapter_fails_with_the_file_name(saved):
    # Truncate the file and record the new hash, so the safetensors/peft error itself is reached.
    file = saved / "adapter" / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    doc = mlmodel(saved)
    doc["flavors"]["loraflow"]["adapter_sha256"]["adapter_model.safetensors"] = file_sha256(file)
    write_mlmodel(saved, doc)
    with pytest.raises(MlflowException, match="cannot load the adapter from .*adapter_model.safetensors"):
        flavor.load_model(str(saved))


def test_a_newer_flavor_version_asks_to_upgrade(saved):
    doc = mlmodel(saved)
    doc["flavors"]["loraflow"]["flavor_version"] = flavor.FLAVOR_VERSION + 1
    write_mlmodel(saved, doc)
    with pytest.raises(MlflowException, match="upgrade loraflow"):
        flavor.load_model(str(saved))

def test_on_device_needs_every_parameter_and_buffer_there():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert load._on_device(model, torch.device("cpu"))
    model[1].register_buffer("moved", torch.zeros(1, device="meta"))
    assert not load._on_device(model, torch.device("cpu"))
    assert not load._on_device(torch.nn.Linear(2, 2), torch.device("meta"))


def test_booleans_must_be_booleans_and_devices_must_exist(saved):
    with pytest.raises(MlflowException, match="`is_trainable` must be True or False, got 'no'"):
        flavor.load_model(str(saved), is_trainable="no")
    with pytest.raises(MlflowException, match="`trust_remote_code` must be True, False or None"):
        flavor.load_model(str(saved), trust_remote_code="yes")
    with pytest.raises(MlflowException, match=r"`device` 'cuda:7' does not exist on this machine; devices here: cpu"):
        flavor.load_model(str(saved), device="cuda:7")
    with pytest.raises(MlflowException, match="model_config `device` 'cuda:7' does not exist"):
        mlflow.pyfunc.load_model(str(saved), model_config={"device": "cuda:7"})
