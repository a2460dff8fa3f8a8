"""Run every loraflow benchmark and write benchmarks/RESULTS.md.

    python benchmarks/run.py            # the full run (about 15 minutes on 2 idle CPU cores)
    python benchmarks/run.py --quick    # a smoke run: tiny model, 1 repeat (not a result)
    python benchmarks/run.py --only chat  # chat training vs TRL, chat pyfunc vs raw generate (needs '.[bench]')

Benchmarks are measurements, not tests: nothing here asserts a time. Each comparison runs both
sides in this one invocation, alternating, each side in a fresh process, and reports medians and
the ratio of medians (absolute times on a shared machine are noisy; the ratios are what counts).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (  # noqa: E402
    bench_chat, bench_infer, bench_real, bench_serving, bench_size, bench_tracking, bench_train, chat_results, common,
    fixtures,
)

TARGETS = {"throughput": 1.5, "efficiency": 0.40, "inference": 3.0, "size": 1.1, "tracking": 0.03, "loss": 0.02,
           **chat_results.TARGETS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repeat: checks the harness only")
    parser.add_argument("--repeats", type=common.positive_int, default=None, help="rounds per comparison (default 3; quick: 1)")
    parser.add_argument("--only", default="train,infer,size,tracking,serving,chat", help="comma-separated subset")
    parser.add_argument("--output", default=str(common.BENCH_DIR / "RESULTS.md"))
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    only = set(args.only.split(","))
    if "chat" in only:
        bench_chat.require_trl()  # before anything runs
    work = fixtures.Workload.quick() if args.quick else fixtures.Workload.full()
    command = "python benchmarks/run.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    began = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as tmp:
        root = Path(tmp)
        os.environ["HF_HUB_CACHE"] = str(root / "hub")  # the offline "Hub" the children read
        log(f"building the workload in {root}")
        fixtures.build(root, work)
        results = {}
        if "train" in only:
            log("1-2. training throughput and hardware efficiency")
            results["train"] = bench_train.run(root, repeats, log)
        if "infer" in only:
            log("3. inference")
            results["infer"] = bench_infer.run(root, repeats, log)
        if "size" in only:
            log("4. artifact size")
            results["size"] = bench_size.run(root, log)
        if "tracking" in only:
            log("5. tracking overhead")
            results["tracking"] = bench_tracking.run(root, repeats, log)
        if "serving" in only:
            log("serving under concurrent clients")
            os.environ.update(common.CHILD_ENV)  # offline, as every child runs
            results["serving"] = bench_serving.run(quick=args.quick)
        if "chat" in only:
            log("chat: training against TRL's SFTTrainer, pyfunc against raw generate")
            results["chat"] = bench_chat.run(root, repeats, log)
    elapsed = time.perf_counter() - began
    text = render(results, work, repeats, command, elapsed, quick=args.quick)
    Path(args.output).write_text(text)
    bench_real.write_results_section(Path(args.output))  # kept from benchmarks/real_results.json, if written
    log(f"wrote {args.output}")
    print(text)


# ---------------------------------------------------------------------------------------------
# RESULTS.md


def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def render(results: dict, work: fixtures.Workload, repeats: int, command: str, elapsed: float, quick: bool) -> str:
    machine, versions = common.machine_info(), common.versions()
    lines = ["# loraflow benchmark results", ""]
    if quick:
        lines += ["> **Smoke run (`--quick`)**: a tiny model and one repeat; these numbers are not results.", ""]
    lines += [
        f"Command: `{command}` (run from the repository root; took {elapsed / 60:.1f} min, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC).",
        "",
        "Every comparison ran both sides in this one invocation, alternating (A B, B A, ...), "
        f"{repeats} time(s) each, every side in a fresh process. Values are medians; ratios are "
        "ratios of medians. This machine is shared, so absolute times are noisy: the ratios count.",
        "",
        "Machine: " + "; ".join(f"{k}: {v}" for k, v in machine.items()),
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()),
        "",
    ]
    rows, sections = [], []
    if "train" in results:
        r, s = results["train"], _train_section(results["train"], work)
        lf, bl = r["loraflow"], r["baseline"]
        speed = lf["tokens_per_s"] / bl["tokens_per_s"]
        loss_gap = abs(lf["eval_loss"] - bl["eval_loss"]) / bl["eval_loss"]
        rows += [
            ("1. training throughput (real tokens/s)", f"{lf['tokens_per_s']:,.0f}", f"{bl['tokens_per_s']:,.0f}",
             f"{speed:.2f}x", ">= 1.5x", _mark(speed >= TARGETS["throughput"])),
            ("1. peak RSS (MiB)", f"{lf['peak_rss_mib']:,.0f}", f"{bl['peak_rss_mib']:,.0f}",
             f"{lf['peak_rss_mib'] / bl['peak_rss_mib']:.2f}x", "<= 1.0x", _mark(lf["peak_rss_mib"] <= bl["peak_rss_mib"])),
            ("1. final eval loss (median over seeds)", f"{lf['eval_loss']:.4f}", f"{bl['eval_loss']:.4f}", f"{loss_gap:.2%} apart",
             "within 2%", _mark(loss_gap <= TARGETS["loss"])),
            ("2. hardware efficiency (model FLOP/s / matmul FLOP/s)", f"{r['efficiency']:.1%}", "-", "-", ">= 40%",
             _mark(r["efficiency"] >= TARGETS["efficiency"])),
        ]
        sections.append(s)
    if "infer" in results:
        r = results["infer"]
        lf, tf = r["loraflow"], r["transformers"]
        speed = lf["prompts_per_s"] / tf["prompts_per_s"]
        rows += [
            ("3. inference throughput (prompts/s)", f"{lf['prompts_per_s']:.2f}", f"{tf['prompts_per_s']:.2f}",
             f"{speed:.2f}x", ">= 3x", _mark(speed >= TARGETS["inference"])),
            ("3. pyfunc load time (s)", f"{lf['load_s']:.3f}", f"{tf['load_s']:.3f}", f"{lf['load_s'] / tf['load_s']:.3f}x",
             "<= 1.0x", _mark(lf["load_s"] <= tf["load_s"])),
        ]
        sections.append(_infer_section(r))
    if "size" in results:
        r = results["size"]
        rows.append(("4. artifact size, Hub reference (bytes)", f"{r['reference_bytes']:,}",
                     f"{r['adapter_bytes'] + r['tokenizer_bytes']:,} (adapter + tokenizer)", f"{r['ratio']:.3f}x",
                     "<= 1.1x", _mark(r["ratio"] <= TARGETS["size"])))
        sections.append(_size_section(r))
    if "tracking" in results:
        r = results["tracking"]
        rows.append(("5. tracking overhead (wall s, sqlite, per-step metrics)", f"{r['on_s']:.1f} (on)",
                     f"{r['off_s']:.1f} (off)", f"{r['overhead']:+.1%}", "<= 3%", _mark(r["overhead"] <= TARGETS["tracking"])))
        sections.append(_tracking_section(r))
    if "chat" in results:
        rows += chat_results.summary_rows(results["chat"])
        sections.append(chat_results.section(results["chat"]))
    lines += ["## Summary", "", "| benchmark | loraflow | baseline | ratio | target | met? |", "|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += [""]
    for section in sections:
        lines += section + [""]
    if "serving" in results:  # not one of the compared targets: a measurement of its own
        lines += [results["serving"], ""]
    return "\n".join(lines)


def _samples(rows: list[dict], keys: list[str], fmt: str = "{:.2f}") -> str:
    formats = {"eval_loss": "{:.4f}", "computed_tokens": "{:,}"}
    return "; ".join(", ".join(f"{k}={formats.get(k, fmt).format(r[k])}" for k in keys) for r in rows)


def _range(bounds: tuple[float, float]) -> str:
    return f"{bounds[0]:.4f}-{bounds[1]:.4f}"


def _train_section(r: dict, work: fixtures.Workload) -> list[str]:
    f = r["flops"]
    return [
        "## 1-2. Training throughput and hardware efficiency",
        "",
        f"Model: LlamaForCausalLM from a config, random weights (seed {work.seed}): hidden {work.hidden_size}, "
        f"{work.num_layers} layers, {work.num_heads} heads, MLP {work.intermediate_size}, vocab of builtin:tiny's "
        f"tokenizer, tied embeddings; {f['n_frozen'] / 1e6:.1f}M matmul weights (frozen), "
        f"{f['n_trainable'] / 1e6:.2f}M LoRA weights (trainable).",
        f"LoRA r={work.r}, alpha={work.lora_alpha:g}, dropout 0.05 on {', '.join(work.target_modules)}. "
        f"AdamW lr {work.learning_rate:g}, warmup {work.warmup_ratio:.0%} then cosine, clip 1.0, fp32. Round i runs "
        f"both sides with seed {work.seed} + i (LoRA init, batch order, dropout masks), because the final eval loss "
        "of a single seed moves by a few percent from seed to seed at this step count, and the baseline's padding "
        f"with it: eval loss and speed are medians over {len(r['samples']['loraflow'])} seeds per side (final eval "
        f"loss across seeds, this run: loraflow {_range(r['loraflow']['eval_loss_range'])}, baseline "
        f"{_range(r['baseline']['eval_loss_range'])}).",
        f"Data: {work.train_examples} training examples of {work.min_len}-{work.max_len} tokens (uniform; windows of "
        f"loraflow's bundled corpus), {f['tokens']:,} real tokens; batch {work.batch_size}, {work.steps} optimizer steps "
        f"(exactly one epoch on both sides, so both process the same tokens); a fixed eval set of {work.eval_examples} examples.",
        "",
        "- loraflow: `apply_lora` + `loraflow.train.FineTune` with its defaults (length-grouped batches from "
        "`make_dataloader`, each cut into micro-batches of at most 1024 tokens on CPU with gradients accumulated; "
        "LoRA dropout masks drawn by `loraflow.dropout.CpuDropout` on CPU; accelerate), tracking off.",
        "- baseline: `peft.get_peft_model` + `transformers.Trainer` + `DataCollatorForLanguageModeling(mlm=False)` "
        "(dynamic padding, right side), default Trainer optimizer, logging and saving off.",
        "- tokens/s = real (non-padding) tokens / time from the first optimizer step to the end of the last.",
        "- eval loss: the same function on both sides (token-weighted mean over the eval set) after training.",
        "- peak RSS: the side's own process (its kernel high-water mark, `VmHWM`), model load and evaluation included.",
        "",
        "FLOP formula (hardware efficiency): per token `4 x N_frozen + 6 x N_trainable`, where N counts matmul "
        "weights (every Linear plus the tied lm_head; the embedding lookup is free); plus, per sequence of T real "
        "tokens, causal attention `6 x L x d x T^2` (QK^T and AV: 4 T^2 d forward, halved by the causal mask, "
        f"x3 for forward and backward). One epoch: {f['flops'] / 1e12:.3f} TFLOP "
        f"(attention {f['attention_share']:.1%}). Padding is not counted. Measured dense matmul: fp32 2048x2048 "
        "`torch.mm`, best of 10, in the loraflow process right after training "
        f"(median {r['matmul_flops'] / 1e9:.0f} GFLOP/s); achieved: {r['achieved_flops'] / 1e9:.1f} GFLOP/s.",
        "",
        *_padding_ceiling(r),
        "Per run: loraflow " + _samples(r["samples"]["loraflow"], ["train_s", "eval_loss", "peak_rss_mib", "computed_tokens"])
        + " | efficiency " + ", ".join(f"{e:.1%}" for e in r["efficiency_each"]),
        "",
        "Per run: baseline " + _samples(r["samples"]["baseline"], ["train_s", "eval_loss", "peak_rss_mib", "computed_tokens"]),
    ]


def _padding_ceiling(r: dict) -> list[str]:
    """Where the speed-up comes from: tokens computed (padding included) and the time per computed token."""
    lf, bl, spread = r["loraflow"], r["baseline"], r["padding_spread"]
    padding = bl["computed_tokens"] / lf["computed_tokens"]
    per_token = bl["us_per_computed_token"] / lf["us_per_computed_token"]
    return [
        f"Where the speed-up comes from: padding and time per token. loraflow computes {lf['computed_tokens']:,.0f} "
        f"tokens (padding included), the baseline {bl['computed_tokens']:,.0f} ({padding:.2f}x; medians over seeds). "
        "Per computed token, "
        f"loraflow takes {lf['us_per_computed_token']:.0f} us and the baseline {bl['us_per_computed_token']:.0f} us "
        f"({per_token:.2f}x): the same model and fp32 math, but loraflow draws its LoRA dropout masks in under half "
        f"the time (`loraflow.dropout`). {padding:.2f}x x {per_token:.2f}x = {padding * per_token:.2f}x.",
        "",
        "How typical this data's padding is: for lengths uniform in "
        f"{r['workload'].min_len}-{r['workload'].max_len} and batches of {r['workload'].batch_size}, random batching "
        f"computes a median {spread['median']:.2f}x the real tokens over 2,000 simulated draws of "
        f"{r['workload'].train_examples} examples (5th-95th percentile {spread['p5']:.2f}-{spread['p95']:.2f}x; "
        "`bench_train.padding_spread`). The step count is set so that spread stays narrow: with 12 steps it is "
        f"{r['padding_spread_12_steps']['p5']:.2f}-{r['padding_spread_12_steps']['p95']:.2f}x.",
        "",
    ]


def _infer_section(r: dict) -> list[str]:
    lf, tf = r["loraflow"], r["transformers"]
    n = len(r["reference"])
    lo_ratio = lf["load_s"] / tf["load_s"]
    lo, hi = common.median_ratio_interval(lf["load_samples"], tf["load_samples"])
    return [
        "## 3. Inference",
        "",
        "The adapter trained by the first loraflow run of benchmark 1, on the same base loaded from a Hub repo id "
        "(an offline Hugging Face cache entry with a commit hash), logged once with `loraflow.flavor.log_model` "
        "(base_mode=reference) and once with `mlflow.transformers.log_model(transformers_model={model, tokenizer}, "
        "task='text-generation')` (which stores the PEFT adapter and a Hub reference to the base), with the "
        "requirements that flavor records for a PEFT model by default (`get_default_pip_requirements`: transformers, "
        "torch, accelerate and peft, pinned; its torchvision pin is left out, as torchvision is not installed here "
        "and pinning it fails).",
        f"Workload: `mlflow.pyfunc.load_model(uri)`, one warm-up predict on one prompt, then predict on {n} prompts of "
        "4-96 tokens, max_new_tokens=32, greedy. loraflow gets a DataFrame with a `prompt` column; the built-in "
        "flavor a list of strings (its documented text-generation input) with max_new_tokens/greedy in its model_config.",
        "Load time excludes importing torch/transformers/peft/mlflow (both sides import them first); it is the "
        f"median of {lf['load_n']} fresh-process loads per side (the predict runs', then load-only runs, alternating); "
        f"ratio {lo_ratio:.3f}x, 95% bootstrap interval {lo:.3f}-{hi:.3f}x (each side's loads resampled). "
        "loraflow's includes checking the base's fingerprint (sha256 of every base tensor); the built-in flavor "
        "checks nothing. The digests of the base's files are recorded in loraflow's digest cache when the file is "
        "first hashed (here: when `log_model` checked the input example) and read from it while the file's path, "
        "size, inode and modification and change times are unchanged. With the cache off "
        "(`LORAFLOW_DIGEST_CACHE=0`, so the stored tensors are hashed from the safetensors files while "
        f"`from_pretrained` loads them): {r['uncached_load_s']:.3f} s, "
        f"{r['uncached_load_s'] / tf['load_s']:.3f}x the built-in flavor's (median of {len(r['uncached_loads'])} "
        "fresh-process loads, alternating with the others).",
        "",
        f"Outputs against the in-memory PeftModel (`generate` per prompt, greedy, continuation only): loraflow "
        f"{lf['matches_reference']}/{n} identical, mlflow.transformers {tf['matches_reference']}/{n} identical. "
        f"The built-in text-generation pipeline returns the prompt followed by the continuation "
        f"(`return_full_text` defaults to True; {tf['full_text']}/{n} of its outputs started with their prompt), so "
        "its outputs are compared after dropping that prompt (as returned, without stripping: loraflow "
        f"{lf['matches_reference_as_returned']}/{n}, mlflow.transformers {tf['matches_reference_as_returned']}/{n}). "
        f"Same outputs on every repeat: loraflow {lf['deterministic']}, mlflow.transformers {tf['deterministic']}.",
        "",
        _builtin_fidelity(r),
        "",
        *_first_mismatch(r),
        "Per run: loraflow " + _samples(r["samples"]["loraflow"], ["load_s", "predict_s"]),
        "",
        "Per run: mlflow.transformers " + _samples(r["samples"]["transformers"], ["load_s", "predict_s"]),
        "",
        "Load-only runs, load_s: loraflow " + ", ".join(f"{x['load_s']:.3f}" for x in r["loads"]["loraflow"])
        + " | mlflow.transformers " + ", ".join(f"{x['load_s']:.3f}" for x in r["loads"]["transformers"])
        + " | loraflow, digest cache off " + ", ".join(f"{x['load_s']:.3f}" for x in r["uncached_loads"]),
    ]


def _builtin_fidelity(r: dict) -> str:
    """Whether the built-in flavor changed the outputs here."""
    tf, n = r["transformers"], len(r["reference"])
    models = {name: r["samples"][name][0]["model"] for name in ("loraflow", "transformers")}
    loaded = " and ".join(f"{k} a `{v['class']}` in {'/'.join(v['dtypes'])}" for k, v in models.items())
    if tf["matches_reference"] == n:
        verdict = (f"Not here: its greedy continuations equal the in-memory model's on all {n} prompts; what separates "
                   "it from loraflow is speed and its full-text output")
    else:
        verdict = (f"Yes here: {n - tf['matches_reference']}/{n} of its continuations differ from the in-memory "
                   "model's (first mismatch below)")
    return (f"Does the built-in flavor change the outputs? {verdict}. "
            f"Loaded through pyfunc, the models run are: {loaded}.")


def _first_mismatch(r: dict) -> list[str]:
    out = []
    for name in ("loraflow", "transformers"):
        texts = r[name]["continuations"]  # the generated part, as the reference holds
        for i, (got, want) in enumerate(zip(texts, r["reference"])):
            if got != want:
                out += [f"First {name} mismatch, prompt {i}: got {got[:80]!r}, in-memory {want[:80]!r}", ""]
                break
    return out


def _size_section(r: dict) -> list[str]:
    parts = ", ".join(f"{k}: {v:,}" for k, v in sorted(r["reference_parts"].items(), key=lambda kv: -kv[1]))
    return [
        "## 4. Artifact size",
        "",
        f"Adapter (`save_pretrained`): {r['adapter_bytes']:,} bytes; tokenizer: {r['tokenizer_bytes']:,} bytes.",
        f"Logged model, Hub-reference base: {r['reference_bytes']:,} bytes ({r['ratio']:.3f}x adapter + tokenizer). "
        f"Its parts: {parts}.",
        f"Logged model, embedded base: {r['embedded_bytes']:,} bytes (the base's safetensors alone: "
        f"{r['base_weights_bytes']:,}).",
        "Sizes are deterministic: measured once.",
    ]


def _tracking_section(r: dict) -> list[str]:
    logged = r["logged"]
    return [
        "## 5. Tracking overhead",
        "",
        "The loraflow training run of benchmark 1 (same model, data, steps, seed), with loraflow's `RunLogger` "
        "logging train_loss, learning_rate and tokens_per_second every optimizer step (plus eval metrics) to a "
        "local sqlite store, against `RunLogger(enabled=False)`. Both sides alternate in one process after an "
        "untimed warm-up run, so only tracking differs. Time: `FineTune.train` (evaluations included) plus, when tracking, "
        "starting, flushing and ending the run.",
        "Not in that time, and reported here instead: the one-off opening of the store in a process (importing "
        f"MLflow's SQL store and connecting, {r['store_setup_s']:.2f} s, once per process however many runs it "
        "makes); the store's schema was created before.",
        f"Check: {logged['runs']} tracked runs, train_loss points per run {logged['train_loss_points']}, "
        f"statuses {logged['statuses']}.",
        "",
        f"Median wall time: on {r['on_s']:.2f} s, off {r['off_s']:.2f} s; overhead {r['overhead']:+.2%} of the "
        "untracked time.",
        "",
        "Per run: on " + _samples(r["samples"]["tracking on"], ["wall_s"]) + " | off "
        + _samples(r["samples"]["tracking off"], ["wall_s"]),
    ]


if __name__ == "__main__":
    main()
