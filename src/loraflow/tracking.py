"""MLflow tracking helpers: the one place (with flavor and registry) that talks to MLflow.

Tracking never stops training: every call here that fails warns and carries on. The caller
learns at the end whether anything was lost (`Tracker.failures`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from loraflow.config import LoraSettings, to_dict

logger = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def _param_text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return "" if value is None else str(value)


def log_params_safely(params: Mapping[str, Any]) -> dict[str, str]:
    """Log params to the active run without tripping over values that are already there.

    `mlflow run` pre-logs every MLproject parameter as the user typed it ("q_proj, v_proj"), and
    MLflow refuses to change a param. A key already logged with the same text is skipped; one
    logged with other text keeps the user's text, and our resolved value goes under
    `<key>_resolved`.

    Returns:
        What was logged, by the name it was logged under.
    """
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return {}
    existing = mlflow.get_run(run.info.run_id).data.params
    to_log: dict[str, str] = {}
    for key, value in params.items():
        text = _param_text(value)[:MAX_PARAM_LENGTH]
        if key not in existing:
            to_log[key] = text
        elif existing[key] != text:
            to_log[f"{key}_resolved"] = text
    if to_log:
        mlflow.log_params(to_log)
    return to_log


def log_metrics_safely(metrics: Mapping[str, float | int], step: int | None = None) -> bool:
    """Log metrics to the active run, if any; a failure warns and returns False."""
    import mlflow

    if mlflow.active_run() is None:
        return True
    try:
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
    except Exception as err:  # any store error: the model is fine, only the record is incomplete
        logger.warning("could not log metrics to MLflow (%s); carrying on", err)
        return False
    return True


def log_lora(settings: LoraSettings, report: Mapping[str, float | int]) -> bool:
    """Log LoRA settings as params and the parameter report as metrics, if a run is active.

    A tracking failure is a warning: it never fails the caller.
    """
    import mlflow

    if mlflow.active_run() is None:
        return True
    try:
        log_params_safely(to_dict(settings))
    except Exception as err:
        logger.warning("could not log LoRA settings to MLflow (%s); carrying on", err)
        return False
    return log_metrics_safely(report)
