"""5. Tracking overhead: loraflow's training run with per-step MLflow logging to a local sqlite store
against the same run with tracking off.

Both sides run `bench_train.loraflow_side` (same model, data, steps, seed) alternating in one
process after an untimed warm-up run, so only tracking differs. With tracking on, every optimizer
step logs train_loss, learning_rate and tokens_per_second (loraflow's `RunLogger`, MLflow async
logging), evaluations log eval_loss and perplexity, and the run is started, flushed and ended
inside the clock. The compared time is the wall time of `train.FineTune.train` (evaluations included) plus,
when tracking, starting, flushing and ending the run. Outside it: creating the store's schema
and the process's one-off opening of the store (importing MLflow's SQL store, connecting),
which is reported on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks import common


def prepare_store(uri: str) -> dict[str, Any]:
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.search_experiments()  # creates the schema
    return {}


def count_logged(uri: str) -> dict[str, Any]:
    """What every tracked run recorded: its train_loss points and status."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    client = mlflow.MlflowClient()
    points = [len(client.get_metric_history(run.info.run_id, "train_loss")) for run in runs]
    return {"runs": len(runs), "train_loss_points": points, "statuses": sorted({run.info.status for run in runs})}


def alternating_runs(root: str, uri: str, repeats: int) -> dict[str, Any]:
    """In one process: a warm-up run, then tracked and untracked runs alternating, `repeats` each.

    One process for both sides, so they share the same warm state (imports, allocator, caches)
    and only tracking differs. The MLflow store is opened before the first timed run; that
    one-off setup is measured on its own (`store_setup_s`).
    """
    from benchmarks import bench_train

    bench_train.loraflow_side(root, measure_peak=False)  # warm-up, untimed
    samples: dict[str, list[dict[str, Any]]] = {"tracking on": [], "tracking off": []}
    for i in range(repeats):
        for side in (["tracking on", "tracking off"] if i % 2 == 0 else ["tracking off", "tracking on"]):
            kwargs = {"tracking_uri": uri} if side == "tracking on" else {}
            samples[side].append(bench_train.loraflow_side(root, measure_peak=False, **kwargs))
    return samples


def run(root: Path, repeats: int, log=print) -> dict[str, Any]:
    uri = f"sqlite:///{root / 'tracking.db'}"
    common.run_child("bench_tracking", "prepare_store", {"uri": uri})
    log(f"    {repeats} tracked and {repeats} untracked runs, alternating in one process")
    samples = common.run_child("bench_tracking", "alternating_runs", {"root": str(root), "uri": uri, "repeats": repeats},
                               timeout=3600)
    samples.pop("peak_rss_mib", None)
    logged = common.run_child("bench_tracking", "count_logged", {"uri": uri})
    on = common.median([r["wall_s"] for r in samples["tracking on"]])
    off = common.median([r["wall_s"] for r in samples["tracking off"]])
    setup = samples["tracking on"][0]["store_setup_s"]
    return {"samples": samples, "on_s": on, "off_s": off, "overhead": (on - off) / off, "logged": logged,
            "store_setup_s": setup}
