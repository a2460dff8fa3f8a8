"""What a run says about itself: its name, tags and description (run_info), as RunLogger writes
them to a real store; and the sources of terminal noise that training used to print."""

from __future__ import annotations

import logging
import warnings
from types import SimpleNamespace

import mlflow
import pytest
from mlflow import MlflowClient

from loraflow import figures, run_info, tracking
from loraflow.config import LoraSettings, TrainSettings


@pytest.mark.parametrize(("base", "short"), [
    ("builtin:tiny", "tiny"), ("Qwen/Qwen2.5-0.5B", "Qwen2.5-0.5B"), ("/models/my llama/", "my-llama"),
])
def test_base_short_names(base, short):
    assert run_info.short_model_name(base) == short


@pytest.mark.parametrize(("data", "short"), [
    (None, "qa"), ("", "qa"), ("builtin:chat", "chat"), ("data/qa.jsonl", "qa"), ("/x/Support Tickets.csv", "Support-Tickets"),
    ("train.parquet", "train"),
])
def test_data_short_names(data, short):
    assert run_info.short_data_name(data) == short


def test_run_name_is_rank_base_and_data():
    assert run_info.run_name(16, "builtin:tiny", "data/qa.jsonl") == "lora-r16-tiny-qa"
    assert len(run_info.run_name(8, "x" * 400, None)) == run_info.MAX_NAME_LENGTH


def test_names_mlflow_made_up_are_told_from_chosen_ones():
    from mlflow.utils.name_utils import _generate_random_name

    assert all(run_info.is_generated_name(_generate_random_name()) for _ in range(20))
    assert run_info.is_generated_name(None)
    assert not run_info.is_generated_name("lora-r16-tiny-qa")
    assert not run_info.is_generated_name("my-experiment-3")


def test_tags_people_filter_on():
    tags = run_info.run_tags("builtin:tiny", 16, ("q_proj", "v_proj"), digests={"train": "abc", "eval": "def"},
                             base_fingerprint="sha256-tensors:00")
    assert tags == {
        "base_model": "builtin:tiny", "task": "completion", "lora.r": "16", "lora.target_modules": "q_proj,v_proj",
        "quantization": "none", "dataset.train.digest": "abc", "dataset.eval.digest": "def",
        "base_fingerprint": "sha256-tensors:00",
    }
    assert run_info.run_tags("b", 8, "all-linear", task="chat")["task"] == "chat"


def _description(**overrides):
    kwargs = dict(base_model="builtin:tiny", train_data="qa.jsonl", r=16, target_modules=("q_proj",), task=None,
                  steps=60, metrics={"eval_loss": (5.3157, 2.7248)}, model_uri="models:/m-1")
    return run_info.run_description(**{**kwargs, **overrides})


def test_the_description_says_what_was_trained_the_losses_and_the_three_commands():
    note = _description()
    assert "`builtin:tiny`" in note and "`qa.jsonl`" in note and "60 optimizer steps" in note
    assert "**eval_loss** 5.316 → 2.725" in note
    assert 'mlflow.pyfunc.load_model("models:/m-1")' in note
    assert "mlflow models serve -m models:/m-1 --env-manager local" in note
    assert "-P registered_model_name=NAME" in note and "loraflow promote --model-name NAME" in note
    assert "Registered models: None" in note
    assert "eval_exact_match" not in note


def test_a_registered_run_says_how_to_promote_it_and_exact_match_is_shown_when_logged():
    note = _description(registered_model_name="qa-lora", registered_version="3",
                        metrics={"eval_loss": (5.0, 2.0), "eval_exact_match": (0.0, 0.5)})
    assert "loraflow promote --model-name qa-lora" in note and "version 3" in note
    assert "registered_model_name=NAME" not in note
    assert "**eval_exact_match** 0 → 0.5" in note


def test_a_run_without_a_logged_model_says_so():
    assert "not logged" in _description(model_uri=None)


def test_before_after_reads_the_first_and_last_step():
    assert run_info.before_after([(20, 2.0), (0, 5.0), (60, 1.0)]) == (5.0, 1.0)
    assert run_info.before_after([]) == (None, None)


# ---------------------------------------------------------------------------------------------
# RunLogger against a real store.


def _result(**overrides):
    values = dict(eval_loss_before=5.0, eval_loss_after=2.5, model_uri="models:/m-1", registered_version=None,
                  history={"train_loss": [(1, 5.0), (2, 4.0)], "eval_loss": [(0, 5.0), (2, 2.5)]})
    return SimpleNamespace(**{**values, **overrides})


def test_a_new_run_is_named_tagged_and_described(tracking_uri):
    lora, train = LoraSettings(r=8), TrainSettings.from_flat(train_data="data/qa.jsonl")
    with tracking.RunLogger.start() as run:
        run.log_settings(lora, train)
        run.log_metrics({"eval_exact_match": 0.1}, 0)
        run.log_metrics({"eval_exact_match": 0.4}, 2)
        run.describe(_result(), lora, train)
    got = mlflow.get_run(run.run_id)
    assert got.info.run_name == "lora-r8-tiny-qa"
    assert got.data.tags["lora.r"] == "8" and got.data.tags["task"] == "completion"
    note = got.data.tags[run_info.NOTE_TAG]
    assert "**eval_loss** 5 → 2.5" in note and "**eval_exact_match** 0.1 → 0.4" in note


def test_a_chosen_name_is_kept_and_run_name_overrides(tracking_uri):
    with mlflow.start_run(run_name="my-baseline") as active:
        with tracking.RunLogger.start() as run:
            run.log_settings(LoraSettings(), TrainSettings())
    assert mlflow.get_run(active.info.run_id).info.run_name == "my-baseline"
    with tracking.RunLogger.start(run_name="nightly") as run:
        run.log_settings(LoraSettings(), TrainSettings())
    assert mlflow.get_run(run.run_id).info.run_name == "nightly"


def test_a_resumed_run_keeps_its_name(tracking_uri):
    with mlflow.start_run() as first:
        pass
    with tracking.RunLogger.start(run_id=first.info.run_id) as run:
        run.log_settings(LoraSettings(), TrainSettings())
    assert mlflow.get_run(run.run_id).info.run_name == first.info.run_name


def test_a_registered_version_gets_a_description(tracking_uri):
    lora, train = LoraSettings(), TrainSettings.from_flat(registered_model_name="qa-lora")
    client = MlflowClient()
    with tracking.RunLogger.start() as run:
        run.log_settings(lora, train)
        client.create_registered_model("qa-lora")
        version = client.create_model_version("qa-lora", f"runs:/{run.run_id}/model", run_id=run.run_id).version
        run.describe(_result(registered_version=str(version)), lora, train)
    description = client.get_model_version("qa-lora", str(version)).description
    assert run.run_id in description and "lora-r16-tiny-qa" in description
    assert "**eval_loss** 5 → 2.5" in description
    assert "loraflow promote --model-name qa-lora" in mlflow.get_run(run.run_id).data.tags[run_info.NOTE_TAG]


# ---------------------------------------------------------------------------------------------
# The terminal: each source of noise, at its cause.


def test_the_input_example_fits_the_context_with_room_for_max_new_tokens(tiny_tokenizer):
    long = "Question: " + "why is the sky so very blue " * 80 + "?\nAnswer:"
    short = "Question: What does a cow say?\nAnswer:"
    assert tracking.input_example_prompts([long, short, long, short], tiny_tokenizer, 256, 64) == [short, short]
    assert tracking.input_example_prompts([short, long], tiny_tokenizer, None, 64) == [short, long]
    (cut,) = tracking.input_example_prompts([long, long], tiny_tokenizer, 256, 64)
    assert 0 < len(tiny_tokenizer(cut)["input_ids"]) <= 256 - 64
    assert cut.rstrip().endswith("Answer:")  # the end of the prompt, where the answer starts, is kept


def test_pip_requirements_carry_no_local_version_label(caplog):
    from loraflow.flavor.save import get_default_pip_requirements

    with caplog.at_level(logging.WARNING, logger="mlflow"):
        requirements = get_default_pip_requirements()
    assert all("+" not in r for r in requirements)
    assert any(r.startswith("torch==") for r in requirements)
    assert "local version label" not in caplog.text


def test_applying_lora_no_longer_warns_about_a_deprecated_transformers_property(model):
    from loraflow.lora import apply_lora

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_lora(model, {"r": 4, "target_modules": "q_proj"})
        warnings.warn("ours stays visible", UserWarning)
    messages = [str(w.message) for w in caught]
    assert not any("is_gradient_checkpointing" in m for m in messages)
    assert "ours stays visible" in messages


def test_only_the_font_cache_notes_are_dropped_and_only_around_our_import(caplog):
    font_logger = logging.getLogger("matplotlib.font_manager")
    with caplog.at_level(logging.INFO, logger="matplotlib.font_manager"):
        with figures._quiet_font_cache_build():
            font_logger.warning("Matplotlib is building the font cache; this may take a moment.")
            font_logger.info("generated new fontManager")
            font_logger.warning("findfont: Font family 'X' not found.")
        font_logger.warning("Matplotlib is building the font cache; this may take a moment.")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["findfont: Font family 'X' not found.",
                        "Matplotlib is building the font cache; this may take a moment."]
