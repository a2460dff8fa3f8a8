"""What the generation metrics cost: the default training run with `eval_samples` 64 against 0.

Both sides run `loraflow.train.run_training` on the offline defaults (built-in model, bundled data,
300 steps, 7 evaluations), alternating, in one process, tracking to a temporary sqlite store; the
built-in model is built first, outside the clock. The share of training time the generation evals
cost is (median with - median without) / median without. Target (issue 11): at most 15%.

    python benchmarks/bench_eval_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


def timed_run(workdir: str, eval_samples: int) -> float:
    from loraflow.config import parse_settings
    from loraflow.train import run_training

    lora, settings = parse_settings({"output_dir": os.path.join(workdir, "outputs"), "eval_samples": str(eval_samples)})
    started = time.perf_counter()
    run_training(lora, settings)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-eval-") as workdir:
        import mlflow

        from loraflow.flavor.bases import builtin_dir

        builtin_dir("builtin:tiny")
        mlflow.set_tracking_uri(f"sqlite:///{workdir}/mlflow.db")
        os.chdir(workdir)
        times: dict[int, list[float]] = {64: [], 0: []}
        timed_run(workdir, 0)  # warm-up: imports, first loads
        for _ in range(args.repeats):
            for samples in (64, 0):
                times[samples].append(timed_run(workdir, samples))
    with_, without = statistics.median(times[64]), statistics.median(times[0])
    share = (with_ - without) / without
    print("| eval_samples | wall s per run (median) | runs |")
    print("|---|---|---|")
    print(f"| 64 | {with_:.2f} | {', '.join(f'{t:.2f}' for t in times[64])} |")
    print(f"| 0 | {without:.2f} | {', '.join(f'{t:.2f}' for t in times[0])} |")
    print(f"\ngeneration evals: {share:+.1%} of the training run's time (target: <= 15%)")


if __name__ == "__main__":
    main()
