"""Where things are: a saved model's files and flavor configuration, and loraflow's cache on this machine.

A saved model is `MLmodel`, `adapter/`, `tokenizer/`, `base/` (embedded mode only) and
`code/loraflow/` (`save.SHIPPED`): safetensors, JSON and YAML, no pickle (docs/flavor.md, Format).

Also the small rules every module shares (how a bad argument is raised, `short`, `parse_bool`),
written once for the rest of loraflow too; light on purpose (MLflow is imported inside functions).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mlflow.exceptions import MlflowException

FLAVOR_NAME = "loraflow"
FLAVOR_VERSION = 1  # bump when the layout or the flavor config changes incompatibly

ADAPTER_SUBPATH = "adapter"
TOKENIZER_SUBPATH = "tokenizer"
BASE_SUBPATH = "base"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
BASE_ARTIFACT = "base"  # a logged base's artifact path in its run (`stored_base`)

# Set to 1 to allow loading models whose base runs its own code (see `loraflow.flavor.load`).
TRUST_REMOTE_CODE_ENV = "LORAFLOW_TRUST_REMOTE_CODE"
# Where built-in bases and base digests are cached (default ~/.cache/loraflow).
HOME_ENV = "LORAFLOW_HOME"

BUILTIN_PREFIX = "builtin:"  # `builtin:tiny` (a base built from code), `builtin:qa` (a bundled dataset)
MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64-bit seeds; MLflow's `long` params are signed
MAX_ECHO = 300  # characters of a value or of another library's message that an error message quotes

_TRUE = ("true", "1", "yes", "y", "on")
_FALSE = ("false", "0", "no", "n", "off")


def invalid(message: str) -> "MlflowException":
    """The error for a bad argument or request (HTTP 400 when served)."""
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def short(value: Any, limit: int = MAX_ECHO, *, quote: bool = True) -> str:
    """`repr(value)` (`str(value)` with `quote=False`) cut to `limit` characters, then `...` and the
    full length: an error message about a value or a request of any size stays readable."""
    text = repr(value) if quote else str(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def parse_bool(value: Any) -> bool | None:
    """`True`/`False` for a bool or a boolean word (true/false, 1/0, yes/no, y/n, on/off), else None:
    the one reading of booleans in loraflow."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    return None


def env_flag(name: str, default: bool) -> bool:
    """An environment variable read as a boolean; unset or unreadable gives `default`."""
    value = parse_bool(os.environ.get(name, ""))
    return default if value is None else value


def cache_root() -> Path:
    """Where loraflow caches built-in bases and base digests: `$LORAFLOW_HOME` or `~/.cache/loraflow`."""
    return Path(os.environ.get(HOME_ENV, Path.home() / ".cache" / "loraflow"))


def read_flavor_conf(path: Path) -> dict[str, Any]:
    """The loraflow flavor configuration of the model saved at `path` (with libyaml's parser where
    PyYAML has it).

    Raises:
        MlflowException: no MLmodel, no loraflow flavor, or a flavor version newer than this code.
    """
    import yaml
    from mlflow.exceptions import MlflowException
    from mlflow.models.model import MLMODEL_FILE_NAME
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    try:
        with open(path / MLMODEL_FILE_NAME, encoding="utf-8") as f:
            doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError as e:
        raise MlflowException(f"no MLmodel file in {str(path)!r}: not an MLflow model", RESOURCE_DOES_NOT_EXIST) from e
    conf = (doc.get("flavors") or {}).get(FLAVOR_NAME) if isinstance(doc, dict) else None
    if not isinstance(conf, dict):
        raise MlflowException(f'the model at {str(path)!r} has no "{FLAVOR_NAME}" flavor', RESOURCE_DOES_NOT_EXIST)
    version = conf.get("flavor_version")
    if not isinstance(version, int) or version > FLAVOR_VERSION:
        raise MlflowException(
            f"the model at {str(path)!r} has loraflow flavor_version {version!r}, but this loraflow "
            f"reads versions up to {FLAVOR_VERSION}: upgrade loraflow "
            f"(it was saved by loraflow {conf.get('loraflow_version')})"
        )
    return conf
