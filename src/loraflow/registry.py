"""Model-registry promotion: gate a registered version on health and metric, then move aliases.

The rules themselves (alias names, the metric comparison, the decision records) are pure and live
in `loraflow.promotion`; this module talks to the registry.

The rules (issue 5), in the order they are checked:

1. The version exists, is READY, holds a loraflow model, and its source run FINISHED and was not
   deleted (a failed, killed or deleted run is refused: its model may be half-trained or tampered with).
2. The metric is read from the source run of the candidate and of the current champion.
3. Metric gate: the candidate must beat the champion by at least `min_delta` (`is_better`); with no
   champion, this gate is passed.
4. Health gate (`health_check`): the version loads through pyfunc and answers its own logged input
   example with non-empty text. It runs last because it is the expensive one.

On promotion the old champion moves to `previous_alias(alias)` and the candidate takes `alias`; both
versions are tagged `promotion.*`. On rejection only the candidate is tagged. Model version aliases
are used, never the deprecated stages. Errors raise `RegistryError` (a `LoraflowError`), bad
arguments `ConfigError`.

Not atomic: the registry has no compare-and-set, so two promotions of the same model at the same
moment can interleave. Run promotions of one model from one place (one CI job at a time).
"""

from __future__ import annotations

import contextlib
import difflib
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from loraflow.errors import ConfigError, LoraflowError
from loraflow.promotion import (
    CHAMPION,
    Decision,
    Rollback,
    alias_problem,
    check_arguments,
    is_better,
    metric_reason,
    previous_alias,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion

TAG_PREFIX = "promotion."
MAX_REASON_LENGTH = 500  # an exception text can be pages long; a tag should stay readable


class RegistryError(LoraflowError):
    """The registry, a model name, a version or its source run cannot be used as asked."""


# ---------------------------------------------------------------------------------------------
# Talking to the registry.


@contextlib.contextmanager
def _registry_calls(uri: str) -> Iterator[None]:
    """Turn a lost connection, or any other refusal by the store, into a `RegistryError` naming the URI."""
    from mlflow.exceptions import MlflowException

    from loraflow.tracking import is_connection_failure

    try:
        yield
    except (MlflowException, OSError) as err:
        if is_connection_failure(err):
            raise RegistryError(f"the model registry at {uri} cannot be reached ({err})") from err
        if not isinstance(err, MlflowException):
            raise
        raise RegistryError(f"the model registry at {uri} refused the request ({err.error_code}: {err.message})") from err


def connect(client: "MlflowClient | None" = None) -> "MlflowClient":
    """An `MlflowClient` whose registry answers; fails within seconds, naming the URI, if it does not.

    MLflow's own client retries a dead server for minutes; an HTTP registry is probed first with a
    short timeout, then one cheap query proves the store (sqlite file, server) can be read.

    Raises:
        RegistryError: the registry or tracking store cannot be reached or read.
    """
    import mlflow
    from mlflow import MlflowClient

    from loraflow.tracking import TrackingUnreachable, check_reachable

    if client is None:
        uris = dict.fromkeys([mlflow.get_registry_uri(), mlflow.get_tracking_uri()])
        for uri in uris:
            try:
                check_reachable(uri)
            except TrackingUnreachable as err:
                raise RegistryError(
                    f"the model registry at {uri} cannot be reached ({err.__cause__ or err}). Start the server, or "
                    "set MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI to a reachable store"
                ) from err
        client = MlflowClient()
    uri = _registry_uri(client)
    try:
        client.search_registered_models(max_results=1)
    except Exception as err:  # any store error here means the registry is unusable, not a bad request
        raise RegistryError(f"the model registry at {uri} cannot be read ({type(err).__name__}: {err})") from err
    return client


def _registry_uri(client: "MlflowClient") -> str:
    import mlflow

    return getattr(client, "_registry_uri", None) or mlflow.get_registry_uri()


def _registered_aliases(client: "MlflowClient", name: str) -> dict[str, str]:
    """The model's aliases ({alias: version}); raises `RegistryError` for an unknown name."""
    from mlflow.exceptions import MlflowException

    try:
        model = client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = [m.name for m in client.search_registered_models(max_results=1000)]
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else (f" Registered models: {', '.join(sorted(known)[:20])}."
                                                              if known else " No model is registered yet.")
        raise RegistryError(
            f"there is no registered model named {name!r} in {_registry_uri(client)}.{hint} "
            "Train with -P registered_model_name=NAME (or --registered-model-name NAME) to create one"
        ) from err
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def _all_versions(client: "MlflowClient", name: str) -> list[str]:
    versions = client.search_model_versions(f"name='{name}'", order_by=["version_number DESC"])
    return sorted((str(v.version) for v in versions), key=int)


def _model_version(client: "MlflowClient", name: str, version: str | None) -> "ModelVersion":
    """The requested version (default: the newest); raises `RegistryError` for an unknown one."""
    from mlflow.exceptions import MlflowException

    if version is None:
        newest = client.search_model_versions(f"name='{name}'", max_results=1, order_by=["version_number DESC"])
        if not newest:
            raise RegistryError(f"registered model {name!r} has no versions yet: train a candidate first")
        return client.get_model_version(name, str(newest[0].version))
    try:
        return client.get_model_version(name, version)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        known = _all_versions(client, name)
        raise RegistryError(
            f"registered model {name!r} has no version {version}; its versions are {', '.join(known) or 'none'}"
        ) from err


def _require_loraflow_model(name: str, version: str) -> None:
    """Read only the version's MLmodel file (not its weights) and check its flavors."""
    from mlflow.models import Model

    from loraflow.flavor import FLAVOR_NAME

    try:
        flavors = Model.load(f"models:/{name}/{version}").flavors
    except Exception as err:  # missing or unreadable artifacts: the version cannot be judged
        raise RegistryError(f"the MLmodel file of {name!r} version {version} cannot be read ({err})") from err
    if FLAVOR_NAME not in flavors:
        raise RegistryError(
            f"{name!r} version {version} is not a loraflow model (its flavors: {', '.join(sorted(flavors))}); "
            "only models logged by `loraflow train` or `loraflow.flavor.log_model` can be promoted"
        )


def _source_metric(client: "MlflowClient", model_version: "ModelVersion", metric: str, *,
                   require_finished: bool) -> float:
    """`metric` from the version's source run (its last logged value).

    Raises:
        RegistryError: no source run, a run that did not finish (when `require_finished`), or no
            such metric in the run.
    """
    name, version = model_version.name, str(model_version.version)
    if not model_version.run_id:
        raise RegistryError(
            f"{name!r} version {version} has no source run, so its `{metric}` cannot be read; "
            "register versions from a training run (train with -P registered_model_name=NAME)"
        )
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(model_version.run_id)
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise RegistryError(
            f"the source run {model_version.run_id} of {name!r} version {version} no longer exists, so its "
            f"`{metric}` cannot be read"
        ) from err
    if require_finished and run.info.status != "FINISHED":
        # Security: a FAILED or KILLED run may have logged a half-trained or tampered model.
        raise RegistryError(
            f"refusing to promote {name!r} version {version}: its source run {run.info.run_id} is "
            f"{run.info.status}, not FINISHED; only versions from runs that finished successfully can be promoted"
        )
    if require_finished and run.info.lifecycle_stage == "deleted":
        raise RegistryError(
            f"refusing to promote {name!r} version {version}: its source run {run.info.run_id} was deleted; "
            "restore the run (mlflow runs restore) if the model is still wanted"
        )
    metrics = run.data.metrics
    if metric not in metrics:
        close = difflib.get_close_matches(metric, list(metrics), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RegistryError(
            f"the source run {run.info.run_id} of {name!r} version {version} has no metric `{metric}`.{hint} "
            f"Its metrics: {', '.join(sorted(metrics)) or 'none'}"
        )
    return float(metrics[metric])


def _tag(client: "MlflowClient", name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, version, TAG_PREFIX + key, str(value))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------------------------------------
# The health gate.


def _texts(output: Any) -> list[Any]:
    import pandas as pd

    if isinstance(output, pd.DataFrame):
        column = "text" if "text" in output.columns else output.columns[0]
        return output[column].tolist()
    if isinstance(output, (pd.Series, list, tuple)):
        return list(output)
    return [output]


def _short(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    return text if len(text) <= MAX_REASON_LENGTH else text[: MAX_REASON_LENGTH - 3] + "..."


def health_check(model_uri: str) -> str | None:
    """Load a model through pyfunc and ask it its own logged input example.

    Healthy means: the artifacts download, the model loads, it answers the input example (with the
    example's params) without raising, and every answer has non-whitespace text.

    Args:
        model_uri: any model URI, e.g. `models:/NAME/3`.

    Returns:
        None if the model is healthy, else the reason it is not (one sentence).
    """
    import mlflow
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="loraflow-health-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp)
        except Exception as err:
            return f"its artifacts cannot be downloaded ({_short(err)})"
        try:
            meta = Model.load(local)
            example = meta.load_input_example(local)
            params = meta.load_input_example_params(local)
        except Exception as err:
            return f"its logged input example cannot be read ({_short(err)})"
        if example is None:
            return "it has no logged input example to check it against"
        try:
            model = mlflow.pyfunc.load_model(local)
        except Exception as err:
            return f"it does not load through pyfunc ({_short(err)})"
        try:
            texts = _texts(model.predict(example, params=params))
        except Exception as err:
            return f"it fails on its logged input example ({_short(err)})"
        finally:
            del model
    if not texts:
        return "it answered its logged input example with no rows"
    empty = [i for i, text in enumerate(texts) if not isinstance(text, str) or not text.strip()]
    if empty:
        return (f"it answered {len(empty)} of {len(texts)} prompts of its logged input example with empty text "
                f"(rows {empty[:5]})")
    return None


# ---------------------------------------------------------------------------------------------
# Public entry points.


def promote_if_better(
    model_name: str,
    version: str | int | None = None,
    metric: str = "eval_loss",
    mode: str = "min",
    min_delta: float = 0.0,
    alias: str = CHAMPION,
    client: "MlflowClient | None" = None,
) -> Decision:
    """Give `alias` to a version if it is healthy and beats the current holder on `metric`.

    Args:
        model_name: the registered model.
        version: the candidate version; default (None or ""): the newest version.
        metric: the metric to compare, read from each version's source run.
        mode: `min` (lower is better, e.g. a loss) or `max` (higher is better).
        min_delta: the smallest improvement that counts (>= 0).
        alias: the alias to compete for; its replaced holder moves to `previous_alias(alias)`.
        client: an `MlflowClient`; default: one for the current tracking and registry URIs.

    Returns:
        The `Decision`. A rejection is a decision, not an error.

    Raises:
        ConfigError: bad arguments (every one listed).
        RegistryError: unreachable registry, unknown model or version, a version that is not a
            loraflow model, a source run that did not finish or lacks `metric` (the candidate's or
            the champion's).
    """
    version = None if version is None or str(version).strip() == "" else str(version).strip()
    check_arguments(version, metric, mode, min_delta, alias)
    version = None if version is None else str(int(version))  # "03" and 3 name version 3
    client = connect(client)
    uri = _registry_uri(client)
    with _registry_calls(uri):
        aliases = _registered_aliases(client, model_name)
        candidate = _model_version(client, model_name, version)
        version = str(candidate.version)
        if candidate.status != "READY":
            raise RegistryError(f"{model_name!r} version {version} is {candidate.status}, not READY; wait or re-register it")
        _require_loraflow_model(model_name, version)
        candidate_value = _source_metric(client, candidate, metric, require_finished=True)
        champion_version = aliases.get(alias)
        champion_value = None
        if champion_version is not None and champion_version != version:
            champion = client.get_model_version(model_name, champion_version)
            champion_value = _source_metric(client, champion, metric, require_finished=False)

        def decide(promoted: bool, reason: str) -> Decision:
            return Decision(promoted, model_name, version, alias, metric, candidate_value, champion_version,
                            champion_value, reason)

        if champion_version == version:
            return decide(False, f"it already holds @{alias}; nothing to do")
        record = {"alias": alias, "metric": metric, "mode": mode, "min_delta": min_delta,
                  "candidate_version": version, "candidate_value": repr(candidate_value),
                  "champion_version": champion_version,
                  "champion_value": None if champion_value is None else repr(champion_value)}

        if champion_value is not None and not is_better(candidate_value, champion_value, mode, min_delta):
            reason = metric_reason(metric, mode, min_delta, candidate_value, champion_value, champion_version, False)
            _tag(client, model_name, version, {**record, "decision": "rejected", "reason": reason, "time": _now()})
            return decide(False, reason)

        problem = health_check(f"models:/{model_name}/{version}")
        if problem is not None:
            reason = f"it failed the health check: {problem}; @{alias} is unchanged"
            _tag(client, model_name, version, {**record, "decision": "rejected", "reason": reason, "time": _now()})
            return decide(False, reason)

        if champion_version is None:
            reason = (f"there was no @{alias} yet, and it passed the health check "
                      f"({metric} {candidate_value:.6g})")
        else:
            reason = metric_reason(metric, mode, min_delta, candidate_value, champion_value, champion_version, True)
            reason += f"; version {champion_version} is now @{previous_alias(alias)}"
        # Previous first: if the second call fails, both aliases point at the old champion (safe).
        if champion_version is not None:
            client.set_registered_model_alias(model_name, previous_alias(alias), champion_version)
        client.set_registered_model_alias(model_name, alias, version)
        stamp = _now()
        _tag(client, model_name, version, {**record, "decision": "promoted", "reason": reason, "time": stamp})
        if champion_version is not None:
            _tag(client, model_name, champion_version, {**record, "decision": "replaced", "replaced_by": version,
                                                       "reason": reason, "time": stamp})
        return decide(True, reason)


def rollback(model_name: str, alias: str = CHAMPION, client: "MlflowClient | None" = None) -> Rollback:
    """Swap `alias` and `previous_alias(alias)`: the previous holder takes the alias back.

    Rolling back twice restores the state before the first rollback.

    Args:
        model_name: the registered model.
        alias: the alias to roll back (default `champion`).
        client: an `MlflowClient`; default: one for the current tracking and registry URIs.

    Returns:
        The `Rollback`: the version that holds `alias` now, and the one it replaced.

    Raises:
        ConfigError: a bad alias.
        RegistryError: unreachable registry, unknown model, or no version holds `previous_alias(alias)`.
    """
    if problem := alias_problem(alias):
        raise ConfigError(problem)
    previous = previous_alias(alias)
    client = connect(client)
    with _registry_calls(_registry_uri(client)):
        aliases = _registered_aliases(client, model_name)
        restored = aliases.get(previous)
        if restored is None:
            raise RegistryError(
                f"cannot roll back {model_name!r}: no version holds @{previous} (a promotion sets it when it "
                f"replaces @{alias}); set one by hand with MlflowClient().set_registered_model_alias"
            )
        replaced = aliases.get(alias)
        if replaced == restored:
            raise RegistryError(f"cannot roll back {model_name!r}: @{alias} and @{previous} are both version {restored}")
        client.set_registered_model_alias(model_name, alias, restored)
        if replaced is None:
            client.delete_registered_model_alias(model_name, previous)
        else:
            client.set_registered_model_alias(model_name, previous, replaced)
        stamp = _now()
        reason = f"rollback of @{alias}: version {restored} restored" + (
            f", version {replaced} moved to @{previous}" if replaced else "")
        _tag(client, model_name, restored, {"decision": "restored", "alias": alias, "reason": reason, "time": stamp})
        if replaced is not None:
            _tag(client, model_name, replaced, {"decision": "rolled_back", "alias": alias, "reason": reason,
                                                "time": stamp})
        return Rollback(model_name, alias, restored, replaced)
