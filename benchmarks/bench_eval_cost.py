"""What the generation metrics cost: the default training run with `eval_samples` 64 against 0.

Both sides run `loraflow.train.run_training` on the offline defaults (built-in model, bundled data,
300 steps, 7 evaluations), alternating, in one process, tracking to a temporary sqlite store; the
built-in model is built first, outside the clock. Two figures:

- the generation evals themselves: the time spent in `loraflow.evaluation.answer` (every greedy
  generation of every evaluation, timed around the call), as a share of the rest of the run.
  Target: at most 15%;
- the whole difference between the sides, (median with - median without) / median without, which
  also holds what logging the samples table and the eval-quality figure costs.

    python benchmarks/bench_eval_cost.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time


GENERATING: list[float] = []  # seconds spent in evaluation.answer, per call, in the current run


def timed_run(workdir: str, eval_samples: int) -> tuple[float, float]:
    """Wall seconds of one default run, and the seconds of it spent generating eval answers."""
    from loraflow.config import parse_settings
    from loraflow.train import run_training

    lora, settings = parse_settings({"output_dir": os.path.join(workdir, "outputs"), "eval_samples": str(eval_samples)})
    GENERATING.clear()
    started = time.perf_counter()
    run_training(lora, settings)
    return time.perf_counter() - started, sum(GENERATING)


def _time_answers() -> None:
    from loraflow import evaluation

    real = evaluation.answer

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            GENERATING.append(time.perf_counter() - started)

    evaluation.answer = timed


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
        _time_answers()
        times: dict[int, list[float]] = {64: [], 0: []}
        shares: list[float] = []
        timed_run(workdir, 0)  # warm-up: imports, first loads
        for _ in range(args.repeats):
            for samples in (64, 0):
                wall, generating = timed_run(workdir, samples)
                times[samples].append(wall)
                if samples:
                    shares.append(generating / (wall - generating))
    with_, without = statistics.median(times[64]), statistics.median(times[0])
    print("| eval_samples | wall s per run (median) | runs |")
    print("|---|---|---|")
    print(f"| 64 | {with_:.2f} | {', '.join(f'{t:.2f}' for t in times[64])} |")
    print(f"| 0 | {without:.2f} | {', '.join(f'{t:.2f}' for t in times[0])} |")
    print(f"\ngeneration evals (time in evaluation.answer): {statistics.median(shares):.1%} of the rest of the run "
          f"(runs: {', '.join(f'{s:.1%}' for s in shares)}; target: <= 15%)")
    print(f"whole difference, table and figure logging included: {(with_ - without) / without:+.1%}")


if __name__ == "__main__":
    main()
