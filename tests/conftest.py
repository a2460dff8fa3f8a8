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
from helpers import fresh_store, independent_tiny_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # a pytest-xdist worker runs as `python -c`: a __main__ without a spec,
    # which pyspark.sql.connect (imported by MLflow once pyspark is) takes for a doctest run, and exits
    import importlib.machinery
    import sys

    if getattr(sys.modules["__main__"], "__spec__", None) is None and not hasattr(sys.modules["__main__"], "__file__"):
        sys.modules["__main__"].__spec__ = importlib.machinery.ModuleSpec("__main__", None)  # spawn skips it
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # pytest-xdist workers share the cores: torch threads of
    # this worker and of the processes it starts, set before torch is imported (each would take every core)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0))
                                                    // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))


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


@pytest.fixture(scope="session", autouse=True)
def _independent_tiny_build(request, tmp_path_factory) -> None:
    """On an empty cache, the first pytest-xdist worker builds `builtin:tiny` for its first test and the
    second would wait for it: the second builds an independent copy meanwhile, which `test_builtin`
    compares with the cached build instead of building one more (when the e2e tier runs)."""
    from loraflow import builtin
    from loraflow.flavor.files import atomic_dir
    from loraflow.flavor.layout import cache_root

    independent = independent_tiny_dir(tmp_path_factory)
    cold = not (cache_root() / f"tiny-v{builtin.BUILD_VERSION}" / "config.json").exists()
    rebuild_runs = any(item.get_closest_marker("e2e") for item in request.session.items)
    if cold and rebuild_runs and independent and os.environ.get("PYTEST_XDIST_WORKER") == "gw1":
        with atomic_dir(independent) as tmp:
            builtin.build_tiny(tmp)


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


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the xdist_group marks
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(getattr(pytest.mark, tier(item)))
        group = shared_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
            if getattr(config.option, "loadgroup", False):  # an xdist worker with --dist loadgroup
                _group_in_nodeid(item, group)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects, and must order, the same way
        items[:] = e2e_first(items)


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
# Parallel runs: `scripts/test.sh` runs pytest-xdist workers (`-n`, `--dist loadgroup`).

# Module or session fixtures that train, start a process or build a site. A worker builds such a
# fixture for the tests it runs, so every test that takes one goes to the same worker (one
# `xdist_group` per module, or per session fixture), and the fixture is built once.
SHARED_FIXTURES = {"default_run", "runs", "server", "expected", "trained", "champion", "spark", "chat_run", "nf4_run",
                   "prequantized_dir", "site", "real_run", "saved"}


def shared_group(item: pytest.Item) -> str | None:
    """The `xdist_group` of a test that takes a shared fixture: its module, or the session fixture's name."""
    definitions = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    for name in sorted(SHARED_FIXTURES & set(getattr(item, "fixturenames", ()))):
        scope = definitions[name][-1].scope if definitions.get(name) else "function"
        if scope == "session":
            return name
        if scope == "module":
            return Path(str(item.fspath)).relative_to(Path(__file__).parent).as_posix()
    return None


def _group_in_nodeid(item: pytest.Item, group: str) -> None:
    """The `NODEID@GROUP` that pytest-xdist's loadgroup scheduler reads. xdist 3.8 writes it to
    `item._nodeid`, which pytest 9.2 no longer reads (pytest-dev/pytest-xdist#1386): the groups were
    silently ignored. Where the id is pytest 9.2's structured `NodeId`, set it here."""
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # an older pytest: xdist's own suffix works
        return
    if isinstance(getattr(item, "_id", None), NodeId) and "@" not in item.nodeid:
        item._id = NodeId.parse(f"{item.nodeid}@{group}")


def e2e_first(items: list[pytest.Item]) -> list[pytest.Item]:
    """The `e2e` tests first, then the others, each in file order: the workers start on the long tests,
    and the short ones fill in at the end. (The groups above go first in any case.)"""
    return sorted(items, key=lambda item: item.get_closest_marker("e2e") is None)


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
