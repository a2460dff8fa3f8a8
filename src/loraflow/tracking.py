"""MLflow tracking helpers: the one place (with flavor and registry) that talks to MLflow.

Tracking never stops training: every call here that fails warns and carries on. The caller
learns at the end whether anything was lost (`Tracker.failures`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from loraflow.config import LoraSettings, to_dict
from loraflow.errors import LoraflowError

logger = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
REACHABILITY_TIMEOUT_S = 5.0
# MLflow's async logging thread polls its queue with a 1 s timeout, so each flush and end_run
# stalls up to a second. With a buffering window it waits on an event that flushing sets instead
# and writes one batch per window (MLflow reads whole seconds; a process killed with SIGKILL loses
# at most the last window). Used only where the user has not set it.
ASYNC_BUFFER_ENV = "MLFLOW_ASYNC_LOGGING_BUFFERING_SECONDS"
ASYNC_BUFFER_SECONDS = "1"


class TrackingUnreachable(LoraflowError):
    """The tracking server does not answer at all."""


def check_reachable(uri: str | None = None, timeout: float = REACHABILITY_TIMEOUT_S) -> None:
    """Fail within seconds, naming the URI, when an http(s) tracking server does not answer.

    MLflow's own client retries a dead server for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7 with
    exponential backoff); a training run should not start, load a model and then hang.
    """
    import urllib.error
    import urllib.request

    import mlflow

    uri = uri or mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError:
        return  # it answered (a server without /health, an auth proxy): reachable
    except OSError as err:
        reason = getattr(err, "reason", err)
        raise TrackingUnreachable(
            f"MLflow tracking server {uri} cannot be reached ({reason}). Start it, or point "
            "MLFLOW_TRACKING_URI at a reachable store (unset, MLflow uses sqlite:///mlflow.db)."
        ) from err


def is_connection_failure(err: Exception) -> bool:
    text = f"{type(err).__name__} {err}"
    return isinstance(err, OSError) or any(
        marker in text for marker in ("Connection", "Max retries exceeded", "Timeout", "timed out")
    )


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


class RunLogger:
    """Everything a training run records in MLflow, each call guarded so tracking never stops training.

    Only the main process logs (MLflow's one-run-per-rank problem, mlflow #11782): on other
    processes every method is a no-op. `failures` counts what could not be recorded.
    """

    def __init__(self, run_id: str | None, enabled: bool):
        self.run_id = run_id
        self.enabled = enabled
        self.failures = 0
        self.unreachable = False  # after a connection failure, skip MLflow instead of retrying for minutes

    @classmethod
    @contextlib.contextmanager
    def start(cls, enabled: bool = True, run_id: str | None = None) -> Iterator["RunLogger"]:
        """Use the active run (or the one `mlflow run` made, via MLFLOW_RUN_ID), else start one.

        `run_id` re-opens an earlier run (resuming from its checkpoint).
        """
        if not enabled:  # never imports mlflow: a run with tracking off does not pay for it
            yield cls(None, enabled=False)
            return
        import mlflow

        check_reachable()
        owned = mlflow.active_run() is None
        run = mlflow.start_run(run_id=run_id) if owned else mlflow.active_run()
        logger_ = cls(run.info.run_id, enabled=True)
        status = "FAILED"
        set_buffer = ASYNC_BUFFER_ENV not in os.environ
        if set_buffer:
            os.environ[ASYNC_BUFFER_ENV] = ASYNC_BUFFER_SECONDS
        try:
            yield logger_
            status = "FINISHED"
        except KeyboardInterrupt:
            status = "KILLED"
            raise
        finally:
            logger_._guard("flush async logging", mlflow.flush_async_logging)
            if owned:
                logger_._guard("end the run", lambda: mlflow.end_run(status=status))
            if set_buffer:
                os.environ.pop(ASYNC_BUFFER_ENV, None)

    def _guard(self, what: str, call, *args: Any, **kwargs: Any) -> Any:
        if not self.enabled:
            return None
        if self.unreachable:
            self.failures += 1
            return None
        try:
            return call(*args, **kwargs)
        except Exception as err:  # any store or network error: warn, count, carry on
            self.failures += 1
            self.unreachable = is_connection_failure(err)
            if self.unreachable:  # later calls, MLflow's own included (end_run at exit), fail at once
                os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
            then = "skipping MLflow from now on" if self.unreachable else "training carries on"
            logger.warning("MLflow: could not %s (%s: %s); %s", what, type(err).__name__, err, then)
            return None

    def log_settings(self, lora: LoraSettings, train: Any) -> None:
        """Every resolved setting as a param, and the whole config as `config.yaml`."""
        if not self.enabled:
            return
        import mlflow

        resolved = {"lora": to_dict(lora), "train": to_dict(train)}
        self._guard("log params", log_params_safely, {**resolved["train"], **resolved["lora"]})
        self._guard("log config.yaml", mlflow.log_dict, resolved, "config.yaml")

    def log_metrics(self, metrics: Mapping[str, float | int], step: int | None) -> None:
        """Log metrics asynchronously (per-step logging must not slow training)."""
        if not self.enabled:
            return
        import mlflow

        values = {k: float(v) for k, v in metrics.items()}
        self._guard("log metrics", mlflow.log_metrics, values, step=step, synchronous=False)

    def log_datasets(self, train: Any, evaluation: Any) -> None:
        """The train and eval tables (`loraflow.data.Table`) as MLflow dataset inputs, with source and digest."""
        if not self.enabled:
            return
        import mlflow

        def log(table: Any, name: str, context: str) -> None:
            dataset = mlflow.data.from_pandas(table.frame, source=_dataset_source(table.source), name=name)
            mlflow.log_input(dataset, context=context)

        self._guard("log the train dataset", log, train, "train", "training")
        self._guard("log the eval dataset", log, evaluation, "eval", "evaluation")

    def log_loss_curve(self, history: Mapping[str, list[tuple[int, float]]]) -> None:
        """A loss-curve figure: train loss per step and eval loss at each evaluation."""
        if not self.enabled:
            return
        import mlflow

        self._guard("log the loss curve", lambda: mlflow.log_figure(loss_curve_figure(history), "loss_curve.png"))

    def log_model(self, model: Any, tokenizer: Any, **kwargs: Any):
        """Log the PEFT model with the loraflow flavor; None if it could not be logged."""
        from loraflow import flavor

        return self._guard("log the model", lambda: flavor.log_model(model, "model", tokenizer, **kwargs))

    def tag_version(self, info: Any, train: Any, lora: LoraSettings, eval_loss: float) -> str | None:
        """Tag a registered version with its run's key metric and settings; returns the version."""
        version = getattr(info, "registered_model_version", None)
        if version is None or not train.registered_model_name:
            return None
        from mlflow import MlflowClient

        tags = {
            "eval_loss": f"{eval_loss:.6g}",
            "base_model": train.base_model,
            "r": str(lora.r),
            "lora_alpha": str(lora.lora_alpha),
            "target_modules": _param_text(lora.target_modules),
            "run_id": self.run_id or "",
        }

        def tag() -> None:
            client = MlflowClient()
            for key, value in tags.items():
                client.set_model_version_tag(train.registered_model_name, str(version), key, value)

        self._guard("tag the model version", tag)
        return str(version)


def _dataset_source(path: str) -> Any:
    """A local file as MLflow's `LocalArtifactDatasetSource`, named directly: given a plain path,
    MLflow finds that class registered twice and warns that the source is ambiguous."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    local = [s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource"]
    return local[0](str(Path(path).resolve())) if local else str(path)


def loss_curve_figure(history: Mapping[str, list[tuple[int, float]]]):
    """Matplotlib figure of train loss (line) and eval loss (markers) against optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for key, style in (("train_loss", "-"), ("eval_loss", "o-")):
        points = history.get(key) or []
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, style, label=key.replace("_", " "))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("loraflow training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig
