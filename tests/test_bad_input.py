"""Bad input at every edge: fuzzed CLI/MLproject options, model URIs that do not exist, remote code.

Issue 7. The CLI must answer any string given to any option with success or a usage error (exit
code 2) that names the option, never a traceback. Loading a model from a URI that does not exist
must raise an `MlflowException` naming the URI. A base model that ships its own code must not run
it unless the user allowed it (`--trust-remote-code`), and must say so clearly when it is refused.
"""

from __future__ import annotations

import json
import os
import traceback
import uuid
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from loraflow import cli
from loraflow.flavor import layout

pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")

# Strings that have broken parsers before: empty, blank, non-finite, huge, signed, unicode look-alike
# digits, separators only, control characters, and very long values (ENAMETOOLONG as a path).
SPECIAL = [
    "", " ", "\t\n", "nan", "NaN", "inf", "-inf", "-1", "0", "1e400", "-1e400", "1" * 400, "1.5", "0x10",
    "true", "none", "null", ",,,", " , ", "all-linear", "٣", "１２", "\x00", "\u202e", "😀", "a" * 5000,
    "../../../etc/passwd", "-", "--", "=", "{}", "[1, 2]",
]
values = st.one_of(st.sampled_from(SPECIAL), st.text(), st.text(alphabet="0123456789.-+eE,", max_size=12))
FUZZ_SETTINGS = settings(
    max_examples=40, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def options_of(command: click.Command) -> list[click.Option]:
    return [p for p in command.params if isinstance(p, click.Option) and not p.hidden and p.name != "help"]


def long_name(option: click.Option) -> str:
    return max(option.opts, key=len)


def invoke(command_name: str, args: list[str]):
    return CliRunner().invoke(cli.main, [command_name, *args], catch_exceptions=True)


def assert_handled(result, option: click.Option, value: str) -> None:
    """Success, or exit 2 with a message naming the option; never an unhandled exception."""
    where = f"{long_name(option)}={value!r}: exit {result.exit_code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        where + "\n" + "".join(traceback.format_exception(result.exception))
    )
    assert result.exit_code in (0, 2), where
    if result.exit_code == 2:
        assert long_name(option) in result.output or f"`{option.name}`" in result.output, where


def args_for(option: click.Option, value: str) -> list[str]:
    # `--opt=value` so that a value starting with "-" is not taken for an option.
    return [f"{long_name(option)}={value}"]


# ---------------------------------------------------------------------------------------------
# validate: the real command (config.json only, on the meta device).


def test_validate_answers_any_option_value_with_success_or_a_usage_error():
    command = cli.main.commands["validate"]

    @FUZZ_SETTINGS
    @given(option=st.sampled_from(options_of(command)), value=values)
    def check(option, value):
        assert_handled(invoke("validate", args_for(option, value)), option, value)

    check()


# ---------------------------------------------------------------------------------------------
# train: validation is real; the training itself is stubbed (it runs after validation).


@pytest.fixture
def stub_training(monkeypatch):
    calls = []

    def run_training(lora, settings, explicit=(), resume=None):
        calls.append((lora, settings, set(explicit), resume))
        return SimpleNamespace(ok=True, run_id=None, model_uri=None)

    monkeypatch.setattr("loraflow.train.run_training", run_training)
    return calls


def test_train_answers_any_option_value_with_success_or_a_usage_error(stub_training):
    command = cli.main.commands["train"]

    @FUZZ_SETTINGS
    @given(option=st.sampled_from(options_of(command)), value=values)
    def check(option, value):
        before = len(stub_training)
        result = invoke("train", args_for(option, value))
        assert_handled(result, option, value)
        assert len(stub_training) == before + (result.exit_code == 0)  # trains only when valid

    check()


@pytest.mark.parametrize(
    "option, value",
    [
        ("--r", "0"),
        ("--r", "-3"),
        ("--lora-dropout", "nan"),
        ("--lora-alpha", "inf"),
        ("--batch-size", "1e400"),
        ("--learning-rate", "-1"),
        ("--target-modules", ",,,"),
        ("--target-modules", "no_such_module"),
        ("--trust-remote-code", "sure"),
        ("--base-model", "\x00"),
        ("--base-model", "a" * 5000),
        ("--resume-from", "a" * 5000),
        ("--resume-from", "\x00"),
        ("--config", "a" * 5000),
    ],
)
def test_train_rejects_hand_picked_bad_values_naming_the_option(stub_training, option, value):
    result = invoke("train", [f"{option}={value}"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert option in result.output or f"`{option[2:].replace('-', '_')}`" in result.output, result.output
    assert not stub_training


def test_train_passes_valid_strings_through_parsed(stub_training):
    # Lenient where the meaning is clear: blanks around names, empty list items, "2.0" for an int.
    result = invoke("train", ["--r=8", "--lora-dropout=0", "--target-modules= q_proj ,, v_proj ", "--batch-size=2.0"])
    assert result.exit_code == 0, result.output
    (lora, settings, explicit, resume), = stub_training
    assert (lora.r, lora.lora_dropout, lora.target_modules, settings.optim.batch_size) == (8, 0.0, ("q_proj", "v_proj"), 2)
    assert explicit == {"r", "lora_dropout", "target_modules", "batch_size"} and resume is None
    assert settings.model.trust_remote_code is False  # off unless asked


# ---------------------------------------------------------------------------------------------
# promote: option parsing and the registry's argument checks; the registry itself is stubbed.


@pytest.fixture
def stub_registry(monkeypatch):
    registry = pytest.importorskip("loraflow.registry")
    if "promote" not in cli.main.commands:
        pytest.skip("promote command not present")
    calls = []

    def promote_if_better(model_name, version=None, metric="eval_loss", mode="min", min_delta=0.0, alias="champion"):
        registry.check_arguments(version, metric, mode, min_delta, alias)  # the real checks
        calls.append(model_name)
        return SimpleNamespace(promoted=True, already_champion=False, summary=lambda: f"promoted {model_name}")

    monkeypatch.setattr(registry, "promote_if_better", promote_if_better)
    return calls


def test_promote_answers_any_option_value_with_success_or_a_usage_error(stub_registry):
    command = cli.main.commands["promote"]

    @FUZZ_SETTINGS
    @given(option=st.sampled_from(options_of(command)), value=values)
    def check(option, value):
        required = [] if option.name == "model_name" else ["--model-name=m"]
        assert_handled(invoke("promote", required + args_for(option, value)), option, value)

    check()


# ---------------------------------------------------------------------------------------------
# Model URIs that do not exist (test_flavor covers a missing adapter file, flipped bytes, a changed
# base fingerprint and a newer flavor version).


@pytest.mark.parametrize(
    "uri",
    [
        pytest.param(f"runs:/{uuid.uuid4().hex}/model", id="runs:/<random id>/model"),  # one id for every xdist worker
        "models:/nope/1",
        "models:/nope@champion",
        "{tmp}/no/such/model",
        "file://{tmp}/no/such/model",
    ],
)
def test_a_model_uri_that_does_not_exist_fails_naming_it(uri, tmp_path, tracking_uri):
    from loraflow import flavor

    uri = uri.format(tmp=tmp_path)
    with pytest.raises(MlflowException, match="no loraflow model at") as info:
        flavor.load_model(uri)
    assert uri in str(info.value)
    assert info.value.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)


def test_a_directory_that_is_not_a_loraflow_model_fails_clearly(tmp_path):
    from loraflow import flavor

    (tmp_path / "empty").mkdir()
    with pytest.raises(MlflowException, match="MLmodel"):
        flavor.load_model(str(tmp_path / "empty"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: x\n")
    with pytest.raises(MlflowException, match="loraflow"):
        flavor.load_model(str(tmp_path / "other"))


# ---------------------------------------------------------------------------------------------
# trust_remote_code: a base whose config.json has an `auto_map` pointing at code shipped with it.

CONFIGURATION_PY = '''
from transformers import LlamaConfig


class CustomConfig(LlamaConfig):
    model_type = "loraflow-custom"
'''
MODELING_PY = '''
from transformers import LlamaForCausalLM

from .configuration_custom import CustomConfig

RAN = "custom code ran"


class CustomForCausalLM(LlamaForCausalLM):
    config_class = CustomConfig
'''


@pytest.fixture
def custom_code_base(tmp_path, tiny_path) -> Path:
    """The built-in tiny model as a directory that needs remote code (no network involved)."""
    import shutil

    target = tmp_path / "custom-base"
    shutil.copytree(tiny_path, target)
    (target / "configuration_custom.py").write_text(CONFIGURATION_PY)
    (target / "modeling_custom.py").write_text(MODELING_PY)
    config = json.loads((target / "config.json").read_text())
    config.update(
        model_type="loraflow-custom",
        architectures=["CustomForCausalLM"],
        auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                  "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"},
    )
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_remote_code_is_refused_unless_allowed_naming_the_model_and_the_option(custom_code_base):
    from loraflow.base_models import load_config, load_for_training, load_skeleton
    from loraflow.errors import ConfigError
    from loraflow.flavor.bases import NeedsRemoteCode, load_base_model

    with pytest.raises(NeedsRemoteCode, match="ships its own Python code"):  # the loader itself; callers word it
        load_base_model(str(custom_code_base))
    for load in (load_config, load_skeleton, load_for_training):
        with pytest.raises(ConfigError, match="--trust-remote-code") as info:
            load(str(custom_code_base))
        assert str(custom_code_base) in str(info.value)
        with pytest.raises(ConfigError, match="--trust-remote-code"):
            load(str(custom_code_base), trust_remote_code=None)  # None never means "ask on stdin"
    assert type(load_base_model(str(custom_code_base), trust_remote_code=True)).__name__ == "CustomForCausalLM"


def test_cli_refuses_remote_code_with_a_usage_error_and_runs_it_when_asked(custom_code_base, stub_training):
    refused = invoke("validate", [f"--base-model={custom_code_base}", "--target-modules=q_proj"])
    assert refused.exit_code == 2 and "--trust-remote-code" in refused.output, refused.output
    allowed = invoke("validate", [f"--base-model={custom_code_base}", "--target-modules=q_proj", "--trust-remote-code=true"])
    assert allowed.exit_code == 0, allowed.output
    trained = invoke("train", [f"--base-model={custom_code_base}", "--trust-remote-code=true"])
    assert trained.exit_code == 0 and stub_training[-1][1].model.trust_remote_code is True


def _saved_custom_model(custom_code_base: Path, path: Path, *, trust_remote_code: bool) -> None:
    from model_helpers import make_peft_model

    from loraflow import flavor
    from loraflow.flavor.bases import load_base_model, load_tokenizer

    base = load_base_model(str(custom_code_base), trust_remote_code=True).eval()
    flavor.save_model(make_peft_model(base), path, load_tokenizer(str(custom_code_base)),
                      base_model=str(custom_code_base), base_mode="embedded", trust_remote_code=trust_remote_code)


def test_trust_remote_code_is_recorded_and_must_be_allowed_again_on_load(custom_code_base, tmp_path, monkeypatch):
    import mlflow
    import yaml

    from loraflow import flavor

    monkeypatch.delenv(layout.TRUST_REMOTE_CODE_ENV, raising=False)
    path = tmp_path / "model"
    _saved_custom_model(custom_code_base, path, trust_remote_code=True)
    base = yaml.safe_load((path / "MLmodel").read_text())["flavors"]["loraflow"]["base"]
    assert base["trust_remote_code"] is True
    assert (path / "base" / "modeling_custom.py").is_file()  # the code travels with an embedded base

    for load in (lambda: flavor.load_model(str(path)), lambda: mlflow.pyfunc.load_model(str(path))):
        with pytest.raises(MlflowException, match="trust_remote_code=True") as info:
            load()
        assert layout.TRUST_REMOTE_CODE_ENV in str(info.value) and info.value.error_code == "INVALID_PARAMETER_VALUE"

    model, _ = flavor.load_model(str(path), trust_remote_code=True)
    assert type(model.get_base_model()).__name__ == "CustomForCausalLM"
    monkeypatch.setenv(layout.TRUST_REMOTE_CODE_ENV, "1")
    assert mlflow.pyfunc.load_model(str(path)).predict(["Hello"], params={"max_new_tokens": 2}).shape == (1, 1)


def test_permission_never_turns_on_remote_code_a_model_did_not_record(custom_code_base, saved_tiny):
    import shutil

    import yaml

    from loraflow import flavor

    # Built-in base: recorded as not needing remote code.
    assert yaml.safe_load((saved_tiny / "MLmodel").read_text())["flavors"]["loraflow"]["base"]["trust_remote_code"] is False
    # Tamper with it: give its embedded base an auto_map and code. Even a caller who allows remote
    # code does not run code the model never recorded needing.
    for name in ("configuration_custom.py", "modeling_custom.py", "config.json"):
        shutil.copy(custom_code_base / name, saved_tiny / "base" / name)
    with pytest.raises(MlflowException, match="saved with trust_remote_code=False"):
        flavor.load_model(str(saved_tiny), trust_remote_code=True)


@pytest.fixture
def saved_tiny(tmp_path, tiny_model, tiny_tokenizer) -> Path:
    from model_helpers import make_peft_model

    from loraflow import flavor

    path = tmp_path / "tiny-model"
    flavor.save_model(make_peft_model(tiny_model), path, tiny_tokenizer, base_model="builtin:tiny")
    return path


def test_log_model_validates_its_example_with_the_callers_permission_only(custom_code_base, tracking_uri, monkeypatch):
    import logging

    import mlflow
    from model_helpers import make_peft_model

    from loraflow import flavor
    from loraflow.flavor.bases import load_base_model, load_tokenizer

    monkeypatch.delenv(layout.TRUST_REMOTE_CODE_ENV, raising=False)
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logging.getLogger("mlflow.models.model").addHandler(handler)
    try:
        base = load_base_model(str(custom_code_base), trust_remote_code=True).eval()
        with mlflow.start_run():
            info = flavor.log_model(make_peft_model(base), "model", load_tokenizer(str(custom_code_base)),
                                    base_model=str(custom_code_base), trust_remote_code=True)
    finally:
        logging.getLogger("mlflow.models.model").removeHandler(handler)
    assert not [r for r in records if "Failed to validate serving input" in r], records
    assert layout.TRUST_REMOTE_CODE_ENV not in os.environ  # the permission did not outlive the call
    with pytest.raises(MlflowException, match="trust_remote_code=True"):
        flavor.load_model(info.model_uri)


# ---------------------------------------------------------------------------------------------
# Issue 12: every command's options. Exit codes are in the documented set (0 ok, 1 registry or
# tracking error, 2 bad option or input) and no output holds a traceback.

DOCUMENTED = (0, 1, 2)


def assert_documented(result, option, value) -> None:
    where = f"{long_name(option) if option else 'LOCAL_DIR'}={value!r}: exit {result.exit_code}\n{result.output}"
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        where + "\n" + "".join(traceback.format_exception(result.exception)))
    assert result.exit_code in DOCUMENTED, where
    assert "Traceback" not in result.output, where


@pytest.fixture
def batch_inputs(tmp_path, monkeypatch):
    """A prompts file and a folder that passes the model-URI check; prediction itself is stubbed."""
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt\nHello\nThe sky\n")
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text("flavors: {}\n")
    monkeypatch.setattr("loraflow.predict._predict_in_chunks", lambda uri, rows, *a, **k: ["x"] * len(rows))
    return {"--model-uri": str(model), "--input": str(prompts)}


def test_batch_predict_answers_any_option_value_with_a_documented_exit_code(batch_inputs, tracking_uri, tmp_path):
    command = cli.main.commands["batch-predict"]

    valued = [o for o in options_of(command) if not o.is_flag]  # flags take no value (--spark would start Spark)

    @FUZZ_SETTINGS
    @given(option=st.sampled_from(valued), value=values)
    def check(option, value):
        given_args = {**batch_inputs, "--output": str(tmp_path / f"out-{uuid.uuid4().hex}.jsonl")}
        given_args.pop(long_name(option), None)
        args = [f"{k}={v}" for k, v in given_args.items()] + ["--no-spark"] + args_for(option, value)
        assert_documented(invoke("batch-predict", args), option, value)

    check()


def test_rollback_answers_any_option_value_with_a_documented_exit_code(tracking_uri):
    command = cli.main.commands["rollback"]

    @FUZZ_SETTINGS
    @given(option=st.sampled_from(options_of(command)), value=values)
    def check(option, value):
        required = [] if option.name == "model_name" else ["--model-name=m"]
        assert_documented(invoke("rollback", required + args_for(option, value)), option, value)

    check()


@pytest.fixture(scope="module")
def saved_for_upload(tmp_path_factory, tiny_path, tiny_tokenizer) -> Path:
    from model_helpers import make_peft_model

    from loraflow import flavor
    from loraflow.flavor.bases import load_base_model

    path = tmp_path_factory.mktemp("upload") / "model"
    flavor.save_model(make_peft_model(load_base_model(tiny_path).eval()), path, tiny_tokenizer, base_model="builtin:tiny")
    return path


def test_upload_answers_any_argument_or_option_value_with_a_documented_exit_code(saved_for_upload, tracking_uri,
                                                                                  monkeypatch):
    monkeypatch.setattr("loraflow.upload.verify_folder", lambda folder: None)  # tested for real in test_registry
    command = cli.main.commands["upload"]

    @settings(max_examples=30, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(option=st.sampled_from([None, *options_of(command)]), value=values)
    def check(option, value):
        if option is None:
            args = ["--", value]
        else:
            args = [str(saved_for_upload), *args_for(option, value)]
        assert_documented(invoke("upload", args), option, value)

    check()
