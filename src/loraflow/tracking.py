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

from loraflow import figures
from loraflow.config import LoraSettings, TrainSettings, to_dict
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
# MLflow's client retries a request to a dead server for minutes (7 times, with exponential backoff);
# loraflow's commands retry a few times, so a blip is survived and an outage noticed in seconds.
RETRIES_ENV = "MLFLOW_HTTP_REQUEST_MAX_RETRIES"
RETRIES = "3"


def retry_briefly() -> None:
    """Let MLflow retry a failed request `RETRIES` times, unless the user has set `RETRIES_ENV`."""
    os.environ.setdefault(RETRIES_ENV, RETRIES)


class TrackingUnreachable(LoraflowError):
    """The tracking server does not answer at all."""


def check_reachable(uri: str | None = None, timeout: float = REACHABILITY_TIMEOUT_S) -> None:
    """Fail within seconds, naming the URI, when an http(s) tracking server does not answer.

    MLflow's own client retries a dead server for minutes (`RETRIES_ENV`); a training run should
    not start, load a model and then hang.
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
        self.task = "completion"  # what the data is (log_settings); the description says it
        self.run_id = run_id
        self.enabled = enabled
        self.failures = 0
        self.unreachable = False  # after a connection failure, skip MLflow instead of retrying for minutes
        self.may_name = False  # log_settings names the run from what it trains (see `start`)
        self.run_name: str | None = None
        self.digests: dict[str, str] = {}

    @classmethod
    @contextlib.contextmanager
    def start(cls, enabled: bool = True, run_id: str | None = None, run_name: str | None = None) -> Iterator["RunLogger"]:
        """Use the active run (or the one `mlflow run` made, via MLFLOW_RUN_ID), else start one.

        `run_id` re-opens an earlier run (resuming from its checkpoint). `run_name` names the run;
        without it, a new run whose name MLflow made up is named by `log_settings` from what it
        trains (`run_info.run_name`); a name someone chose, or a resumed run's, is kept.
        """
        if not enabled:  # never imports mlflow: a run with tracking off does not pay for it
            yield cls(None, enabled=False)
            return
        import mlflow

        from loraflow import run_info

        check_reachable()
        owned = mlflow.active_run() is None
        run = mlflow.start_run(run_id=run_id) if owned else mlflow.active_run()
        logger_ = cls(run.info.run_id, enabled=True)
        logger_.run_name = run.info.run_name
        if run_name:
            logger_._set_tags({"mlflow.runName": run_name})
            logger_.run_name = run_name
        else:
            logger_.may_name = run_id is None and run_info.is_generated_name(run.info.run_name)
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
                os.environ[RETRIES_ENV] = "0"
            then = "skipping MLflow from now on" if self.unreachable else "training carries on"
            logger.warning("MLflow: could not %s (%s: %s); %s", what, type(err).__name__, err, then)
            return None

    def log_settings(self, lora: LoraSettings, train: TrainSettings, task: str = "completion",
                     dtypes: Mapping[str, str] | None = None) -> None:
        """Every resolved setting as a param, the whole config as `config.yaml`, and the run's tags
        (`task`: `completion` or `chat`, what the data is). `dtypes`: the params `base_dtype` and
        `compute_dtype`, the dtypes the run chose (`loraflow.base_models.effective_dtypes`)."""
        if not self.enabled:
            return
        import mlflow

        from loraflow import run_info
        from loraflow.flavor.trainable import quantization_record

        base = train.model
        resolved = {"lora": to_dict(lora), "train": to_dict(train)}
        tags = run_info.run_tags(base.base_model, lora.r, lora.target_modules, task=task, quantization=base.quantization)
        if self.may_name:
            tags["mlflow.runName"] = run_info.run_name(lora.r, base.base_model, train.data.train_data)
        # A quantized base's record beside `quantization` itself: `quantization_compute_dtype`, `quantization_double_quant`.
        record = quantization_record(base.quantization, base.precision) or {}
        quantized = {f"quantization_{key}": value for key, value in record.items() if key != "method"}
        params = {**resolved["train"], **resolved["lora"], **quantized, **(dtypes or {})}
        self.task, self.run_name = task, tags.get("mlflow.runName", self.run_name)
        self._guard("log params", log_params_safely, params)
        self._guard("log config.yaml", mlflow.log_dict, resolved, "config.yaml")
        self._guard("set the run's tags", mlflow.set_tags, tags)

    def _set_tags(self, tags: Mapping[str, str]) -> None:
        import mlflow

        self._guard("set the run's tags", mlflow.set_tags, dict(tags))

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
            try:
                mlflow.log_input(dataset, context=context)
            except mlflow.MlflowException as err:
                # Runs that log the same new dataset at once (a sweep's parallel trials) race in the store's
                # look-up-then-insert, and the loser's insert breaks the unique key; the row exists now, so
                # a second call links it.
                if is_connection_failure(err):
                    raise
                mlflow.log_input(dataset, context=context)
            self.digests[name] = dataset.digest

        self._guard("log the train dataset", log, train, "train", "training")
        self._guard("log the eval dataset", log, evaluation, "eval", "evaluation")
        self._set_tags({f"dataset.{name}.digest": digest for name, digest in self.digests.items()})

    def log_loss_curve(self, history: Mapping[str, list[tuple[int, float]]]) -> None:
        """A loss-curve figure: train loss per step and eval loss at each evaluation."""
        if not self.enabled:
            return
        import mlflow

        self._guard("log the loss curve", lambda: mlflow.log_figure(figures.loss_curve(history), "loss_curve.png"))

    def log_samples(self, rows: list[dict[str, Any]], history: Mapping[str, list[tuple[int, float]]]) -> None:
        """The generated eval answers as the MLflow table `eval_samples.json` (one row per sample per
        evaluation: step, prompt, expected, generated, exact_match), and the figure `eval_quality.png`."""
        if not self.enabled:
            return
        import mlflow
        import pandas as pd

        self._guard("log the eval samples table", mlflow.log_table, pd.DataFrame(rows), "eval_samples.json")
        self._guard("log the eval quality figure",
                    lambda: mlflow.log_figure(figures.eval_quality(history), "eval_quality.png"))

    def log_model(self, model: Any, tokenizer: Any, **kwargs: Any):
        """Log the PEFT model with the loraflow flavor; None if it could not be logged."""
        from loraflow import flavor

        # MLflow's check would load the model a second time in this process (most of a run's time and
        # memory on a large base: benchmarks/bench_qlora.py); `promote`'s health gate checks it instead.
        info = self._guard("log the model", lambda: flavor.log_model(model, "model", tokenizer,
                                                                     validate_serving_input=False, **kwargs))
        fingerprint = (getattr(info, "flavors", None) or {}).get(flavor.FLAVOR_NAME, {}).get("base", {}).get("fingerprint")
        if fingerprint:
            self._set_tags({"base_fingerprint": str(fingerprint)})
        return info

    def tag_version(self, info: Any, train: TrainSettings, lora: LoraSettings, eval_loss: float) -> str | None:
        """Tag a registered version with its run's key metric and settings; returns the version."""
        version = getattr(info, "registered_model_version", None)
        name = train.tracking.registered_model_name
        if version is None or not name:
            return None
        from mlflow import MlflowClient

        tags = {
            "eval_loss": f"{eval_loss:.6g}",
            "base_model": train.model.base_model,
            "r": str(lora.r),
            "lora_alpha": str(lora.lora_alpha),
            "target_modules": _param_text(lora.target_modules),
            "run_id": self.run_id or "",
        }

        def tag() -> None:
            client = MlflowClient()
            for key, value in tags.items():
                client.set_model_version_tag(name, str(version), key, value)

        self._guard("tag the model version", tag)
        return str(version)


    def describe(self, result: Any, lora: LoraSettings, train: TrainSettings) -> None:
        """The run's Markdown description (`mlflow.note.content`), and the registered version's.

        `result` is `train.TrainResult`: eval loss before/after, model URI, registered version.
        Exact match before/after is included when the run logged `eval_exact_match`.
        """
        if not self.enabled:
            return
        from loraflow import run_info

        history = getattr(result, "history", None) or {}
        exact = history.get("eval_exact_match") or self._guard("read eval_exact_match", self._history, "eval_exact_match")
        base_model, train_data = train.model.base_model, train.data.train_data
        registered = train.tracking.registered_model_name if result.registered_version else None
        metrics = {"eval_loss": (result.eval_loss_before, result.eval_loss_after),
                   **({"eval_exact_match": run_info.before_after(exact)} if exact else {})}
        steps = max((step for step, _ in history.get("train_loss") or []), default=None)
        note = run_info.run_description(
            base_model=base_model, train_data=train_data, r=lora.r, target_modules=lora.target_modules,
            task=self.task, steps=steps, metrics=metrics, model_uri=result.model_uri,
            registered_model_name=registered, registered_version=result.registered_version)
        version_text = registered and run_info.version_description(
            run_id=self.run_id, run_name=self.run_name, base_model=base_model, train_data=train_data,
            r=lora.r, metric="eval_loss", before=result.eval_loss_before, after=result.eval_loss_after)
        self._set_tags({run_info.NOTE_TAG: note})
        if version_text:
            self._guard("describe the model version", _describe_version, registered, result.registered_version,
                        version_text)

    def _history(self, key: str) -> list[tuple[int, float]]:
        import mlflow
        from mlflow import MlflowClient

        mlflow.flush_async_logging()
        return [(m.step, m.value) for m in MlflowClient().get_metric_history(self.run_id, key)]


def _describe_version(name: str, version: str, text: str) -> None:
    from mlflow import MlflowClient

    MlflowClient().update_model_version(name, str(version), description=text)


def peak_rss_mib() -> float:
    """This process's peak resident set so far, in MiB.

    On Linux, the kernel's high-water mark of the process's own memory (`VmHWM`): `ru_maxrss` keeps
    the size of the process that forked this one, so a run that `mlflow run` starts would report at
    least its parent's (tests/test_tracking.py shows it). Elsewhere, `ru_maxrss`.
    """
    import resource
    import sys

    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def peak_memory() -> dict[str, float]:
    """The process's peak memory so far, in MiB: `peak_rss_mib` (resident set, the OS's count), and
    on a GPU `peak_gpu_memory_mib` (what torch allocated at most)."""
    import torch

    peak = {"peak_rss_mib": peak_rss_mib()}
    if torch.cuda.is_available():
        peak["peak_gpu_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peak


def input_example_prompts(prompts: list[str], tokenizer: Any, context: int | None, max_new_tokens: int,
                          count: int = 2) -> list[str]:
    """Up to `count` prompts the model can answer with `max_new_tokens` more tokens, for the input example.

    MLflow runs the example through the model when logging it: a training prompt longer than the
    context fails that check. The shortest prompts are taken (in their order), and if even those
    do not fit, the shortest is cut to its last tokens that fit.
    """
    prompts = [p for p in prompts if p.strip()] or ["Question: What does a cow say?\nAnswer:"]
    lengths = [len(ids) for ids in tokenizer(prompts)["input_ids"]]
    budget = None if context is None else context - max_new_tokens
    shortest = sorted(range(len(prompts)), key=lambda i: lengths[i])[:count]
    if budget is None or all(lengths[i] <= budget for i in shortest):
        return [prompts[i] for i in sorted(shortest)]
    fitting = [i for i in shortest if lengths[i] <= budget]
    if fitting:
        return [prompts[i] for i in sorted(fitting)]
    ids = tokenizer(prompts[shortest[0]])["input_ids"]
    keep = max(1, budget)
    while keep > 1:  # decoding and encoding again can merge or split tokens: check the round trip
        text = tokenizer.decode(ids[-keep:], skip_special_tokens=True)
        if len(tokenizer(text)["input_ids"]) <= budget:
            return [text]
        keep -= 1
    return [tokenizer.decode(ids[-1:], skip_special_tokens=True)]


def _dataset_source(path: str) -> Any:
    """A local file as MLflow's `LocalArtifactDatasetSource`, named directly: given a plain path,
    MLflow finds that class registered twice and warns that the source is ambiguous."""
    from mlflow.data.dataset_source_registry import get_registered_sources

    local = [s for s in get_registered_sources() if s.__name__ == "LocalArtifactDatasetSource"]
    return local[0](str(Path(path).resolve())) if local else str(path)
