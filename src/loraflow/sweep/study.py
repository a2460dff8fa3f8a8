"""The study: where it lives (`MlflowStorage`, so a study is resumed by name from the tracking
store), and how its trials run: in this process, in `workers` processes of this machine, or on
Spark executors (`MlflowSparkStudy`).

`trials` is the size the study should reach: a resumed study runs only the trials it lacks
(interrupted ones do not count; their params are queued again and run first).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.signals import exit_code
from loraflow.sweep.trial import INTERRUPTED, Plan, log_synchronously, objective

logger = logging.getLogger(__name__)

STUDY_TAG = "loraflow.sweep.study"


@dataclass(frozen=True)
class StudyRef:
    """Where a study lives: enough to load it again in another process."""

    name: str
    """The study name (the study run's name)."""
    experiment_id: str
    """The MLflow experiment holding the study run and the trial runs."""
    tracking_uri: str
    """The tracking store (workers and Spark executors connect to it)."""
    pruner: str
    """`median` or `none`."""
    seed: int
    """The sampler's seed (worker i uses seed + i)."""


def experiment_id() -> str:
    """The experiment a run would use: MLFLOW_EXPERIMENT_ID, MLFLOW_EXPERIMENT_NAME (created if
    missing), else the default experiment."""
    import mlflow

    if os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"]
    name = os.environ.get("MLFLOW_EXPERIMENT_NAME")
    return mlflow.set_experiment(name).experiment_id if name else "0"


def make_pruner(name: str) -> Any:
    import optuna

    # No pruning before 3 trials have finished: a median of fewer says little.
    return optuna.pruners.MedianPruner(n_startup_trials=3) if name == "median" else optuna.pruners.NopPruner()


def make_sampler(seed: int) -> Any:
    import optuna

    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=4)


def storage(ref: StudyRef) -> Any:
    import mlflow
    from mlflow.optuna.storage import MlflowStorage

    log_synchronously()
    mlflow.set_tracking_uri(ref.tracking_uri)
    return MlflowStorage(experiment_id=ref.experiment_id)


def open_study(ref: StudyRef, direction: str, worker: int = 0) -> tuple[Any, bool]:
    """The study named `ref.name`, created if new; and whether it existed.

    Raises:
        ConfigError: an existing study optimises in the other direction.
    """
    import optuna

    from loraflow.errors import ConfigError

    store = storage(ref)
    sampler, pruner = make_sampler(ref.seed + worker), make_pruner(ref.pruner)
    # MlflowStorage.create_new_study never reports a name as taken, so look it up first.
    existed = store.get_study_id_by_name_if_exists(ref.name) is not None
    if not existed:
        return optuna.create_study(storage=store, study_name=ref.name, direction=direction,
                                   sampler=sampler, pruner=pruner), False
    study = optuna.load_study(study_name=ref.name, storage=store, sampler=sampler, pruner=pruner)
    if study.direction.name.lower() != direction:
        raise ConfigError(f"study {ref.name!r} was created to {study.direction.name.lower()} its metric, not to "
                          f"{direction} it; give the same --metric/--mode, or a new --study-name")
    return study, True


def counted(study: Any) -> int:
    """Trials that count towards `trials`: all but waiting and interrupted ones."""
    from optuna.trial import TrialState

    return sum(1 for t in study.trials if t.state != TrialState.WAITING and not t.user_attrs.get(INTERRUPTED))


def run_trials(study: Any, plan: Plan, n_trials: int) -> None:
    """Ask, train and tell `n_trials` trials one after another in this process.

    A failed trial is told FAIL and the loop goes on; Ctrl-C tells the running trial PRUNED (its run
    KILLED), queues its params again, and raises.
    """
    from optuna.trial import TrialState
    from optuna import TrialPruned

    for _ in range(n_trials):
        trial = study.ask()
        try:
            value = objective(trial, plan)
        except TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
        except KeyboardInterrupt:
            study.tell(trial, state=TrialState.PRUNED)
            study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number})
            raise
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
        else:
            study.tell(trial, value)


def worker_main(ref: StudyRef, plan: Plan, n_trials: int, worker: int, workers: int, gpu: str | None) -> None:
    """A worker process: its GPU (or its share of the CPU cores), then `n_trials` trials of the study."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before torch starts CUDA in this (spawned) process
    else:
        import torch

        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    from loraflow.report import configure_logging

    configure_logging()
    study, _ = open_study(ref, plan.direction, worker)
    try:
        run_trials(study, plan, n_trials)
    except KeyboardInterrupt:
        raise SystemExit(exit_code("SIGINT")) from None


def visible_gpus() -> list[str]:
    """The GPU ids this process may use (CUDA_VISIBLE_DEVICES, else all); empty without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [g.strip() for g in visible.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def shares(n_trials: int, workers: int) -> list[int]:
    """`n_trials` split as evenly as possible over `workers` (no worker gets 0 unless n < workers)."""
    return [n_trials // workers + (1 if i < n_trials % workers else 0) for i in range(workers)]


def run_in_processes(ref: StudyRef, plan: Plan, n_trials: int, workers: int) -> list[int]:
    """Run the trials in `workers` spawned processes sharing the study; their exit codes.

    Each process asks the study for its own trials, so no trial runs twice. Ctrl-C reaches every
    worker (same process group): each ends its running trial KILLED and exits.
    """
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    gpus = visible_gpus()  # worker i gets GPU i mod len(gpus)
    processes = [context.Process(target=worker_main, name=f"sweep-worker-{i}",
                                 args=(ref, plan, share, i, workers, gpus[i % len(gpus)] if gpus else None))
                 for i, share in enumerate(shares(n_trials, workers)) if share]
    with this_loraflow_first():
        for process in processes:
            process.start()
    try:
        for process in processes:
            process.join()
    except KeyboardInterrupt:
        for process in processes:
            process.join(timeout=120)
        raise
    return [p.exitcode for p in processes]


@contextlib.contextmanager
def this_loraflow_first() -> Iterator[None]:
    """While workers are spawned (they get this `sys.path`), put the running loraflow first: a pyfunc
    load in this process may have put a model's shipped copy of loraflow ahead of it."""
    import sys

    import loraflow

    root = str(Path(loraflow.__file__).resolve().parents[1])
    saved = list(sys.path)
    sys.path[:] = [root, *(p for p in saved if p != root)]
    try:
        yield
    finally:
        sys.path[:] = saved


def run_on_spark(ref: StudyRef, plan: Plan, n_trials: int) -> None:
    """Run the trials on Spark executors through `MlflowSparkStudy` (the active Spark session, else local[*]).

    Failed trials are recorded FAILED and the study goes on; a pruned trial's run ends KILLED.
    """
    from mlflow.pyspark.optuna.study import MlflowSparkStudy
    from pyspark.sql import SparkSession

    SparkSession.getActiveSession() or SparkSession.builder.master("local[*]").appName("loraflow-sweep").getOrCreate()
    study = MlflowSparkStudy(ref.name, storage(ref), sampler=make_sampler(ref.seed), pruner=make_pruner(ref.pruner),
                             mlflow_tracking_uri=ref.tracking_uri)
    study.optimize(_SparkObjective(plan), n_trials=n_trials, catch=(Exception,))


class _SparkObjective:
    """The objective, picklable for Spark executors (which import loraflow from their own Python)."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def __call__(self, trial: Any) -> float:
        return objective(trial, self.plan)


def end_stale_trials(ref: StudyRef, study_run_id: str) -> list[str]:
    """Mark the study's trial runs still RUNNING as KILLED (after Ctrl-C or a lost worker); their ids."""
    from mlflow import MlflowClient

    client = MlflowClient(ref.tracking_uri)
    runs = client.search_runs([ref.experiment_id], f"tags.mlflow.parentRunId = '{study_run_id}' "
                                                   "and attributes.status = 'RUNNING'")
    for run in runs:
        client.set_tag(run.info.run_id, "user_" + INTERRUPTED, "true")
        client.set_terminated(run.info.run_id, status="KILLED")
    return [run.info.run_id for run in runs]
