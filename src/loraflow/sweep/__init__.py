"""Sweeps: search LoRA settings with Optuna, the study kept in MLflow itself (`loraflow sweep`).

One MLflow run holds the study (`mlflow.optuna.storage.MlflowStorage`); each trial is a run
nested under it, and a normal loraflow training run. The flow, top to bottom (`run_sweep`):

1. read the search space and the fixed settings, and check every value the space can produce
   (`space.check_space`) before anything loads;
2. open the study by name in the tracking store (new, or resumed);
3. run the trials it lacks: here, in `workers` processes, or on Spark (`study`), each one training
   with a pruner watching its metric (`trial`);
4. record the best trial, a trials table and Optuna's plots on the study's run; register the
   winner and put it through `loraflow promote`'s gate if asked (`results`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from loraflow.errors import ConfigError, LoraflowError
from loraflow.signals import exit_code
from loraflow.sweep.results import SweepResult
from loraflow.sweep.space import DEFAULT_SPACE, SearchSpace, check_space, load_space

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SPACE", "SweepInterrupted", "SweepSettings", "SweepResult", "run_sweep", "sweep_settings"]

METRICS = {"eval_loss": "min", "eval_perplexity": "min", "eval_exact_match": "max", "eval_token_f1": "max"}
"""Metrics every evaluation logs, and which way is better."""
GENERATION_METRICS = ("eval_exact_match", "eval_token_f1")
SWEEP_DEFAULTS = {"max_steps": 30, "eval_steps": 10, "eval_samples": 0}
"""Training settings a sweep uses unless given: short trials, evaluated 3 times (for the pruner)."""
PRUNERS = ("median", "none")
MODES = ("auto", "min", "max")
_STUDY_NAME = re.compile(r"^[\w.\-]+$")


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class SweepSettings:
    """How to search; every `loraflow train` setting not searched is fixed for all trials."""

    trials: int = _help("How many trials the study should have (a resumed study runs only those it lacks).", 8)
    search_space: str | None = _help("YAML file of the settings to search. Empty: the default space "
                                     "(r, lora_alpha, learning_rate, lora_dropout, target_modules).", None)
    metric: str = _help(f"The objective, read at the final evaluation: {', '.join(METRICS)}.", "eval_loss")
    mode: str = _help("min or max the metric; auto: max for exact match and F1, min for losses.", "auto")
    study_name: str | None = _help("The study (and its MLflow run) name; an existing study of this name "
                                   "is resumed. Empty: sweep-<UTC time>.", None)
    workers: int = _help("Trial processes on this machine sharing the study (one GPU each, or a share of "
                         "the CPU cores).", 1)
    spark: bool = _help("Run the trials on Spark executors (MlflowSparkStudy; the active Spark session, "
                        "else local[*]).", False)
    pruner: str = _help("Stop unpromising trials at an evaluation: median (the median pruner) or none.", "median")
    promote: bool = _help("Put the registered winner through `loraflow promote`'s gate (needs "
                          "--registered-model-name).", False)


class SweepInterrupted(LoraflowError, KeyboardInterrupt):
    """Ctrl-C: running trials ended KILLED; `result` is the study so far, resumable by name."""

    def __init__(self, result: SweepResult):
        self.result = result
        super().__init__(f"sweep interrupted; resume it with: loraflow sweep --study-name {result.study_name}")


# ---------------------------------------------------------------------------------------------
# Settings.


def _int(name: str, value: Any, problems: list[str], low: int, high: int) -> int:
    try:
        number = float(str(value).strip())
        if not number.is_integer() or not low <= number <= high:
            raise ValueError
        return int(number)
    except ValueError:
        problems.append(f"`{name}` must be a whole number from {low} to {high}, got {value!r}")
        return low


def sweep_settings(raw: Mapping[str, Any], fixed: Mapping[str, Any]) -> SweepSettings:
    """`SweepSettings` from strings (CLI options, MLproject params); `fixed` are the training settings.

    Raises:
        ConfigError: every bad value at once.
    """
    from loraflow.flavor.layout import parse_bool

    given = {k: v for k, v in raw.items() if v is not None and str(v).strip() != ""}
    problems: list[str] = []
    values: dict[str, Any] = {k: str(v).strip() for k, v in given.items()}
    for name, high in (("trials", 10_000), ("workers", 256)):
        if name in given:
            values[name] = _int(name, given[name], problems, 1, high)
    for name in ("spark", "promote"):
        if name in given:
            values[name] = parse_bool(given[name])
            if values[name] is None:
                problems.append(f"`{name}` must be true or false, got {given[name]!r}")
    settings = SweepSettings(**{k: v for k, v in values.items() if v is not None})
    problems += _rules(settings, fixed)
    if problems:
        raise ConfigError(problems)
    return settings


def _rules(s: SweepSettings, fixed: Mapping[str, Any]) -> list[str]:
    import difflib

    problems = []
    if s.metric not in METRICS:
        close = difflib.get_close_matches(s.metric, list(METRICS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        problems.append(f"`metric` must be one that every evaluation logs ({', '.join(METRICS)}), got {s.metric!r}.{hint}")
    eval_samples = str(fixed.get("eval_samples", SWEEP_DEFAULTS["eval_samples"])).strip()
    if s.metric in GENERATION_METRICS and eval_samples in ("0", "0.0", ""):
        problems.append(f"`metric` {s.metric} is scored on generated answers: give --eval-samples N (e.g. 32); "
                        "a sweep evaluates no samples by default")
    for name, value, choices in (("mode", s.mode, MODES), ("pruner", s.pruner, PRUNERS)):
        if value not in choices:
            problems.append(f"`{name}` must be one of {', '.join(choices)}, got {value!r}")
    if s.study_name is not None and not _STUDY_NAME.match(s.study_name):
        problems.append(f"`study_name` may hold letters, digits, '.', '_' and '-' only, got {s.study_name!r}")
    if s.spark and s.workers > 1:
        problems.append("`workers` is for processes on this machine; with --spark, Spark's executors run the "
                        "trials: drop --workers or --spark")
    if s.promote and not fixed.get("registered_model_name"):
        problems.append("`promote` needs --registered-model-name NAME: the winner is registered, then promoted")
    return problems


def direction(settings: SweepSettings) -> str:
    mode = METRICS.get(settings.metric, "min") if settings.mode == "auto" else settings.mode
    return "minimize" if mode == "min" else "maximize"


# ---------------------------------------------------------------------------------------------
# The sweep.


def fixed_settings(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The training settings every trial shares: the sweep's defaults, then what was given.

    `registered_model_name` is left out: trials do not register; the winner is registered once.
    """
    given = {k: v for k, v in raw.items() if v is not None and not (isinstance(v, str) and not v.strip())}
    given.pop("registered_model_name", None)
    return {**SWEEP_DEFAULTS, **given}


def run_sweep(settings: SweepSettings, train_raw: Mapping[str, Any]) -> SweepResult:
    """Run (or resume) a study and return what it found.

    Args:
        settings: how to search.
        train_raw: `loraflow train` settings, flat, as given (strings are fine): fixed for every trial.

    Raises:
        ConfigError: a bad search space, fixed setting or combination, before anything loads.
        SweepInterrupted: Ctrl-C; running trials ended KILLED, the study can be resumed.
    """
    space = load_space(settings.search_space)
    fixed = fixed_settings(train_raw)
    explicit = {k for k, v in train_raw.items() if v is not None and str(v).strip() != ""}
    check_space(space, fixed, explicit)  # before mlflow, torch or Optuna is even imported
    import mlflow

    from loraflow import tracking
    from loraflow.sweep import study as study_lib
    from loraflow.sweep.trial import Plan

    tracking.check_reachable()
    seed = int(float(fixed.get("seed", 42)))
    name = settings.study_name or f"sweep-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}"
    ref = study_lib.StudyRef(name, study_lib.experiment_id(), mlflow.get_tracking_uri(), settings.pruner, seed)
    plan = Plan(space, fixed, settings.metric, direction(settings), frozenset(explicit))
    study, resumed = study_lib.open_study(ref, plan.direction)
    study_run_id = study._study_id
    _prepare_study_run(study, study_run_id, space, resumed)
    remaining = max(0, settings.trials - study_lib.counted(study))
    logger.info("sweep: study %s (run %s)%s: %d trial(s) to run", name, study_run_id,
                " resumed" if resumed else "", remaining)
    try:
        _run(ref, plan, study, settings, remaining)
    except KeyboardInterrupt:
        study_lib.end_stale_trials(ref, study_run_id)
        result = _finish(study, study_run_id, plan, settings, "KILLED")
        result.interrupted = True
        raise SweepInterrupted(result) from None
    study_lib.end_stale_trials(ref, study_run_id)  # left by a worker that died
    registered = str(train_raw.get("registered_model_name") or "").strip() or None
    return _finish(study, study_run_id, plan, settings, "FINISHED", registered)


def _run(ref: Any, plan: Any, study: Any, settings: SweepSettings, remaining: int) -> None:
    from loraflow.sweep import study as study_lib

    if remaining == 0:
        return
    if settings.spark:
        study_lib.run_on_spark(ref, plan, remaining)
    elif settings.workers > 1:
        codes = study_lib.run_in_processes(ref, plan, remaining, settings.workers)
        if any(code == exit_code("SIGINT") for code in codes):
            raise KeyboardInterrupt
        for i, code in enumerate(codes):
            if code:
                logger.warning("sweep: worker %d exited with code %s; its running trial is marked KILLED", i, code)
    else:
        study_lib.run_trials(study, plan, remaining)


def _prepare_study_run(study: Any, run_id: str, space: SearchSpace, resumed: bool) -> None:
    """Mark the study run RUNNING, nest it under an `mlflow run` entry run, and refuse another space."""
    import os

    from mlflow import MlflowClient

    from loraflow.sweep.study import STUDY_TAG

    client = MlflowClient()
    stored = study.user_attrs.get("search_space")
    if resumed and stored is not None and stored != space.as_dict():
        raise ConfigError(f"study {study.study_name!r} searches {stored!r}, not {space.as_dict()!r}; give the "
                          "same --search-space to resume it, or a new --study-name")
    if not resumed:
        study.set_user_attr("search_space", space.as_dict())
    client.update_run(run_id, status="RUNNING")
    client.set_tag(run_id, STUDY_TAG, study.study_name)
    entry = os.environ.get("MLFLOW_RUN_ID")  # `mlflow run -e sweep` made a run for this command
    if entry and entry != run_id:
        client.set_tag(entry, "loraflow.sweep.study_run_id", run_id)
        if not resumed:
            client.set_tag(run_id, "mlflow.parentRunId", entry)


def _finish(study: Any, run_id: str, plan: Any, settings: SweepSettings, status: str,
            registered_model_name: str | None = None) -> SweepResult:
    from mlflow import MlflowClient

    from loraflow.sweep import results

    result = results.collect(study, run_id, plan.metric, plan.direction)
    results.log_to_study_run(study, result, plan.space.as_dict(), plan.fixed)
    MlflowClient().set_terminated(run_id, status=status)
    if registered_model_name and status == "FINISHED":  # a registry error is reported after the study is recorded
        results.register_best(result, registered_model_name, settings.promote)
    return result
