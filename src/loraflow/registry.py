"""Model-registry promotion: gate a registered version on health and metric, then move aliases.

The rules themselves (alias names, the metric comparison, the decision records) are pure and live
in `loraflow.promotion`; this module talks to the registry.

The rules, in the order they are checked:

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
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from loraflow.errors import ConfigError, LoraflowError
from loraflow.health import health_check
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
            if _is_file_store(uri):
                raise RegistryError(
                    f"the model registry needs a database-backed store, but the tracking/registry URI is the "
                    f"folder {uri!r}; set MLFLOW_TRACKING_URI to sqlite:///mlflow.db, a postgresql:// URI or an "
                    "http(s):// tracking server (`mlflow migrate-filestore` moves existing runs)"
                )
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


def _is_file_store(uri: str | None) -> bool:
    """A plain folder path or a file: URI (MLflow's file store, which has no usable model registry)."""
    from urllib.parse import urlparse

    if not uri:
        return False
    scheme = urlparse(uri).scheme
    return scheme in ("", "file") or len(scheme) == 1  # a Windows drive letter reads as a scheme


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
    run, status, via = _training_run(client, run)
    if require_finished and status != "FINISHED":
        # Security: a FAILED or KILLED run may have logged a half-trained or tampered model.
        raise RegistryError(
            f"refusing to promote {name!r} version {version}: {via} {status}, not FINISHED; only versions "
            "from runs that finished successfully can be promoted"
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


def _training_run(client: "MlflowClient", run: Any) -> tuple[Any, str, str]:
    """The run that trained a version's model, its status, and how it was found.

    A `loraflow upload` run is not the training: it names the training run and records that run's
    status at upload (tags of `loraflow.upload`); that status decides, and the metrics are the
    training run's when it still exists.
    """
    from mlflow.exceptions import MlflowException

    from loraflow.upload import SOURCE_RUN_ID_TAG, SOURCE_RUN_STATUS_TAG

    tags = run.data.tags
    if SOURCE_RUN_STATUS_TAG not in tags:
        return run, run.info.status, f"its source run {run.info.run_id} is"
    status, source_id = tags[SOURCE_RUN_STATUS_TAG], tags.get(SOURCE_RUN_ID_TAG)
    if not source_id:
        return run, status, (f"it was uploaded (run {run.info.run_id}) without naming its training run, "
                             f"so that run's status is")
    via = f"it was uploaded (run {run.info.run_id}) from training run {source_id}, which was"
    try:
        return client.get_run(source_id), status, via
    except MlflowException:
        return run, status, via


def _tag(client: "MlflowClient", name: str, version: str, tags: dict[str, Any]) -> None:
    for key, value in tags.items():
        if value is not None:
            client.set_model_version_tag(name, version, TAG_PREFIX + key, str(value))


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    force: bool = False,
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
        force: promote even though the current champion's `metric` cannot be read (its run lacks
            it or is gone); the candidate still needs its metric, a finished run and the health gate.

    Returns:
        The `Decision`. A rejection is a decision, not an error.

    Raises:
        ConfigError: bad arguments (every one listed).
        RegistryError: unreachable registry, unknown model or version, a version that is not a
            loraflow model, a source run that did not finish or lacks `metric` (the candidate's, or
            the champion's without `force`).
    """
    version = None if version is None or str(version).strip() == "" else str(version).strip()
    check_arguments(version, metric, mode, min_delta, alias)
    if not isinstance(model_name, str) or not model_name.strip():
        raise ConfigError(f"`model_name` must name a registered model, got {model_name!r}")
    version = None if version is None else str(int(version))  # "03" and 3 name version 3
    client = connect(client)
    with _registry_calls(_registry_uri(client)):
        aliases = _registered_aliases(client, model_name)
        candidate = _model_version(client, model_name, version)
        version = str(candidate.version)
        if candidate.status != "READY":
            raise RegistryError(f"{model_name!r} version {version} is {candidate.status}, not READY; wait or re-register it")
        _require_loraflow_model(model_name, version)
        candidate_value = _source_metric(client, candidate, metric, require_finished=True)
        champion_version = aliases.get(alias)
        champion_value, forced = None, None
        if champion_version is not None and champion_version != version:
            champion_value, forced = _champion_value(client, model_name, champion_version, metric, force)

        def decide(promoted: bool, reason: str) -> Decision:
            return Decision(promoted, model_name, version, alias, metric, candidate_value, champion_version,
                            champion_value, reason)

        if champion_version == version:
            return decide(False, f"it already holds @{alias}; nothing to do")
        record = {"alias": alias, "metric": metric, "mode": mode, "min_delta": min_delta,
                  "candidate_version": version, "candidate_value": repr(candidate_value),
                  "champion_version": champion_version, "forced": "true" if forced else None,
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
        elif forced:
            reason = (f"forced (--force): {forced}; it passed the health check ({metric} {candidate_value:.6g}); "
                      f"version {champion_version} is now @{previous_alias(alias)}")
        else:
            reason = metric_reason(metric, mode, min_delta, candidate_value, champion_value, champion_version, True)
            reason += f"; version {champion_version} is now @{previous_alias(alias)}"
        _move_aliases(client, model_name, alias, version, champion_version, {**record, "reason": reason})
        return decide(True, reason)


def _champion_value(client: "MlflowClient", name: str, champion_version: str, metric: str,
                    force: bool) -> tuple[float | None, str | None]:
    """The champion's `metric`, or (None, why) when it cannot be read and `force` allows that."""
    champion = client.get_model_version(name, champion_version)
    try:
        return _source_metric(client, champion, metric, require_finished=False), None
    except RegistryError as err:
        if force:
            return None, f"the champion's `{metric}` cannot be read ({err})"
        raise RegistryError(
            f"{err}. The current @champion version {champion_version} cannot be compared, so no version can beat "
            f"it: pass --force to promote despite that (the candidate still needs its `{metric}`, a finished run "
            "and the health check), or compare on a metric both runs have (--metric)"
        ) from err


def _move_aliases(client: "MlflowClient", name: str, alias: str, version: str, champion_version: str | None,
                  record: dict[str, Any]) -> None:
    # Previous first: if the second call fails, both aliases point at the old champion (safe).
    if champion_version is not None:
        client.set_registered_model_alias(name, previous_alias(alias), champion_version)
    client.set_registered_model_alias(name, alias, version)
    stamp = _now()
    _tag(client, name, version, {**record, "decision": "promoted", "time": stamp})
    if champion_version is not None:
        _tag(client, name, champion_version, {**record, "decision": "replaced", "replaced_by": version, "time": stamp})


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
    if not isinstance(model_name, str) or not model_name.strip():
        raise ConfigError(f"`model_name` must name a registered model, got {model_name!r}")
    previous = previous_alias(alias)
    client = connect(client)
    with _registry_calls(_registry_uri(client)):
        aliases = _registered_aliases(client, model_name)
        restored = aliases.get(previous)
        if restored is None:
            now = (f"@{alias} is version {aliases[alias]}, the first version ever promoted, so there is nothing "
                   "to go back to" if alias in aliases else f"no version holds @{alias} either")
            raise RegistryError(
                f"cannot roll back {model_name!r}: no version holds @{previous}. Rollback applies after a promotion "
                f"replaced an @{alias}: the replaced version keeps @{previous}, and rollback gives @{alias} back to "
                f"it. Here {now}; to serve another version, promote it (loraflow promote --version N) or set "
                "@previous by hand (MlflowClient().set_registered_model_alias)"
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
