"""The README's "Promote and serve" block, run as written (issue 12).

Its ```bash blocks are parsed and each line runs in a temporary copy of the project against a real
sqlite store, with shorter training (`max_steps` overrides) and a free port for the server, which
the test starts in the background and stops.
"""

from __future__ import annotations

import re
import shlex
import subprocess

import pytest
from helpers import ROOT, env_with_venv, free_port, project_copy, stop, wait_for_http
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def section_commands(title: str) -> list[str]:
    """The shell commands of a README section's bash blocks: continuation lines joined, comments and
    `. .venv/bin/activate` dropped (the test's environment already has the venv first on PATH)."""
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            command = command.strip()
            if command and not command.startswith(("#", ". .venv")):
                commands.append(command)
    return commands


def shorter(command: str, steps: str) -> str:
    """A training run with `steps` steps: the README's own max_steps replaced, else added."""
    if "-P max_steps=" in command:
        return re.sub(r"-P max_steps=\d+", f"-P max_steps={steps}", command)
    head, _, comment = command.partition("  #")
    return f"{head} -P max_steps={steps}" + (f"  #{comment}" if comment else "")


def test_the_readme_promote_and_serve_block_runs_as_written(tmp_path):
    commands = section_commands("Promote and serve")
    assert any(c.startswith("loraflow rollback") for c in commands) and any("&" in c for c in commands)
    project = project_copy(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = env_with_venv(MLFLOW_TRACKING_URI=uri, CUDA_VISIBLE_DEVICES="")
    port = str(free_port())
    trainings = iter(["2", "8"])  # the README's short first run stays the shorter one
    server = None
    outputs = []
    try:
        for command in commands:
            command = command.replace("5001", port)
            if command.startswith("mlflow run . --env-manager local"):
                command = shorter(command, next(trainings))
            if command.rstrip().endswith("&"):
                server = subprocess.Popen(command.rstrip(" &"), shell=True, cwd=project, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
                wait_for_http(f"http://127.0.0.1:{port}/health", server, timeout=300)
                continue
            proc = subprocess.run(command, shell=True, cwd=project, env=env, capture_output=True, text=True, timeout=600)
            assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            outputs.append((command, proc.stdout))
    finally:
        if server is not None:
            stop(server)
    by_start = {shlex.split(c)[0] + " " + shlex.split(c)[1]: out for c, out in outputs}
    assert '"text"' in by_start["curl -s"] or '"predictions"' in by_start["curl -s"]
    promotions = [out for c, out in outputs if "-e promote" in c]
    assert "promoted: tiny-lora version 1 is now @champion" in promotions[0]
    assert "promoted: tiny-lora version 2 is now @champion" in promotions[1]
    assert "rolled back: tiny-lora version 1 is now @champion; version 2 is now @previous" in by_start["loraflow rollback"]
    aliases = {k: str(v) for k, v in MlflowClient(uri).get_registered_model("tiny-lora").aliases.items()}
    assert aliases == {"champion": "1", "previous": "2"}


def test_load_and_generate_skips_runs_without_a_model(tmp_path):
    """After the promote entry point's model-less run, the example still finds the trained model."""
    project = project_copy(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = env_with_venv(MLFLOW_TRACKING_URI=uri, CUDA_VISIBLE_DEVICES="")
    none = subprocess.run(["python", "examples/load_and_generate.py"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)
    assert none.returncode == 1 and "no finished run has logged a loraflow model" in none.stderr
    assert "Traceback" not in none.stderr
    proc = subprocess.run(["python", "-m", "loraflow", "train", "--max-steps", "2"], cwd=project, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(uri)
    # a newer finished run without a model, as `mlflow run -e promote` leaves one
    client.set_terminated(client.create_run("0").info.run_id, "FINISHED")
    proc = subprocess.run(["python", "examples/load_and_generate.py"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model: models:/m-" in proc.stdout and "native: PeftModel" in proc.stdout
