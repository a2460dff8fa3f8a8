"""Writing a model: layout, flavor config, shipped code, base modes, bad arguments (loraflow.flavor.save)."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow.exceptions import MlflowException
from mlflow.models import Model
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, ErrorCode
from model_helpers import PROMPTS, base_args, logits, make_peft_model, mlmodel, perturb_safetensors, write_mlmodel

from loraflow import flavor
from loraflow.flavor import fingerprint, generation, layout, load, pyfunc, save
from loraflow.flavor.files import file_sha256

INVALID = ErrorCode.Name(INVALID_PARAMETER_VALUE)
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")


def test_a_directory_without_the_flavor_is_refused_by_name(saved, tmp_path):
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    with pytest.raises(MlflowException, match="no MLmodel file in"):
        flavor.load_model(str(empty))
    doc = mlmodel(saved)
    del doc["flavors"]["loraflow"]
    write_mlmodel(saved, doc)
    with pytest.raises(MlflowException, match='has no "loraflow" flavor'):
        flavor.load_model(str(saved))


def test_saved_artifact_layout_and_flavor_config(saved, peft_model):
    conf = mlmodel(saved)["flavors"]["loraflow"]
    assert conf["flavor_version"] == flavor.FLAVOR_VERSION
    assert {"peft_version", "transformers_version", "torch_version", "loraflow_version"} <= set(conf)
    assert conf["lora"]["r"] == 4 and conf["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert conf["lora"]["modules_to_save"] == ["lm_head"]
    base = conf["base"]
    assert base["mode"] == "embedded" and base["kind"] == "builtin" and base["name"] == "builtin:tiny"
    assert base["fingerprint"] == fingerprint.base_fingerprint(peft_model) and base["dtype"] == "float32"
    assert (saved / "adapter" / "adapter_model.safetensors").is_file()
    assert (saved / "base" / "model.safetensors").is_file() and (saved / "base" / "config.json").is_file()
    assert (saved / "code" / "loraflow" / "flavor" / "pyfunc.py").is_file()
    assert not (saved / "code" / "loraflow" / "flavor" / "__init__.py").exists()  # the installed surface, not shipped
    pyfunc_conf = mlmodel(saved)["flavors"]["python_function"]
    assert pyfunc_conf["loader_module"] == "loraflow.flavor.pyfunc" and pyfunc_conf["code"] == "code"
    requirements = (saved / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "transformers", "peft", "safetensors"}
    assert not any(r.startswith("loraflow") for r in requirements)  # shipped as code instead
    pickles = [p for p in saved.rglob("*") if p.suffix in (".bin", ".pkl", ".pickle", ".pt", ".pth")]
    assert pickles == []
    shipped = sorted(p.name for p in (saved / "code" / "loraflow").iterdir())
    assert shipped == ["flavor"]  # no package root (no `__init__.py`), training code, tests, caches or resources
    flavor_files = sorted(str(p.relative_to(saved / "code" / "loraflow")) for p in (saved / "code" / "loraflow").rglob("*"))
    assert flavor_files == sorted(["flavor", *save.SHIPPED])  # the loading and serving code, nothing else


def test_the_saved_model_loads_where_loraflow_is_not_installed(saved, tmp_path, tiny_path, tiny_tokenizer):
    """Only the shipped `code/loraflow` is importable: loading and predicting (completions and chat)
    must not need more."""
    import subprocess
    import sys

    from model_helpers import save_chat_model

    chat = save_chat_model(tmp_path / "chat", tiny_path, tiny_tokenizer)
    src = str(Path(flavor.__file__).resolve().parents[2])  # the installed (editable) package's root
    script = f"""
import sys
sys.path = [p for p in sys.path if p != {src!r}]
import importlib.util
assert importlib.util.find_spec("loraflow") is None, "loraflow is still importable"
import mlflow.pyfunc
model = mlflow.pyfunc.load_model({str(saved)!r})
print(model.predict(["Hello"], params={{"max_new_tokens": 3}})["text"].tolist())
chat = mlflow.pyfunc.load_model({chat!r})
print(chat.predict({{"messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 3}})["choices"])
code = ({str(saved / "code" / "loraflow")!r}, {str(Path(chat) / "code" / "loraflow")!r})
origin = lambda m: m.__file__ or list(m.__path__)[0]  # `loraflow` itself is a namespace package here
outside = [n for n, m in sys.modules.items() if n.split(".")[0] == "loraflow" and not origin(m).startswith(code)]
assert not outside, outside
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_after_a_pyfunc_load_every_loraflow_module_is_the_installed_one(saved, tmp_path):
    """MLflow puts the model's `code/` first on `sys.path`; it holds no package root, so where
    loraflow is installed, the installed package (flavor included) is the one imported."""
    import subprocess
    import sys

    src = str(Path(flavor.__file__).resolve().parents[1])  # the installed package
    script = f"""
import sys
import mlflow.pyfunc
mlflow.pyfunc.load_model({str(saved)!r})
import loraflow.train
from loraflow import LoRAManager
code = {str(saved / "code")!r}
shipped = [n for n, m in sys.modules.items() if n.split(".")[0] == "loraflow" and (m.__file__ or "").startswith(code)]
assert not shipped, shipped
assert loraflow.flavor.__file__.startswith({src!r}), loraflow.flavor.__file__
assert LoRAManager.__module__ == "loraflow.compat"
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_referenced_builtin_base_ships_the_resources_to_rebuild_it(tmp_path, peft_model, tiny_tokenizer):
    path = tmp_path / "model"
    flavor.save_model(peft_model, path, tiny_tokenizer, base_model="builtin:tiny", base_mode="reference")
    assert [p.name for p in (path / "code" / "loraflow" / "resources").iterdir()] == ["corpus.txt"]  # no training sets
    assert (path / "code" / "loraflow" / "builtin.py").is_file()
    assert not (path / "base").exists()


def test_modules_to_save_weights_are_in_the_adapter_file(saved):
    from safetensors.torch import load_file

    keys = load_file(str(saved / "adapter" / "adapter_model.safetensors"))
    assert any(k.endswith("lm_head.weight") for k in keys)


def test_reference_mode_for_a_local_path_copies_no_weights(tmp_path, peft_model, tiny_tokenizer, tiny_path):
    path = tmp_path / "model"
    flavor.save_model(peft_model, path, tiny_tokenizer, base_model=tiny_path, base_mode="reference")
    base = mlmodel(path)["flavors"]["loraflow"]["base"]
    assert base["mode"] == "reference" and base["kind"] == "local" and base["name"] == str(Path(tiny_path).resolve())
    assert not (path / "base").exists()


def test_auto_mode_defaults(tmp_path, peft_model, tiny_tokenizer, tiny_path):
    # No base_model: peft's base_model_name_or_path (the local dir) is used, embedded by default.
    flavor.save_model(peft_model, tmp_path / "m", tiny_tokenizer)
    base = mlmodel(tmp_path / "m")["flavors"]["loraflow"]["base"]
    assert (base["mode"], base["kind"]) == ("embedded", "local")
    assert save._resolve_base_mode("hub", "auto") == "reference"
    # logging a model: a local folder or GGUF file is logged once; a built-in base stays embedded
    assert [save._resolve_base_mode(kind, "auto", logging=True) for kind in ("hub", "local", "gguf", "builtin")] == [
        "reference", "logged", "logged", "embedded"]

# ---------------------------------------------------------------------------------------------
# Bad arguments to save_model.


def test_save_model_rejects_bad_arguments(tmp_path, peft_model, tiny_model, tiny_tokenizer, saved):
    with pytest.raises(MlflowException, match="must be a peft.PeftModel"):
        flavor.save_model(tiny_model, tmp_path / "a", tiny_tokenizer)
    with pytest.raises(MlflowException, match="already exists and is not empty"):
        flavor.save_model(peft_model, saved, tiny_tokenizer)
    with pytest.raises(MlflowException, match="`base_mode` must be one of"):
        flavor.save_model(peft_model, tmp_path / "b", tiny_tokenizer, base_mode="copy")
    with pytest.raises(MlflowException, match="unknown keys"):
        flavor.save_model(peft_model, tmp_path / "c", tiny_tokenizer, generation_defaults={"max_tokens": 3})
    assert not any((tmp_path / name).exists() for name in "abc")  # nothing half-written


@pytest.mark.parametrize("config", [{"batch_size": True}, {"batch_size": 0}, {"max_new_tokens_cap": "8"}])
def test_a_model_config_that_loading_would_refuse_is_refused_at_save_time(tmp_path, peft_model, tiny_tokenizer, config):
    """Saving and loading check model_config with one rule, so no model saves fine and then never loads."""
    from loraflow.flavor.pyfunc import pyfunc_config

    with pytest.raises(MlflowException, match="must be a positive integer"):
        pyfunc_config(config)  # what loading says
    with pytest.raises(MlflowException, match="must be a positive integer"):
        flavor.save_model(peft_model, tmp_path / "m", tiny_tokenizer, **config)
    assert not (tmp_path / "m").exists()


def test_embedding_a_base_without_safetensors_is_refused(tmp_path, peft_model, tiny_tokenizer, tiny_path):
    pickled_only = tmp_path / "pickled-base"
    pickled_only.mkdir()
    shutil.copy(Path(tiny_path) / "config.json", pickled_only)
    (pickled_only / "pytorch_model.bin").write_bytes(b"not copied")
    with pytest.raises(MlflowException, match="no \\*.safetensors weights"):
        flavor.save_model(peft_model, tmp_path / "m", tiny_tokenizer, base_model=str(pickled_only))


def test_hub_reference_needs_a_resolved_revision(tmp_path, peft_model, tiny_tokenizer):
    # No network here: this checks the Hub branch up to the point where it would need one.
    with pytest.raises(MlflowException, match="no resolved Hub commit"):
        flavor.save_model(peft_model, tmp_path / "m", tiny_tokenizer, base_model="some-org/some-model")
    peft_model.get_base_model().config._commit_hash = "0123456789abcdef0123456789abcdef01234567"
    flavor.save_model(peft_model, tmp_path / "m2", tiny_tokenizer, base_model="some-org/some-model")
    base = mlmodel(tmp_path / "m2")["flavors"]["loraflow"]["base"]
    assert base == {**base, "mode": "reference", "kind": "hub", "name": "some-org/some-model",
                    "revision": "0123456789abcdef0123456789abcdef01234567"}
    assert not (tmp_path / "m2" / "base").exists()


@pytest.mark.parametrize("name, module", [("save_model", "save"), ("log_model", "save")])
def test_the_public_functions_have_their_implementations_signatures(name, module):
    """`loraflow.flavor`'s surface carries the real signatures, kept equal to what runs them
    (`load_model` is its own implementation, over `load.load_local`)."""
    import importlib
    import inspect

    public = inspect.signature(getattr(flavor, name)).parameters
    implementation = inspect.signature(getattr(importlib.import_module(f"loraflow.flavor.{module}"), name)).parameters

    def shape(params):
        return [(p.name, p.kind, p.default) for p in params.values()]

    assert shape(public) == shape(implementation)
