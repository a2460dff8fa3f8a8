"""Promotion through the model registry: the gate, aliases, rollback, errors, real server and serving.

Most candidates are cheap but real: a PEFT model on the built-in tiny base, logged with the loraflow
flavor into its own run, which also logs the `eval_loss` the gate compares (as training does).
The test of two *trained* candidates runs `loraflow.train.run_training` itself.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.request
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from helpers import BIN, env_with_venv, free_port, mlflow_server, project_copy, stop, wait_for_http
from hypothesis import given
from hypothesis import strategies as st
from mlflow import MlflowClient
from model_helpers import generate_texts

from loraflow import flavor
from loraflow.flavor import layout
from loraflow.cli import main
from loraflow.errors import ConfigError
from loraflow.registry import (
    Decision,
    RegistryError,
    check_arguments,
    health_check,
    is_better,
    previous_alias,
    promote_if_better,
    rollback,
)

PROMPT = "Question: What is LoRA?\nAnswer:"
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")


# ---------------------------------------------------------------------------------------------
# The pure rules.

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
deltas = st.floats(min_value=0, max_value=1e3, allow_nan=False)


@given(finite, finite, deltas)
def test_max_mode_is_min_mode_on_negated_values(a, b, d):
    assert is_better(a, b, "min", d) == is_better(-a, -b, "max", d)


@given(finite, deltas, st.sampled_from(["min", "max"]))
def test_a_value_never_beats_itself(a, d, mode):
    assert not is_better(a, a, mode, d)


@given(finite, finite, deltas, st.sampled_from(["min", "max"]))
def test_two_values_never_beat_each_other(a, b, d, mode):
    assert not (is_better(a, b, mode, d) and is_better(b, a, mode, d))


@given(finite, finite, deltas, deltas, st.sampled_from(["min", "max"]))
def test_a_larger_min_delta_never_promotes_more(a, b, d1, d2, mode):
    small, large = sorted((d1, d2))
    assert not is_better(a, b, mode, large) or is_better(a, b, mode, small)


def test_min_delta_edges_and_nan():
    assert is_better(0.9, 1.0, "min", 0.1)  # exactly min_delta better counts, despite float rounding
    assert not is_better(0.95, 1.0, "min", 0.1)
    assert is_better(1.2, 1.0, "max") and not is_better(1.2, 1.0, "min")
    assert not is_better(math.nan, 1.0) and is_better(1.0, math.nan)


def test_bad_arguments_are_reported_together():
    with pytest.raises(ConfigError) as err:
        check_arguments("two", "", "mn", -1.0, "latest")
    text = str(err.value)
    assert "5 problems" in text
    for needle in ("`version`", "`metric`", "`mode`", "Did you mean 'min'", "`min_delta`", "reserved"):
        assert needle in text
    assert previous_alias("champion") == "previous" and previous_alias("canary") == "canary-previous"


def test_decision_summary_is_one_line():
    kept = Decision(False, "demo", "3", "champion", "eval_loss", 1.3, "2", 1.2, "eval_loss 1.3 is not below 1.2")
    assert kept.summary() == "rejected: demo version 3 was not promoted to @champion: eval_loss 1.3 is not below 1.2"
    assert "\n" not in kept.summary() and not kept.already_champion


# ---------------------------------------------------------------------------------------------
# Cheap candidates in a real sqlite store.


def _peft(tiny_path: str, seed: int, *, silent: bool = False):
    """A LoRA model on q/v plus a trainable lm_head copy, with seeded non-zero weights.

    `silent=True` zeroes the lm_head copy: every logit is then exactly 0, greedy decoding picks
    token 0, which is the tokenizer's pad token, and decoding with skip_special_tokens yields "".
    That is a real failure mode (a collapsed fine-tune that only emits special tokens) and it is
    what the health gate exists to catch: the model loads and predicts, but says nothing.
    """
    import peft

    from loraflow.flavor.bases import load_base_model

    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                             modules_to_save=["lm_head"])
    model = peft.get_peft_model(load_base_model(tiny_path).eval(), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".modules_to_save." in name and silent:
                param.zero_()
            elif "lora_B" in name or ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def models(tiny_path, tiny_tokenizer):
    return {"healthy": _peft(tiny_path, 0), "silent": _peft(tiny_path, 1, silent=True), "tokenizer": tiny_tokenizer}


@pytest.fixture
def store(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a sqlite store puts artifacts under ./mlruns
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return MlflowClient()


def log_candidate(models, name: str, eval_loss: float | None, *, kind: str = "healthy", status: str = "FINISHED",
                  input_example=None) -> str:
    """One run that logs `eval_loss` and a loraflow model registered under `name`; returns the version."""
    run = mlflow.start_run()
    try:
        if eval_loss is not None:
            mlflow.log_metric("eval_loss", eval_loss)
        info = flavor.log_model(models[kind], "model", models["tokenizer"], base_model="builtin:tiny",
                                registered_model_name=name, input_example=input_example)
    finally:
        mlflow.end_run(status=status)
    assert run.info.run_id
    return str(info.registered_model_version)


def aliases(client: MlflowClient, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    return {k.removeprefix("promotion."): v for k, v in client.get_model_version(name, version).tags.items()
            if k.startswith("promotion.")}


def cli(*args: str):
    return CliRunner().invoke(main, list(args))


def test_a_worse_challenger_is_rejected_and_the_champion_kept(store, models):
    first, worse = log_candidate(models, "demo", 1.0), log_candidate(models, "demo", 1.2)
    decision = promote_if_better("demo", version=first)
    assert decision.promoted and decision.champion_version is None
    assert aliases(store, "demo") == {"champion": first}

    result = cli("promote", "--model-name", "demo")  # the newest version: the worse one
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"rejected: demo version {worse} was not promoted to @champion: eval_loss 1.2 is not below 1 of "
        f"champion version {first} (mode min); the champion is unchanged")
    assert aliases(store, "demo") == {"champion": first}
    recorded = tags(store, "demo", worse)
    assert recorded["decision"] == "rejected" and recorded["champion_version"] == first
    assert float(recorded["candidate_value"]) == 1.2 and float(recorded["champion_value"]) == 1.0
    assert "not below" in recorded["reason"] and recorded["time"].endswith("+00:00")

    result = cli("promote", "--model-name", "demo", "--require-promotion")
    assert result.exit_code == 3 and "rejected:" in result.output
    # Better, but not by min_delta; then better by enough in `max` mode is still worse in `min` mode.
    slightly = log_candidate(models, "demo", 0.95)
    assert not promote_if_better("demo", min_delta=0.1).promoted
    assert "improvement 0.05 < min_delta 0.1" in tags(store, "demo", slightly)["reason"]
    assert promote_if_better("demo", version=worse, mode="max").promoted  # 1.2 > 1.0 when higher is better
    assert aliases(store, "demo") == {"champion": worse, "previous": first}
    unchanged = promote_if_better("demo", version=worse, mode="max")
    assert not unchanged.promoted and unchanged.already_champion
    assert cli("promote", "--model-name", "demo", "--version", worse, "--mode", "max",
               "--require-promotion").exit_code == 0  # already the champion is not a rejection


def test_a_better_candidate_that_says_nothing_fails_the_health_gate(store, models):
    champion = log_candidate(models, "gate", 1.0)
    assert promote_if_better("gate").promoted
    silent = log_candidate(models, "gate", 0.5, kind="silent")  # better metric, empty answers
    decision = promote_if_better("gate")
    assert not decision.promoted and "failed the health check" in decision.reason
    assert "with empty text" in decision.reason
    assert aliases(store, "gate") == {"champion": champion}
    assert tags(store, "gate", silent)["decision"] == "rejected"
    assert health_check(f"models:/gate/{champion}") is None

    # The health gate applies with no champion too.
    log_candidate(models, "gate-first", 0.5, kind="silent")
    assert not promote_if_better("gate-first").promoted
    assert aliases(store, "gate-first") == {}

    # A logged example the model cannot answer: a prompt longer than its 256-token context.
    # MLflow only warns at log time; the gate refuses it.
    log_candidate(models, "gate-example", 0.5, input_example=["word " * 300])
    decision = promote_if_better("gate-example")
    assert not decision.promoted and "fails on its logged input example" in decision.reason
    assert "exceeds the model's context of 256 tokens" in decision.reason


def test_rollback_swaps_champion_and_previous(store, models):
    first, second = log_candidate(models, "roll", 1.0), log_candidate(models, "roll", 0.9)
    promote_if_better("roll", version=first)
    refused = cli("rollback", "--model-name", "roll")
    assert refused.exit_code == 1 and "no version holds @previous" in refused.output
    assert "Traceback" not in refused.output
    assert promote_if_better("roll").promoted
    assert aliases(store, "roll") == {"champion": second, "previous": first}
    assert tags(store, "roll", first)["decision"] == "replaced" and tags(store, "roll", first)["replaced_by"] == second

    result = cli("rollback", "--model-name", "roll")
    assert result.exit_code == 0, result.output
    assert f"rolled back: roll version {first} is now @champion; version {second} is now @previous" in result.output
    assert aliases(store, "roll") == {"champion": first, "previous": second}
    assert tags(store, "roll", second)["decision"] == "rolled_back"
    assert tags(store, "roll", first)["decision"] == "restored"
    assert rollback("roll").version == second  # rolling back the rollback


@pytest.mark.filterwarnings("ignore:Add type hints to the `predict` method")
def test_each_error_names_the_problem(store, models):
    good = log_candidate(models, "errs", 1.0)

    def error(*args: str) -> str:
        result = cli("promote", *args)
        assert result.exit_code == 1, result.output
        assert "Traceback" not in result.output
        return result.output

    assert "no registered model named 'errz'" in error("--model-name", "errz") and "Did you mean 'errs'" in error(
        "--model-name", "errz")
    assert f"has no version 7; its versions are {good}" in error("--model-name", "errs", "--version", "7")
    out = error("--model-name", "errs", "--metric", "eval_los")
    assert "has no metric `eval_los`" in out and "Did you mean 'eval_loss'" in out

    unfinished = log_candidate(models, "errs", 0.1, status="FAILED")
    out = error("--model-name", "errs", "--version", unfinished)
    assert "refusing to promote" in out and "FAILED, not FINISHED" in out
    deleted = log_candidate(models, "errs", 0.1)
    store.delete_run(store.get_model_version("errs", deleted).run_id)
    assert "was deleted" in error("--model-name", "errs", "--version", deleted)
    assert log_candidate(models, "errs", None) and "has no metric `eval_loss`" in error("--model-name", "errs")

    class Echo(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with mlflow.start_run():
        mlflow.log_metric("eval_loss", 0.1)
        mlflow.pyfunc.log_model(name="model", python_model=Echo(), registered_model_name="not-lora")
    assert "is not a loraflow model (its flavors: python_function)" in error("--model-name", "not-lora")
    assert aliases(store, "errs") == {} and aliases(store, "not-lora") == {}

    with pytest.raises(RegistryError, match="no registered model"):
        rollback("errz")
    nan_delta = cli("promote", "--model-name", "errs", "--min-delta", "nan")
    assert nan_delta.exit_code == 2 and "`min_delta` must be a finite number" in nan_delta.output


@pytest.mark.timeout(60)  # MLflow's default retries would take over 4 minutes; loraflow makes none
def test_an_unreachable_registry_fails_within_seconds(monkeypatch):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", url)
    mlflow.set_tracking_uri(url)
    mlflow.set_registry_uri(url)
    try:
        with pytest.raises(RegistryError, match=f"registry at {url} cannot be reached"):
            promote_if_better("demo")
        result = cli("rollback", "--model-name", "demo")
        assert result.exit_code == 1 and f"{url} cannot be reached" in result.output
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


# ---------------------------------------------------------------------------------------------
# End to end: real training, `mlflow run`, a real `mlflow server`, `mlflow models serve`.


@pytest.mark.slow
def test_two_trained_candidates_the_better_one_promoted(store, tracking_uri, tmp_path):
    from loraflow.config import parse_settings
    from loraflow.train import run_training

    def train(**overrides: str):
        raw = {"max_steps": "5", "eval_steps": "5", "batch_size": "8", "r": "8", "registered_model_name": "trained",
               "output_dir": str(tmp_path / "out"), **overrides}
        lora, settings = parse_settings(raw)
        return run_training(lora, settings, explicit=set(raw))

    barely = train(learning_rate="0.00001")  # hardly moves from the base model
    trained = train()
    assert barely.registered_version == "1" and trained.registered_version == "2"
    assert trained.eval_loss_after < barely.eval_loss_after

    # The first through the MLproject entry point, as a user would.
    proc = subprocess.run(
        [str(BIN / "mlflow"), "run", str(project_copy(tmp_path)), "-e", "promote", "--env-manager", "local",
         "-P", "model_name=trained", "-P", "version=1"],
        cwd=tmp_path, env=env_with_venv(MLFLOW_TRACKING_URI=tracking_uri, CUDA_VISIBLE_DEVICES=""),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "promoted: trained version 1 is now @champion: there was no @champion yet" in proc.stdout
    result = cli("promote", "--model-name", "trained")
    assert result.exit_code == 0, result.output
    assert "promoted: trained version 2 is now @champion: eval_loss" in result.output
    assert aliases(store, "trained") == {"champion": "2", "previous": "1"}
    # Both versions record the same decision: the values compared, from each version's source run.
    for version, decision in (("2", "promoted"), ("1", "replaced")):
        recorded = tags(store, "trained", version)
        assert recorded["decision"] == decision and recorded["candidate_version"] == "2"
        assert float(recorded["candidate_value"]) == pytest.approx(trained.eval_loss_after)
        assert float(recorded["champion_value"]) == pytest.approx(barely.eval_loss_after)

    # Load the champion by alias, natively and through pyfunc.
    model, tokenizer = flavor.load_model("models:/trained@champion")
    assert model.peft_config["default"].r == 8
    native = generate_texts(model, tokenizer, [PROMPT], batch_size=1, max_new_tokens_cap=8, max_new_tokens=8)
    served = mlflow.pyfunc.load_model("models:/trained@champion").predict(pd.DataFrame({"prompt": [PROMPT]}),
                                                                           params={"max_new_tokens": 8})
    assert served["text"].tolist() == native and native[0].strip()

    # And undo it through the MLproject entry point.
    proc = subprocess.run(
        [str(BIN / "mlflow"), "run", str(tmp_path / "project"), "-e", "rollback", "--env-manager", "local",
         "-P", "model_name=trained"],
        cwd=tmp_path, env=env_with_venv(MLFLOW_TRACKING_URI=tracking_uri), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rolled back: trained version 1 is now @champion; version 2 is now @previous" in proc.stdout
    assert aliases(store, "trained") == {"champion": "1", "previous": "2"}


@pytest.mark.slow
def test_promotion_against_a_real_tracking_server(tmp_path, monkeypatch, models):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with mlflow_server(tmp_path) as (url, _):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        monkeypatch.setenv("MLFLOW_REGISTRY_URI", url)
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)
        try:
            client = MlflowClient()
            first, worse, better = (log_candidate(models, "served", loss) for loss in (1.0, 1.5, 0.5))
            assert promote_if_better("served", version=first).promoted
            assert not promote_if_better("served", version=worse).promoted
            assert cli("promote", "--model-name", "served").exit_code == 0
            assert aliases(client, "served") == {"champion": better, "previous": first}
            assert tags(client, "served", worse)["decision"] == "rejected"
            assert cli("rollback", "--model-name", "served").exit_code == 0
            assert aliases(client, "served") == {"champion": first, "previous": better}
            out = mlflow.pyfunc.load_model("models:/served@champion").predict(pd.DataFrame({"prompt": [PROMPT]}))
            assert out["text"][0].strip()
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)


@pytest.mark.slow
def test_serving_the_champion_by_alias(store, models, tracking_uri, tmp_path):
    log_candidate(models, "serve", 1.0)
    promote_if_better("serve")
    params = {"max_new_tokens": 6}
    expected = mlflow.pyfunc.load_model("models:/serve@champion").predict(
        pd.DataFrame({"prompt": [PROMPT]}), params=params)["text"].tolist()
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/serve@champion", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=env_with_venv(MLFLOW_TRACKING_URI=tracking_uri, CUDA_VISIBLE_DEVICES=""),
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", proc, timeout=180)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations", headers={"Content-Type": "application/json"},
            data=json.dumps({"dataframe_records": [{"prompt": PROMPT}], "params": params}).encode(),
        )
        with urllib.request.urlopen(request, timeout=120) as response:
            assert response.status == 200
            body = json.loads(response.read())
    finally:
        stop(proc)
        log.close()
    assert proc.poll() is not None
    assert [row["text"] for row in body["predictions"]] == expected and expected[0].strip()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-v"]))


# ---------------------------------------------------------------------------------------------
# Issue 12: uploads never finish another run, and promotion sees through them; dead ends have a way out.


def _saved_folder(models, tmp_path: Path, run_id: str) -> Path:
    folder = tmp_path / "outputs" / f"model-{run_id}"
    flavor.save_model(models["healthy"], folder, models["tokenizer"], base_model="builtin:tiny")
    return folder


def test_upload_logs_into_a_new_run_and_never_changes_the_training_runs_status(store, models, tmp_path):
    run = store.create_run("0")  # a training run whose server died: it stays RUNNING
    store.log_metric(run.info.run_id, "eval_loss", 0.5)
    folder = _saved_folder(models, tmp_path, run.info.run_id)
    result = cli("upload", str(folder), "--registered-model-name", "up")
    assert result.exit_code == 0, result.output
    assert store.get_run(run.info.run_id).info.status == "RUNNING"  # untouched
    new_run_id = store.get_model_version("up", "1").run_id
    assert new_run_id != run.info.run_id
    upload_tags = store.get_run(new_run_id).data.tags
    assert upload_tags["loraflow.upload.source_run_id"] == run.info.run_id
    assert upload_tags["loraflow.upload.source_run_status"] == "RUNNING"
    assert f"runs:/{new_run_id}/model" in result.output


def test_a_version_uploaded_from_a_killed_run_is_refused_however_good_its_metric(store, models, tmp_path):
    run = store.create_run("0")
    store.log_metric(run.info.run_id, "eval_loss", 0.001)
    store.set_terminated(run.info.run_id, "KILLED")
    assert cli("upload", str(_saved_folder(models, tmp_path, run.info.run_id)),
               "--registered-model-name", "killed").exit_code == 0
    result = cli("promote", "--model-name", "killed")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "KILLED, not FINISHED" in result.output and run.info.run_id in result.output
    assert aliases(store, "killed") == {}


def test_a_version_uploaded_from_a_finished_run_is_promoted_on_that_runs_metric(store, models, tmp_path):
    run = store.create_run("0")
    store.log_metric(run.info.run_id, "eval_loss", 0.7)
    store.set_terminated(run.info.run_id, "FINISHED")
    assert cli("upload", str(_saved_folder(models, tmp_path, run.info.run_id)),
               "--registered-model-name", "fine").exit_code == 0
    decision = promote_if_better("fine")
    assert decision.promoted and decision.candidate_value == 0.7


def test_upload_refuses_a_tampered_adapter_before_logging_anything(store, models, tmp_path):
    from model_helpers import perturb_safetensors

    run = store.create_run("0")
    folder = _saved_folder(models, tmp_path, run.info.run_id)
    adapter = next(folder.rglob("adapter_model.safetensors"))
    perturb_safetensors(adapter)
    result = cli("upload", str(folder), "--registered-model-name", "tampered")
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "refusing to upload" in result.output and "integrity" in result.output
    assert len(store.search_runs(["0"])) == 1 and not store.search_registered_models()


def test_upload_of_a_folder_whose_run_does_not_exist_suggests_run_id(store, models, tmp_path):
    folder = _saved_folder(models, tmp_path, "0" * 32)
    result = cli("upload", str(folder))
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert "does not exist" in result.output and "--run-id" in result.output
    assert not store.search_runs(["0"])


def test_promote_force_replaces_a_champion_whose_run_lacks_the_metric(store, models):
    old = log_candidate(models, "nometric", None)
    store.set_registered_model_alias("nometric", "champion", old)
    new = log_candidate(models, "nometric", 0.9)
    stuck = cli("promote", "--model-name", "nometric")
    assert stuck.exit_code == 1 and "--force" in stuck.output and "has no metric `eval_loss`" in stuck.output
    forced = cli("promote", "--model-name", "nometric", "--force")
    assert forced.exit_code == 0, forced.output
    assert "forced (--force)" in forced.output
    assert aliases(store, "nometric") == {"champion": new, "previous": old}
    assert tags(store, "nometric", new)["forced"] == "true"


def test_promote_force_still_refuses_an_unfinished_candidate(store, models):
    old = log_candidate(models, "forced-bad", None)
    store.set_registered_model_alias("forced-bad", "champion", old)
    bad = log_candidate(models, "forced-bad", 0.1, status="FAILED")
    result = cli("promote", "--model-name", "forced-bad", "--version", bad, "--force")
    assert result.exit_code == 1 and "FAILED, not FINISHED" in result.output
    assert aliases(store, "forced-bad") == {"champion": old}


def test_rollback_after_a_first_promotion_says_why_and_when_rollback_applies(store, models):
    first = log_candidate(models, "once", 1.0)
    assert promote_if_better("once").promoted
    result = cli("rollback", "--model-name", "once")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "no version holds @previous" in result.output
    assert f"@champion is version {first}, the first version ever promoted" in result.output
    assert "Rollback applies after a promotion replaced" in result.output


@pytest.mark.parametrize("command", ["promote", "rollback"])
def test_an_empty_model_name_is_a_usage_error(command):
    result = cli(command, "--model-name", "")
    assert result.exit_code == 2 and "--model-name" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["promote", "rollback"])
@pytest.mark.parametrize("uri", ["{tmp}/store", "file://{tmp}/store"])
def test_a_file_store_says_the_registry_needs_a_database(command, uri, tmp_path, monkeypatch):
    uri = uri.format(tmp=tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_REGISTRY_URI", raising=False)
    mlflow.set_tracking_uri(uri)
    try:
        result = cli(command, "--model-name", "m")
    finally:
        mlflow.set_tracking_uri(None)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert "needs a database-backed store" in result.output and "sqlite:///mlflow.db" in result.output


def test_a_version_uploaded_without_a_known_training_run_is_refused(store, models, tmp_path):
    folder = tmp_path / "somewhere" / "model"
    flavor.save_model(models["healthy"], folder, models["tokenizer"], base_model="builtin:tiny")
    assert cli("upload", str(folder), "--registered-model-name", "orphan").exit_code == 0
    run_tags = store.get_run(store.get_model_version("orphan", "1").run_id).data.tags
    assert run_tags["loraflow.upload.source_run_status"] == "NONE"
    result = cli("promote", "--model-name", "orphan")
    assert result.exit_code == 1 and "without naming its training run" in result.output
    assert aliases(store, "orphan") == {}
