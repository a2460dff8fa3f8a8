"""Shared fixtures (the built-in tiny model, a real MLflow sqlite store per test) and the tiers.

Every test gets one tier marker, from what it does:
- `unit`: no model and no store;
- `model`: the tiny in-process model or an in-process MLflow store;
- `e2e`: real processes (`mlflow run`, `mlflow server`, `mlflow models serve`, the CLI as a
  subprocess, torchrun), Spark, PostgreSQL, QLoRA, the real checkpoint, built-in rebuilds.

`bash scripts/test.sh --fast` runs `-m "not e2e"`. A test outside `e2e` that starts a process fails,
naming the tier it belongs to, so the fast tier stays fast.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from helpers import fresh_store

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

    uri = fresh_store(tmp_path / "mlflow.db")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


# ---------------------------------------------------------------------------------------------
# Tiers.

E2E_FILES = {  # every test in these files starts servers or workers, or trains for many steps
    "test_mlflow_run.py", "test_multiprocess.py", "test_postgres.py", "test_qlora.py", "test_serving.py",
    "test_serving_faults.py", "test_real_checkpoint.py", "test_outages.py",
}
E2E_FIXTURES = {"spark", "champion", "default_run", "real_checkpoint", "mlflow_server"}  # they start one
E2E_CALLS = ("subprocess.", "Popen(", "mlflow_server(", "build_tiny(")  # a process, a server, a builtin rebuild
QUANTIZED = {"nf4", "fp4", "int8"}  # QLoRA through bitsandbytes on the CPU
MODEL_FIXTURES = {"tiny_path", "tracking_uri", "tiny_tokenizer"}  # the built-in model or a store


def _source(item: pytest.Item) -> str:
    import inspect

    try:
        return inspect.getsource(item.function)
    except (AttributeError, OSError, TypeError):
        return ""


def tier(item: pytest.Item) -> str:
    """`e2e`, `model` or `unit`, from what the test does: its file, fixtures, calls and parameters."""
    fixtures = set(getattr(item, "fixturenames", ()))
    params = getattr(getattr(item, "callspec", None), "params", {})
    if (Path(str(item.fspath)).name in E2E_FILES or item.get_closest_marker("slow") or fixtures & E2E_FIXTURES
            or any(call in _source(item) for call in E2E_CALLS) or QUANTIZED & {str(v) for v in params.values()}):
        return "e2e"
    return "model" if fixtures & MODEL_FIXTURES else "unit"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(getattr(pytest.mark, tier(item)))


@pytest.fixture(autouse=True)
def _processes_only_in_e2e(request, monkeypatch):
    """Outside the e2e tier a test may not start Python or a tool of this environment (`mlflow`,
    `torchrun`, `loraflow`): each start imports torch, transformers and MLflow, seconds each, and
    would make the fast tier slow. System tools (`uname`, `git`) start in milliseconds and pass."""
    if request.node.get_closest_marker("e2e"):
        return
    import sys

    name, real_init = request.node.nodeid, subprocess.Popen.__init__
    here = str(Path(sys.executable).parent)

    def refuse_python(self, args, *rest, **kwargs):
        program = str(args[0] if isinstance(args, (list, tuple)) else str(args).split()[0])
        if program.startswith(here) or Path(program).name.startswith("python"):
            raise AssertionError(f"{name} starts {program!r}: a test that starts a process belongs in the e2e "
                                 "tier (tests/conftest.py: tier), or test it in process")
        real_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse_python)


# ---------------------------------------------------------------------------------------------
# The main job, once per test session.


@pytest.fixture(scope="session")
def default_run(tmp_path_factory):
    """`mlflow run . -P r=16` on the real defaults (built-in model, bundled data, 300 steps), as a
    user runs it, in a copy of the project: one run that every test of the main job reads."""
    import sys
    from types import SimpleNamespace

    from helpers import env_with_venv, project_copy
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("default-run")
    project = project_copy(tmp)
    uri = fresh_store(tmp / "mlflow.db", artifact_root=str(tmp / "mlruns"))
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "mlflow"), "run", str(project), "-P", "r=16", "--env-manager", "local",
         # the same modules in other words: re-logging the pre-logged param must not fail the run
         "-P", "target_modules=q_proj, k_proj, v_proj, o_proj"],
        cwd=project, env=env_with_venv(MLFLOW_TRACKING_URI=uri), capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("Default").experiment_id])

    def history(key: str) -> list[tuple[int, float]]:
        return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))

    return SimpleNamespace(uri=uri, run=run, run_id=run.info.run_id, stdout=proc.stdout, history=history,
                           model_uri=f"runs:/{run.info.run_id}/model")
