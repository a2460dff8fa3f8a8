"""Multi-process training: 2 CPU processes (gloo) under torchrun give one run, one model, the same loss.

The 2-process run (batch 4 per process) is compared with a single-process run of the same global
batch (8) and seed, both for one pass over the training data (18 optimizer steps). It writes a
checkpoint at step 9, and a 2-process run resumed from it ends exactly like it. A signal to one
process stops both at the same step.
"""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from helpers import BIN, env_with_venv, free_port, fresh_store, project_copy
from mlflow import MlflowClient

pytestmark = pytest.mark.slow

# 20 eval examples: batches of 8, 8 and 4, the last split 2 + 2 (a sharder that repeats or drops
# examples to even out the processes would change the step-0 eval loss); 140 train examples: 18
# steps of 8 (or 2 x 4) are one pass over the data in both runs.
SETTINGS = ["--eval-fraction", "0.125", "--max-steps", "18", "--eval-steps", "100", "--r", "8", "--seed", "42"]

# Final eval loss: both runs train on the same global batches (8 length-grouped examples per step,
# split 4 + 4 across the processes), so they differ only in how the loss is averaged (the mean of
# the two processes' token means vs one token mean over 8 examples) and in float reduction order.
# Measured on the built-in model: 4.0262 (1 process) vs 4.0227 (2 processes), |diff| = 0.0035 nats.
# The tolerance, 0.02 nats (0.5%), is ~6x that, and well below what real bugs cost here: planning
# batches per process (2 x 4 different examples per step) 0.11, a scheduler stepped once per
# process 0.17, and two processes that do not talk to each other make two runs.
FINAL_EVAL_LOSS_TOLERANCE = 0.02


def train(tmp_path: Path, name: str, launcher: list[str], batch_size: int, *extra: str,
          uri: str | None = None) -> MlflowClient:
    uri = uri or fresh_store(tmp_path / f'{name}.db')
    proc = subprocess.run(
        [*launcher, "loraflow", "train", *SETTINGS, "--batch-size", str(batch_size), *extra,
         "--output-dir", str(tmp_path / f"{name}-outputs")],
        env=env_with_venv(MLFLOW_TRACKING_URI=uri, MLFLOW_REGISTRY_URI=uri),
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return MlflowClient(uri)


def copy_store(uri: str, db: Path) -> str:
    """A copy of the sqlite store at `uri`, whose runs put their artifacts in a folder beside `db` from now on."""
    shutil.copyfile(uri.removeprefix("sqlite:///"), db)
    root = str(db.with_suffix("")) + "-artifacts/"
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE experiments SET artifact_location = ? || experiment_id", (root,))
        conn.execute("UPDATE runs SET artifact_uri = ? || experiment_id || '/' || run_uuid || '/artifacts'", (root,))
    conn.close()
    return f"sqlite:///{db}"


def torchrun() -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "--"]  # `--`: torchrun would take `--r` for its --rdzv-*


def only_run(client: MlflowClient):
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments)
    assert len(runs) == 1, f"expected one MLflow run, got {len(runs)}: {[r.info.run_id for r in runs]}"
    return runs[0]


def eval_losses(client: MlflowClient, run_id: str) -> dict[int, float]:
    history = client.get_metric_history(run_id, "eval_loss")
    steps = [m.step for m in history]
    assert len(steps) == len(set(steps)), f"eval_loss logged more than once per step: {sorted(steps)}"
    return {m.step: m.value for m in history}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(single-process client, two-process client), each trained once for the module."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    single = train(tmp, "single", [sys.executable, "-m"], batch_size=8)
    double = train(tmp, "double", torchrun(), 4, "--checkpoint-steps", "9")  # kept: step 18 ends the run
    return single, double


@pytest.fixture(scope="module")
def resumed(runs):
    """(the step-9 checkpoint of the 2-process run, a copy of its store where a 2-process run resumed from it)."""
    _, double = runs
    tmp = Path(double.tracking_uri.removeprefix("sqlite:///")).parent
    checkpoint = tmp / "double-outputs" / "checkpoints" / only_run(double).info.run_id / "step-000009"
    # the resumed run logs steps 10-18 again into the same run: in a copy, so the other tests see one run
    uri = copy_store(double.tracking_uri, tmp / "resumed.db")
    return checkpoint, train(tmp, "resumed", torchrun(), 4, "--resume-from", str(checkpoint), uri=uri)


def test_two_processes_make_one_run_with_params_and_metrics_logged_once(runs):
    _, double = runs
    run = only_run(double)
    assert run.info.status == "FINISHED"
    assert run.data.params["batch_size"] == "4" and run.data.params["max_steps"] == "18"
    assert not [k for k in run.data.params if k.endswith("_resolved")], run.data.params
    assert sorted(eval_losses(double, run.info.run_id)) == [0, 18]
    assert len(double.get_metric_history(run.info.run_id, "train_loss")) == 18


def test_two_processes_log_one_model_that_loads(runs):
    _, double = runs
    run = only_run(double)
    models = double.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert len(models) == 1, [m.model_id for m in models]
    mlflow.set_tracking_uri(double.tracking_uri)
    try:
        out = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model").predict(
            pd.DataFrame({"prompt": ["Question: What does a cow say?\nAnswer:"]}), params={"max_new_tokens": 4}
        )
    finally:
        mlflow.set_tracking_uri(None)
    assert len(out["text"]) == 1


def test_two_processes_match_one_process_with_the_same_global_batch(runs):
    single, double = runs
    one = eval_losses(single, only_run(single).info.run_id)
    two = eval_losses(double, only_run(double).info.run_id)
    # Before training the model is the same, so this compares only the sharded evaluation: every
    # eval example counted exactly once, token-weighted, summed across processes.
    assert two[0] == pytest.approx(one[0], abs=1e-4)
    assert abs(two[18] - one[18]) <= FINAL_EVAL_LOSS_TOLERANCE, (one, two)
    assert two[18] < 0.8 * two[0]  # it did train


def test_two_processes_resume_exactly_from_every_process_rng_state(runs, resumed):
    _, double = runs
    checkpoint, client = resumed
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                              "random_states_1.pkl"]
    # each logged train loss is the mean over both processes, each with its own LoRA dropout masks
    # (the default lora_dropout): they match the uninterrupted run only if every process got its RNG state back
    run_id = only_run(double).info.run_id
    for key, resumed_steps in (("train_loss", range(10, 19)), ("eval_loss", [18])):
        values = defaultdict(list)  # step -> [uninterrupted, resumed]
        for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp):
            values[m.step].append(m.value)
        assert {step for step, v in values.items() if len(v) == 2} == set(resumed_steps), values
        for step in resumed_steps:
            assert values[step][1] == pytest.approx(values[step][0], abs=1e-5), (key, step, values[step])


def test_mlflow_run_distributed_entry_point(tmp_path):
    """`mlflow run -e distributed -P nproc_per_node=2`: torchrun under MLflow's run, still one run."""
    project = project_copy(tmp_path)
    uri = fresh_store(tmp_path / 'mlflow.db')
    proc = subprocess.run(
        [str(BIN / "mlflow"), "run", str(project), "-e", "distributed", "--env-manager", "local",
         "-P", "nproc_per_node=2", "-P", "max_steps=2", "-P", "eval_steps=1", "-P", "batch_size=4"],
        cwd=project, env=env_with_venv(MLFLOW_TRACKING_URI=uri),
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    client = MlflowClient(uri)
    run = only_run(client)
    assert run.info.status == "FINISHED"
    assert sorted(eval_losses(client, run.info.run_id)) == [0, 1, 2]
    assert len(client.search_logged_models(experiment_ids=[run.info.experiment_id])) == 1


def test_a_signal_that_reaches_one_process_stops_every_process_at_the_same_step(tmp_path):
    """A scheduler may signal one process, and Ctrl-C reaches each at its own point of a step: the
    processes agree on the step to stop at, so all of them write the one checkpoint (each its RNG state)."""
    import os
    import re
    import signal
    import threading
    import time

    import psutil

    uri = fresh_store(tmp_path / "stop.db")
    proc = subprocess.Popen(
        [*torchrun(), "loraflow", "train", *SETTINGS, "--max-steps", "5000", "--batch-size", "4",
         "--output-dir", str(tmp_path / "outputs")],
        env=env_with_venv(MLFLOW_TRACKING_URI=uri), cwd=tmp_path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = bytearray()

    def read_all() -> None:  # both processes' output, as it comes
        while chunk := os.read(proc.stdout.fileno(), 4096):
            output.extend(chunk)

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not re.search(rb"training:.*\| *[1-9]\d*/5000", output):  # a step is done: the loop is running
            assert proc.poll() is None and time.monotonic() < deadline, output.decode(errors="replace")[-3000:]
            time.sleep(0.2)
        workers = {int(p.environ()["LOCAL_RANK"]): p for p in psutil.Process(proc.pid).children()}
        workers[1].send_signal(signal.SIGTERM)  # not the main process, which logs and saves the adapter
        proc.wait(timeout=120)
    finally:  # on a failure, the workers too: they hold the output pipe, and would train on
        for leftover in psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []:
            leftover.kill()
        proc.kill()
        reader.join()
    text = output.decode(errors="replace")
    (checkpoint,) = (tmp_path / "outputs" / "checkpoints").glob("*/step-*")
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == ["random_states_0.pkl",
                                                                              "random_states_1.pkl"], text[-3000:]
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert text.count(f"stopped by SIGTERM; resume with --resume-from {checkpoint}") == 2, text[-3000:]
    client = MlflowClient(uri)  # the main process recorded the run up to the checkpoint before it exited
    run = only_run(client)
    logged = max(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
    assert run.info.status == "KILLED" and checkpoint.name == f"step-{logged:06d}", (run.info.status, logged)
