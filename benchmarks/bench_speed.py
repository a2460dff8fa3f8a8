"""Each training speed trick of `loraflow.speed` against the same step with that trick off.

One training step (forward and backward, the optimizer step held back) of `loraflow.train.FineTune.train_step` on
a real model, SmolLM2-135M-Instruct in fp32 (`benchmarks/bench_real.py`'s copy), LoRA r=16 with
dropout 0.05 on every linear layer, on loraflow's first length-grouped batch of 8 of
`bench_chat`'s conversations. In one process, so that the sides share the model and the batch:
each round times every side once, in an order that turns over from round to round, and
`LORAFLOW_DISABLE` names the trick a side turns off. Reported: the median seconds per step, and the
ratio of the trick-off step to the all-on step (above 1: the trick saves time).

Not here: `heap_trim` (quantized training only: `benchmarks/bench_qlora.py` measures it) and the
tricks of the shipped code (generation and loading: `bench_infer.py`, `bench_qlora.py`).

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_speed [--repeats 5]

Writes benchmarks/speed_results.json and benchmarks/speed_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks import bench_chat, bench_real, bench_train, common, fixtures

HERE = Path(__file__).resolve().parent
SIDES = {"all on": "", "head_at_labels off": "head_at_labels", "cpu_dropout off": "cpu_dropout",
         "cpu_micro_batches off": "cpu_micro_batches"}


def first_batch(root: Path, pad_token_id: int) -> dict:
    """loraflow's first training batch of the chat files (length-grouped, seed 42)."""
    from loraflow import data as data_lib

    ids, labels = bench_chat.loraflow_tokens(root, "train")
    loader = data_lib.make_dataloader(data_lib.TokenizedExamples(ids, labels), bench_real.BATCH,
                                      pad_token_id=pad_token_id, shuffle=True, seed=42)
    return next(iter(loader))


def step_recipe(model, tokenizer):
    """loraflow's recipe set up on `model` with its optimizer step held back: a step is a forward and backward."""
    from accelerate import Accelerator

    from loraflow import data as data_lib
    from loraflow import tracking, train
    from loraflow.config import TrainSettings

    recipe = train.FineTune(TrainSettings.from_flat(max_grad_norm=0.0))
    examples = data_lib.TokenizedExamples([[tokenizer.eos_token_id]], [[-100]])
    recipe.setup(Accelerator(cpu=True), tracking.RunLogger(None, enabled=False), model, tokenizer, examples, examples)
    recipe.optimizer.step = lambda *args, **kwargs: None
    return recipe


def timed_step(recipe, batch: dict, disable: str) -> float:
    """Seconds of one forward and backward with `disable` turned off (as `FineTune` runs it on CPU)."""
    import torch

    from loraflow import speed
    from loraflow.train import micro_batch_budget

    os.environ[speed.ENV] = disable
    cpu = torch.device("cpu")
    recipe.model.zero_grad(set_to_none=True)
    recipe.budget = micro_batch_budget(0, cpu)
    with speed.cpu_dropout(recipe.model, cpu):
        started = time.perf_counter()
        recipe.train_step(batch)
        return time.perf_counter() - started


def run(root: Path, repeats: int, log) -> tuple[dict[str, list[float]], dict]:
    """Seconds per step of every side, by side, and the batch they stepped on."""
    from loraflow.config import lora_settings
    from loraflow.flavor.bases import load_base_model, load_tokenizer
    from loraflow.lora import apply_lora

    work = fixtures.load_workload(root)
    tokenizer = load_tokenizer(str(root / "base"))
    model = apply_lora(load_base_model(str(root / "base")), lora_settings(bench_train._lora_values(work))).train()
    batch = first_batch(root, tokenizer.pad_token_id)
    recipe = step_recipe(model, tokenizer)
    timed_step(recipe, batch, "")  # warm-up: allocator, thread pool
    times: dict[str, list[float]] = {name: [] for name in SIDES}
    names = list(SIDES)
    for i in range(repeats):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(timed_step(recipe, batch, SIDES[name]))
            log(f"    round {i + 1}/{repeats} {name}: {times[name][-1]:.2f}s")
    return times, batch


def report(times: dict[str, list[float]], batch_shape: dict, command: str, load: tuple[float, float]) -> dict:
    from loraflow import speed

    base = common.median(times["all on"])
    rows = []
    for name, values in times.items():
        trick = SIDES[name]
        rows.append({"side": name, "median_s": common.median(values), "runs_s": values,
                     "off_over_on": common.median(values) / base if trick else 1.0,
                     "reason": speed.TRICKS.get(trick, "every trick on")})
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
            "machine": common.machine_info(), "versions": common.versions(), "load_average": list(load),
            "batch": batch_shape, "rows": rows}


def markdown(doc: dict) -> str:
    versions = ", ".join(f"{k} {v}" for k, v in doc["versions"].items())
    machine = doc["machine"]
    lines = [
        "# Training speed tricks, each against the same step with it off", "",
        f"Command: `{doc['command']}` ({doc['date']}; 1-minute load average {doc['load_average'][0]:.1f} at the "
        f"start, {doc['load_average'][1]:.1f} at the end).", "",
        f"Machine: {machine['cpu']}, {machine['logical cores']} logical cores, {machine['memory']}, torch threads "
        f"{machine['torch threads']}. Versions: {versions}.", "",
        f"One forward and backward of SmolLM2-135M-Instruct (fp32, LoRA r=16, dropout 0.05, every linear layer) on "
        f"loraflow's first batch of 8 chat conversations: {doc['batch']['rows']} rows of up to "
        f"{doc['batch']['width']} tokens, {doc['batch']['real_tokens']:,} real tokens of which "
        f"{doc['batch']['label_tokens']:,} are label tokens. Sides alternate in one process "
        f"(`benchmarks/bench_speed.py`).", "",
        "| side | median s per step | off / on | what the trick does |", "|---|---:|---:|---|",
    ]
    for row in doc["rows"]:
        ratio = "-" if row["side"] == "all on" else f"{row['off_over_on']:.2f}x"
        lines.append(f"| {row['side']} | {row['median_s']:.2f} | {ratio} | {row['reason']} |")
    lines += ["", "Runs (s): " + "; ".join(f"{r['side']}: " + ", ".join(f"{v:.2f}" for v in r["runs_s"])
                                          for r in doc["rows"]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=common.positive_int, default=5, help="rounds (each times every side once)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    command = "python -m benchmarks.bench_speed " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    began, load = time.perf_counter(), os.getloadavg()[0]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="loraflow-bench-speed-") as tmp:
        root = Path(tmp)
        bench_real.build(root, 1)
        bench_chat.write_data(root)
        times, batch = run(root, args.repeats, log)
    mask = batch["attention_mask"]
    shape = {"rows": int(mask.shape[0]), "width": int(mask.shape[1]), "real_tokens": int(mask.sum()),
             "label_tokens": int((batch["labels"][:, 1:] != -100).sum())}
    doc = report(times, shape, command.strip(), (load, os.getloadavg()[0]))
    (HERE / "speed_results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (HERE / "speed_results.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
