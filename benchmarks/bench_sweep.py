"""Sweep pruning: what the median pruner saves on the default sweep (`loraflow sweep` with no
options: the default search space, 8 trials of 30 steps on builtin:tiny, seed 42).

Three sweeps per round, each in a fresh process (`common.run_child`) against its own new sqlite store:

1. `none`: the default sweep with pruning off; its trials' settings are recorded;
2. `median`: the default sweep as users run it (median pruner). Once a trial is pruned, the TPE
   sampler sees different results and picks different settings, so this side trains other trials;
3. `median-replay`: the settings of side 1, in the same order, with the median pruner. Only
   pruning differs from side 1: this is the headline comparison.

The clock covers the whole `run_sweep` call: every trial's model load, training, evaluations and
logging, and the study's own record. Reported per side: wall time, the optimizer steps the trials
ran (each logs `train_loss` once, counted from the store), finished and pruned trials, and the best
and worst finished eval_loss, so that time saved is read beside what pruning gave up.

    python -m benchmarks.bench_sweep            # writes benchmarks/sweep_results.json and .md
    python -m benchmarks.bench_sweep --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import common

RESULTS_JSON = common.BENCH_DIR / "sweep_results.json"
RESULTS_MD = common.BENCH_DIR / "sweep_results.md"
SIDES = ("none", "median", "median-replay")


def _replay_sampler(settings: list[dict[str, Any]]) -> Any:
    """An Optuna sampler that gives trial n the recorded settings of trial n."""
    import optuna

    class Replay(optuna.samplers.BaseSampler):
        def infer_relative_search_space(self, study, trial):
            return {}

        def sample_relative(self, study, trial, search_space):
            return {}

        def sample_independent(self, study, trial, name, distribution):
            return settings[trial.number][name]

    return Replay()


def sweep_side(pruner: str, trials: int, store: str, replay: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """One default sweep in this process, against a new store at `store`; its measurements."""
    import mlflow

    from loraflow.sweep import run_sweep, study, sweep_settings

    if replay is not None:
        study.make_sampler = lambda seed: _replay_sampler(replay)
    os.chdir(Path(store).parent)  # the store's artifacts (./mlruns) go beside it, not into the repository
    mlflow.set_tracking_uri(f"sqlite:///{store}")
    mlflow.search_experiments()  # creates the schema, outside the clock
    with tempfile.TemporaryDirectory() as outputs:
        train = {"output_dir": outputs}
        settings = sweep_settings({"trials": str(trials), "pruner": pruner, "study_name": "bench"}, train)
        start = time.perf_counter()
        result = run_sweep(settings, train)
        seconds = time.perf_counter() - start
    client = mlflow.MlflowClient()
    runs = client.search_runs(["0"], f"tags.mlflow.parentRunId = '{result.study_run_id}'",
                              order_by=["attributes.start_time ASC"])
    steps = sum(len(client.get_metric_history(r.info.run_id, "train_loss")) for r in runs)
    ordered = sorted(study.open_study(_ref(result), result.direction)[0].trials, key=lambda t: t.number)
    return {"seconds": seconds, "optimizer_steps": steps, "counts": result.counts,
            "best_eval_loss": result.best.value if result.best else None, "worst_eval_loss": result.worst_value,
            "trial_settings": [t.params for t in ordered]}


def _ref(result: Any) -> Any:
    import mlflow

    from loraflow.sweep.study import StudyRef

    return StudyRef(result.study_name, "0", mlflow.get_tracking_uri(), "none", 0)


def one_round(trials: int, folder: Path) -> dict[str, dict[str, Any]]:
    samples: dict[str, dict[str, Any]] = {}
    for side in SIDES:
        replay = samples["none"]["trial_settings"] if side == "median-replay" else None
        kwargs = {"pruner": "none" if side == "none" else "median", "trials": trials,
                  "store": str(folder / f"{side}.db"), "replay": replay}
        samples[side] = common.run_child("bench_sweep", "sweep_side", kwargs, timeout=3600)
        s = samples[side]
        print(f"{side}: {s['seconds']:.1f} s, {s['optimizer_steps']} steps, {s['counts']}", flush=True)
    return samples


def measure(trials: int, repeats: int) -> dict[str, Any]:
    rounds = []
    for i in range(repeats):
        with tempfile.TemporaryDirectory(prefix="loraflow-bench-sweep-") as tmp:
            rounds.append(one_round(trials, Path(tmp)))

    def median_of(side: str, key: str) -> float:
        return common.median([r[side][key] for r in rounds])

    replay_ratio = common.ratio(median_of("median-replay", "seconds"), median_of("none", "seconds"))
    return {"trials": trials, "repeats": repeats, "rounds": rounds,
            "time_ratio_replay_pruned_over_unpruned": replay_ratio, "time_saved_same_trials": 1 - replay_ratio,
            "step_ratio_replay_pruned_over_unpruned": common.ratio(median_of("median-replay", "optimizer_steps"),
                                                                   median_of("none", "optimizer_steps")),
            "time_ratio_default_pruned_over_unpruned": common.ratio(median_of("median", "seconds"),
                                                                    median_of("none", "seconds")),
            "machine": common.machine_info(), "versions": common.versions()}


def markdown(result: dict[str, Any]) -> str:
    rows = ["| round | side | wall time (s) | optimizer steps | finished / pruned | best eval_loss | worst eval_loss |",
            "|---|---|---|---|---|---|---|"]
    for i, samples in enumerate(result["rounds"], 1):
        for side, s in samples.items():
            c = s["counts"]
            rows.append(f"| {i} | {side} | {s['seconds']:.1f} | {s['optimizer_steps']} | {c['finished']} / "
                        f"{c['pruned']} | {s['best_eval_loss']:.4f} | {s['worst_eval_loss']:.4f} |")
    return "\n".join([
        "# Sweep pruning on the default sweep", "",
        f"{result['trials']} trials, default search space, builtin:tiny, 30 steps per trial; {result['repeats']} "
        "round(s) of three sweeps, each in a fresh process and store (see `benchmarks/bench_sweep.py`).", "",
        *rows, "",
        f"- same trial settings, median pruner / no pruner, wall time: "
        f"**{result['time_ratio_replay_pruned_over_unpruned']:.2f}** "
        f"(time saved: {result['time_saved_same_trials']:.0%}); optimizer steps: "
        f"{result['step_ratio_replay_pruned_over_unpruned']:.2f}",
        f"- default sweep as run (the sampler then picks other trials), median / none, wall time: "
        f"{result['time_ratio_default_pruned_over_unpruned']:.2f}",
        f"- machine: {result['machine'].get('cpu')}, {result['machine'].get('logical cores')} logical cores "
        "(shared with other work while measured)", "",
        "Produced by `python -m benchmarks.bench_sweep`.", ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=common.positive_int, default=8)
    parser.add_argument("--repeats", type=common.positive_int, default=1)
    args = parser.parse_args()
    result = measure(args.trials, args.repeats)
    RESULTS_JSON.write_text(json.dumps(result, indent=2) + "\n")
    RESULTS_MD.write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
