"""1. Training throughput, and 2. hardware efficiency: loraflow's `train.FineTune` against transformers.Trainer.

Both sides, each in a fresh process: the same saved random Llama, the same token ids (one epoch,
so both process exactly the same real tokens), LoRA r/alpha/dropout/targets, batch size, optimizer
steps, peak learning rate, warmup + cosine schedule, gradient clipping and seed.

- loraflow: `loraflow.lora.apply_lora` + `loraflow.train.FineTune` (its `make_dataloader`, length-grouped
  batches, accelerate), tracking off (`RunLogger(enabled=False)`).
- baseline: the canonical recipe, `peft.get_peft_model` + `transformers.Trainer` +
  `DataCollatorForLanguageModeling(mlm=False)` (dynamic padding, right side), logging off.

Timed window: from the first optimizer step's start to the last one's end (loraflow: after its
step-0 evaluation until its last per-step record; Trainer: `on_train_begin` to the last
`on_step_end`). Eval loss is then computed by the same function for both (token-weighted mean
over the fixed eval set).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from benchmarks import common, fixtures


def _lora_values(work: fixtures.Workload) -> dict[str, Any]:
    return {"r": work.r, "lora_alpha": work.lora_alpha, "lora_dropout": 0.05, "target_modules": list(work.target_modules)}


def eval_loss(model, examples: list[list[int]], pad_token_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean next-token loss over `examples` (BOS never a target), in file order."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(examples), batch_size):
            rows = examples[s : s + batch_size]
            width = max(map(len, rows))
            ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            labels = ids.masked_fill(mask == 0, -100)
            n = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * n
            count += n
    return total / count


def flops_per_run(work: fixtures.Workload, vocab: int, lengths: list[int]) -> dict[str, float]:
    """Model FLOPs of one epoch over `lengths`, with the formula stated in RESULTS.md.

    Per token: 4 x N_frozen (forward 2 + input-gradient 2; no weight gradient) + 6 x N_trainable,
    where N counts matmul weights only (every Linear + the tied lm_head; the embedding lookup is
    free). Per sequence of T tokens, causal attention adds 6 x L x d x T^2 (QK^T and AV: 4 T^2 d
    forward without the mask, halved by causality, x3 for forward + backward).
    """
    d, i, layers = work.hidden_size, work.intermediate_size, work.num_layers
    n_frozen = layers * (4 * d * d + 3 * d * i) + vocab * d
    n_trainable = layers * len(work.target_modules) * work.r * (d + d)
    tokens = sum(lengths)
    dense = (4 * n_frozen + 6 * n_trainable) * tokens
    attention = sum(6 * layers * d * t * t for t in lengths)
    return {"n_frozen": n_frozen, "n_trainable": n_trainable, "tokens": tokens, "flops": dense + attention,
            "attention_share": attention / (dense + attention)}


def padding_spread(work: fixtures.Workload, draws: int = 2000) -> dict[str, float]:
    """How much padding random batching computes for this workload's length distribution.

    Simulates `draws` fresh datasets (lengths uniform in [min_len, max_len], as `fixtures.build`
    draws them) shuffled into batches of `batch_size`, each padded to its longest example, as the
    baseline's collator does. Returns the median and 5th/95th percentiles of computed / real tokens:
    the speed-up that skipping all padding gives over such a baseline at equal time per token.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    usable = work.train_examples - work.train_examples % work.batch_size
    ratios = []
    for _ in range(draws):
        lengths = rng.integers(work.min_len, work.max_len + 1, usable)
        batches = rng.permutation(lengths).reshape(-1, work.batch_size)
        ratios.append(batches.max(axis=1).sum() * work.batch_size / lengths.sum())
    p5, median, p95 = np.percentile(ratios, [5, 50, 95])
    return {"median": float(median), "p5": float(p5), "p95": float(p95)}


def _workload(root: Path, seed: int | None) -> fixtures.Workload:
    work = fixtures.load_workload(root)
    return work if seed is None else dataclasses.replace(work, seed=seed)


class _TimingRunLogger:
    """A tracking-off RunLogger that also notes when the loop starts and its last step ends."""

    def __init__(self, inner):
        self.inner, self.run_id, self.start, self.end = inner, inner.run_id, None, None

    def log_metrics(self, metrics, step):
        now = time.perf_counter()
        if "eval_loss" in metrics and step == 0:
            self.start = now  # step-0 evaluation done: the loop starts now
        if "train_loss" in metrics:
            self.end = now
        self.inner.log_metrics(metrics, step)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def loraflow_side(root: str, tracking_uri: str | None = None, measure_peak: bool = True,
                  save_adapter: bool = False, seed: int | None = None) -> dict[str, Any]:
    """Train with loraflow's own loop; `tracking_uri` logs every step to that MLflow store.

    With `save_adapter`, the trained adapter goes to `<root>/adapter` (benchmarks 3 and 4 use it).
    `seed` replaces the workload's seed (LoRA init, batch order, dropout masks).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from loraflow import data as data_lib
    from loraflow import tracking, train
    from loraflow.config import lora_settings, TrainSettings
    from loraflow.lora import apply_lora
    from loraflow.flavor.bases import load_base_model, load_tokenizer

    root_path = Path(root)
    work, data = _workload(root_path, seed), fixtures.load_data(root_path)
    settings = TrainSettings.from_flat(
        base_model=str(root_path / "base"), max_seq_length=work.max_len, max_steps=work.steps,
        batch_size=work.batch_size, learning_rate=work.learning_rate, warmup_ratio=work.warmup_ratio,
        eval_steps=10**6, seed=work.seed, precision="fp32", output_dir=str(root_path / "out"),
    )
    accelerator = Accelerator(mixed_precision="no")
    set_seed(work.seed)
    tokenizer = load_tokenizer(settings.model.base_model)
    model = apply_lora(load_base_model(settings.model.base_model), lora_settings(_lora_values(work)))

    def examples(rows):
        return data_lib.TokenizedExamples(rows, [[-100] + r[1:] for r in rows])

    # no tables: both sides get the same token ids
    train_examples, eval_examples = examples(data["train"]), examples(data["eval"])
    store_setup_s = None
    if tracking_uri:  # imported outside the clock, and only here: the untracked side never loads mlflow
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
        # One-off per process, not per run: importing MLflow's SQL store and opening the database.
        # Timed here and reported on its own, outside the per-run overhead.
        setup_started = time.perf_counter()
        mlflow.search_experiments(max_results=1)
        store_setup_s = time.perf_counter() - setup_started
    started = time.perf_counter()
    if tracking_uri:
        with tracking.RunLogger.start(enabled=True) as run:
            timing = _TimingRunLogger(run)
            _train(settings, accelerator, timing, model, tokenizer, train_examples, eval_examples)
    else:
        timing = _TimingRunLogger(tracking.RunLogger(None, enabled=False))
        _train(settings, accelerator, timing, model, tokenizer, train_examples, eval_examples)
    wall = time.perf_counter() - started
    model = accelerator.unwrap_model(model)
    # measured after training, so its 2048x2048 buffers never raise this side's peak RSS
    peak = common.matmul_flops() if measure_peak else None
    if save_adapter:
        model.save_pretrained(str(root_path / "adapter"))
    return {
        "train_s": timing.end - timing.start,
        "wall_s": wall,
        "store_setup_s": store_setup_s,
        "tokens": sum(map(len, data["train"])),
        "computed_tokens": _computed_tokens(train_examples, settings, tokenizer.pad_token_id, accelerator.device),
        "eval_loss": eval_loss(model, data["eval"], tokenizer.pad_token_id),
        "matmul_flops": peak,
        "torch_threads": torch.get_num_threads(),
    }


def _train(settings, accelerator, run, model, tokenizer, train_examples, eval_examples) -> None:
    """loraflow's recipe, as `run_training` runs it: set up, then train."""
    from loraflow import train

    recipe = train.FineTune(settings)
    recipe.setup(accelerator, run, model, tokenizer, train_examples, eval_examples)
    recipe.train()


def _computed_tokens(examples, settings, pad_token_id: int, device) -> int:
    """Tokens `FineTune` made the model compute in its first epoch, padding included: the same batches
    (same seed) cut into the same micro-batches."""
    from loraflow import data as data_lib
    from loraflow.train import micro_batch_budget

    budget = micro_batch_budget(settings.optim.micro_batch_tokens, device)
    loader = data_lib.make_dataloader(examples, settings.optim.batch_size, pad_token_id=pad_token_id, shuffle=True,
                                      seed=settings.optim.seed)
    return sum(p["input_ids"].numel() for b in loader for p in (data_lib.split_batch(b, budget) if budget else [b]))


def baseline_side(root: str, seed: int | None = None) -> dict[str, Any]:
    """Train with the canonical transformers.Trainer + peft recipe (`seed` as in `loraflow_side`)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM, AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainerCallback,
        TrainingArguments, set_seed,
    )

    root_path = Path(root)
    work, data = _workload(root_path, seed), fixtures.load_data(root_path)
    base = str(root_path / "base")
    set_seed(work.seed)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "right"  # the usual choice for causal-LM training
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(task_type="CAUSAL_LM", **_lora_values(work)))

    class Timer(TrainerCallback):
        start = end = None

        def on_train_begin(self, args, state, control, **kw):
            Timer.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            Timer.end = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(root_path / "trainer-out"), per_device_train_batch_size=work.batch_size,
        max_steps=work.steps, learning_rate=work.learning_rate, warmup_steps=work.warmup_ratio,
        lr_scheduler_type="cosine", weight_decay=0.0, max_grad_norm=1.0, seed=work.seed,
        logging_strategy="no", save_strategy="no", eval_strategy="no", report_to="none",
        disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
    )
    dataset = [{"input_ids": ids} for ids in data["train"]]
    pad_to_longest = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm=False)
    computed = []  # tokens each batch makes the model compute, padding included

    def collator(features):
        batch = pad_to_longest(features)
        computed.append(batch["input_ids"].numel())
        return batch

    trainer = Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator, callbacks=[Timer()])
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    return {
        "train_s": Timer.end - Timer.start,
        "wall_s": wall,
        "tokens": sum(map(len, data["train"])),
        "computed_tokens": sum(computed[: work.steps]),  # the Trainer may collate one batch ahead
        "eval_loss": eval_loss(model, data["eval"], tokenizer.pad_token_id),
        "torch_threads": torch.get_num_threads(),
    }


def run(root: Path, repeats: int, log=print) -> dict[str, Any]:
    """Alternate the two sides `repeats` times; medians, ratios and the efficiency figure.

    Round i runs both sides with seed `work.seed + i`: the final eval loss of one seed varies by a
    few percent from seed to seed (more than the 2% target), and so does the padding of the
    baseline's random batches, so each side's median is over as many seeds as rounds.
    """
    work = fixtures.load_workload(root)
    data = fixtures.load_data(root)
    samples = common.alternate(
        {
            "loraflow": lambda i: common.run_child(
                "bench_train", "loraflow_side", {"root": str(root), "save_adapter": i == 0, "seed": work.seed + i}),
            "baseline": lambda i: common.run_child(
                "bench_train", "baseline_side", {"root": str(root), "seed": work.seed + i}),
        },
        repeats,
        log,
    )
    out: dict[str, Any] = {"samples": samples, "workload": work}
    for side, rows in samples.items():
        out[side] = {
            "tokens_per_s": common.median([r["tokens"] / r["train_s"] for r in rows]),
            "peak_rss_mib": common.median([r["peak_rss_mib"] for r in rows]),
            "eval_loss": common.median([r["eval_loss"] for r in rows]),
            "train_s": common.median([r["train_s"] for r in rows]),
            "computed_tokens": common.median([r["computed_tokens"] for r in rows]),
            "eval_loss_range": (min(r["eval_loss"] for r in rows), max(r["eval_loss"] for r in rows)),
            "us_per_computed_token": common.median([1e6 * r["train_s"] / r["computed_tokens"] for r in rows]),
        }
    from loraflow.flavor.bases import load_tokenizer

    vocab = len(load_tokenizer(str(root / "base")))
    flops = flops_per_run(work, vocab, [len(r) for r in data["train"]])
    rows = samples["loraflow"]
    out["flops"] = flops
    out["efficiency"] = common.median([flops["flops"] / r["train_s"] / r["matmul_flops"] for r in rows])
    out["achieved_flops"] = common.median([flops["flops"] / r["train_s"] for r in rows])
    out["matmul_flops"] = common.median([r["matmul_flops"] for r in rows])
    out["efficiency_each"] = [flops["flops"] / r["train_s"] / r["matmul_flops"] for r in rows]
    out["padding_spread"] = padding_spread(work)
    out["padding_spread_12_steps"] = padding_spread(dataclasses.replace(work, train_examples=12 * work.batch_size))
    return out
