"""Helpers shared by the data tests: small tables and traceable examples."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loraflow.data import Columns, TokenizedExamples

PC = Columns(prompt="prompt", completion="completion")
TEXT = Columns(text="text")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sample_rows(n: int = 6) -> list[dict]:
    return [{"prompt": f"Question: what is {i}?\nAnswer:", "completion": f" It is {i}."} for i in range(n)]


def fake_examples(lengths: list[int]) -> TokenizedExamples:
    """Examples whose ids encode their own index, so batches can be traced back to them."""
    ids = [[1] + [10 + i] * (n - 1) for i, n in enumerate(lengths)]
    return TokenizedExamples(ids, [[-100] + row[1:] for row in ids], 0, 0)


def example_index(row: torch.Tensor) -> int:
    return int(row[1]) - 10

