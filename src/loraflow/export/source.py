"""The model to export: a local folder read where it is, or a `runs:/`, `models:/` (any artifact URI)
model downloaded into a temporary folder that is removed afterwards; its loraflow flavor
configuration (read by `loraflow.flavor.layout.read_flavor_conf`), and the provenance record every
export carries.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraflow.export import DTYPES, ExportError


@dataclass
class Source:
    """A loraflow model on this machine: where it was asked for, its local folder and flavor config."""

    uri: str
    path: Path
    conf: dict[str, Any]


@contextmanager
def open_source(model_uri: str) -> Iterator[Source]:
    """The loraflow model at `model_uri`, read where it is (a local folder) or downloaded into a
    temporary folder that is removed afterwards (`runs:/`, `models:/`, other artifact URIs).

    Raises:
        ExportError: nothing is there, or it is not a loraflow model.
    """
    local = Path(os.path.expanduser(model_uri))
    if "://" not in model_uri and ":/" not in model_uri and local.is_dir():
        yield read_source(model_uri, local.resolve())
        return
    with tempfile.TemporaryDirectory(prefix="loraflow-export-source-") as download:
        yield read_source(model_uri, _download(model_uri, download))


def _download(model_uri: str, dst_path: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path))
    except (MlflowException, OSError) as e:
        raise ExportError(f"no model at `model_uri` {model_uri!r}: {e}. Give models:/NAME@ALIAS, "
                          "runs:/RUN_ID/model or a local model folder") from e


def read_source(model_uri: str, local: Path) -> Source:
    """Read the loraflow flavor config of the model folder `local`.

    Raises:
        ExportError: it is not an MLflow model, not a loraflow one, or one of a newer flavor version.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    from loraflow.flavor.layout import FLAVOR_NAME, read_flavor_conf

    if not (local / "MLmodel").is_file():
        raise ExportError(f"`model_uri` {model_uri!r} is not an MLflow model (no MLmodel file in "
                          f"{str(local)!r}): give a model logged by loraflow (loraflow train, flavor.log_model)")
    try:
        conf = read_flavor_conf(local)
    except MlflowException as e:
        if e.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise ExportError(f"`model_uri` {model_uri!r}: {e.message}") from e  # a newer flavor version
        raise ExportError(f"`model_uri` {model_uri!r} is not a loraflow model: its flavors are "
                          f"{_flavor_names(local)}, not {FLAVOR_NAME!r}. Export works on models logged by loraflow") from e
    except Exception as e:
        raise ExportError(f"`model_uri` {model_uri!r}: its MLmodel file cannot be read ({e}); re-log the model") from e
    if not isinstance(conf.get("base"), dict):
        raise ExportError(f"`model_uri` {model_uri!r}: its loraflow flavor records no base model; re-log the model")
    return Source(model_uri, local, conf)


def _flavor_names(local: Path) -> list[str]:
    """The flavors an MLmodel file lists (for the message about a model that is not loraflow's)."""
    import yaml

    doc = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))
    flavors = doc.get("flavors") if isinstance(doc, dict) else None
    return sorted(flavors) if isinstance(flavors, dict) else []


def provenance(source: Source, export_format: str, dtype: str | None) -> dict[str, Any]:
    """The small record of where an export came from (`loraflow_export.json`, run tags)."""
    from loraflow import __version__

    base = source.conf["base"]
    return {
        "format": export_format,
        "source_model_uri": source.uri,
        "base": {key: base.get(key) for key in ("kind", "name", "revision", "dtype", "fingerprint")},
        "base_fingerprint": base.get("fingerprint"),
        "adapter_sha256": dict(source.conf.get("adapter_sha256") or {}),
        "dtype": dtype,
        "loraflow_version": __version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def target_dtype(source: Source, dtype: str) -> str:
    """The torch dtype name to export in: `--dtype`, or (auto) the base's recorded dtype; for a base
    quantized in training (QLoRA) 16 bits: its compute dtype if that is 16-bit, else bf16."""
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    if quantization := source.conf.get("quantization"):
        return "float16" if quantization.get("compute_dtype") == "float16" else "bfloat16"
    recorded = str(source.conf["base"].get("dtype") or "")
    if recorded not in DTYPES.values():
        raise ExportError(f"the model records base dtype {recorded!r}, which --dtype auto cannot export: pass "
                          "--dtype bf16, fp16 or fp32")
    return recorded
