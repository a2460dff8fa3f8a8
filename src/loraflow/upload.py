"""`loraflow upload`: log a model that training saved locally (the tracking server was down).

The upload goes into a **new run**, never into the run the model came from: that run's status
(RUNNING, FAILED, KILLED: whatever the outage left) is the truth about the training, and marking it
FINISHED would let a half-trained model through promotion. The new run records the original run's
id and status as tags (`SOURCE_RUN_ID_TAG`, `SOURCE_RUN_STATUS_TAG`); `loraflow.registry` reads
them, so a version uploaded from a run that did not finish is refused as that run would be.

Before anything is logged, the folder is loaded natively (`loraflow.flavor.load_model`), which
checks the adapter's sha256 and the base's fingerprint: a tampered folder is refused at upload.
"""

from __future__ import annotations

import re
from pathlib import Path

from loraflow.errors import LoraflowError

SOURCE_RUN_ID_TAG = "loraflow.upload.source_run_id"
SOURCE_RUN_STATUS_TAG = "loraflow.upload.source_run_status"
UPLOADED_FROM_TAG = "loraflow.upload.local_dir"
NO_SOURCE = "NONE"  # the status recorded when the model's training run is not known


def upload_model(
    local_dir: str, run_id: str | None = None, registered_model_name: str | None = None, artifact_path: str = "model"
) -> str:
    """Log a loraflow model saved locally to a new run that names its training run, and optionally register it.

    Args:
        local_dir: a folder written by `loraflow.flavor.save_model` (training's fallback copy).
        run_id: the training run the model came from; default: the run named in a
            `model-<run_id>` folder, else none (recorded as unknown: promotion then refuses it).
        registered_model_name: also register it as a new version of this model.

    Returns:
        The model URI (`runs:/<new_run_id>/<artifact_path>`).

    Raises:
        LoraflowError: the folder is not a loraflow model, fails its digest or fingerprint check, or
            names a run that does not exist; the tracking server cannot be reached.
    """
    import mlflow

    from loraflow.tracking import check_reachable

    folder = Path(local_dir)
    verify_folder(folder)
    named = re.fullmatch(r"model-([0-9a-f]{32})", folder.name)
    source_id = run_id or (named.group(1) if named else None)
    check_reachable()
    tags = {UPLOADED_FROM_TAG: str(folder.resolve())[:5000], SOURCE_RUN_ID_TAG: source_id or "",
            SOURCE_RUN_STATUS_TAG: NO_SOURCE}
    experiment_id = None
    if source_id:
        source = _source_run(source_id, given=run_id is not None)
        tags[SOURCE_RUN_STATUS_TAG] = source.info.status
        experiment_id = source.info.experiment_id
    with mlflow.start_run(experiment_id=experiment_id, tags=tags, run_name=f"upload-{folder.name}"[:250]) as run:
        mlflow.log_artifacts(str(folder), artifact_path)
    uri = f"runs:/{run.info.run_id}/{artifact_path}"
    if registered_model_name:
        mlflow.register_model(uri, registered_model_name)
    return uri


def verify_folder(folder: Path) -> None:
    """Refuse a folder that is not a loraflow model, or whose adapter or base fails its check."""
    from mlflow.exceptions import MlflowException
    from mlflow.models import Model

    from loraflow import flavor

    where = repr(str(folder))
    try:
        flavors = Model.load(str(folder)).flavors
    except Exception as err:
        raise LoraflowError(f"{where} is not a saved MLflow model (no readable MLmodel): {str(err)[:300]}") from err
    if flavor.FLAVOR_NAME not in flavors:
        raise LoraflowError(f"{where} is not a loraflow model; its flavors are {sorted(flavors)}")
    try:
        loaded = flavor.load_model(str(folder))
    except MlflowException as err:
        raise LoraflowError(f"refusing to upload {where}: it fails its integrity check ({err.message[:500]}); "
                            "upload only a folder that training wrote and nothing changed since") from err
    del loaded


def _source_run(run_id: str, *, given: bool):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_run(run_id)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
        where = "given with --run-id" if given else "named by the folder"
        raise LoraflowError(
            f"the training run {run_id!r} ({where}) does not exist in the tracking store "
            f"({mlflow_uri()}); pass --run-id with the id of the run that trained this model, or point "
            "MLFLOW_TRACKING_URI at the store that holds it"
        ) from err


def mlflow_uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()
