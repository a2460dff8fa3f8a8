"""What the terminal shows: log lines that name their source, and a finished run's summary, with
answers before and after."""

from __future__ import annotations

import logging
from typing import Any

EXAMPLES = 3  # held-out questions shown with their answers before and after fine-tuning


def _name_source(record: logging.LogRecord) -> bool:
    """Tag a log line with where it comes from: `[loraflow]` is ours, `[bitsandbytes]` is not."""
    record.source = "loraflow" if record.name.startswith("loraflow") else record.name.split(".")[0]
    return True


def configure_logging() -> None:
    """INFO and up on stderr as `[source] LEVEL message`; chatty client libraries at WARNING."""
    handler = logging.StreamHandler()
    handler.addFilter(_name_source)
    handler.setFormatter(logging.Formatter("[%(source)s] %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for noisy in ("httpx", "urllib3", "alembic", "mlflow.store"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def print_summary(result: Any) -> None:
    """Print the run's summary (`result` is a `train.TrainResult`): ids, eval loss and exact match
    before -> after, a few held-out answers, how to load the model, and what to do when tracking failed."""
    change = f"{result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}"
    lines = ["", "loraflow: training finished", f"  run id:       {result.run_id}", f"  eval loss:    {change}"]
    em = result.history.get("eval_exact_match") or []
    if em:
        lines.append(f"  exact match:  {em[0][1]:.2f} -> {em[-1][1]:.2f} (held-out eval answers, greedy)")
        lines += _examples(result.samples)
    if result.model_uri:
        lines += [
            f"  model URI:    {result.model_uri}",
            "  load it:",
            f"    mlflow.pyfunc.load_model({result.model_uri!r}).predict(...)",
            f"    model, tokenizer = loraflow.flavor.load_model({result.model_uri!r}, is_trainable=True)",
        ]
    if result.local_model_dir:
        lines.append(f"  NOT logged to MLflow; the model is saved at {result.local_model_dir}")
        lines.append(f"  log it later with: loraflow upload {result.local_model_dir}")
    if not result.ok:
        lines.append("  some tracking calls failed: see the warnings above")
        if result.checkpoint_dir:
            lines.append(f"  checkpoints: {result.checkpoint_dir}")
    print("\n".join(lines), flush=True)


def _examples(samples: list[dict[str, Any]]) -> list[str]:
    """Before/after/expected for the first few held-out questions (the first and last evaluation)."""
    if not samples:
        return []
    first, last = min(r["step"] for r in samples), max(r["step"] for r in samples)
    before = [r for r in samples if r["step"] == first][:EXAMPLES]
    after = {r["prompt"]: r["generated"] for r in samples if r["step"] == last}
    lines = ["  held-out questions (before -> after fine-tuning; expected):"]
    for row in before:
        question = " ".join(str(row["prompt"]).split())
        lines += [f"    {question}", f"      before:   {row['generated'].strip()!r}",
                  f"      after:    {after.get(row['prompt'], '').strip()!r}", f"      expected: {row['expected'].strip()!r}"]
    return lines
