"""End to end: what a user sees. A quiet terminal, and a run the MLflow UI can explain, read
through the REST API the UI itself calls, from a real `mlflow server`."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.parse
import urllib.request

import pytest
from helpers import env_with_venv, mlflow_server

pytestmark = pytest.mark.slow

OURS = re.compile(r"^\[loraflow\] WARNING ")


def _get(url: str, path: str, **query: str) -> dict:
    with urllib.request.urlopen(f"{url}{path}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.loads(response.read())


def foreign_warnings(stderr: str) -> list[str]:
    """Lines of stderr that are warnings and not our own `[loraflow] WARNING ...`."""
    return [line for line in stderr.splitlines() if re.search(r"warn", line, re.IGNORECASE) and not OURS.match(line)]


def test_foreign_warnings_are_told_from_ours():
    stderr = ("[loraflow] WARNING `r`=512 is unusually large\n"
              "/x/transformers/modeling_utils.py:3312: FutureWarning: `is_gradient_checkpointing` is deprecated\n"
              "2026/12/01 12:17:40 WARNING mlflow.utils.requirements_utils: Found torch version (2.13.0+cpu)\n")
    assert len(foreign_warnings(stderr)) == 2


def test_a_default_run_is_quiet_and_explains_itself_in_the_ui(tmp_path):
    with mlflow_server(tmp_path) as (url, _):
        proc = subprocess.run(
            [sys.executable, "-m", "loraflow", "train", "--max-steps", "6", "--eval-steps", "3",
             "--registered-model-name", "qa-lora", "--output-dir", str(tmp_path / "out")],
            # a fresh matplotlib config dir: the font cache is built during the run, as on a first use
            env=env_with_venv(MLFLOW_TRACKING_URI=url, MPLCONFIGDIR=str(tmp_path / "mpl")),
            capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert foreign_warnings(proc.stderr) == [], proc.stderr[-5000:]
        assert "generated new fontManager" not in proc.stderr

        (listed,) = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{url}/api/2.0/mlflow/runs/search", data=json.dumps({"experiment_ids": ["0"]}).encode(),
            headers={"Content-Type": "application/json"}), timeout=30).read())["runs"]
        run = _get(url, "/api/2.0/mlflow/runs/get", run_id=listed["info"]["run_id"])["run"]
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert run["info"]["run_name"] == "lora-r16-tiny-qa" == tags["mlflow.runName"]
        assert tags["base_model"] == "builtin:tiny" and tags["task"] == "completion"
        assert tags["lora.r"] == "16" and tags["lora.target_modules"] == "q_proj,k_proj,v_proj,o_proj"
        assert tags["quantization"] == "none" and tags["base_fingerprint"].startswith("sha256-tensors:")
        assert re.fullmatch(r"[0-9a-f]+", tags["dataset.train.digest"]) and tags["dataset.eval.digest"]
        note = tags["mlflow.note.content"]
        assert "**`builtin:tiny`**" in note and "6 optimizer steps" in note and "**eval_loss** " in note
        model_uri = re.search(r"Model: `(models:/[^`]+)`", note).group(1)
        assert f'mlflow.pyfunc.load_model("{model_uri}")' in note
        assert f"mlflow models serve -m {model_uri} --env-manager local" in note
        assert "loraflow promote --model-name qa-lora" in note

        version = _get(url, "/api/2.0/mlflow/model-versions/get", name="qa-lora", version="1")["model_version"]
        assert run["info"]["run_id"] in version["description"] and "**eval_loss** " in version["description"]
