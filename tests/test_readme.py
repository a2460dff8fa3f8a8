"""The shell blocks of the README and the getting-started page run as written.

Each ```bash block of `README.md` and `docs/getting-started.md` is one test. Its lines run in order,
in a temporary copy of the project, with the venv first on PATH (`. .venv/bin/activate` is dropped),
`export NAME=value` applied to the environment, and a line ending in `&` started in the background
on a free port (later lines are pointed at that port) and stopped at the end.

An HTML comment on the line before a block says how it is tested:

- `<!-- doc-test: slow -->`: it trains; every training command gets a short `max_steps` (2 for the
  first run, 8 for later ones, so a later version can beat an earlier one);
- `<!-- doc-test: skip: REASON -->`: not run (it creates environments, needs a GPU, the Hub or your
  own files); the reason says what tests it instead;
- no comment: it runs exactly as written.

Every block that runs starts processes, so it is a slow (`e2e`) test; checking the markers is not.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import ROOT, env_with_venv, free_port, project_copy, stop, wait_for_http
from mlflow import MlflowClient

PAGES = ("README.md", "docs/getting-started.md")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", flags=re.S | re.M)
MARKER = re.compile(r"<!--\s*doc-test:\s*(\w+)(?::\s*(.*?))?\s*-->\s*$")
TRAINING = ("mlflow run . --env-manager local", "loraflow train")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    section: str
    mode: str  # "run", "slow" or "skip"
    reason: str
    commands: tuple[str, ...]

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line} ({self.section})"


def shell_blocks(page: str) -> list[Block]:
    """Every ```bash block of a page, with its marker and the section it sits in."""
    text = (ROOT / page).read_text()
    blocks = []
    for match in FENCE.finditer(text):
        if match[1] not in ("bash", "sh", "shell", "console"):
            continue
        before = text[: match.start()].rstrip("\n").splitlines()
        marker = MARKER.match(before[-1].strip()) if before else None
        headings = [line.lstrip("#").strip() for line in before if line.startswith("#")]
        commands = []
        for command in match[2].replace("\\\n", " ").splitlines():
            command = command.strip()
            if command and not command.startswith("#"):
                commands.append(command)
        blocks.append(Block(page, len(before) + 1, headings[-1] if headings else "", marker[1] if marker else "run",
                            (marker[2] or "") if marker else "", tuple(commands)))
    return blocks


ALL_BLOCKS = [block for page in PAGES for block in shell_blocks(page)]
RUNNABLE = [block for block in ALL_BLOCKS if block.mode != "skip"]


def test_every_shell_block_is_run_or_says_why_not():
    assert RUNNABLE, "no shell block of the README or getting-started page runs"
    for block in ALL_BLOCKS:
        assert block.mode in ("run", "slow", "skip"), f"{block.id}: unknown doc-test marker {block.mode!r}"
        assert block.mode != "skip" or block.reason, f"{block.id}: a skipped block must say why (and what tests it)"
        assert block.commands, f"{block.id}: an empty shell block"
    readme = [b for b in ALL_BLOCKS if b.page == "README.md"]
    tour = [c for b in readme if b.mode == "slow" for c in b.commands]
    assert any(c.startswith("mlflow run") for c in tour) and any(c.endswith("&") for c in tour), "the README tour"


def shorter(command: str, steps: str) -> str:
    """A training command with `steps` optimizer steps: its own max_steps replaced, else added."""
    head, _, comment = command.partition("  #")
    head = head.rstrip()
    if re.search(r"(-P max_steps=|--max-steps )\d+", head):
        head = re.sub(r"(-P max_steps=|--max-steps )\d+", rf"\g<1>{steps}", head)
    else:
        head += f" -P max_steps={steps}" if head.startswith("mlflow run") else f" --max-steps {steps}"
    return head + (f"  #{comment}" if comment else "")


def run_block(block: Block, tmp_path: Path) -> list[tuple[str, str]]:
    """Run a block's commands in order in a project copy; return (command, stdout) of each one."""
    project = project_copy(tmp_path)
    env = env_with_venv(CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        env.pop(name, None)
    ports: dict[str, str] = {}
    servers: list[subprocess.Popen] = []
    outputs = []
    trainings = 0
    try:
        for command in block.commands:
            command = re.sub(r"^\.\s+\.venv/bin/activate\s*(&&\s*)?", "", command)
            if not command:
                continue
            for old, new in ports.items():
                command = command.replace(old, new)
            if command.startswith("export "):
                env.update(dict(part.split("=", 1) for part in shlex.split(command)[1:]))
                continue
            if block.mode == "slow" and command.startswith(TRAINING):
                command = shorter(command, "2" if trainings == 0 else "8")
                trainings += 1
            if command.rstrip().endswith("&"):
                port = re.search(r"(?:-p|--port)\s+(\d+)", command)
                assert port, f"{block.id}: a background command without -p PORT: {command}"
                ports[port[1]] = str(free_port())
                command = command.replace(port[1], ports[port[1]])
                servers.append(subprocess.Popen(command.rstrip(" &"), shell=True, cwd=project, env=env,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                                start_new_session=True))
                wait_for_http(f"http://127.0.0.1:{ports[port[1]]}/health", servers[-1], timeout=300)
                continue
            proc = subprocess.run(command, shell=True, cwd=project, env=env, capture_output=True, text=True,
                                  timeout=900)
            assert proc.returncode == 0, f"{block.id}: {command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            outputs.append((command, proc.stdout))
    finally:
        for server in servers:
            stop(server)
    return outputs


@pytest.mark.slow
@pytest.mark.parametrize("block", RUNNABLE, ids=[f"{b.page}#{b.section}" for b in RUNNABLE])
def test_shell_block_runs_as_written(block, tmp_path):
    outputs = run_block(block, tmp_path)
    for command, out in outputs:
        if command.startswith("curl"):
            assert '"predictions"' in out or '"chat.completion"' in out, f"{block.id}: {command}\n{out[-2000:]}"
    if block.section.endswith("Promote and serve"):
        check_promotions(outputs, tmp_path)


def check_promotions(outputs: list[tuple[str, str]], tmp_path: Path) -> None:
    """The promote-and-serve walk-through ends as its comments say: 1 is @champion again, 2 @previous."""
    promotions = [out for c, out in outputs if "-e promote" in c]
    assert "promoted: tiny-lora version 1 is now @champion" in promotions[0]
    assert "promoted: tiny-lora version 2 is now @champion" in promotions[1]
    rollback = next(out for c, out in outputs if c.startswith("loraflow rollback"))
    assert "rolled back: tiny-lora version 1 is now @champion; version 2 is now @previous" in rollback
    uri = f"sqlite:///{tmp_path / 'project' / 'mlflow.db'}"
    aliases = {k: str(v) for k, v in MlflowClient(uri).get_registered_model("tiny-lora").aliases.items()}
    assert aliases == {"champion": "1", "previous": "2"}


@pytest.mark.slow
def test_load_and_generate_skips_runs_without_a_model(tmp_path, monkeypatch):
    """After the promote entry point's model-less run, the example still finds the trained model.

    The example runs as a user runs it, in its own process; the training it needs runs in process."""
    import mlflow
    import torch
    from click.testing import CliRunner

    from loraflow.cli import main

    project = project_copy(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = env_with_venv(MLFLOW_TRACKING_URI=uri, CUDA_VISIBLE_DEVICES="")
    none = subprocess.run(["python", "examples/load_and_generate.py"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=300)
    assert none.returncode == 1 and "no finished run has logged a loraflow model" in none.stderr
    assert "Traceback" not in none.stderr
    monkeypatch.chdir(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # CUDA_VISIBLE_DEVICES="", in process
    mlflow.set_tracking_uri(uri)
    try:
        result = CliRunner().invoke(main, ["train", "--max-steps", "2"])
    finally:
        mlflow.set_tracking_uri(None)
    assert result.exit_code == 0, result.output[-3000:] + repr(result.exception)
    client = MlflowClient(uri)
    # a newer finished run without a model, as `mlflow run -e promote` leaves one
    client.set_terminated(client.create_run("0").info.run_id, "FINISHED")
    proc = subprocess.run(["python", "examples/load_and_generate.py"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "model: models:/m-" in proc.stdout and "native: PeftModel" in proc.stdout
