"""The project files agree with each other: MLproject <-> CLI options <-> settings, conda <-> pyproject."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

from loraflow import config
from loraflow.cli import main, option_name

ROOT = Path(__file__).resolve().parents[1]


def _mlproject() -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text())


def test_conda_pip_section_mirrors_pyproject_dependencies():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert [p for p in pip_section if p != "-e ."] == deps
    assert "-e ." in pip_section  # loraflow itself, so `python -m loraflow` runs under conda


def test_every_mlproject_param_is_passed_to_its_command_as_the_matching_option():
    for name, entry in _mlproject()["entry_points"].items():
        command = entry["command"]
        for param in entry.get("parameters", {}):
            assert f"{option_name(param)} {{{param}}}" in command, f"{name}: {param} not passed as {option_name(param)}"


def test_main_and_validate_params_are_settings_with_the_library_defaults():
    fields = {**{f: getattr(config.LoraSettings(), f) for f in config.field_names(config.LoraSettings)},
              **config.to_dict(config.TrainSettings())}
    for entry_name in ("main", "validate"):
        params = _mlproject()["entry_points"][entry_name]["parameters"]
        parsed_lora, parsed_train = config.parse_settings({k: str(v["default"]) for k, v in params.items()})
        for key in params:
            assert key in fields, f"{entry_name}: MLproject param {key} is not a setting"
            parsed = getattr(parsed_lora, key) if hasattr(parsed_lora, key) else config.to_dict(parsed_train)[key]
            assert parsed == fields[key], f"{entry_name}: default of {key} is {parsed!r}, library says {fields[key]!r}"


def test_train_command_documents_every_setting():
    train = main.commands["train"]
    documented = {opt for p in train.params for opt in p.opts}
    for field in config.field_names(config.LoraSettings) + config.field_names(config.TrainSettings):
        assert option_name(field) in documented
    assert all(p.help for p in train.params if p.name != "help")


def test_readme_quotes_the_two_commands_that_ci_and_users_run():
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    assert re.search(r"scripts/test\.sh", (ROOT / ".ci" / "run").read_text())
