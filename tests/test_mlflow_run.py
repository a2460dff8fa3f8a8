"""End to end: the real `mlflow run` command, and training against a real `mlflow server`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from helpers import env_with_venv, mlflow_server, project_copy
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def test_mlflow_run_main_entry_point_on_the_defaults(tmp_path):
    project = project_copy(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(project), "-P", "r=16", "--env-manager", "local",
         # the same modules in other words: re-logging the pre-logged param must not fail the run
         "-P", "target_modules=q_proj, k_proj, v_proj, o_proj"],
        cwd=project, env=env_with_venv(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "loraflow: training finished" in proc.stdout
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])
    assert run.info.status == "FINISHED"
    history = sorted(client.get_metric_history(run.info.run_id, "eval_loss"), key=lambda m: m.step)
    assert history[0].step == 0 and history[-1].value <= 0.8 * history[0].value
    mlflow.set_tracking_uri(uri)
    try:
        out = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(["Question: What does a pig say?\nAnswer:"])
    finally:
        mlflow.set_tracking_uri(None)
    assert out["text"][0].strip()


def test_training_against_a_real_tracking_server(tmp_path):
    with mlflow_server(tmp_path) as (url, _):
        proc = subprocess.run(
            [sys.executable, "-m", "loraflow", "train", "--max-steps", "6", "--eval-steps", "3",
             "--target-modules", "q_proj, v_proj", "--output-dir", str(tmp_path / "out")],
            env=env_with_venv(MLFLOW_TRACKING_URI=url), capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
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
