"""RunLogger: what a run records, and what tracking costs when it is off."""

from __future__ import annotations

import os
import subprocess
import sys

import mlflow
from mlflow import MlflowClient

from loraflow import tracking


def test_tracking_off_never_imports_mlflow():
    code = (
        "import sys\n"
        "from loraflow import tracking\n"
        "with tracking.RunLogger.start(enabled=False) as run:\n"
        "    run.log_metrics({'train_loss': 1.0}, 1)\n"
        "    run.log_loss_curve({'train_loss': [(1, 1.0)], 'eval_loss': []})\n"
        "    run.log_datasets(None, None)\n"
        "assert 'mlflow' not in sys.modules, 'mlflow was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_async_metrics_are_all_written_and_the_buffer_setting_is_scoped(tracking_uri, monkeypatch):
    monkeypatch.delenv(tracking.ASYNC_BUFFER_ENV, raising=False)
    with tracking.RunLogger.start() as run:
        assert os.environ[tracking.ASYNC_BUFFER_ENV] == tracking.ASYNC_BUFFER_SECONDS
        for step in range(1, 26):
            run.log_metrics({"train_loss": 1.0 / step}, step)
    assert tracking.ASYNC_BUFFER_ENV not in os.environ
    history = MlflowClient().get_metric_history(run.run_id, "train_loss")
    assert sorted(m.step for m in history) == list(range(1, 26))
    assert mlflow.get_run(run.run_id).info.status == "FINISHED"


def test_a_buffer_setting_the_user_chose_is_kept(tracking_uri, monkeypatch):
    monkeypatch.setenv(tracking.ASYNC_BUFFER_ENV, "5")
    with tracking.RunLogger.start() as run:
        run.log_metrics({"train_loss": 1.0}, 1)
        assert os.environ[tracking.ASYNC_BUFFER_ENV] == "5"
    assert os.environ[tracking.ASYNC_BUFFER_ENV] == "5"


def test_peak_rss_counts_this_process_not_the_parent_that_started_it():
    """A child of a large process reports its own peak: `ru_maxrss` would report the parent's size."""
    parent = bytearray(1024 * 2**20)
    parent[:: 4096] = b"\1" * len(parent[:: 4096])  # make every page resident
    code = (
        "import resource\n"
        "from loraflow.tracking import peak_rss_mib\n"
        "print(peak_rss_mib(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    del parent
    assert result.returncode == 0, result.stderr
    own, ru_maxrss = map(float, result.stdout.split())
    if sys.platform == "linux":
        assert ru_maxrss >= 1024  # the kernel keeps the parent's size there: what the check guards against
        assert 0 < own < 512


def test_a_dataset_another_run_inserted_at_the_same_moment_is_linked_not_lost(tracking_uri, tmp_path, monkeypatch):
    """Two runs logging the same new dataset at once (a sweep's trials on Spark executors) race in the
    store's look-up-then-insert: the loser's insert breaks the unique key. Its run still gets the dataset."""
    import threading

    import pandas as pd

    from loraflow.data.tables import Table

    (tmp_path / "rows.jsonl").write_text("")
    table = Table(pd.DataFrame({"prompt": ["a"], "completion": ["b"]}), "train_data", str(tmp_path / "rows.jsonl"))
    client = MlflowClient()
    other = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    real, lost = mlflow.log_input, []

    def lose_the_race(dataset, context=None, **kwargs):
        if not lost:  # the other run's insert lands between this run's look-up and its insert
            def other_run_logs_it() -> None:  # a run of its own: MLflow's active run is per thread
                with mlflow.start_run(run_id=other):
                    real(dataset, context=context)

            winner = threading.Thread(target=other_run_logs_it)
            winner.start()
            winner.join()
            lost.append(dataset.name)
            raise mlflow.MlflowException("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, "
                                         "datasets.name, datasets.digest")
        return real(dataset, context=context, **kwargs)

    monkeypatch.setattr(mlflow, "log_input", lose_the_race)
    with tracking.RunLogger.start() as run:
        run.log_datasets(table, table)
    assert lost == ["train"] and run.failures == 0
    mine = {d.dataset.name: d.dataset.digest for d in mlflow.get_run(run.run_id).inputs.dataset_inputs}
    theirs = {d.dataset.name: d.dataset.digest for d in mlflow.get_run(other).inputs.dataset_inputs}
    assert mine == {"train": run.digests["train"], "eval": run.digests["eval"]} and theirs == {"train": mine["train"]}
