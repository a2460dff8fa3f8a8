"""Storing a base model's files: embedded in one model, or logged once to the tracking store for
every model trained on it (loading a logged base is `load.localized`'s).

Embedded (`base_mode="embedded"`): the base's files are copied into the model, under `base/`.

Logged (`base_mode="logged"`, what "auto" means for a local folder or a GGUF file in `log_model`):
the same files are logged once per fingerprint, as the artifacts of one run in the `loraflow-bases`
experiment, tagged with the fingerprint. A later model on the same base finds that run and writes
only its adapter. A model records the run's URI (`runs:/<id>/base`), the artifact URI it resolved to
when logged, and the fingerprint. Loading downloads the base once per machine into
`$LORAFLOW_HOME/bases/<fingerprint>` and checks the loaded tensors against the fingerprint, as it
does for any base.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.exceptions import MlflowException

from loraflow.flavor.fingerprint import base_state_dict
from loraflow.flavor.layout import BASE_ARTIFACT, invalid

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import RunInfo
    from peft import PeftModel

# What a stored base holds from its directory: config, weights, and any remote code. Never pickled
# `.bin` checkpoints (the model format holds no pickle).
BASE_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "*.py")
BASES_EXPERIMENT = "loraflow-bases"
FINGERPRINT_TAG = "loraflow.base_fingerprint"


def base_files(source: Path) -> list[Path]:
    """The files of the base folder `source` that a stored base holds."""
    return sorted({p for pattern in BASE_FILE_PATTERNS for p in source.glob(pattern) if p.is_file()})


def check_base_files(source: Path) -> None:
    """Refuse a base folder without safetensors weights (nothing of it would load)."""
    if not any(p.suffix == ".safetensors" for p in base_files(source)):
        raise invalid(
            f"cannot store the base model from {str(source)!r} with the model: it has no *.safetensors weights "
            "(pickled .bin checkpoints are not copied). Re-save it with "
            "`model.save_pretrained(dir, safe_serialization=True)` or use base_mode='reference'"
        )


def write_base(peft_model: "PeftModel", source_dir: str | None, target: Path) -> None:
    """Write the base as a Hugging Face folder at `target`: a copy of `source_dir`'s files, or, for a
    base with no folder (a dequantized GGUF base), its config, generation config and tensors as
    stored, in one safetensors file (tied matrices once)."""
    target.mkdir(parents=True)
    if source_dir is not None:
        for path in base_files(Path(source_dir)):
            shutil.copy2(path, target / path.name)
        return
    from safetensors.torch import save_file

    base = peft_model.get_base_model()
    base.config.save_pretrained(str(target))
    if getattr(base, "generation_config", None) is not None:
        base.generation_config.save_pretrained(str(target))
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in base_state_dict(base).items()}
    save_file(tensors, str(target / "model.safetensors"), metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------
# Logged once per fingerprint.


def log_base(peft_model: "PeftModel", section: dict[str, Any], source_dir: str | None) -> dict[str, str]:
    """Log the base to the tracking store unless a run there already holds one with its fingerprint.

    Returns:
        Where it is: `uri` (`runs:/<id>/base`) and `artifact_uri` (that artifact's resolved location).
    """
    from mlflow import MlflowClient

    client = MlflowClient()
    experiment_id = _bases_experiment(client)
    info = (_logged_run(client, experiment_id, section["fingerprint"])
            or _log_new(client, experiment_id, peft_model, section, source_dir))
    return {"uri": f"runs:/{info.run_id}/{BASE_ARTIFACT}",
            "artifact_uri": f"{info.artifact_uri.rstrip('/')}/{BASE_ARTIFACT}"}


def _bases_experiment(client: "MlflowClient") -> str:
    experiment = client.get_experiment_by_name(BASES_EXPERIMENT)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(BASES_EXPERIMENT, tags={
            "mlflow.note.content": "Base models stored once, each referenced by every loraflow model trained on it."})
    except MlflowException:  # made meanwhile by another process
        return client.get_experiment_by_name(BASES_EXPERIMENT).experiment_id


def _logged_run(client: "MlflowClient", experiment_id: str, fingerprint: str) -> "RunInfo | None":
    """The finished run holding this base's files, or None."""
    runs = client.search_runs([experiment_id], filter_string=(
        f"tags.`{FINGERPRINT_TAG}` = '{fingerprint}' and attributes.status = 'FINISHED'"))
    return next((run.info for run in runs if client.list_artifacts(run.info.run_id, BASE_ARTIFACT)), None)


def _log_new(client: "MlflowClient", experiment_id: str, peft_model: "PeftModel", section: dict[str, Any],
             source_dir: str | None) -> "RunInfo":
    """A new run holding the base's files: a local folder's logged from where they are, a base with no
    folder (a dequantized GGUF base) written out first."""
    fingerprint = section["fingerprint"]
    tags = {FINGERPRINT_TAG: fingerprint, "base_model": section["name"], "dtype": str(section.get("dtype")),
            "mlflow.note.content": f"The base model `{section['name']}` (fingerprint `{fingerprint}`), stored once "
                                   "for every loraflow model trained on it."}
    run = client.create_run(experiment_id, run_name=f"base-{Path(section['name']).name}"[:250], tags=tags)
    try:
        if source_dir is not None:  # no copy of a base that may be many GB
            for path in base_files(Path(source_dir)):
                client.log_artifact(run.info.run_id, str(path), BASE_ARTIFACT)
        else:
            with tempfile.TemporaryDirectory(prefix="loraflow-base-") as tmp:
                write_base(peft_model, None, Path(tmp) / BASE_ARTIFACT)
                client.log_artifacts(run.info.run_id, str(Path(tmp) / BASE_ARTIFACT), BASE_ARTIFACT)
    except BaseException:
        client.set_terminated(run.info.run_id, "FAILED")
        raise
    client.set_terminated(run.info.run_id)
    return run.info
