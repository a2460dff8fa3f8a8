"""`precision` through a whole run: the dtypes the policy chose are the run's params, a bf16-stored base
trains and serves in fp32 on a CPU with its fingerprint intact, and what the device cannot do is refused."""

from __future__ import annotations

import logging

import mlflow
import pytest
import torch
from click.testing import CliRunner

from loraflow import cli, flavor
from loraflow.config import parse_settings
from loraflow.flavor import dtypes, trainable
from loraflow.train import run_training

pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
FAST = {"max_steps": "1", "eval_steps": "1", "batch_size": "4", "r": "4", "eval_samples": "0",
        "train_data": "builtin:chat", "max_seq_length": "64"}


@pytest.fixture
def bf16_base(tmp_path, tiny_path):
    """The built-in tiny base, saved in bf16 as Hub checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path / "tiny-bf16"
    AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.bfloat16).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(folder)
    return folder


def test_a_bf16_stored_base_trains_in_fp32_on_a_cpu_and_keeps_its_fingerprint(bf16_base, tracking_uri):
    from mlflow.models import Model

    result = run_training(*parse_settings({**FAST, "base_model": str(bf16_base)}))
    params = mlflow.get_run(result.run_id).data.params
    assert (params["base_dtype"], params["compute_dtype"]) == ("float32", "float32")
    conf = Model.load(mlflow.artifacts.download_artifacts(result.model_uri)).flavors["loraflow"]
    assert conf["base"]["dtype"] == "bfloat16"  # recorded as stored
    model, _ = flavor.load_model(result.model_uri)  # the fingerprint is checked on the stored bf16 weights
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    as_stored, _ = flavor.load_model(result.model_uri, dtype="bf16")
    assert {p.dtype for p in as_stored.parameters()} == {torch.bfloat16}


def test_precision_bf16_holds_the_base_in_bf16_and_says_once_what_it_costs_here(
        tiny_path, tracking_uri, caplog, monkeypatch):
    monkeypatch.setattr(trainable, "_warned", set())
    with caplog.at_level(logging.WARNING, logger="loraflow.flavor.trainable"):
        result = run_training(*parse_settings({**FAST, "base_model": tiny_path, "precision": "bf16"}))
    params = mlflow.get_run(result.run_id).data.params
    assert (params["base_dtype"], params["compute_dtype"]) == ("bfloat16", "bfloat16")
    notes = [r.getMessage() for r in caplog.records if r.name == "loraflow.flavor.trainable"]
    assert notes == ([] if dtypes.cpu_has_native_bf16() else [dtypes.plan_dtypes("bf16", dtypes.device_facts()).note])
    model, _ = flavor.load_model(result.model_uri)  # serves in fp32 on this CPU, whatever it trained in
    assert {p.dtype for p in model.parameters()} == {torch.float32}


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused only without a GPU")
def test_fp16_on_a_cpu_is_one_message_exit_2_and_nothing_written(tmp_path, tiny_path, tracking_uri):
    outcome = CliRunner().invoke(cli.main, ["train", "--base-model", tiny_path, "--train-data", "builtin:chat",
                                            "--precision", "fp16", "--max-steps", "1"])
    assert outcome.exit_code == 2, outcome.output
    assert "`precision` (--precision) fp16 needs a CUDA GPU, none is available; use auto, fp32 or bf16" in outcome.output
    assert "Traceback" not in outcome.output
    assert mlflow.search_runs(search_all_experiments=True).empty
    assert not (tmp_path / "outputs").exists()


def test_model_config_dtype_sets_what_the_pyfunc_computes_in_and_refuses_a_bad_one(bf16_base, tracking_uri):
    from mlflow.exceptions import MlflowException

    result = run_training(*parse_settings({**FAST, "base_model": str(bf16_base)}))
    served = mlflow.pyfunc.load_model(result.model_uri, model_config={"dtype": "bfloat16"})
    assert {p.dtype for p in served.get_raw_model().model.get_base_model().parameters()} == {torch.bfloat16}
    with pytest.raises(MlflowException, match="model_config `dtype` must be None"):
        mlflow.pyfunc.load_model(result.model_uri, model_config={"dtype": "int8"})
