"""The bundled data (scripts/make_sample_data.py): reproducible, and held-out facts stay unseen.

The built-in model learns facts only in pre-training, from prose; fine-tuning shows the question
format. So a seeded split of either sample must leave its eval answers out of the training rows,
and the corpus must hold no question/answer or chat text.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from loraflow import data

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ROOT / "src" / "loraflow" / "resources"


def load_script():
    spec = importlib.util.spec_from_file_location("make_sample_data", ROOT / "scripts" / "make_sample_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_the_script_reproduces_the_committed_files_byte_for_byte(tmp_path, monkeypatch):
    script = load_script()
    monkeypatch.setattr(script, "OUT", tmp_path)
    script.main()
    for name in ("corpus.txt", "sample.jsonl", "chat.jsonl"):
        assert (tmp_path / name).read_bytes() == (RESOURCES / name).read_bytes(), name


def test_one_question_per_fact_and_every_answer_is_in_the_corpus():
    rows = read_jsonl(RESOURCES / "sample.jsonl")
    corpus = set((RESOURCES / "corpus.txt").read_text(encoding="utf-8").splitlines())
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts) == len(load_script().facts())
    for row in rows:
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
        assert row["completion"].startswith(" ")
        assert row["completion"].strip() in corpus  # known from pre-training, as a sentence of its own


def test_the_corpus_has_no_question_answer_or_chat_text():
    corpus = (RESOURCES / "corpus.txt").read_text(encoding="utf-8")
    for marker in ("Question:", "Answer:", "?", "<|", "|>", "assistant", "user\n", "system"):
        assert marker not in corpus, marker


@pytest.mark.parametrize("seed", [0, 42, 7])
def test_a_seeded_split_of_the_qa_sample_leaves_eval_facts_unseen(seed):
    table = data.load_examples(data.SAMPLE_DATA, data.Columns(prompt="prompt", completion="completion"))
    train, evaluation = (part.frame for part in data.split_examples(table, 0.1, seed))
    assert not set(evaluation["prompt"]) & set(train["prompt"])
    assert not set(evaluation["completion"]) & set(train["completion"])


@pytest.mark.parametrize("seed", [0, 42, 7])
def test_a_seeded_split_of_the_chat_sample_leaves_eval_answers_unseen(seed):
    import numpy as np

    rows = read_jsonl(RESOURCES / "chat.jsonl")
    assert any(len(r["messages"]) > 3 for r in rows) and any(r["messages"][0]["role"] == "system" for r in rows)
    for row in rows:
        roles = [m["role"] for m in row["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles
    order = np.random.default_rng(seed).permutation(len(rows))
    n_eval = max(1, round(0.1 * len(rows)))
    evaluation, train = [rows[i] for i in order[:n_eval]], [rows[i] for i in order[n_eval:]]

    def said(rows, role):
        return {m["content"] for r in rows for m in r["messages"] if m["role"] == role}

    assert not said(evaluation, "assistant") & said(train, "assistant")
    assert not said(evaluation, "user") & said(train, "user")
