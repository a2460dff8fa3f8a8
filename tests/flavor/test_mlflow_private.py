"""The private MLflow names loraflow uses are where it imports them, and take the arguments loraflow
passes: an MLflow upgrade that moves or changes one fails here, by name."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from loraflow.flavor import mlflow_private

SRC = Path(__file__).resolve().parents[2] / "src" / "loraflow"

# How loraflow calls each private function: (positional arguments, keyword arguments).
CALLS = {
    "_save_example": (("mlflow_model", "input_example", "path"), {}),
    "_validate_and_copy_code_paths": (("code_paths", "path"), {}),
    "_get_installed_version": (("package",), {}),
    "_get_pinned_requirement": (("package",), {"version": "1.0"}),
    "_process_pip_requirements": (("default", "pip_requirements", "extra_pip_requirements"), {}),
    "_validate_env_arguments": ((None, "pip_requirements", "extra_pip_requirements"), {}),
    "_download_artifact_from_uri": ((), {"artifact_uri": "uri", "output_path": "dst"}),
    "_add_code_from_conf_to_system_path": (("path", "conf"), {}),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_each_private_function_takes_the_arguments_loraflow_passes(name):
    args, kwargs = CALLS[name]
    inspect.signature(getattr(mlflow_private, name)).bind(*args, **kwargs)  # TypeError when MLflow changed it


def test_the_private_constants_and_classes_are_what_loraflow_writes_and_reads():
    assert mlflow_private._CONDA_ENV_FILE_NAME == "conda.yaml"
    assert mlflow_private._REQUIREMENTS_FILE_NAME == "requirements.txt"
    assert mlflow_private._PYTHON_ENV_FILE_NAME == "python_env.yaml"
    assert mlflow_private._CONSTRAINTS_FILE_NAME == "constraints.txt"
    assert callable(mlflow_private._PythonEnv.current().to_yaml)
    assert mlflow_private._MLFLOW_IS_IN_SERVING_ENVIRONMENT.get() in (True, False, None)
    predicates, nouns = mlflow_private.run_name_words()
    assert "happy" in predicates or len(predicates) > 10
    assert len(nouns) > 10


def private_mlflow_imports(text: str) -> list[str]:
    """The private names a module's source imports from mlflow (one-line or parenthesized imports)."""
    names = []
    for match in re.finditer(r"from (mlflow[\w.]*) import (\([^)]*\)|[^\n]*)", text):
        names += [f"{match.group(1)}.{n}" for n in re.findall(r"\b(_\w+)", match.group(2))]
    return names


def test_no_other_module_imports_a_private_mlflow_name():
    assert private_mlflow_imports("from mlflow.utils.environment import (\n    _PythonEnv,\n)") == [
        "mlflow.utils.environment._PythonEnv"]
    offenders = {str(path.relative_to(SRC)): private_mlflow_imports(path.read_text()) for path in SRC.rglob("*.py")
                 if path.name != "mlflow_private.py"}
    assert {path: names for path, names in offenders.items() if names} == {}
