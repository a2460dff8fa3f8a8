"""The training recipe in-process: loss goes down, runs are deterministic, everything is tracked."""

from __future__ import annotations

import contextlib

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from loraflow import flavor
from loraflow.config import parse_settings
from loraflow.errors import ConfigError, DataError
from loraflow.train import run_training

FAST = {"max_steps": "8", "eval_steps": "4", "batch_size": "8", "r": "8", "eval_samples": "8"}


def train(**overrides):
    raw = {**FAST, **overrides}
    lora, settings = parse_settings(raw)
    return run_training(lora, settings, explicit=set(raw))


def test_eval_samples_zero_turns_generation_metrics_off(tracking_uri, tmp_path):
    result = train(output_dir=str(tmp_path), eval_samples="0")
    assert "eval_exact_match" not in result.history and result.samples == []
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    assert "eval_exact_match" not in run.data.metrics
    assert "eval_samples.json" not in {a.path for a in MlflowClient(tracking_uri).list_artifacts(result.run_id)}


def test_same_seed_gives_the_same_final_eval_loss(tracking_uri, tmp_path):
    first = train(output_dir=str(tmp_path))
    second = train(output_dir=str(tmp_path))
    assert first.eval_loss_after == second.eval_loss_after
    assert train(output_dir=str(tmp_path), seed="7").eval_loss_after != first.eval_loss_after


def test_a_training_run_reads_its_training_file_once(tracking_uri, tmp_path, monkeypatch):
    from loraflow.data import tables

    data = tmp_path / "train.jsonl"
    data.write_text(tables.SAMPLE_DATA.read_text())
    reads = []
    real = tables.read_table

    def counting(path, role="train_data"):
        reads.append((str(path), role))
        return real(path, role)

    monkeypatch.setattr(tables, "read_table", counting)
    result = train(train_data=str(data))
    assert result.ok and reads == [(str(data), "train_data")]
    run = MlflowClient(tracking_uri).get_run(result.run_id)
    sources = {d.dataset.name: d.dataset.source for d in run.inputs.dataset_inputs}
    assert set(sources) == {"train", "eval"} and all(str(data) in source for source in sources.values())


def test_logging_the_model_never_loads_a_second_copy_of_it(tracking_uri, tmp_path, monkeypatch):
    """MLflow would check the input example by loading the logged model again in this process (a
    second copy of the base in memory); training skips that reload, and the logged model still serves."""
    from loraflow.flavor import load, pyfunc

    loads = []
    real = load.load_local
    counting = lambda *a, **k: loads.append(a) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(load, "load_local", counting)
    monkeypatch.setattr(pyfunc, "load_local", counting)  # the pyfunc loader (MLflow's check) binds it at import
    result = train(output_dir=str(tmp_path))
    assert result.ok and result.model_uri and loads == []
    answer = mlflow.pyfunc.load_model(result.model_uri).predict(["Q: What does a cow say?\nA:"])
    assert len(loads) == 1 and len(answer) == 1


def test_bad_data_fails_before_any_model_loads(tracking_uri, tmp_path, monkeypatch):
    import loraflow.flavor.bases

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(loraflow.flavor.bases, "load_base_model", no_model)
    with pytest.raises(DataError, match="missing.jsonl"):
        train(train_data=str(tmp_path / "missing.jsonl"))


def test_a_model_that_cannot_be_logged_is_saved_locally_and_reported(tracking_uri, tmp_path, monkeypatch):
    def broken_store(*args, **kwargs):
        raise OSError("artifact store unreachable")

    monkeypatch.setattr(flavor, "log_model", broken_store)
    result = train(output_dir=str(tmp_path / "out"))
    assert not result.ok and result.model_uri is None
    from peft import PeftModel

    model, tokenizer = flavor.load_model(result.local_model_dir)
    assert isinstance(model, PeftModel)


def test_registered_version_is_tagged_with_its_metrics_and_settings(tracking_uri, tmp_path):
    result = train(output_dir=str(tmp_path), registered_model_name="tiny-lora")
    version = MlflowClient().get_model_version("tiny-lora", result.registered_version)
    assert version.tags["base_model"] == "builtin:tiny" and version.tags["r"] == "8"
    assert float(version.tags["eval_loss"]) == pytest.approx(result.eval_loss_after, rel=1e-5)


def test_continued_training_starts_from_the_logged_adapter(tracking_uri, tmp_path):
    first = train(output_dir=str(tmp_path))
    second = train(output_dir=str(tmp_path), init_model=first.model_uri)
    assert second.eval_loss_before == pytest.approx(first.eval_loss_after, abs=1e-6)
    assert second.eval_loss_after < second.eval_loss_before


def test_continued_training_rejects_conflicting_lora_settings(tracking_uri, tmp_path):
    first = train(output_dir=str(tmp_path))
    with pytest.raises(ConfigError, match="`r` is 32 but init_model"):
        train(output_dir=str(tmp_path), init_model=first.model_uri, r="32")


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _recipe(peft_model, tokenizer, accelerator):
    """A `FineTune` set up on `peft_model` whose optimizer leaves the parameters alone: each optimizer
    step records the LoRA gradients it was given (unclipped) in `recipe.grads`."""
    from loraflow import data as data_lib
    from loraflow import tracking
    from loraflow.config import TrainSettings
    from loraflow.train import FineTune

    recipe = FineTune(TrainSettings.from_flat(max_grad_norm=0.0, eval_samples=0))
    examples = data_lib.TokenizedExamples([[1, 2, 3]], [[-100, 2, 3]])
    recipe.setup(accelerator, tracking.RunLogger(None, enabled=False), peft_model, tokenizer, examples, examples)
    recipe.grads = []
    recipe.optimizer.step = lambda *args, **kwargs: recipe.grads.append(_lora_grads(peft_model))
    return recipe


def _step(recipe, batch: dict, max_tokens: int | None) -> torch.Tensor:
    """The batch's mean loss from one `train_step` in micro-batches of at most `max_tokens` tokens."""
    recipe.budget = max_tokens
    assert recipe.train_step(batch)
    return recipe.loss


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the optimizer step is held back
def test_micro_batches_give_the_same_loss_and_gradients_as_one_pass(model, tiny_tokenizer):
    from accelerate import Accelerator

    from loraflow import data as data_lib
    from loraflow.lora import apply_lora
    from loraflow.config import lora_settings

    peft_model = apply_lora(model, lora_settings({"r": 4, "lora_dropout": 0.0})).train()
    texts = ["a short one", "a somewhat longer example sentence here", "mid length text", "x"]
    rows = [tiny_tokenizer(t)["input_ids"] for t in texts]
    batch = data_lib.collate_padded([(r, [-100] + r[1:]) for r in rows], tiny_tokenizer.pad_token_id)
    recipe = _recipe(peft_model, tiny_tokenizer, Accelerator(cpu=True))

    whole = _step(recipe, batch, None)
    expected = recipe.grads[-1]
    assert len(data_lib.split_batch(batch, 12)) > 1
    split = _step(recipe, batch, 12)

    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6)
    for name, grad in recipe.grads[-1].items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_auto_micro_batches_split_on_cpu_only():
    from loraflow.train import CPU_MICRO_BATCH_TOKENS, micro_batch_budget

    assert micro_batch_budget(0, torch.device("cpu")) == CPU_MICRO_BATCH_TOKENS
    assert micro_batch_budget(0, torch.device("cuda")) is None
    assert micro_batch_budget(300, torch.device("cuda")) == 300


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")  # the optimizer step is held back
def test_a_micro_batch_without_label_tokens_is_skipped_and_the_last_real_one_syncs(model, tiny_tokenizer, monkeypatch):
    from accelerate import Accelerator

    from loraflow import data as data_lib
    from loraflow.config import lora_settings
    from loraflow.lora import apply_lora

    peft_model = apply_lora(model, lora_settings({"r": 4, "lora_dropout": 0.0})).train()
    rows = [tiny_tokenizer(t)["input_ids"] for t in ["one example sentence to learn", "a prompt only"]]
    batch = data_lib.collate_padded([(rows[0], [-100] + rows[0][1:]), (rows[1], [-100] * len(rows[1]))],
                                    tiny_tokenizer.pad_token_id)
    accelerator = Accelerator(cpu=True)
    recipe = _recipe(peft_model, tiny_tokenizer, accelerator)
    synced = []  # for each backward: did it run outside no_sync (the one that syncs across processes)?
    inside = {"no_sync": False}

    @contextlib.contextmanager
    def no_sync(m):
        inside["no_sync"] = True
        yield
        inside["no_sync"] = False

    backward = accelerator.backward
    monkeypatch.setattr(accelerator, "no_sync", no_sync)
    monkeypatch.setattr(accelerator, "backward", lambda loss: (synced.append(not inside["no_sync"]), backward(loss)))

    whole = _step(recipe, batch, None)
    synced.clear()
    assert len(data_lib.split_batch(batch, 8)) == 2
    split = _step(recipe, batch, 8)

    assert synced == [True]  # the label-less last part was dropped; the real one ran and synced
    assert torch.isfinite(split) and torch.allclose(split, whole, rtol=1e-5)
