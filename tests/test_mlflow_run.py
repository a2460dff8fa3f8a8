"""End to end: the real `mlflow run` command, and training against a real `mlflow server`."""

from __future__ import annotations

import mlflow
import pytest
from click.testing import CliRunner
from helpers import mlflow_server
from mlflow import MlflowClient

from loraflow.cli import main

pytestmark = pytest.mark.slow


def test_mlflow_run_main_entry_point_on_the_defaults(default_run):
    assert "loraflow: training finished" in default_run.stdout
    assert default_run.run.info.status == "FINISHED"
    mlflow.set_tracking_uri(default_run.uri)
    try:
        model = mlflow.pyfunc.load_model(default_run.model_uri)
        out = model.predict(["Question: What does a pig say?\nAnswer:"])
        short = model.predict(["Question: What does a cow say?\nAnswer:"], params={"max_new_tokens": 8})
    finally:
        mlflow.set_tracking_uri(None)
    assert out["text"][0].strip() and short["text"][0].strip()


def test_defaults_cut_eval_loss_by_at_least_a_fifth(default_run):
    losses = default_run.history("eval_loss")
    assert losses[0][0] == 0 and losses[-1][0] == 300
    assert losses[-1][1] <= 0.8 * losses[0][1]


def test_the_default_run_visibly_learns_to_answer_held_out_questions(default_run):
    """Exact match on held-out eval questions: <= 0.2 before training, >= 0.7 after."""
    exact = dict(default_run.history("eval_exact_match"))
    assert exact[0] <= 0.2 and exact[300] >= 0.7
    assert sorted(exact) == [0, 50, 100, 150, 200, 250, 300]
    assert default_run.history("eval_token_f1")[-1][1] >= exact[300]


def test_the_samples_table_has_a_row_per_sample_per_evaluation(default_run):
    import json

    import pandas as pd

    mlflow.set_tracking_uri(default_run.uri)
    try:
        local = mlflow.artifacts.download_artifacts(run_id=default_run.run_id, artifact_path="eval_samples.json")
        figure = mlflow.artifacts.download_artifacts(run_id=default_run.run_id, artifact_path="eval_quality.png")
    finally:
        mlflow.set_tracking_uri(None)
    doc = json.loads(open(local).read())
    table = pd.DataFrame(doc["data"], columns=doc["columns"])
    assert list(table.columns) == ["step", "prompt", "expected", "generated", "exact_match"]
    per_step = table.groupby("step").size()
    assert sorted(per_step.index) == [0, 50, 100, 150, 200, 250, 300] and per_step.nunique() == 1
    for step, value in default_run.history("eval_exact_match"):  # the table is what the metric scored
        assert table[table.step == step].exact_match.mean() == pytest.approx(value)
    assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_run_records_params_metric_histories_inputs_and_artifacts(default_run):
    import math

    client = MlflowClient(default_run.uri)
    run = client.get_run(default_run.run_id)
    assert run.data.params["r"] == "16" and run.data.params["base_model"] == "builtin:tiny"
    # `mlflow run` logged the user's text first; loraflow's parsed value goes beside it
    assert run.data.params["target_modules"] == "'q_proj, k_proj, v_proj, o_proj'"
    assert run.data.params["target_modules_resolved"] == "q_proj,k_proj,v_proj,o_proj"
    evals = default_run.history("eval_loss")
    assert evals[0][0] == 0 and evals[-1][0] == 300
    assert math.isclose(evals[-1][1], run.data.metrics["eval_loss"], rel_tol=1e-6)
    assert len(default_run.history("train_loss")) == 300
    for key in ("learning_rate", "tokens_per_second", "eval_perplexity", "trainable_params", "lora_params"):
        assert key in run.data.metrics
    contexts = sorted(d.tags[0].value for d in run.inputs.dataset_inputs)
    assert contexts == ["evaluation", "training"]
    assert all(d.dataset.digest and d.dataset.source for d in run.inputs.dataset_inputs)
    artifacts = {a.path for a in client.list_artifacts(default_run.run_id)}
    assert {"config.yaml", "loss_curve.png"} <= artifacts


def test_training_against_a_real_tracking_server(tmp_path, monkeypatch):
    """The server is the real process here; `loraflow train` runs in process (click's CliRunner)."""
    with mlflow_server(tmp_path) as (url, _):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        try:
            result = CliRunner().invoke(main, ["train", "--max-steps", "6", "--eval-steps", "3",
                                               "--target-modules", "q_proj, v_proj", "--output-dir", str(tmp_path / "out")])
        finally:
            mlflow.set_tracking_uri(None)
        assert result.exit_code == 0, result.output[-3000:] + repr(result.exception)
        client = MlflowClient(url)
        (run,) = client.search_runs(["0"])
        params = run.data.params
        assert params["target_modules"] == "q_proj,v_proj" and params["max_steps"] == "6"
        assert [m.step for m in sorted(client.get_metric_history(run.info.run_id, "eval_loss"), key=lambda m: m.step)] == [0, 3, 6]
        assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 6
        assert {d.tags[0].value for d in run.inputs.dataset_inputs} == {"training", "evaluation"}
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "loss_curve.png"} <= artifacts
        mlflow.set_tracking_uri(url)
        try:
            loaded = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        finally:
            mlflow.set_tracking_uri(None)
        assert loaded.metadata.flavors.get("loraflow")
