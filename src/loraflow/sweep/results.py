"""What a sweep leaves behind: the study run's record (best trial, trials table, Optuna's plots),
the winner registered and promoted through `loraflow promote`'s gate, and the terminal summary."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

from loraflow.sweep.space import resolve
from loraflow.sweep.trial import BEFORE, INTERRUPTED, MODEL_URI

logger = logging.getLogger(__name__)

STATES = {"COMPLETE": "FINISHED", "PRUNED": "KILLED", "FAIL": "FAILED", "RUNNING": "RUNNING", "WAITING": "SCHEDULED"}
"""Optuna's trial states as the trial runs show them (MlflowStorage's mapping)."""
PLOTS = {
    "optimization_history.png": "plot_optimization_history",
    "param_importances.png": "plot_param_importances",
    "parallel_coordinate.png": "plot_parallel_coordinate",
}


@dataclass
class SweepResult:
    """What a sweep found; `summary()` is what the terminal shows."""

    study_name: str
    study_run_id: str
    metric: str
    direction: str
    counts: dict[str, int] = field(default_factory=dict)
    """Trials by outcome: finished, pruned, failed, interrupted (the last two runs' status: KILLED)."""
    best: Any = None
    """The best finished trial (an Optuna FrozenTrial), or None."""
    worst_value: float | None = None
    best_run_id: str | None = None
    model_uri: str | None = None
    registered_model_name: str | None = None
    registered_version: str | None = None
    decision: Any = None
    """The `promotion.Decision` when --promote was given."""
    interrupted: bool = False

    def summary(self) -> str:
        """Best settings, the metric before -> after, trial counts, and how to load, serve or resume."""
        counts = ", ".join(f"{n} {k}" for k, n in self.counts.items() if n) or "none"
        lines = ["", f"loraflow: sweep {'interrupted' if self.interrupted else 'finished'}",
                 f"  study:        {self.study_name} (run {self.study_run_id})", f"  trials:       {counts}"]
        if self.best is None:
            hint = ": see the FAILED runs' `loraflow.sweep.failure` tags" if self.counts.get("failed") else " yet"
            lines.append(f"  no trial finished{hint}")
        else:
            before = self.best.user_attrs.get(BEFORE)
            change = f"{before:.4f} -> {self.best.value:.4f}" if before is not None else f"{self.best.value:.4f}"
            settings = resolve(self.best.params, {})
            lines += [f"  best trial:   {self.best.number} (run {self.best_run_id})",
                      f"  settings:     {_settings_text(settings)}",
                      f"  {self.metric + ':':<14}{change} (base model -> best trial)"]
            if self.worst_value is not None:
                lines.append(f"  worst trial:  {self.metric} {self.worst_value:.4f} (finished trials)")
            lines += self._model_lines()
            options = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())
            lines.append(f"  train it longer: loraflow train {options} --max-steps 300")
        lines.append(f"  resume or extend: loraflow sweep --study-name {self.study_name} --trials N")
        return "\n".join(lines)

    def _model_lines(self) -> list[str]:
        uri = self.model_uri
        lines = []
        if self.registered_version:
            uri = f"models:/{self.registered_model_name}/{self.registered_version}"
            lines.append(f"  registered:   {self.registered_model_name} version {self.registered_version}")
        if self.decision is not None:
            lines.append(f"  promotion:    {self.decision.summary()}")
        if uri:
            lines += [f"  model URI:    {uri}", f"  load it:      mlflow.pyfunc.load_model({uri!r}).predict(...)",
                      f"  serve it:     mlflow models serve -m {uri} --env-manager local"]
        return lines


def _settings_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def collect(study: Any, study_run_id: str, metric: str, direction: str) -> SweepResult:
    """Count the trials by state and pick the best finished one."""
    from optuna.trial import TrialState

    trials = [t for t in study.trials if t.state != TrialState.WAITING]
    result = SweepResult(study.study_name, study_run_id, metric, direction)
    result.counts = {outcome: sum(1 for t in trials if _outcome(t) == outcome)
                     for outcome in ("finished", "pruned", "failed", "interrupted", "running")}
    finished = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    if finished:
        pick = min if direction == "minimize" else max
        result.best = pick(finished, key=lambda t: t.value)
        result.worst_value = (max if direction == "minimize" else min)(t.value for t in finished)
        result.best_run_id = result.best._trial_id
        result.model_uri = result.best.user_attrs.get(MODEL_URI)
    return result


def _outcome(trial: Any) -> str:
    if trial.user_attrs.get(INTERRUPTED):
        return "interrupted"
    return {"COMPLETE": "finished", "PRUNED": "pruned", "FAIL": "failed"}.get(trial.state.name, "running")


def trials_table(study: Any) -> dict[str, list[Any]]:
    """One row per trial: number, status, value, params, run id, duration and why it stopped."""
    from optuna.trial import TrialState

    trials = sorted((t for t in study.trials if t.state != TrialState.WAITING), key=lambda t: t.number)
    names = sorted({name for t in trials for name in t.params})
    table: dict[str, list[Any]] = {k: [] for k in ("trial", "status", "value", *names, "run_id", "seconds", "note")}
    for t in trials:
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        steps = max(t.intermediate_values, default=None)
        note = t.user_attrs.get("failure") or ("interrupted (Ctrl-C)" if t.user_attrs.get(INTERRUPTED) else "")
        if t.state == TrialState.PRUNED and not note:
            note = f"pruned after step {steps}"
        row = {"trial": t.number, "status": STATES[t.state.name], "value": t.value, "run_id": t._trial_id,
               "seconds": seconds, "note": note, **{n: t.params.get(n) for n in names}}
        for key in table:
            table[key].append(row[key])
    return table


def log_to_study_run(study: Any, result: SweepResult, space: dict[str, Any], fixed: dict[str, Any]) -> None:
    """Record the sweep on the study's run: best params (tags) and metric, the trials table, the plots.

    Tags and metrics, not params, hold the best trial: a resumed study's best may change, and an
    MLflow param never can.
    """
    from mlflow import MlflowClient

    client, run_id = MlflowClient(), result.study_run_id
    client.log_dict(run_id, {"search_space": space, "fixed_settings": fixed, "metric": result.metric,
                             "direction": result.direction}, "sweep.json")
    _log_new_rows(client, run_id, trials_table(study))
    for outcome, count in result.counts.items():
        client.log_metric(run_id, f"trials_{outcome}", count)
    if result.best is not None:
        client.log_metric(run_id, f"best_{result.metric}", result.best.value)
        client.set_tag(run_id, "best_run_id", result.best_run_id)
        client.set_tag(run_id, "best_trial", str(result.best.number))
        for name, value in result.best.params.items():
            client.set_tag(run_id, f"best.{name}", str(value))
        client.log_dict(run_id, {"trial": result.best.number, "run_id": result.best_run_id,
                                 result.metric: result.best.value, "params": result.best.params}, "best_trial.json")
    import matplotlib.pyplot as plt

    for artifact, figure in study_figures(study).items():
        client.log_figure(run_id, figure, artifact)
        plt.close(figure)


def _log_new_rows(client: Any, run_id: str, table: dict[str, list[Any]]) -> None:
    """Add the trials not yet in the run's `trials.json` table (MLflow appends to a logged table).

    A row never changes once logged: a trial is logged when it ended, and an ended trial stays so.
    """
    import mlflow

    logged: set[str] = set()
    if "trials.json" in {a.path for a in client.list_artifacts(run_id)}:
        logged = set(mlflow.load_table("trials.json", run_ids=[run_id])["run_id"])
    keep = [i for i, rid in enumerate(table["run_id"]) if rid not in logged]
    if keep:
        client.log_table(run_id, {k: [v[i] for i in keep] for k, v in table.items()}, "trials.json")


def study_figures(study: Any) -> dict[str, Any]:
    """Optuna's optimisation history, parameter importances and parallel coordinates (matplotlib).

    A plot Optuna cannot draw yet (importances need 2 finished trials that differ) is left out.
    """
    import matplotlib

    matplotlib.use("Agg")
    import optuna.visualization.matplotlib as plots

    figures = {}
    for artifact, name in PLOTS.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib backend experimental
                axes = getattr(plots, name)(study)
        except Exception as err:  # too few finished trials for this plot
            logger.info("sweep: %s not drawn (%s)", artifact, err)
            continue
        figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
        figure.set_size_inches(10, 6)
        figure.tight_layout()
        figures[artifact] = figure
    return figures


def register_best(result: SweepResult, name: str, promote: bool) -> None:
    """Register the best finished trial's model as a new version of `name`; with `promote`, run
    `loraflow promote`'s gate on it (health check, finished run, metric against the champion)."""
    import mlflow
    from mlflow import MlflowClient

    from loraflow.registry import promote_if_better

    if result.model_uri is None:
        logger.warning("sweep: no finished trial has a logged model, so nothing is registered")
        return
    version = mlflow.register_model(result.model_uri, name)
    result.registered_model_name, result.registered_version = name, str(version.version)
    client = MlflowClient()
    for key, value in (("sweep_study", result.study_name), ("sweep_trial", str(result.best.number)),
                       (result.metric, f"{result.best.value:.6g}")):
        client.set_model_version_tag(name, result.registered_version, key, value)
    if promote:
        mode = "min" if result.direction == "minimize" else "max"
        result.decision = promote_if_better(name, version=result.registered_version, metric=result.metric, mode=mode)
