"""5. Tracking overhead: loraflow's training run with per-step MLflow logging to a local sqlite store
against the same run with tracking off.

Both sides run `bench_train.loraflow_side` (same model, data, steps, seed) in fresh processes,
alternating. With tracking on, every optimizer step logs train_loss, learning_rate and
tokens_per_second (loraflow's `RunLogger`, MLflow async logging), evaluations log eval_loss and
perplexity, and the run is flushed and ended. Each store is a new sqlite file whose schema is
created before the clock starts (creating a store is a one-off cost, not per-run overhead).
The compared time is the wall time of `train.fit` (evaluations included) plus, when tracking,
opening, flushing and ending the run.
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
    import mlflow

    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(search_all_experiments=True, output_format="list")
    client = mlflow.MlflowClient()
    history = client.get_metric_history(runs[0].info.run_id, "train_loss")
    return {"runs": len(runs), "train_loss_points": len(history), "status": runs[0].info.status}


def run(root: Path, repeats: int, log=print) -> dict[str, Any]:
    stores = iter(range(10**6))

    def tracked(i: int) -> dict[str, Any]:
        uri = f"sqlite:///{root / f'tracking-{next(stores)}.db'}"
        common.run_child("bench_tracking", "prepare_store", {"uri": uri})
        result = common.run_child("bench_train", "loraflow_side", {"root": str(root), "tracking_uri": uri, "measure_peak": False})
        result["logged"] = common.run_child("bench_tracking", "count_logged", {"uri": uri})
        return result

    def untracked(i: int) -> dict[str, Any]:
        return common.run_child("bench_train", "loraflow_side", {"root": str(root), "measure_peak": False})

    samples = common.alternate({"tracking on": tracked, "tracking off": untracked}, repeats, log)
    on = common.median([r["wall_s"] for r in samples["tracking on"]])
    off = common.median([r["wall_s"] for r in samples["tracking off"]])
    return {"samples": samples, "on_s": on, "off_s": off, "overhead": (on - off) / off}
