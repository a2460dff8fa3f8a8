"""QLoRA end to end on the CPU: `--quantization nf4|int8` trains the built-in model, tracks the
quantization, counts 4-bit parameters as the elements they stand for, refuses what cannot work
(with exit code 2), and a QLoRA model exports merged only with `--force`."""

from __future__ import annotations

import json
import sys

import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow import MlflowClient

from loraflow import flavor
from loraflow.cli import main
from loraflow.config import lora_settings, parse_settings
from loraflow.errors import ConfigError
from loraflow.flavor.bases import load_base_model
from loraflow.lora import apply_lora, parameter_report
from loraflow.train import run_training
from helpers import fresh_store

pytest.importorskip("bitsandbytes")

FAST = {"max_steps": "6", "eval_steps": "6", "batch_size": "8", "r": "8", "eval_samples": "4", "precision": "fp32",
        "learning_rate": "0.005"}


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def train_run(tmp, **overrides):
    uri = fresh_store(tmp / 'mlflow.db')
    mlflow.set_tracking_uri(uri)
    try:
        raw = {**FAST, "output_dir": str(tmp / "outputs"), **overrides}
        lora, settings = parse_settings(raw)
        return uri, run_training(lora, settings, explicit=set(raw))
    finally:
        mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def nf4_run(tmp_path_factory):
    """(folder, tracking URI, TrainResult, the logged model downloaded) of one short nf4 run."""
    tmp = tmp_path_factory.mktemp("nf4-run")
    uri, result = train_run(tmp, quantization="nf4")
    mlflow.set_tracking_uri(uri)
    try:
        local = mlflow.artifacts.download_artifacts(result.model_uri, dst_path=str(tmp / "logged"))
    finally:
        mlflow.set_tracking_uri(None)
    return tmp, uri, result, local


def test_nf4_training_on_the_builtin_model_learns_and_logs_a_qlora_model(nf4_run):
    _, _, result, local = nf4_run
    assert result.ok and result.eval_loss_after < result.eval_loss_before
    model, _ = flavor.load_model(local)
    assert type(model.get_base_model().model.layers[0].self_attn.q_proj.base_layer).__name__ == "Linear4bit"


def test_the_run_records_the_quantization_and_the_peak_memory(nf4_run):
    _, uri, result, _ = nf4_run
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.data.params["quantization"] == "nf4"
    assert run.data.params["quantization_compute_dtype"] == "float32"
    assert run.data.params["quantization_double_quant"] == "True"
    assert run.data.tags["quantization"] == "nf4"
    assert run.data.metrics["peak_rss_mib"] > 100  # torch alone takes more


def test_continuing_from_a_qlora_model_keeps_and_records_its_quantization(nf4_run):
    """`--init-model` of a QLoRA model trains on the base quantized again as it was, and the run says
    so; asking for another quantization is refused before any model loads."""
    tmp, uri, result, _ = nf4_run
    mlflow.set_tracking_uri(uri)
    try:
        raw = {**FAST, "max_steps": "2", "eval_samples": "0", "output_dir": str(tmp / "outputs"),
               "init_model": result.model_uri}
        lora, settings = parse_settings(raw)
        continued = run_training(lora, settings, explicit=set(raw))
        assert continued.ok and continued.eval_loss_before == pytest.approx(result.eval_loss_after, rel=1e-4)
        assert MlflowClient(uri).get_run(continued.run_id).data.params["quantization"] == "nf4"
        lora, settings = parse_settings({**raw, "quantization": "none"})
        with pytest.raises(ConfigError, match="trained with 'nf4'; leave it out") as refused:
            run_training(lora, settings, explicit={*raw, "quantization"})
        assert str(refused.value).count("`quantization`") == 1  # the CLI adds the flag after each
    finally:
        mlflow.set_tracking_uri(None)


def test_the_parameter_report_counts_a_4bit_weight_as_the_elements_it_stands_for(nf4_run, tiny_path):
    """Logged by the run, and computed here: the same totals as on the unquantized base."""
    _, uri, result, _ = nf4_run
    settings = lora_settings(r=8)
    plain = parameter_report(apply_lora(load_base_model(tiny_path), settings))
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.data.metrics["total_params"] == plain["total_params"]
    assert run.data.metrics["trainable_params"] == plain["trainable_params"]
    from loraflow.base_models import load_for_training

    quantized = apply_lora(load_for_training("builtin:tiny", quantization="nf4")[0], settings)
    assert parameter_report(quantized) == plain
    assert quantized.get_nb_trainable_parameters() == (plain["trainable_params"], plain["total_params"])


def test_int8_training_on_the_builtin_model_runs_and_logs(tmp_path):
    _, result = train_run(tmp_path, quantization="int8", max_steps="2", eval_steps="2", eval_samples="0")
    assert result.ok and result.model_uri
    assert len(result.history["train_loss"]) == 2


def test_dora_trains_on_an_int8_base_so_it_is_not_refused():
    """peft 0.21 supports DoRA on bitsandbytes' 8-bit (and 4-bit) layers: nothing to refuse."""
    from loraflow.base_models import load_for_training

    base, tokenizer = load_for_training("builtin:tiny", quantization="int8", precision="fp32")
    model = apply_lora(base, lora_settings(r=4, target_modules="q_proj,v_proj", use_dora=True))
    batch = tokenizer(["Question: What does a duck say?\nAnswer: quack"], return_tensors="pt")
    model(**batch, labels=batch["input_ids"]).loss.backward()
    magnitudes = [p.grad for n, p in model.named_parameters() if "lora_magnitude_vector" in n]
    assert magnitudes and all(g is not None and torch.isfinite(g).all() for g in magnitudes)


# ---------------------------------------------------------------------------------------------
# Refusals, each at validation, with exit code 2.


def test_quantization_without_bitsandbytes_is_exit_2_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # `import bitsandbytes` fails
    result = invoke("validate", "--quantization", "nf4")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "`quantization` (--quantization) nf4 needs bitsandbytes" in result.output
    assert "pip install 'loraflow[quantization]'" in result.output


def test_an_unknown_quantization_is_refused_with_the_choices():
    result = invoke("validate", "--quantization", "nf5")
    assert result.exit_code == 2
    assert "`quantization` (--quantization) must be one of none, nf4, fp4, int8; got 'nf5'" in result.output


def test_modules_to_save_on_a_layer_that_is_quantized_is_refused():
    result = invoke("validate", "--quantization", "nf4", "--modules-to-save", "o_proj")
    assert result.exit_code == 2
    assert "`modules_to_save` (--modules-to-save) entry 'o_proj' is a layer that --quantization nf4 quantizes" \
        in result.output
    assert "target it with LoRA" in result.output


def test_modules_to_save_on_lm_head_stays_allowed_as_bitsandbytes_keeps_it_unquantized():
    result = invoke("validate", "--quantization", "nf4", "--modules-to-save", "lm_head")
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def prequantized_dir(tmp_path_factory, tiny_path):
    """The built-in base saved already quantized (nf4): its config.json has a quantization_config."""
    from transformers import AutoTokenizer, BitsAndBytesConfig

    model = load_base_model(tiny_path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    folder = tmp_path_factory.mktemp("prequantized") / "tiny-nf4"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_path).save_pretrained(folder)
    assert "quantization_config" in json.loads((folder / "config.json").read_text())
    return folder


@pytest.mark.parametrize("mode", ["embedded", "auto"])  # auto embeds a local folder
def test_embedding_a_prequantized_checkpoint_is_refused(prequantized_dir, mode):
    result = invoke("validate", "--base-model", str(prequantized_dir), "--base-mode", mode)
    assert result.exit_code == 2
    assert "is a pre-quantized checkpoint" in result.output and "--base-mode reference" in result.output


def test_a_prequantized_checkpoint_by_reference_passes_validation(prequantized_dir):
    result = invoke("validate", "--base-model", str(prequantized_dir), "--base-mode", "reference")
    assert "pre-quantized" not in result.output


# ---------------------------------------------------------------------------------------------
# Export.


def test_a_merged_export_of_a_qlora_model_is_refused_without_force(nf4_run):
    tmp, _, _, local = nf4_run
    out = invoke("export", local, "--format", "merged", "--output", str(tmp / "refused"))
    assert out.exit_code == 2 and "Traceback" not in out.output
    assert "trained on a nf4-quantized base (QLoRA): merging is lossy" in out.output and "--force" in out.output
    assert not (tmp / "refused").exists()


def test_with_force_a_qlora_model_merges_onto_the_dequantized_base_in_16_bit(nf4_run):
    from transformers import AutoModelForCausalLM

    tmp, _, _, local = nf4_run
    out = invoke("export", local, "--format", "merged", "--output", str(tmp / "merged"), "--force")
    assert out.exit_code == 0, out.output
    assert "merged onto the dequantized nf4 base, in bfloat16" in out.output
    config = json.loads((tmp / "merged" / "config.json").read_text())
    assert "quantization_config" not in config and config["dtype"] == "bfloat16"
    merged = AutoModelForCausalLM.from_pretrained(tmp / "merged").float().eval()
    qlora, tokenizer = flavor.load_model(local)
    batch = tokenizer(["Question: What does a duck say?\nAnswer:"], return_tensors="pt")
    with torch.no_grad():
        reference = qlora(**batch).logits
        difference = (merged(**batch).logits - reference).abs().max().item()
    assert difference < 0.05 * reference.abs().max().item()  # bf16 rounding, not a different model


# ---------------------------------------------------------------------------------------------
# The MLproject parameter, and a quiet terminal.


@pytest.mark.slow
def test_mlflow_run_with_quantization_nf4_trains_quietly_and_logs_a_qlora_model(tmp_path):
    """`mlflow run . -P quantization=nf4`; bitsandbytes' kernel line ("Failed to load CPU
    gemm_4bit_forward", logged on import on AVX512-BF16 CPUs) and any warning stay off the terminal."""
    import re
    import subprocess
    from pathlib import Path

    from helpers import env_with_venv, project_copy

    project = project_copy(tmp_path)
    uri = fresh_store(tmp_path / 'mlflow.db')
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(project), "--env-manager", "local",
         "-P", "quantization=nf4", "-P", "max_steps=2", "-P", "eval_steps=2", "-P", "eval_samples=4"],
        cwd=project, env=env_with_venv(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "gemm_4bit_forward" not in proc.stderr and "MatMul8bitLt" not in proc.stderr
    assert not [line for line in proc.stderr.splitlines() if re.search(r"Warning:", line)], proc.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.data.params["quantization"] == "nf4" and run.info.status == "FINISHED"
