"""Interruption and resume: atomic checkpoints, SIGTERM/SIGINT, kill -9, and an exact continuation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from helpers import env_with_venv
from mlflow import MlflowClient

from loraflow import checkpoint as ckpt
from loraflow import tracking
from loraflow.cli import main
from loraflow.config import parse_settings
from loraflow.errors import LoraflowError
from loraflow.train import TrainingInterrupted, run_training

SETTINGS = {"max_steps": "12", "eval_steps": "4", "batch_size": "4", "r": "4", "lora_dropout": "0.1"}


def settings(tmp_path: Path, **overrides):
    return parse_settings({**SETTINGS, "output_dir": str(tmp_path / "out"), **overrides})


def interrupt_at(monkeypatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Deliver a real signal to this process right after optimizer step `step` is logged."""
    original = tracking.RunLogger.log_metrics

    def log_metrics(self, metrics, at_step):
        original(self, metrics, at_step)
        if at_step == step and "train_loss" in metrics:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(tracking.RunLogger, "log_metrics", log_metrics)


def _has_bitsandbytes() -> bool:
    from loraflow.flavor.quantization import bitsandbytes_problem

    return bitsandbytes_problem() is None


@pytest.mark.parametrize("quantization", [
    "none", pytest.param("nf4", marks=pytest.mark.skipif(not _has_bitsandbytes(), reason="needs bitsandbytes"))])
def test_interrupted_and_resumed_run_ends_exactly_like_an_uninterrupted_one(quantization, tracking_uri, tmp_path,
                                                                            monkeypatch):
    # dropout on, so the RNG state must be restored too; 12 steps over 36 examples cross an epoch.
    # nf4: the checkpoint holds the adapter only, and the resumed run quantizes the base again
    reference = run_training(*settings(tmp_path / "a", quantization=quantization))
    interrupt_at(monkeypatch, 5)
    with pytest.raises(TrainingInterrupted) as stopped:
        run_training(*settings(tmp_path / "b", quantization=quantization))
    monkeypatch.undo()
    state = ckpt.read_state(stopped.value.checkpoint)
    assert state.step == 5 and stopped.value.signal_name == "SIGTERM"
    client = MlflowClient()
    assert client.get_run(state.run_id).info.status == "KILLED"

    resumed = run_training(*settings(tmp_path / "b", quantization=quantization), resume=stopped.value.checkpoint)
    assert client.get_run(state.run_id).data.params["quantization"] == quantization
    assert resumed.run_id == state.run_id  # the same MLflow run continues
    assert resumed.eval_loss_after == pytest.approx(reference.eval_loss_after, abs=1e-5)
    assert client.get_run(state.run_id).info.status == "FINISHED"
    train_steps = sorted({m.step for m in client.get_metric_history(state.run_id, "train_loss")})
    assert train_steps == list(range(1, 13))
    assert [m.step for m in sorted(client.get_metric_history(state.run_id, "eval_loss"), key=lambda m: m.step)] == [0, 4, 8, 12]


def to_old_layout(folder: Path) -> None:
    """Rewrite a checkpoint in the layout before accelerate's save_state: optimizer.pt, scheduler.pt, and
    process 0's torch RNG state in rng.pt, each a `torch.save`d state dict."""
    import torch
    from accelerate.utils import load

    torch.save(load(folder / "optimizer.bin"), folder / "optimizer.pt")
    torch.save(load(folder / "custom_checkpoint_0.pkl", weights_only=False), folder / "scheduler.pt")
    torch.save({"cpu": load(folder / "random_states_0.pkl")["torch_manual_seed"]}, folder / "rng.pt")
    for name in ("optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"):
        (folder / name).unlink()


def test_checkpoints_are_written_every_checkpoint_steps_pruned_and_resumed_in_the_old_layout_too(tracking_uri,
                                                                                                  tmp_path):
    result = run_training(*settings(tmp_path, checkpoint_steps="3"))
    root = ckpt.run_dir(tmp_path / "out", result.run_id)
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000009"]
    written = {p.name for p in (root / "step-000009").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.bin", "custom_checkpoint_0.pkl",
            "random_states_0.pkl", "state.json"} <= written
    assert not {"model.safetensors", "pytorch_model.bin"} & written, "the frozen base is never saved"

    # a checkpoint written before accelerate's save_state (one test, one training run: the suite's time budget)
    to_old_layout(root / "step-000009")
    resumed = run_training(*settings(tmp_path, checkpoint_steps="3"), resume=root / "step-000009")
    assert resumed.run_id == result.run_id
    assert resumed.eval_loss_after == pytest.approx(result.eval_loss_after, abs=1e-5)


def test_a_crash_mid_write_never_becomes_the_latest_checkpoint(tracking_uri, tmp_path, monkeypatch):
    result = run_training(*settings(tmp_path, checkpoint_steps="3", max_steps="6"))
    root = ckpt.run_dir(tmp_path / "out", result.run_id)
    latest = ckpt.latest_checkpoint(root)
    state = ckpt.read_state(latest)
    import torch
    from accelerate import Accelerator

    from loraflow.lora import apply_lora
    from loraflow.flavor.bases import load_base_model

    model = apply_lora(load_base_model("builtin:tiny"), {"r": 4})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    accelerator = Accelerator(cpu=torch.accelerator.current_accelerator() is None)
    model, optimizer = accelerator.prepare(model, optimizer)
    ckpt.track(accelerator, model, scheduler)

    def crash(*args, **kwargs):  # the adapter is written, then the disk fills up
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(root, ckpt.CheckpointState(9, 0, 9, state.run_id, {}), accelerator)
    assert ckpt.latest_checkpoint(root) == latest
    assert not list(root.glob(".tmp-*")), "the half-written folder is cleaned up"


def test_resume_from_a_run_id_and_clear_error_when_there_is_nothing(tmp_path):
    (tmp_path / "checkpoints" / "abc" / ".tmp-step-000003-x").mkdir(parents=True)
    with pytest.raises(LoraflowError, match="no checkpoint found"):
        ckpt.resolve_checkpoint("abc", tmp_path)


def test_a_checkpoint_without_optimizer_state_is_refused_with_a_clear_error(tmp_path):
    (tmp_path / "state.json").write_text("{}")
    with pytest.raises(LoraflowError, match="no optimizer state .* incomplete"):
        ckpt.restore(tmp_path, None, None, None, None)


@pytest.mark.slow
def test_kill_9_resumes_from_the_last_complete_checkpoint(tmp_path, tracking_uri):
    uri = tracking_uri
    out = tmp_path / "out"
    args = [sys.executable, "-m", "loraflow", "train", "--max-steps", "4000", "--eval-steps", "1000",
            "--checkpoint-steps", "5", "--batch-size", "4", "--output-dir", str(out)]
    proc = subprocess.Popen(args, env=env_with_venv(MLFLOW_TRACKING_URI=uri), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    def reached_step_10() -> bool:
        # any complete checkpoint at step >= 10: step-000010 itself lives only until step 20 is
        # written (the last two are kept), which a fast run can do between two polls
        runs = list((out / "checkpoints").glob("*"))
        latest = ckpt.latest_checkpoint(runs[0]) if runs else None
        try:
            if latest is None or ckpt.read_state(latest).step < 10:
                return False
        except FileNotFoundError:  # rotated away between listing and reading: look again
            return False
        # metrics are logged asynchronously: kill only once the step-0 evaluation has landed
        return bool(MlflowClient(uri).get_metric_history(runs[0].name, "eval_loss"))

    try:
        deadline = time.monotonic() + 180
        while not reached_step_10() and time.monotonic() < deadline:
            assert proc.poll() is None, "training exited before writing two checkpoints"
            time.sleep(0.2)
    finally:
        proc.kill()  # SIGKILL: no handler runs, possibly mid-write
        proc.wait()
    (run_root,) = list((out / "checkpoints").iterdir())
    latest = ckpt.latest_checkpoint(run_root)
    assert latest is not None and ckpt.read_state(latest).step >= 10
    # the killed process is the real one; the resume runs the same command in process
    resumed = CliRunner().invoke(main, ["train", "--resume-from", run_root.name, "--output-dir", str(out),
                                        "--max-steps", str(ckpt.read_state(latest).step + 3)])
    assert resumed.exit_code == 0, resumed.output[-3000:] + repr(resumed.exception)
    client = MlflowClient(uri)
    assert client.get_run(run_root.name).data.params["max_steps"] == "4000"
    # the killed process may have logged a few steps past its last checkpoint; the resumed one
    # evaluates at its own final step, counted on from the checkpoint
    evals = sorted(m.step for m in client.get_metric_history(run_root.name, "eval_loss"))
    assert evals == [0, ckpt.read_state(latest).step + 3]
    assert client.get_run(run_root.name).info.status == "FINISHED"
