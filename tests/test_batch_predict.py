"""batch-predict loses nothing and explains every mistake (issue 12).

Outputs are checked before the model loads and written atomically; an existing file or column is
never replaced silently; an interrupted job keeps its finished rows and `--resume` completes it;
every bad model URI, input or option is one message with exit code 2, never a traceback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import env_with_venv, free_port
from model_helpers import CHATS, save_chat_model

from loraflow.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
PROMPTS = ["Question: What does a cow say?\nAnswer:", "Hello", "The sky"]


def run(*args: str):
    return CliRunner().invoke(main, ["batch-predict", *args])


def assert_clean(result, code: int = 2) -> str:
    assert result.exit_code == code, result.output + repr(result.exception)
    assert "Traceback" not in result.output, result.output
    return result.output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny_path, tiny_tokenizer) -> str:
    from model_helpers import make_peft_model

    from loraflow import flavor
    from loraflow.flavor.bases import load_base_model

    path = tmp_path_factory.mktemp("bp") / "model"
    flavor.save_model(make_peft_model(load_base_model(tiny_path).eval()), path, tiny_tokenizer, base_model="builtin:tiny")
    return str(path)


@pytest.fixture
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.parquet"
    pd.DataFrame({"id": [1, 2, 3], "prompt": PROMPTS}).to_parquet(path)
    return path


def test_batch_predict_writes_the_table_atomically_and_leaves_no_temporary_files(model_dir, prompts, tmp_path):
    out = tmp_path / "out" / "result.jsonl"
    result = run("--model-uri", model_dir, "--input", str(prompts), "--output", str(out), "--max-new-tokens", "2",
                 "--chunk-rows", "2")
    assert result.exit_code == 0, result.output
    table = pd.read_json(out, lines=True)
    assert table.columns.tolist() == ["id", "prompt", "text"] and len(table) == 3
    assert sorted(p.name for p in out.parent.iterdir()) == ["result.jsonl"]  # no .tmp-*, no .partial


def test_batch_predict_refuses_to_replace_the_input_or_an_existing_output_without_overwrite(model_dir, prompts, tmp_path):
    before = prompts.read_bytes()
    out = assert_clean(run("--model-uri", model_dir, "--input", str(prompts), "--output", str(prompts)))
    assert "is the input file" in out and "--overwrite" in out
    existing = tmp_path / "done.csv"
    existing.write_text("keep me\n")
    out = assert_clean(run("--model-uri", model_dir, "--input", str(prompts), "--output", str(existing)))
    assert "already exists" in out and "--overwrite" in out
    assert existing.read_text() == "keep me\n" and prompts.read_bytes() == before
    result = run("--model-uri", model_dir, "--input", str(prompts), "--output", str(existing), "--overwrite",
                 "--max-new-tokens", "1")
    assert result.exit_code == 0, result.output
    assert len(pd.read_csv(existing)) == 3


def test_batch_predict_never_replaces_an_existing_text_column(model_dir, tmp_path):
    source = tmp_path / "with_text.jsonl"
    pd.DataFrame({"prompt": PROMPTS, "text": ["a", "b", "c"]}).to_json(source, orient="records", lines=True)
    out = assert_clean(run("--model-uri", model_dir, "--input", str(source), "--output", str(tmp_path / "o.jsonl")))
    assert "already has a column 'text'" in out and "--output-column" in out
    result = run("--model-uri", model_dir, "--input", str(source), "--output", str(tmp_path / "o.jsonl"),
                 "--output-column", "answer", "--max-new-tokens", "1")
    assert result.exit_code == 0, result.output
    table = pd.read_json(tmp_path / "o.jsonl", lines=True)
    assert table["text"].tolist() == ["a", "b", "c"] and table["answer"].notna().all()


@pytest.mark.parametrize("target, expected", [
    ("/proc/loraflow-out.parquet", "does not accept files"),
    ("{file}/out.parquet", "is a file, not a folder"),
    ("{tmp}/out.txt", "must end in one of"),
    ("{tmp}", "is a directory"),
])
def test_batch_predict_checks_the_output_can_be_written_before_the_model_loads(prompts, tmp_path, monkeypatch,
                                                                              target, expected):
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "a-file").write_text("x")
    target = target.format(file=tmp_path / "a-file", tmp=tmp_path)
    out = assert_clean(run("--model-uri", "models:/never-looked-up@champion", "--input", str(prompts), "--output", target))
    assert expected in out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_batch_predict_refuses_a_read_only_folder_before_the_model_loads(prompts, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        out = assert_clean(run("--model-uri", "x", "--input", str(prompts), "--output", str(folder / "o.parquet")))
        assert "does not accept files" in out
    finally:
        folder.chmod(0o700)


def test_batch_predict_names_bad_model_uris_before_loading(prompts, tmp_path, tracking_uri, models_in_registry):
    out_path = str(tmp_path / "o.parquet")

    def error(uri: str) -> str:
        return assert_clean(run("--model-uri", uri, "--input", str(prompts), "--output", out_path))

    assert "no registered model 'nope'" in error("models:/nope@champion") and "bp-lora" in error("models:/nope/1")
    out = error("models:/bp-lora/99")
    assert "has no version '99'" in out and "its versions are 1" in out
    assert "has no alias @gold" in error("models:/bp-lora@gold")
    assert "has no versions yet" in error("models:/bp-empty@champion")
    assert "is not a model URI nor an existing folder" in error("not a uri")
    assert "no run 'abc'" in error("runs:/abc/model")
    assert not Path(out_path).exists()


@pytest.fixture
def models_in_registry(tracking_uri, model_dir):
    from mlflow import MlflowClient

    client = MlflowClient()
    with mlflow.start_run():
        mlflow.log_artifacts(model_dir, "model")
        uri = f"runs:/{mlflow.active_run().info.run_id}/model"
    mlflow.register_model(uri, "bp-lora")
    client.create_registered_model("bp-empty")
    return client


def test_batch_predict_names_bad_inputs_and_options(model_dir, tmp_path):
    empty = tmp_path / "empty.parquet"
    pd.DataFrame({"prompt": pd.Series([], dtype=str)}).to_parquet(empty)
    numbers = tmp_path / "numbers.parquet"
    pd.DataFrame({"prompt": [1, 2]}).to_parquet(numbers)
    out = str(tmp_path / "o.parquet")
    assert "has no rows" in assert_clean(run("--model-uri", model_dir, "--input", str(empty), "--output", out))
    text = assert_clean(run("--model-uri", model_dir, "--input", str(numbers), "--output", out))
    assert "must hold text prompts" in text and "int" in text
    for option, value in (("--max-new-tokens", "0"), ("--max-new-tokens", "100000"), ("--seed", "-1"),
                          ("--seed", str(2**64)), ("--seed", "1" * 400)):
        text = assert_clean(run("--model-uri", model_dir, "--input", str(numbers), "--output", out, f"{option}={value}"))
        assert option in text


@pytest.mark.timeout(150)  # MLflow's default retries would take over 4 minutes; loraflow makes none
def test_batch_predict_fails_within_seconds_when_the_tracking_server_is_down(prompts, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    proc = subprocess.run([sys.executable, "-m", "loraflow", "batch-predict", "--model-uri", "models:/m@champion",
                           "--input", str(prompts), "--output", str(tmp_path / "o.parquet")],
                          env=env_with_venv(MLFLOW_TRACKING_URI=url), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{url} cannot be reached" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.timeout(60)  # MLflow's default retries would take over 4 minutes; loraflow makes none
def test_batch_predict_gives_up_on_a_dead_tracking_server_without_retrying(prompts, tmp_path, monkeypatch):
    from loraflow.predict import predict_table
    from loraflow.tracking import TrackingUnreachable

    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    mlflow.set_tracking_uri(url)
    try:
        with pytest.raises(TrackingUnreachable, match="cannot be reached"):
            predict_table("models:/m@champion", prompts, tmp_path / "o.parquet")
    finally:
        mlflow.set_tracking_uri(None)


@pytest.mark.slow
@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_batch_predict_keeps_finished_rows_when_interrupted_and_resume_completes_them(model_dir, tmp_path, signame,
                                                                                     code, caplog):
    source = tmp_path / "many.jsonl"
    rows = 300
    pd.DataFrame({"prompt": [f"Question: what is {i}?\nAnswer:" for i in range(rows)]}).to_json(
        source, orient="records", lines=True)
    out = tmp_path / "out.jsonl"
    partial = tmp_path / "out.jsonl.partial"
    command = [sys.executable, "-m", "loraflow", "batch-predict", "--model-uri", model_dir, "--input", str(source),
               "--output", str(out), "--max-new-tokens", "8", "--chunk-rows", "4"]
    # as from a terminal: a shell's background job (`pytest ... &`) would start it with SIGINT ignored
    proc = subprocess.Popen(command, env=env_with_venv(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and len(list(partial.glob("rows-*.jsonl"))) < 2:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(getattr(signal, signame))
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr[-3000:]
    assert f"interrupted by {signame}" in stderr
    assert str(partial) in stderr and "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists()
    kept = len(list(partial.glob("rows-*.jsonl")))
    assert kept >= 2

    # the interrupted process is the real one; the rerun and the resume run in process (same command)
    refused = run(*command[4:])
    assert refused.exit_code == 2 and "--resume" in refused.stderr  # partial results are not discarded silently
    caplog.set_level("INFO", logger="loraflow")
    resumed = run(*command[4:], "--resume")
    assert resumed.exit_code == 0, resumed.output[-3000:] + repr(resumed.exception)
    assert f"({kept * 4} already done)" in caplog.text or "already done" in caplog.text
    table = pd.read_json(out, lines=True)
    assert len(table) == rows and table["text"].notna().all() and not partial.exists()


def test_resume_refuses_partial_results_made_from_another_input(model_dir, prompts, tmp_path):
    out = tmp_path / "o.jsonl"
    partial = tmp_path / "o.jsonl.partial"
    partial.mkdir()
    (partial / "rows-000000000-000000000.jsonl").write_text('{"row": 0, "prompt": "something else", "text": "x"}\n')
    text = assert_clean(run("--model-uri", model_dir, "--input", str(prompts), "--output", str(out), "--resume"))
    assert "made from another input (row 0 differs)" in text and "--overwrite" in text
    assert (partial / "rows-000000000-000000000.jsonl").exists() and not out.exists()


def test_resume_with_spark_is_refused(model_dir, prompts, tmp_path):
    from loraflow.errors import ConfigError
    from loraflow.predict import predict_table

    with pytest.raises(ConfigError, match="in-process prediction only"):
        predict_table(model_dir, prompts, tmp_path / "o.parquet", spark=object(), resume=True)


# ---------------------------------------------------------------------------------------------
# Chat models (issue 17): a `messages` column in, the assistant's reply out.

@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory, tiny_path, tiny_tokenizer) -> str:
    return save_chat_model(tmp_path_factory.mktemp("bp-chat") / "model", tiny_path, tiny_tokenizer)


def chat_replies(model_dir: str, max_tokens: int) -> list[str]:
    model = mlflow.pyfunc.load_model(model_dir)
    return [model.predict({"messages": chat, "max_tokens": max_tokens})["choices"][0]["message"]["content"]
            for chat in CHATS]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_batch_predict_answers_a_messages_column_with_each_chat_reply(chat_model_dir, tmp_path, suffix):
    source = tmp_path / f"chats{suffix}"
    table = pd.DataFrame({"id": [1, 2, 3], "messages": CHATS})
    table.to_parquet(source) if suffix == ".parquet" else table.to_json(source, orient="records", lines=True)
    out = tmp_path / "replies.jsonl"
    result = run("--model-uri", chat_model_dir, "--input", str(source), "--output", str(out), "--max-new-tokens", "4",
                 "--chunk-rows", "2")
    assert result.exit_code == 0, result.output + repr(result.exception)
    written = pd.read_json(out, lines=True)
    assert written.columns.tolist() == ["id", "messages", "text"] and written["id"].tolist() == [1, 2, 3]
    assert written["text"].tolist() == chat_replies(chat_model_dir, 4)


def test_batch_predict_resumes_a_chat_job_from_its_kept_rows(chat_model_dir, tmp_path):
    source = tmp_path / "chats.jsonl"
    pd.DataFrame({"conversation": CHATS}).to_json(source, orient="records", lines=True)
    out = tmp_path / "o.jsonl"
    partial = tmp_path / "o.jsonl.partial"
    partial.mkdir()
    kept = json.dumps({"row": 0, "prompt": CHATS[0], "text": "kept reply"})
    (partial / "rows-000000000-000000000.jsonl").write_text(kept + "\n")
    result = run("--model-uri", chat_model_dir, "--input", str(source), "--output", str(out), "--messages-column",
                 "conversation", "--max-new-tokens", "4", "--resume")
    assert result.exit_code == 0, result.output + repr(result.exception)
    texts = pd.read_json(out, lines=True)["text"].tolist()
    assert texts == ["kept reply", *chat_replies(chat_model_dir, 4)[1:]] and not partial.exists()


def test_batch_predict_checks_conversations_and_the_task_before_the_chat_model_loads(chat_model_dir, model_dir,
                                                                                     prompts, tmp_path, monkeypatch):
    monkeypatch.setattr(mlflow.pyfunc, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    bad = tmp_path / "bad.jsonl"
    pd.DataFrame({"messages": [CHATS[0], [{"role": "wizard", "content": "hi"}], "not a list"]}).to_json(
        bad, orient="records", lines=True)
    out = str(tmp_path / "o.jsonl")
    text = assert_clean(run("--model-uri", chat_model_dir, "--input", str(bad), "--output", out))
    assert "2 of 3 conversations are not valid" in text and "'wizard'" in text and "rows" in text
    text = assert_clean(run("--model-uri", chat_model_dir, "--input", str(prompts), "--output", out))
    assert "is a chat model" in text and "--messages-column" in text
    chats = tmp_path / "chats.jsonl"
    pd.DataFrame({"messages": CHATS}).to_json(chats, orient="records", lines=True)
    text = assert_clean(run("--model-uri", model_dir, "--input", str(chats), "--output", out))
    assert "is a completion model" in text and "--prompt-column" in text
    text = assert_clean(run("--model-uri", chat_model_dir, "--input", str(chats), "--output", out,
                            "--repetition-penalty", "1.2"))
    assert "--repetition-penalty" in text and "chat model" in text
    assert not Path(out).exists()
