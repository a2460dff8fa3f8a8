"""Tracking outages: a dead server at start fails fast; one that dies mid-run loses nothing."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time

import mlflow
import pytest
from helpers import env_with_venv, free_port, mlflow_server, stop
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def test_unreachable_tracking_server_fails_at_once_naming_the_uri(tmp_path):
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "loraflow", "train", "--max-steps", "2"],
        env=env_with_venv(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert uri in proc.stderr and "cannot be reached" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_server_killed_mid_run_keeps_training_saves_locally_and_uploads_later(tmp_path):
    out = tmp_path / "out"
    steps = 150
    with mlflow_server(tmp_path) as (url, server):
        trainer = subprocess.Popen(
            [sys.executable, "-m", "loraflow", "train", "--max-steps", str(steps), "--eval-steps", "50",
             "--checkpoint-steps", "50", "--output-dir", str(out)],
            # MLflow's retries of a dead server stay as loraflow sets them, without the seconds of backoff between them
            env=env_with_venv(MLFLOW_TRACKING_URI=url, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0",
                              MLFLOW_HTTP_REQUEST_BACKOFF_JITTER="0"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        client = MlflowClient(url)
        deadline = time.monotonic() + 120
        run_id = None
        while time.monotonic() < deadline:  # wait until training is logging steps, then pull the plug
            runs = client.search_runs(["0"])
            if runs and len(client.get_metric_history(runs[0].info.run_id, "train_loss")) >= 5:
                run_id = runs[0].info.run_id
                break
            assert trainer.poll() is None, trainer.communicate()[1][-3000:]
            time.sleep(0.1)
        assert run_id, "training never logged a step"
        # the trainer is held while the server goes down, so the outage falls mid-run however fast it trains
        trainer.send_signal(signal.SIGSTOP)
        try:
            stop(server)
        finally:
            trainer.send_signal(signal.SIGCONT)
        stdout, stderr = trainer.communicate(timeout=400)
    assert trainer.returncode == 1, stderr[-3000:]
    assert "could not" in stderr and "training finished" in stdout
    local = re.search(r"the model is saved at (\S+)", stdout).group(1)
    assert f"model-{run_id}" in local
    assert (out / "checkpoints" / run_id).is_dir()

    # the server comes back (same backend store): upload the local copy into a new run that names
    # the training run, whose status (left RUNNING by the outage) is never changed
    with mlflow_server(tmp_path) as (url, _):
        proc = subprocess.run([sys.executable, "-m", "loraflow", "upload", local, "--registered-model-name", "saved"],
                              env=env_with_venv(MLFLOW_TRACKING_URI=url), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        upload_run_id = re.search(r"runs:/([0-9a-f]{32})/model", proc.stdout).group(1)
        client = MlflowClient(url)
        assert upload_run_id != run_id and client.get_run(run_id).info.status != "FINISHED"
        logged = client.get_metric_history(run_id, "train_loss")  # the steps trained after the outage are not
        assert 5 <= len(logged) < steps and max(m.step for m in logged) < steps
        assert client.get_run(upload_run_id).data.tags["loraflow.upload.source_run_id"] == run_id
        mlflow.set_tracking_uri(url)
        try:
            answer = mlflow.pyfunc.load_model("models:/saved/1").predict(["Question: What does a cat say?\nAnswer:"])
        finally:
            mlflow.set_tracking_uri(None)
        assert answer["text"][0].strip()
