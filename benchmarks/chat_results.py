"""The chat benchmark's part of RESULTS.md: its summary rows, its section, and writing that section alone.

`bench_chat.run` measures; this module only formats its result (so `run.py` and
`python benchmarks/bench_chat.py --write` render the same text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

TARGETS = {"chat_training": 1.5, "chat_inference": 0.9}



def _mark(ok: bool) -> str:
    return "yes" if ok else "**no**"


def summary_rows(r: dict[str, Any]) -> list[tuple[str, ...]]:
    """The chat rows of RESULTS.md's summary table (benchmark, loraflow, baseline, ratio, target, met?)."""
    lf, trl, py, raw = r["loraflow"], r["trl"], r["pyfunc"], r["raw"]
    rss = lf["peak_rss_mib"] / trl["peak_rss_mib"]
    gap = abs(lf["eval_loss"] - trl["eval_loss"]) / trl["eval_loss"]
    return [
        ("chat training throughput (real tokens/s)", f"{lf['tokens_per_s']:,.0f}", f"{trl['tokens_per_s']:,.0f} (TRL SFTTrainer)",
         f"{r['train_speedup']:.2f}x", ">= 1.5x", _mark(r["train_speedup"] >= TARGETS["chat_training"])),
        ("chat training, trained (assistant) tokens/s", f"{lf['trained_tokens_per_s']:,.0f}",
         f"{trl['trained_tokens_per_s']:,.0f}", f"{lf['trained_tokens_per_s'] / trl['trained_tokens_per_s']:.2f}x",
         "(same data)", "-"),
        ("chat training peak RSS (MiB)", f"{lf['peak_rss_mib']:,.0f}", f"{trl['peak_rss_mib']:,.0f}", f"{rss:.2f}x",
         "<= 1.0x", _mark(rss <= 1.0)),
        ("chat final eval loss (assistant tokens, median over seeds)", f"{lf['eval_loss']:.4f}", f"{trl['eval_loss']:.4f}",
         f"{gap:.2%} apart", "within 2%", _mark(gap <= 0.02)),
        ("chat pyfunc throughput (generated tokens/s)", f"{py['tokens_per_s']:.1f}", f"{raw['tokens_per_s']:.1f} (raw generate)",
         f"{r['infer_ratio']:.2f}x", ">= 0.9x", _mark(r["infer_ratio"] >= TARGETS["chat_inference"])),
    ]


def _per_run(rows: list[dict], keys: list[str]) -> str:
    formats = {"eval_loss": "{:.4f}", "computed_tokens": "{:,}", "generated_tokens": "{:,}"}
    return "; ".join(", ".join(f"{k}={formats.get(k, '{:.2f}').format(x[k])}" for k in keys) for x in rows)


def section(r: dict[str, Any]) -> list[str]:
    """The `## Chat` section of RESULTS.md: setup, checks, decomposition and every run."""
    work, lf, trl, py, raw, s = r["workload"], r["loraflow"], r["trl"], r["pyfunc"], r["raw"], r["settings"]
    check = r["train_samples"]["trl"][0]
    padding = trl["computed_tokens"] / lf["computed_tokens"]
    per_token = trl["us_per_computed_token"] / lf["us_per_computed_token"]
    n_seeds = len(r["train_samples"]["loraflow"])
    return [
        "## Chat: training against TRL's SFTTrainer, chat pyfunc against raw `generate`",
        "",
        f"Model: benchmark 1's random Llama (hidden {work.hidden_size}, {work.num_layers} layers, builtin:tiny's "
        f"tokenizer with its ChatML tokens). Data: {work.train_examples} training and {work.eval_examples} held-out "
        "conversations from `fixtures.conversations` (seed "
        f"{work.seed}; a system message half the time, 1-3 turns, user messages of 4-48 and replies of 8-160 "
        f"corpus tokens), {r['tokens']:,} real tokens of which {r['trained_tokens']:,} trained (assistant replies "
        f"and their `<|im_end|>\\n`); max_seq_length {s['max_seq_length']} (no conversation is cut). LoRA r={work.r}, "
        f"alpha={work.lora_alpha:g}, dropout 0.05 on {', '.join(work.target_modules)}; AdamW lr {work.learning_rate:g}, "
        f"warmup {work.warmup_ratio:.0%} then cosine, clip 1.0, fp32; batch {work.batch_size}, {work.steps} steps "
        f"(one epoch on both sides). Round i uses seed {work.seed} + i on both sides; values are medians over "
        f"{n_seeds} seed(s). torch threads per process: "
        f"{sorted({x['torch_threads'] for rows in r['train_samples'].values() for x in rows})}.",
        "",
        "- Template: ChatML with `{% generation %}` / `{% endgeneration %}` around each reply and its `<|im_end|>\\n` "
        "(`bench_chat.TEMPLATE`), written to a .jinja file: loraflow gets it as `--chat-template FILE` (its masks come "
        "from the rendering and ignore the markers), TRL as `chat_template_path=FILE` with `assistant_only_loss=True`.",
        f"- Identical inputs: TRL's tokenized train set equals loraflow's on {check['identical_ids']}/{check['examples']} "
        f"conversations (input ids) and {check['identical_labels']}/{check['examples']} (labels, -100 outside the "
        "assistant tokens).",
        "- TRL is configured as a user would: its defaults (no packing; no padding_free, which it documents as needing "
        "FlashAttention; its collator, padding each batch to its longest row; no `group_by_length`, the Trainer's "
        "default; its chunked LM head over the trained positions only), except `gradient_checkpointing=False` and "
        "`bf16=False` (TRL's defaults for GPUs): the loraflow side recomputes no activations and trains in fp32 here, "
        "and this CPU's bf16 matmul runs at half its fp32 rate.",
        "- Timed window: first optimizer step to the end of the last; tokenization is outside it (median: loraflow "
        f"{lf['prep_s']:.2f} s, TRL's `SFTTrainer(...)` construction, tokenizing included, {trl['prep_s']:.2f} s). "
        "Throughput counts real (non-padding) tokens, and the trained tokens beside them: both sides process the same "
        "tokens, so the two ratios are the same.",
        "- Eval loss: `bench_chat.masked_eval_loss` in each side's process after training: the token-weighted mean "
        "next-token loss over the held-out conversations' assistant tokens (loraflow's labels, equal to TRL's), "
        "batches of 8 in file order. Peak RSS: the side's own fresh process (`VmHWM`), loading and evaluation "
        "included.",
        "",
        f"Where the training speed-up comes from: TRL computes {trl['computed_tokens']:,.0f} tokens (padding included), "
        f"loraflow {lf['computed_tokens']:,.0f} ({padding:.2f}x); per computed token TRL takes "
        f"{trl['us_per_computed_token']:.0f} us and loraflow {lf['us_per_computed_token']:.0f} us ({per_token:.2f}x). "
        f"{padding:.2f}x x {per_token:.2f}x = {padding * per_token:.2f}x. Hardware efficiency of the loraflow side "
        f"(benchmark 2's formula on these lengths): {r['efficiency']:.1%}.",
        "",
        "CPU time (this process's, all threads, `time.process_time`) in the same windows, which other processes on "
        "this shared machine disturb less than wall time: training "
        f"{lf['tokens_per_cpu_s']:,.0f} against {trl['tokens_per_cpu_s']:,.0f} real tokens per CPU second "
        f"({lf['tokens_per_cpu_s'] / trl['tokens_per_cpu_s']:.2f}x); inference {py['tokens_per_cpu_s']:.1f} against "
        f"{raw['tokens_per_cpu_s']:.1f} generated tokens per CPU second "
        f"({py['tokens_per_cpu_s'] / raw['tokens_per_cpu_s']:.2f}x).",
        "",
        _inference_text(r),
        "",
        "Per run: loraflow " + _per_run(r["train_samples"]["loraflow"], ["train_s", "train_cpu_s", "eval_loss", "peak_rss_mib", "computed_tokens"]),
        "",
        "Per run: TRL " + _per_run(r["train_samples"]["trl"], ["train_s", "train_cpu_s", "eval_loss", "peak_rss_mib", "computed_tokens"]),
        "",
        "Per run: pyfunc " + _per_run(r["infer_samples"]["pyfunc"], ["predict_s", "predict_cpu_s", "generated_tokens"])
        + " | raw " + _per_run(r["infer_samples"]["raw"], ["predict_s", "predict_cpu_s", "generated_tokens"]),
    ]


def _inference_text(r: dict[str, Any]) -> str:
    """The inference paragraph: what the two sides run, and what they generated."""
    work, py, raw, s = r["workload"], r["pyfunc"], r["raw"], r["settings"]
    return (
        f"Inference: the adapter of the first loraflow run, saved with `loraflow.flavor.save_model(chat_template=...)` "
        f"and loaded with `mlflow.pyfunc.load_model`, predicting a list of {s['requests']} chat requests "
        f"(`fixtures.conversations` seed {work.seed} + 1000, cut before their last reply; max_tokens {s['max_new_tokens']}, "
        "temperature 0), against the same base + adapter (`PeftModel.from_pretrained`) running `model.generate` on "
        f"`apply_chat_template(add_generation_prompt=True, padding=True)` batches of {s['batch']} in request order, "
        "left-padded, greedy, `eos_token_id=[eos, im_end]`. Both count generated tokens up to and including the stop "
        "token; both time rendering, generating and decoding, after one warm-up call, each in a fresh process. "
        f"Generated tokens: pyfunc {py['generated_tokens']:,}, raw {raw['generated_tokens']:,}; equal outputs "
        f"{r['equal_outputs']}/{s['requests']}; the same outputs on every repeat: pyfunc {py['deterministic']}, raw "
        f"{raw['deterministic']}. Median predict time: pyfunc {py['predict_s']:.2f} s, raw {raw['predict_s']:.2f} s."
    )


def standalone_text(r: dict[str, Any], command: str, elapsed: float, quick: bool) -> list[str]:
    """The chat section with its own command, date, versions and summary rows (for `--write`)."""
    from datetime import datetime, timezone
    from importlib.metadata import version

    lines = section(r)
    head, rest = lines[:2], lines[2:]
    note = ["> **Smoke run (`--quick`)**: not a result.", ""] if quick else []
    return head + note + [
        f"Command: `{command}` (run on its own, after the sections above; took {elapsed / 60:.1f} min, "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; trl {version('trl')}, datasets {version('datasets')}).",
        "",
        "| benchmark | loraflow | baseline | ratio | target | met? |", "|---|---|---|---|---|---|",
        *["| " + " | ".join(row) + " |" for row in summary_rows(r)], "",
    ] + rest


def write_section(path: Path, lines: list[str], heading: str = "## Chat") -> None:
    """Replace (or append) the section starting with `heading` (default `## Chat`) of an existing
    RESULTS.md, keeping the others."""
    old = path.read_text().splitlines() if path.exists() else []
    start = next((k for k, line in enumerate(old) if line.startswith(heading)), len(old))
    end = next((k for k in range(start + 1, len(old)) if old[k].startswith("## ")), len(old))
    kept = old[:start] + old[end:]
    while kept and not kept[-1].strip():
        kept.pop()
    path.write_text("\n".join(kept + [""] + lines) + "\n")
