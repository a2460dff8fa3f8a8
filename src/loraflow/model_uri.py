"""What a model URI names, checked before any model loads: that it exists, and which task it serves.

`check_model_uri` fails within seconds on a URI that names nothing (an unknown registered model,
alias, version or run, a folder without an MLmodel file), saying what exists instead;
`check_task` reads the MLmodel file alone to refuse prompts for a chat model and conversations for
a completion model. Used by `loraflow batch-predict` (`loraflow.predict`).
"""

from __future__ import annotations

from pathlib import Path

from loraflow.errors import LoraflowError


def check_task(model_uri: str, chat: bool, column: str) -> None:
    """Refuse prompts for a chat model and conversations for a completion model (reads the MLmodel only)."""
    from mlflow.models import get_model_info

    task = (get_model_info(model_uri).flavors.get("loraflow") or {}).get("task", "completion")
    if task == "chat" and not chat:
        raise LoraflowError(f"`model_uri` {model_uri!r} is a chat model: it answers conversations, not prompts; "
                            "give a table with a `messages` column (lists of {\"role\", \"content\"}) or name it "
                            "with --messages-column NAME")
    if task != "chat" and chat:
        raise LoraflowError(f"`model_uri` {model_uri!r} is a completion model: it continues prompts, not "
                            f"conversations (column {column!r}); name the prompt column with --prompt-column NAME")


def check_model_uri(model_uri: str) -> None:
    """Fail before loading anything when `model_uri` names no model (an unknown name, alias,
    version or run, a registered model without versions, a path that does not exist).

    Raises:
        LoraflowError: the URI names nothing; the message says what exists instead.
        TrackingUnreachable: the tracking server does not answer (within seconds).
    """
    from loraflow.tracking import check_reachable

    how = "give models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model or a folder holding an MLmodel file"
    if model_uri.startswith("models:/"):
        check_reachable()
        _check_registered(model_uri, how)
    elif model_uri.startswith("runs:/"):
        check_reachable()
        _check_run(model_uri, how)
    elif "://" not in model_uri and not model_uri.startswith("file:"):
        path = Path(model_uri).expanduser()
        if not (path / "MLmodel").is_file():
            what = "has no MLmodel file" if path.is_dir() else "is not a model URI nor an existing folder"
            raise LoraflowError(f"`model_uri` {model_uri[:300]!r} {what}; {how}")


def _check_registered(model_uri: str, how: str) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    rest = model_uri[len("models:/"):]
    name, sep, ref = rest.partition("@") if "@" in rest else rest.partition("/")
    client = MlflowClient()
    try:
        if not sep and name.startswith("m-"):
            client.get_logged_model(name)
            return
        client.get_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        known = sorted(m.name for m in client.search_registered_models(max_results=100))
        listed = f"registered models: {', '.join(known[:20])}" if known else "no model is registered yet"
        raise LoraflowError(f"`model_uri` {model_uri!r}: there is no registered model {name!r} ({listed}); {how}") from err
    versions = sorted((str(v.version) for v in client.search_model_versions(f"name='{name}'")), key=int)
    if not versions:
        raise LoraflowError(f"`model_uri` {model_uri!r}: registered model {name!r} has no versions yet; "
                            "train one with --registered-model-name NAME")
    try:
        if sep == "@":
            client.get_model_version_by_alias(name, ref)
        elif ref and ref.lower() != "latest":
            client.get_model_version(name, ref)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        aliases = sorted(client.get_registered_model(name).aliases or {})
        what = f"alias @{ref}" if sep == "@" else f"version {ref!r}"
        raise LoraflowError(f"`model_uri` {model_uri!r}: {name!r} has no {what}; its versions are "
                            f"{', '.join(versions)}, its aliases {', '.join(aliases) or 'none'}") from err


def _check_run(model_uri: str, how: str) -> None:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    run_id = model_uri[len("runs:/"):].split("/", 1)[0]
    try:
        MlflowClient().get_run(run_id)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        raise LoraflowError(f"`model_uri` {model_uri!r}: there is no run {run_id!r} in the tracking store; {how}") from err
