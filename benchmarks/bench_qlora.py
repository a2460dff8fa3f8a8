"""QLoRA memory: peak RSS of `loraflow train` on a ~300M Qwen2-shaped base, nf4 against fp32.

    python benchmarks/bench_qlora.py              # ~300M parameters, 3 repeats per side
    python benchmarks/bench_qlora.py --quick      # a tiny Qwen2, 1 repeat: checks the harness only

The base is built from a `Qwen2Config` with random weights and saved in fp32 (the fp32 side trains
it as saved; the nf4 side quantizes it at load, as users do with a Hub checkpoint). Both sides run
the same `loraflow train` command (same LoRA settings, data, batch and steps), each in a fresh
process, alternating; the figure is each process's own peak RSS (`VmHWM`), which covers
loading, training, evaluating and logging the model, and beside it the peak of its anonymous
resident memory (`RssAnon`, sampled every 10 ms), which leaves out the checkpoint's file pages that
the process maps while it reads the weights.

A third side, "nf4 untrimmed", runs nf4 with `loraflow.heap`'s per-layer `malloc_trim` turned
off: the memory it saves and the time it costs (training tokens per second, the median of the run's
logged `tokens_per_second`). Nothing here asserts anything.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import common  # noqa: E402

# Qwen2-shaped: grouped-query attention (16 query heads, 2 key/value heads), SwiGLU MLP, tied
# embeddings. 24 layers of d=1024 hold 264M parameters, the embeddings 33M: about 297M in all.
FULL_SHAPE = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 24,
              "num_attention_heads": 16, "num_key_value_heads": 2, "vocab_size": 32000}
QUICK_SHAPE = {"hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 32000}
TRAIN_ARGS = ["--train-data", "builtin:qa", "--r", "16", "--lora-alpha", "32",
              "--target-modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
              "--batch-size", "8", "--max-seq-length", "128", "--max-steps", "3", "--eval-steps", "1000",
              "--eval-samples", "0", "--precision", "fp32", "--base-mode", "reference", "--seed", "0"]


def build_base(directory: Path, shape: dict[str, int]) -> int:
    """Save a random-weight Qwen2 of `shape` (fp32) with the built-in tokenizer; its parameter count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    from loraflow.flavor.bases import builtin_dir

    tokenizer = AutoTokenizer.from_pretrained(builtin_dir("tiny"))
    config = Qwen2Config(**shape, max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def _rss_anon_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class AnonPeak:
    """The largest `RssAnon` seen, sampled every 10 ms: resident memory that is not file pages.

    Peak RSS also counts the pages of the checkpoint file mapped while it is read (the kernel can
    drop those at will), so both are reported."""

    def __init__(self) -> None:
        import threading

        self.peak = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _rss_anon_mib())

    def __enter__(self) -> "AnonPeak":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def train_side(base: str, quantization: str, tracking_uri: str, trim: bool = True) -> dict[str, Any]:
    """Child: one `loraflow train` on `base` (peak RSS is added by `common.run_child`); `trim=False`
    turns off the heap trimming of quantized CPU training."""
    import os

    import mlflow

    from loraflow import speed
    from loraflow.cli import main

    if not trim:
        os.environ[speed.ENV] = "heap_trim"
    mlflow.set_tracking_uri(tracking_uri)
    args = ["train", "--base-model", base, "--quantization", quantization, *TRAIN_ARGS]
    with AnonPeak() as anon:
        try:
            main(args, standalone_mode=False)
        except SystemExit as stop:
            if stop.code:
                raise
    run = mlflow.search_runs(order_by=["start_time DESC"], max_results=1, output_format="list")[0]
    rates = [m.value for m in mlflow.MlflowClient().get_metric_history(run.info.run_id, "tokens_per_second")]
    return {"eval_loss": run.data.metrics.get("eval_loss"), "status": run.info.status, "peak_anon_mib": anon.peak,
            "tokens_per_second": common.median(rates)}


def measure(base: Path, repeats: int, tracking_uri: str, log=print) -> dict[str, list[dict[str, Any]]]:
    sides = {"none": {"quantization": "none"}, "nf4": {"quantization": "nf4"},
             "nf4 untrimmed": {"quantization": "nf4", "trim": False}}

    def side(name: str) -> Any:
        def run(_round: int) -> dict[str, Any]:
            result = common.run_child("bench_qlora", "train_side",
                                      {"base": str(base), "tracking_uri": tracking_uri, **sides[name]})
            log(f"  {name:>13}: peak RSS {result['peak_rss_mib']:,.0f} MiB "
                f"(anonymous {result['peak_anon_mib']:,.0f}), {result['tokens_per_second']:.0f} tokens/s, "
                f"eval loss {result['eval_loss']:.4f}")
            return result
        return run

    return common.alternate({name: side(name) for name in sides}, repeats, log)


def report(samples: dict[str, list[dict[str, Any]]], parameters: int) -> str:
    keys = ("peak_rss_mib", "peak_anon_mib", "tokens_per_second", "eval_loss")
    med = {side: {key: common.summarize(runs, key) for key in keys} for side, runs in samples.items()}
    fp32, nf4, untrimmed = med["none"], med["nf4"], med["nf4 untrimmed"]

    def row(label: str, m: dict[str, float]) -> str:
        return (f"| {label} | {m['peak_rss_mib']:,.0f} | {m['peak_anon_mib']:,.0f} | "
                f"{m['tokens_per_second']:.0f} | {m['eval_loss']:.4f} |")

    return "\n".join([
        f"Qwen2-shaped base: {parameters / 1e6:.0f}M parameters, fp32 on disk; "
        f"{len(samples['nf4'])} run(s) per side, medians",
        "",
        "| side | peak RSS (MiB) | peak anonymous RSS (MiB) | tokens/s | eval loss |",
        "|---|---|---|---|---|",
        row("fp32 (`--quantization none`)", fp32),
        row("nf4 (`--quantization nf4`)", nf4),
        row("nf4, heap not trimmed", untrimmed),
        "",
        f"nf4 / fp32 peak RSS: **{common.ratio(nf4['peak_rss_mib'], fp32['peak_rss_mib']):.2f}x** (target <= 0.5x); "
        f"peak anonymous RSS: {common.ratio(nf4['peak_anon_mib'], fp32['peak_anon_mib']):.2f}x",
        f"heap trimming: peak RSS {common.ratio(nf4['peak_rss_mib'], untrimmed['peak_rss_mib']):.2f}x, "
        f"training speed {common.ratio(nf4['tokens_per_second'], untrimmed['tokens_per_second']):.2f}x "
        "(nf4 against nf4 untrimmed)",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny Qwen2, 1 repeat: checks the harness only")
    parser.add_argument("--repeats", type=common.positive_int, default=None, help="runs per side (default 3; quick: 1)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    with tempfile.TemporaryDirectory(prefix="loraflow-qlora-") as tmp:
        base = Path(tmp) / "qwen2-base"
        parameters = build_base(base, QUICK_SHAPE if args.quick else FULL_SHAPE)
        print(f"built {parameters / 1e6:.1f}M-parameter Qwen2 base in {base}")
        samples = measure(base, repeats, f"sqlite:///{tmp}/mlflow.db")
    print()
    print(report(samples, parameters))


if __name__ == "__main__":
    main()
