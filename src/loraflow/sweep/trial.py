"""One trial of a sweep: a normal loraflow training run inside the trial's MLflow run, reporting its
metric to the pruner at each evaluation.

`MlflowStorage` keeps every Optuna trial as an MLflow run nested under the study's run; the
training logs into that same run, so a trial's run holds the trial's params and intermediate
values beside the run's own params, metrics, samples and model. How the run ends:

- FINISHED: trained and logged; the objective is the metric at the final evaluation;
- KILLED: pruned (what it logged so far is kept), or stopped by Ctrl-C (then its params are queued
  again, so the resumed study trains them first);
- FAILED: an error (out of memory, a NaN metric, a tracking outage); its reason is in the
  `loraflow.sweep.failure` tag and `error_message.txt`, and the study goes on.
"""

from __future__ import annotations

import logging
import math
import os
import traceback
from dataclasses import dataclass, field
from typing import Any

from loraflow import config
from loraflow.sweep.space import SearchSpace, resolve, suggest

logger = logging.getLogger(__name__)

FAILURE_TAG = "loraflow.sweep.failure"
TRIAL_TAG = "loraflow.sweep.trial"
INTERRUPTED = "interrupted"
"""Trial user attribute (tag `user_interrupted`): stopped by Ctrl-C, not counted, queued again."""
MODEL_URI = "model_uri"
"""Trial user attribute: the logged model of a finished trial."""
BEFORE = "metric_before"
"""Trial user attribute: the objective metric at step 0 (the base model with a zero LoRA update)."""
MAX_REASON = 500
ASYNC_LOGGING_ENV = "MLFLOW_ENABLE_ASYNC_LOGGING"


def log_synchronously() -> None:
    """Turn MLflow's async logging off in this process.

    `MlflowStorage` reads back what it has just written (each suggested param rewrites the
    trial's `param_directions` tag from the run's current tags); with async logging that read can
    miss the last write, and a trial's params are lost (a KeyError in `get_trial` later).
    """
    os.environ[ASYNC_LOGGING_ENV] = "false"


@dataclass(frozen=True)
class Plan:
    """What every trial needs, in any process (it is pickled to workers and Spark executors)."""

    space: SearchSpace
    """The searched settings."""
    fixed: dict[str, Any]
    """Every other setting, flat, as `loraflow train` takes them."""
    metric: str
    """The objective: a metric each evaluation logs."""
    direction: str
    """`minimize` or `maximize`."""
    explicit: frozenset[str] = field(default_factory=frozenset)
    """Setting names the user gave (for `init_model` conflicts)."""


class TrialFailed(Exception):
    """A trial trained but cannot count: its metric is missing or not finite, or tracking lost records."""


class PruningReport:
    """The `on_evaluate` callback of a trial's training: reports the metric and raises to prune.

    Step 0 is not reported (every trial starts from the same base model, the LoRA update being
    zero), nor is the final evaluation (the trial is finished; its value is the objective).
    """

    def __init__(self, trial: Any, metric: str):
        self.trial, self.metric = trial, metric
        self.first: float | None = None
        self.last: float | None = None

    def __call__(self, step: int, metrics: dict[str, float], final: bool) -> None:
        import optuna

        value = metrics.get(self.metric)
        if value is None:
            return
        self.first = value if self.first is None else self.first
        self.last = value
        if step == 0 or final or not math.isfinite(value):
            return
        self.trial.report(value, step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at step {step}: {self.metric} {value:.4g}")


def objective(trial: Any, plan: Plan) -> float:
    """Train one trial in its own MLflow run and return its metric at the final evaluation.

    Raises:
        optuna.TrialPruned: the pruner stopped it (the run ends KILLED).
        KeyboardInterrupt: Ctrl-C (the run ends KILLED, its params are queued again).
        Exception: anything else (the run ends FAILED, with the reason).
    """
    import mlflow
    import optuna

    log_synchronously()  # a Spark executor or worker process runs this first
    raw = resolve(suggest(trial, plan.space), plan.fixed)
    lora, settings = config.parse_settings(raw)
    report = PruningReport(trial, plan.metric)
    # Write the trial's params to its run before training logs its own (training then logs a
    # searched value it resolves, such as target_modules=attention, as `<name>_resolved`).
    getattr(trial.storage, "flush_all_batches", lambda: None)()
    run = mlflow.start_run(run_id=trial._trial_id)  # the run MlflowStorage made for this trial
    mlflow.set_tag(TRIAL_TAG, str(trial.number))
    try:
        return _train(lora, settings, plan, trial, report)
    except optuna.TrialPruned:
        raise
    except KeyboardInterrupt:
        trial.set_user_attr(INTERRUPTED, True)
        raise
    except Exception as err:
        _record_failure(trial, err)
        raise
    finally:
        _release(run)


def _train(lora: config.LoraSettings, settings: config.TrainSettings, plan: Plan, trial: Any,
           report: PruningReport) -> float:
    from loraflow.train import run_training

    result = run_training(lora, settings, explicit=set(plan.explicit), on_evaluate=report)
    if report.first is not None:
        trial.set_user_attr(BEFORE, report.first)
    if report.last is None:
        raise TrialFailed(f"the run logged no `{plan.metric}` at its evaluations; check --metric (generation "
                          "metrics such as eval_exact_match need --eval-samples > 0)")
    if not math.isfinite(report.last):
        raise TrialFailed(f"`{plan.metric}` is {report.last} at the final evaluation (the loss diverged: "
                          "try a lower learning_rate)")
    if not result.ok or not result.model_uri:
        raise TrialFailed("tracking failed during the run, so its record or model is incomplete "
                          f"(model saved at {result.local_model_dir})")
    trial.set_user_attr(MODEL_URI, result.model_uri)
    return report.last


def _record_failure(trial: Any, err: BaseException) -> None:
    """The reason in a tag (shown in the trials table) and the traceback as an artifact; never raises."""
    import mlflow

    reason = " ".join(f"{type(err).__name__}: {err}".split())[:MAX_REASON]
    try:
        trial.set_user_attr("failure", reason)
        mlflow.set_tag(FAILURE_TAG, reason)
        mlflow.log_text("".join(traceback.format_exception(err)), "error_message.txt")
    except Exception as log_err:  # a tracking outage: the trial fails anyway, the study goes on
        logger.warning("could not record why trial %s failed (%s)", trial.number, log_err)
    logger.warning("trial %s failed: %s", trial.number, reason)


def _release(run: Any) -> None:
    """Stop logging to the trial's run, leaving it RUNNING: the study's `tell` then sets its final
    status through the storage (Optuna refuses to tell a trial whose run already ended)."""
    import mlflow

    try:
        mlflow.end_run(status="RUNNING")
    except Exception as err:
        logger.warning("could not release run %s (%s)", run.info.run_id, err)
