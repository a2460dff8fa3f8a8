"""Sweeps (loraflow.sweep): the search space and its up-front checks, and studies kept in a real
MLflow store: nested trial runs, pruning, failures, Ctrl-C and resume, the winner through the gate,
worker processes and Spark."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from click.testing import CliRunner

from loraflow import cli
from loraflow.errors import ConfigError
from loraflow.sweep import SweepInterrupted, run_sweep, sweep_settings
from loraflow.sweep.space import DEFAULT_SPACE, check_space, load_space, parse_space, resolve
from loraflow.sweep.study import shares

ROOT = Path(__file__).resolve().parents[1]
SHORT = {"max_steps": "4", "eval_steps": "2", "eval_samples": "0", "max_seq_length": "64"}
SMALL_SPACE = {"r": [4, 8], "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}}


def write_space(tmp_path: Path, text: str) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return str(path)


def sweep(tmp_path: Path, trials: int, space: dict | None = None, **options) -> object:
    import yaml

    raw = {"trials": str(trials), "search_space": write_space(tmp_path, yaml.safe_dump(space or SMALL_SPACE)),
           **{k: v for k, v in options.items() if k in ("study_name", "promote", "workers", "spark", "pruner")}}
    train = {**SHORT, "output_dir": str(tmp_path / "outputs"),
             **{k: v for k, v in options.items() if k not in raw}}
    return run_sweep(sweep_settings(raw, train), train)


def trial_runs(result) -> list:
    from mlflow import MlflowClient

    return MlflowClient().search_runs(["0"], f"tags.mlflow.parentRunId = '{result.study_run_id}'",
                                      order_by=["attributes.start_time ASC"])


# ---------------------------------------------------------------------------------------------
# The search space.


def test_the_example_file_is_the_default_space():
    assert load_space(ROOT / "examples" / "search_space.yaml").as_dict() == load_space(None).as_dict()
    assert load_space(None).names == ["r", "lora_alpha", "learning_rate", "lora_dropout", "target_modules"]
    assert DEFAULT_SPACE["r"] == [4, 8, 16, 32, 64]


def test_a_malformed_space_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as err:
        parse_space({"learning_rte": [1e-3], "r": [], "lora_dropout": {"low": 0.2, "high": 0.1},
                     "target_modules": {"low": 1, "high": 2}})
    text = str(err.value)
    assert len(err.value.problems) == 4, text
    assert "Did you mean `learning_rate`" in text
    assert "`r`: the list of choices is empty" in text
    assert "`low` 0.2 is above `high` 0.1" in text
    assert "`target_modules` is not a number setting" in text


def test_a_space_that_can_produce_an_invalid_setting_is_refused_naming_it():
    space = parse_space({"learning_rate": {"low": 1e-3, "high": 2.0, "log": True}, "lora_dropout": [0.0, 1.0]})
    with pytest.raises(ConfigError) as err:
        check_space(space, SHORT, set())
    text = str(err.value)
    assert "learning_rate=2.0" in text and "`learning_rate` must be > 0 and < 1, got 2.0" in text
    assert "lora_dropout=1.0" in text and "`lora_dropout` must be >= 0 and < 1, got 1.0" in text


def test_a_setting_both_fixed_and_searched_is_refused():
    with pytest.raises(ConfigError, match="`r` is given as a fixed setting and is also in the search space"):
        check_space(parse_space({"r": [4, 8]}), {**SHORT, "r": "16"}, {"r"})
    with pytest.raises(ConfigError, match="cannot vary r: search training settings only"):
        check_space(parse_space({"r": [4, 8]}), {**SHORT, "init_model": "models:/m@champion"}, {"init_model"})


def test_a_module_choice_the_model_lacks_is_refused_before_training(tiny_path):
    space = parse_space({"target_modules": ["attention", "q_proj,nope_proj"], "r": [8, 64]})
    with pytest.raises(ConfigError) as err:
        check_space(space, SHORT, set())
    assert "target_modules='q_proj,nope_proj'" in str(err.value) and "nope_proj" in str(err.value)
    check_space(parse_space({"target_modules": ["attention", "all-linear"], "r": [8, 64]}), SHORT, set())


def test_a_trial_resolves_alpha_as_a_multiple_of_r_and_named_module_sets():
    raw = resolve({"r": 16, "lora_alpha_per_r": 2, "target_modules": "attention"}, {"max_steps": 4})
    assert raw == {"max_steps": 4, "r": 16, "lora_alpha": 32.0, "target_modules": "q_proj,k_proj,v_proj,o_proj"}
    assert resolve({"target_modules": "all-linear"}, {})["target_modules"] == "all-linear"


def test_bad_sweep_options_are_reported_together():
    with pytest.raises(ConfigError) as err:
        sweep_settings({"trials": "0", "metric": "eval_exact_match", "workers": "2", "spark": "true",
                        "promote": "true", "pruner": "hyperband"}, {"eval_samples": "0"})
    text = str(err.value)
    for expected in ("`trials` must be a whole number", "--eval-samples", "`pruner` must be one of",
                     "drop --workers or --spark", "`promote` needs --registered-model-name"):
        assert expected in text


def test_trials_are_split_evenly_over_workers():
    assert shares(5, 2) == [3, 2] and shares(1, 3) == [1, 0, 0] and sum(shares(7, 3)) == 7


def test_workers_share_the_visible_gpus_one_each(monkeypatch):
    import torch

    from loraflow.sweep.study import visible_gpus

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert visible_gpus() == ["5", "7"]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert visible_gpus() == ["0", "1"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert visible_gpus() == []


@pytest.mark.parametrize("text, message", [
    ("r: [4, 8\n", "is not valid YAML"),
    ("rank: [4, 8]\n", "unknown setting `rank`"),
    ("- r\n", "must hold a mapping"),
])
def test_a_bad_search_space_file_is_one_message_and_exit_code_2(tmp_path, text, message):
    result = CliRunner().invoke(cli.main, ["sweep", "--search-space", write_space(tmp_path, text)])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


class FakeTrial:
    """The two calls a trial's training makes to Optuna, recorded; prunes from `prune_at` on."""

    def __init__(self, prune_at: int):
        self.prune_at, self.reported = prune_at, []

    def report(self, value: float, step: int) -> None:
        self.reported.append((step, value))

    def should_prune(self) -> bool:
        return self.reported[-1][0] >= self.prune_at


def test_a_trial_reports_between_the_first_and_final_evaluations_and_stops_when_pruned():
    import optuna

    from loraflow.sweep.trial import PruningReport

    trial = FakeTrial(prune_at=20)
    report = PruningReport(trial, "eval_loss")
    report(0, {"eval_loss": 2.0}, False)
    report(10, {"eval_loss": 1.5, "eval_perplexity": 4.5}, False)
    with pytest.raises(optuna.TrialPruned, match="pruned at step 20"):
        report(20, {"eval_loss": 1.4}, False)
    assert trial.reported == [(10, 1.5), (20, 1.4)] and (report.first, report.last) == (2.0, 1.4)
    finished = PruningReport(FakeTrial(prune_at=0), "eval_loss")
    finished(30, {"eval_loss": float("nan")}, True)  # the final value is the objective, never reported
    assert finished.trial.reported == [] and math.isnan(finished.last)


# ---------------------------------------------------------------------------------------------
# Studies in a real store.


def test_a_failed_trial_is_recorded_and_the_study_goes_on(tracking_uri, tmp_path, monkeypatch):
    import mlflow

    from loraflow import train

    real, calls = train.run_training, []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "run_training", out_of_memory_once)
    result = sweep(tmp_path, 3, study_name="oom")
    runs = trial_runs(result)
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED", "FINISHED"]
    assert "out of memory" in runs[0].data.tags["loraflow.sweep.failure"]
    assert result.counts == {"finished": 2, "pruned": 0, "failed": 1, "interrupted": 0, "running": 0}
    finished = runs[1]  # a normal training run: its params, metrics and model
    assert {"r", "learning_rate", "max_steps"} <= set(finished.data.params)
    assert "eval_loss" in finished.data.metrics and finished.outputs.model_outputs
    study_run = mlflow.get_run(result.study_run_id)
    assert study_run.info.status == "FINISHED"
    assert study_run.data.tags["best_run_id"] == result.best_run_id in {r.info.run_id for r in runs[1:]}
    assert study_run.data.metrics["best_eval_loss"] == pytest.approx(result.best.value)
    table = mlflow.load_table("trials.json", run_ids=[result.study_run_id])
    assert table["status"].tolist() == ["FAILED", "FINISHED", "FINISHED"] and "out of memory" in table["note"][0]
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.study_run_id)}
    assert {"optimization_history.png", "parallel_coordinate.png", "param_importances.png"} <= artifacts


def test_pruned_trials_end_killed_and_keep_what_they_logged(tracking_uri, tmp_path, monkeypatch):
    import optuna
    from mlflow import MlflowClient

    # A pruner that stops every trial at its first report makes pruning certain in 2 trials.
    monkeypatch.setattr("loraflow.sweep.study.make_pruner", lambda name: optuna.pruners.ThresholdPruner(upper=0.0))
    result = sweep(tmp_path, 2, study_name="pruned", max_steps="6")
    runs = trial_runs(result)
    assert [r.info.status for r in runs] == ["KILLED", "KILLED"]
    history = MlflowClient().get_metric_history(runs[0].info.run_id, "eval_loss")
    assert [m.step for m in history] == [0, 2]  # evaluated at 0 and 2, stopped before 4 and 6
    assert "r" in runs[0].data.params and not runs[0].outputs.model_outputs
    assert result.counts["pruned"] == 2 and result.best is None and "no trial finished" in result.summary()


def test_an_interrupted_sweep_resumes_by_name_and_trains_the_interrupted_settings_first(
        tracking_uri, tmp_path, monkeypatch):
    import mlflow

    from loraflow import train

    real, calls = train.run_training, []

    def ctrl_c_on_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "run_training", ctrl_c_on_second)
    with pytest.raises(SweepInterrupted) as stop:
        sweep(tmp_path, 2, study_name="resumable")
    first = stop.value.result
    runs = trial_runs(first)
    assert [r.info.status for r in runs] == ["FINISHED", "KILLED", "SCHEDULED"]  # its settings queued again
    assert runs[1].data.tags["user_interrupted"] == "true"
    assert mlflow.get_run(first.study_run_id).info.status == "KILLED"
    interrupted = {k: v for k, v in runs[1].data.params.items() if k in ("r", "learning_rate")}

    resumed = sweep(tmp_path, 2, study_name="resumable")
    assert resumed.study_run_id == first.study_run_id  # the same study, found by name
    runs = trial_runs(resumed)
    assert [r.info.status for r in runs] == ["FINISHED", "KILLED", "FINISHED"]
    assert {k: runs[2].data.params[k] for k in interrupted} == interrupted
    assert resumed.counts["finished"] == 2 and resumed.counts["interrupted"] == 1 and len(calls) == 3
    assert mlflow.get_run(resumed.study_run_id).info.status == "FINISHED"


def test_the_winner_is_registered_and_promoted_only_through_the_gate(tracking_uri, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    space = write_space(tmp_path, "r: [8]\nlearning_rate: [0.005]\n")
    args = ["sweep", "--trials", "1", "--search-space", space, "--study-name", "gate", "--registered-model-name",
            "swept", "--promote", *[f"--{k.replace('_', '-')}={v}" for k, v in SHORT.items()]]
    result = CliRunner().invoke(cli.main, args)
    assert result.exit_code == 0, result.output
    assert "loraflow: sweep finished" in result.output and "promoted: swept version 1 is now @champion" in result.output
    version = MlflowClient().get_model_version_by_alias("swept", "champion")
    best_run = MlflowClient().get_run(version.run_id)  # a trial run of the study, which finished
    assert best_run.data.tags["loraflow.sweep.trial"] == "0" and best_run.info.status == "FINISHED"
    assert str(version.version) == "1"

    # A new winner that fails the health check is registered but never promoted.
    monkeypatch.setattr("loraflow.registry.health_check", lambda uri: "it answered with empty text")
    result = CliRunner().invoke(cli.main, [*args[:6], "gate-2", *args[7:]])
    assert result.exit_code == 0, result.output
    assert "rejected: swept version 2" in result.output
    assert str(MlflowClient().get_model_version_by_alias("swept", "champion").version) == "1"


@pytest.mark.slow
def test_two_workers_share_one_study_without_running_a_trial_twice(tracking_uri, tmp_path):
    result = sweep(tmp_path, 3, study_name="workers", workers="2")
    runs = trial_runs(result)
    assert len(runs) == 3 and [r.info.status for r in runs] == ["FINISHED"] * 3
    assert len({r.info.run_id for r in runs}) == 3
    assert len({(r.data.params["r"], r.data.params["learning_rate"]) for r in runs}) == 3
    assert all("eval_loss" in r.data.metrics and r.outputs.model_outputs for r in runs)


@pytest.fixture
def spark():
    from pyspark.sql import SparkSession

    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)  # executors need this venv (loraflow, torch)
    session = (SparkSession.builder.master("local[2]").appName("loraflow-sweep-tests")
               .config("spark.ui.enabled", "false").config("spark.driver.bindAddress", "127.0.0.1").getOrCreate())
    yield session
    session.stop()


def test_trials_run_on_spark_executors_in_the_same_study(tracking_uri, tmp_path, spark):
    result = sweep(tmp_path, 2, study_name="on-spark", spark="true")
    runs = trial_runs(result)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}
    assert all(r.outputs.model_outputs and "eval_loss" in r.data.metrics for r in runs)
    assert result.best is not None and result.best_run_id in {r.info.run_id for r in runs}


@pytest.mark.slow
def test_the_mlproject_sweep_entry_point_runs_a_study(tmp_path):
    from helpers import env_with_venv, fresh_store, project_copy
    from mlflow import MlflowClient

    project = project_copy(tmp_path)
    uri = fresh_store(tmp_path / "mlflow.db", artifact_root=str(tmp_path / "mlruns"))
    params = {"trials": "2", "max_steps": "4", "eval_steps": "2", "study_name": "from-mlproject"}
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(project), "-e", "sweep", "--env-manager", "local",
         *[arg for k, v in params.items() for arg in ("-P", f"{k}={v}")]],
        cwd=project, env=env_with_venv(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loraflow: sweep finished" in proc.stdout and "2 finished" in proc.stdout
    client = MlflowClient(uri)
    (study_run,) = client.search_runs(["0"], "tags.`loraflow.sweep.study` = 'from-mlproject'")
    entry = client.get_run(study_run.data.tags["mlflow.parentRunId"])  # the run `mlflow run` made
    assert entry.data.tags["loraflow.sweep.study_run_id"] == study_run.info.run_id
    trials = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{study_run.info.run_id}'")
    assert [r.info.status for r in trials] == ["FINISHED", "FINISHED"]


def test_workers_are_spawned_with_the_running_loraflow_first_on_their_path(monkeypatch, tmp_path):
    """A pyfunc load puts a model's shipped copy of loraflow on sys.path; spawned workers must not import it."""
    import sys

    import loraflow
    from loraflow.sweep.study import this_loraflow_first

    shipped = str(tmp_path / "model" / "code")
    monkeypatch.setattr(sys, "path", [shipped, *sys.path])
    root = str(Path(loraflow.__file__).resolve().parents[1])
    with this_loraflow_first():
        assert sys.path[0] == root and shipped in sys.path and sys.path.count(root) == 1
    assert sys.path[0] == shipped
