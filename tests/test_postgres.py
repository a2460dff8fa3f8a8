"""The team deployment end to end: `mlflow server` on PostgreSQL, train + register + promote, load by alias.

The test starts its own throwaway PostgreSQL cluster on 127.0.0.1 (initdb + pg_ctl in a temp dir,
as the `postgres` user when run as root, since PostgreSQL refuses to run as root). It is skipped
only where PostgreSQL is not installed; CI installs it (.ci/run) and sets
LORAFLOW_TEST_REQUIRE_POSTGRES=1, which turns that skip into a failure.
LORAFLOW_TEST_POSTGRES_URI=postgresql://... uses an existing database instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import mlflow
import pandas as pd
import pytest
from click.testing import CliRunner
from helpers import BIN, free_port, server_env, stop, wait_for_http
from mlflow import MlflowClient

from loraflow.cli import main

pytestmark = pytest.mark.slow

NAME = "team-lora"


def postgres_bin() -> Path | None:
    """The folder holding initdb and pg_ctl (Debian keeps them off PATH, in /usr/lib/postgresql/N/bin)."""
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    candidates = [Path(versions[-1]).parent] if versions else []
    if shutil.which("initdb"):  # resolved: a /usr/local/bin symlink points into the real bin folder
        candidates.append(Path(shutil.which("initdb")).resolve().parent)
    return next((d for d in candidates if all((d / b).exists() for b in ("pg_ctl", "createdb"))), None)


def as_postgres_user(command: list[str]) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


@contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A fresh PostgreSQL cluster on a free loopback port with a `mlflow` database; its URI."""
    bindir = postgres_bin()
    if bindir is None:
        reason = ("PostgreSQL is not installed (no initdb on PATH or in /usr/lib/postgresql/*/bin); "
                  "install it with `apt-get install postgresql` (.ci/run does)")
        if os.environ.get("LORAFLOW_TEST_REQUIRE_POSTGRES"):
            pytest.fail(reason + ", but LORAFLOW_TEST_REQUIRE_POSTGRES is set")
        pytest.skip(reason)
    root = Path(tempfile.mkdtemp(prefix="loraflow-pg-"))  # not tmp_path: the postgres user must reach it
    if os.geteuid() == 0:  # its uid and primary group from one passwd lookup, none by group name
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
    data, port = root / "data", free_port()

    def run(*command: str) -> None:
        proc = subprocess.run(as_postgres_user([str(bindir / command[0]), *command[1:]]),
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"{command[0]} failed:\n{proc.stdout}\n{proc.stderr}"

    run("initdb", "-D", str(data), "-U", "loraflow", "--auth=trust", "-E", "UTF8", "--no-sync")
    # fsync off: a throwaway cluster; -k: the socket in our dir, not /var/run/postgresql
    options = f"-h 127.0.0.1 -p {port} -k {root} -F"
    run("pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "postgres.log"), "-w", "-t", "60", "start")
    try:
        run("createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "loraflow", "mlflow")
        yield f"postgresql://loraflow@127.0.0.1:{port}/mlflow"
    finally:
        subprocess.run(as_postgres_user([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"]),
                       capture_output=True, timeout=60)
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def postgres_database() -> Iterator[str]:
    if os.environ.get("LORAFLOW_TEST_POSTGRES_URI"):
        yield os.environ["LORAFLOW_TEST_POSTGRES_URI"]
        return
    with throwaway_postgres() as uri:
        yield uri


@contextmanager
def mlflow_server_on(backend_uri: str, tmp_path: Path) -> Iterator[str]:
    """`mlflow server` with a PostgreSQL backend store and a local artifact root, as the README deploys it."""
    port = free_port()
    log = open(tmp_path / "mlflow-server.log", "wb")
    proc = subprocess.Popen(
        [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri,
         "--artifacts-destination", str(tmp_path / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=server_env(), start_new_session=True,
    )
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", proc, timeout=180)
        yield f"http://127.0.0.1:{port}"
    except Exception:
        log.flush()
        print((tmp_path / "mlflow-server.log").read_text()[-5000:])
        raise
    finally:
        stop(proc)
        log.close()


def test_train_register_promote_and_load_by_alias_through_a_postgres_backed_server(tmp_path, monkeypatch):
    """PostgreSQL and the server are real processes; `loraflow train` runs in process (click's CliRunner)."""
    with postgres_database() as backend, mlflow_server_on(backend, tmp_path) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        try:
            result = CliRunner().invoke(main, ["train", "--max-steps", "4", "--eval-steps", "2", "--r", "4",
                                               "--registered-model-name", NAME, "--output-dir", str(tmp_path / "outputs")])
        finally:
            mlflow.set_tracking_uri(None)
        assert result.exit_code == 0, result.output[-3000:] + repr(result.exception)

        client = MlflowClient(url, registry_uri=url)
        (version,) = client.search_model_versions(f"name='{NAME}'")
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)
        try:
            from loraflow import flavor, registry

            registry.promote_if_better(NAME, version.version, client=client)  # no champion yet: this one wins
            assert client.get_model_version_by_alias(NAME, "champion").version == version.version

            native = flavor.load_model(f"models:/{NAME}@champion")
            assert native.model.peft_config["default"].r == 4
            out = mlflow.pyfunc.load_model(f"models:/{NAME}@champion").predict(
                pd.DataFrame({"prompt": ["Question: What does a cow say?\nAnswer:"]}), params={"max_new_tokens": 4}
            )
            assert len(out["text"]) == 1
        finally:
            mlflow.set_tracking_uri(None)
            mlflow.set_registry_uri(None)

    # Everything above went through PostgreSQL, not a stray local store.
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()
