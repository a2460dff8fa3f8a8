"""Shared fixtures: the built-in tiny model, and a real MLflow sqlite store per test."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


@pytest.fixture(autouse=True)
def _run_in_tmp_path(tmp_path, monkeypatch):
    """Every test runs in its own temp dir: MLflow's ./mlruns artifact root and outputs/ land there."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def _store_uris_do_not_leak():
    """`mlflow.set_registry_uri(url)` also sets MLFLOW_REGISTRY_URI, and `set_registry_uri(None)`
    leaves it set: a later test's subprocess would then register models with a server that is gone.
    Every test ends with the environment's store URIs as they were."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {key: os.environ.get(key) for key in keys}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_path() -> str:
    """Local directory of `builtin:tiny` (built once, then cached)."""
    from loraflow.flavor.bases import builtin_dir as builtin_path

    return str(builtin_path("builtin:tiny"))


@pytest.fixture
def tiny_model(tiny_path):
    """A fresh fp32 copy of the built-in base model, in eval mode."""
    from loraflow.flavor.bases import load_base_model

    return load_base_model(tiny_path).eval()


@pytest.fixture(scope="module")
def base_model(tiny_path):
    """One loaded base model per test module; tests take `model`, a deepcopy peft can wrap freely."""
    from loraflow.flavor.bases import load_base_model

    return load_base_model(tiny_path).eval()


@pytest.fixture
def model(base_model):
    import copy

    return copy.deepcopy(base_model)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_path):
    from loraflow.flavor.bases import load_tokenizer

    return load_tokenizer(tiny_path)


@pytest.fixture
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A real MLflow sqlite store in tmp_path, active for this test (and its subprocesses)."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
