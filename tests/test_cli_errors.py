"""The CLI's one entry point for errors (issue 12): a user's mistake is a message with a documented
exit code; a bug in loraflow prints its traceback after one line saying it is a bug, exit code 1."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from loraflow.cli import BUG_REPORT, main


def invoke(*args: str):
    return CliRunner().invoke(main, list(args))


def test_an_unexpected_exception_is_reported_as_a_bug_with_its_traceback(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr("loraflow.lora.validate_settings", broken)
    result = invoke("validate")
    assert result.exit_code == 1
    assert "this is a bug in loraflow, not a mistake in your input" in result.output and BUG_REPORT in result.output
    assert "Traceback" in result.output and "RuntimeError: an internal invariant broke" in result.output
    assert result.output.index("this is a bug") < result.output.index("Traceback")


def test_an_mlflow_error_with_a_users_error_code_is_a_clean_message(monkeypatch):
    def missing(*args, **kwargs):
        raise MlflowException("no loraflow model at 'models:/x/1': " + "y" * 5000, error_code=INVALID_PARAMETER_VALUE)

    monkeypatch.setattr("loraflow.lora.validate_settings", missing)
    result = invoke("validate")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "no loraflow model at 'models:/x/1'" in result.output and len(result.output) < 1000


def test_ctrl_c_outside_training_exits_130(monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("loraflow.lora.validate_settings", interrupted)
    result = invoke("validate")
    assert result.exit_code == 130 and "interrupted" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("uri", ["models:/nope@champion", "{tmp}/no/such/model"])
def test_train_init_model_that_does_not_exist_is_a_clean_message(uri, tracking_uri, tmp_path):
    uri = uri.format(tmp=tmp_path)
    result = invoke("train", "--init-model", uri, "--max-steps", "1")
    assert result.exit_code == 2, result.output + repr(result.exception)
    assert "Traceback" not in result.output and uri in result.output and "no loraflow model at" in result.output


def test_validate_names_a_base_model_folder_that_does_not_exist():
    result = invoke("validate", "--base-model", "/no/such/dir")
    assert result.exit_code == 2 and "no such folder" in result.output and "Traceback" not in result.output


def test_validate_names_an_unknown_builtin_with_its_prefix_once():
    result = invoke("validate", "--base-model", "builtin:huge")
    assert result.exit_code == 2 and "'builtin:huge' is not a built-in base model" in result.output
    assert "builtin:builtin:" not in result.output and result.output.count("builtin:huge") == 1
