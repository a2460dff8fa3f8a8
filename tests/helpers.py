"""Small utilities for tests that start real processes (mlflow server, mlflow models serve)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

BIN = Path(sys.executable).parent
_STORE_TEMPLATE: list[Path] = []  # one migrated sqlite store per test process, copied per test


def fresh_store(db: Path, artifact_root: str | None = None) -> str:
    """A new, migrated MLflow sqlite store at `db`, as `mlflow` would create it from the current
    directory (or, with `artifact_root`, as a server with that default root would), copied from
    one made once per test process: creating a store runs every migration (seconds)."""
    import shutil
    import sqlite3
    import tempfile

    if not _STORE_TEMPLATE:
        import mlflow

        folder = Path(tempfile.mkdtemp(prefix="loraflow-store-template-"))
        mlflow.MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()
        _STORE_TEMPLATE.append(folder / "mlflow.db")
    db.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_STORE_TEMPLATE[0], db)
    root = artifact_root or str(Path.cwd().resolve() / "mlruns")
    with sqlite3.connect(db) as conn:  # the default experiment's artifacts go where a new store puts them
        conn.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0", (root.rstrip("/") + "/0",))
    conn.close()
    return f"sqlite:///{db}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_with_venv(**extra: str) -> dict[str, str]:
    """The current environment with this interpreter's bin/ first on PATH (for `mlflow`, `python`)."""
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def wait_for_http(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout} s")


def server_store(db: Path) -> str:
    """The server's store: a new one, or the one a server used before at `db` (a restart keeps it)."""
    return f"sqlite:///{db}" if db.exists() else fresh_store(db, "mlflow-artifacts:/")


def server_env() -> dict[str, str]:
    """The environment of a test `mlflow server`: a tracking server without MLflow's job execution,
    whose runner and consumers (each a Python process importing MLflow) serve GenAI jobs that
    loraflow never submits, and would only compete for the cores while the server starts."""
    env = env_with_venv()
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return env


@contextmanager
def mlflow_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """A real `mlflow server` with a sqlite backend on a free loopback port; killed on exit."""
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "wb")
    proc = subprocess.Popen(
        [
            str(BIN / "mlflow"), "server",
            "--backend-store-uri", server_store(tmp_path / "server.db"),
            "--artifacts-destination", str(tmp_path / "server-artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", proc)
        yield url, proc
    finally:
        stop(proc)
        log.close()


def stop(proc: subprocess.Popen) -> None:
    """Terminate a process group started with start_new_session=True, then kill it if needed."""
    import signal

    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=15)


ROOT = Path(__file__).resolve().parents[1]


def project_copy(tmp_path: Path) -> Path:
    """The project's tracked files in a temp dir, so `mlflow run` cannot write into the repo."""
    import shutil

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    dest = tmp_path / "project"
    for name in files:
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


def independent_tiny_dir(tmp_path_factory) -> Path | None:
    """Where a pytest-xdist worker puts its independent build of `builtin:tiny`
    (`conftest._independent_tiny_build`): a folder of this run that every worker sees. None without
    pytest-xdist."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return None
    return tmp_path_factory.getbasetemp().parent / "tiny-independent"
