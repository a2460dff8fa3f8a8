"""Every private MLflow name loraflow uses, imported in this one place.

MLflow's own flavors write and read a model with these helpers (the input example, the code paths,
the environment files, the artifact download, the serving flag); loraflow uses them so that its
models are written exactly as MLflow writes one. They are not public API and can move or change in
any MLflow release: `tests/flavor/test_mlflow_private.py` imports each one and binds the arguments
loraflow passes, so an upgrade that moves or changes one fails there, by name.
"""

from __future__ import annotations

from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
from mlflow.models.utils import _save_example
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.model_utils import _add_code_from_conf_to_system_path, _validate_and_copy_code_paths
from mlflow.utils.requirements_utils import _get_installed_version, _get_pinned_requirement

__all__ = [
    "_CONDA_ENV_FILE_NAME",
    "_CONSTRAINTS_FILE_NAME",
    "_MLFLOW_IS_IN_SERVING_ENVIRONMENT",
    "_PYTHON_ENV_FILE_NAME",
    "_PythonEnv",
    "_REQUIREMENTS_FILE_NAME",
    "_add_code_from_conf_to_system_path",
    "_download_artifact_from_uri",
    "_get_installed_version",
    "_get_pinned_requirement",
    "_process_pip_requirements",
    "_save_example",
    "_validate_and_copy_code_paths",
    "_validate_env_arguments",
    "run_name_words",
]


def run_name_words() -> tuple[list[str], list[str]] | None:
    """The predicates and nouns MLflow draws generated run names from (`happy-cat-123`), or None if
    this MLflow keeps them elsewhere."""
    try:
        from mlflow.utils.name_utils import _GENERATOR_NOUNS, _GENERATOR_PREDICATES
    except ImportError:
        return None
    return list(_GENERATOR_PREDICATES), list(_GENERATOR_NOUNS)
