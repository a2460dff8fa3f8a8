"""Generation metrics (loraflow.evaluation), `loraflow evaluate`, promotion on exact match, and the
`mlflow.genai.evaluate` example."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import env_with_venv, fresh_store
from mlflow import MlflowClient

from loraflow import data, evaluation
from loraflow.cli import main
from loraflow.config import parse_settings
from loraflow.train import run_training

ROOT = Path(__file__).resolve().parents[1]
FAST = {"max_steps": "4", "eval_steps": "2", "batch_size": "8", "r": "4", "eval_samples": "6"}


def test_samples_are_a_fixed_seeded_subset_in_file_order(tiny_tokenizer):
    table = data.load_examples(data.SAMPLE_DATA, data.Columns(prompt="prompt", completion="completion"))
    first = evaluation.pick_samples(table, data.Columns(prompt="prompt", completion="completion"), 10, 3, tiny_tokenizer)
    again = evaluation.pick_samples(table, data.Columns(prompt="prompt", completion="completion"), 10, 3, tiny_tokenizer)
    other = evaluation.pick_samples(table, data.Columns(prompt="prompt", completion="completion"), 10, 4, tiny_tokenizer)
    assert first == again and first.prompts != other.prompts and len(first.prompts) == 10
    order = [table.frame["prompt"].tolist().index(p) for p in first.prompts]
    assert order == sorted(order)
    assert all(table.frame.loc[i, "completion"] == e for i, e in zip(order, first.expected))


def test_chat_samples_ask_everything_before_the_last_reply_and_expect_it(tiny_tokenizer):
    columns = data.Columns(messages="messages")
    table = data.load_examples(data.tables.BUILTIN_DATA["chat"], columns)
    samples = evaluation.pick_samples(table, columns, 5, 0, tiny_tokenizer)
    assert samples.chat and samples.stop_token_ids == [tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")]
    for prompt, expected in zip(samples.prompts, samples.expected):
        assert prompt.endswith("<|im_start|>assistant\n") and expected not in prompt


def test_score_is_the_mean_of_the_metric_definitions():
    scores = evaluation.score([" A duck says quack.", "moo", "A cow says baa."], ["a duck says QUACK", "moo!", "A cow says moo."])
    assert scores["eval_exact_match"] == pytest.approx(2 / 3)
    assert 2 / 3 < scores["eval_token_f1"] < 1
    assert evaluation.score([], []) == {}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("evaluate")
    uri = fresh_store(tmp / 'mlflow.db')
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    import os

    cwd = os.getcwd()
    os.chdir(tmp)
    try:
        runs = [run_training(*parse_settings({**FAST, "max_steps": steps, "registered_model_name": "qa",
                                              "output_dir": str(tmp / "out")})) for steps in ("2", "30")]
    finally:
        os.chdir(cwd)
    yield uri, runs
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    os.environ.pop("MLFLOW_REGISTRY_URI", None)  # set_registry_uri sets it, and None does not clear it


def test_loraflow_evaluate_scores_a_logged_model_and_logs_to_a_run(trained, monkeypatch):
    uri, runs = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    result = CliRunner().invoke(main, ["evaluate", runs[1].model_uri, "--data", "builtin:qa", "--samples", "6",
                                       "--log-to", "new"])
    assert result.exit_code == 0, result.output
    import re

    lines = dict(re.findall(r"(eval_\w+) +([0-9.]+)$", result.output, flags=re.M))  # progress bars share stderr
    assert {"eval_exact_match", "eval_token_f1"} <= set(lines)
    run_id = result.output.strip().splitlines()[-1].split()[-1]
    logged = MlflowClient(uri).get_run(run_id).data.metrics
    assert logged["eval_exact_match"] == pytest.approx(float(lines["eval_exact_match"]), abs=1e-4)
    # into an existing run: its status is kept
    before = MlflowClient(uri).get_run(runs[0].run_id).info.status
    again = CliRunner().invoke(main, ["evaluate", runs[0].model_uri, "--data", "builtin:qa", "--samples", "3",
                                      "--log-to", runs[0].run_id])
    assert again.exit_code == 0, again.output
    after = MlflowClient(uri).get_run(runs[0].run_id)
    assert after.info.status == before and "eval_exact_match" in after.data.metrics


def test_loraflow_evaluate_refuses_bad_data_before_loading_the_model(trained, tmp_path, monkeypatch):
    uri, runs = trained
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (tmp_path / "bad.jsonl").write_text('{"question": "x"}\n')
    result = CliRunner().invoke(main, ["evaluate", runs[0].model_uri, "--data", str(tmp_path / "bad.jsonl")])
    assert result.exit_code == 2 and "column 'prompt' not found" in result.output and "Traceback" not in result.output


def test_promote_on_exact_match_gives_the_alias_to_the_better_answers(trained):
    from loraflow.registry import promote_if_better

    uri, runs = trained
    client = MlflowClient(uri)
    scores = [client.get_run(r.run_id).data.metrics["eval_exact_match"] for r in runs]
    first = promote_if_better("qa", version="1", metric="eval_exact_match", mode="max")
    assert first.promoted
    second = promote_if_better("qa", version="2", metric="eval_exact_match", mode="max")
    assert second.promoted == (scores[1] > scores[0])
    assert second.candidate_value == pytest.approx(scores[1]) and second.champion_value == pytest.approx(scores[0])


@pytest.mark.slow
def test_the_genai_evaluate_example_runs_offline(trained, tmp_path):
    uri, runs = trained
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "genai_evaluate.py"), runs[1].model_uri, "--rows", "4"],
                          cwd=tmp_path, env=env_with_venv(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exact_match/mean:" in proc.stdout and "over 4 held-out questions" in proc.stdout
