"""The loraflow MLflow flavor: exact round trips, trainable reload, fingerprints, tampering, bad input."""

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

from loraflow import flavor, generation, saving

PROMPTS = [
    "Question: What is the capital?\nAnswer:",
    "The sky",
    "Once upon a time there was a small model that",
    "Hello",
    "Question: Why?\nAnswer:",
]
INVALID = ErrorCode.Name(INVALID_PARAMETER_VALUE)
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")


def make_peft_model(base, seed: int = 0):
    """LoRA on q/v plus a trainable copy of the (tied) lm_head, with non-zero weights.

    peft initialises lora_B to zero (an untrained adapter is a no-op), so B and the lm_head copy
    are perturbed from a fixed seed: a round trip that dropped them would change the logits. peft
    draws lora_A from torch's global generator, whose seed differs from run to run: it is drawn
    under the same fixed seed, so every run tests the same model.
    """
    import peft

    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", modules_to_save=["lm_head"]
    )
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.eval()


@pytest.fixture
def peft_model(tiny_model):
    return make_peft_model(tiny_model)


@pytest.fixture(autouse=True)
def _artifacts_in_tmp_and_cpu_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a sqlite store puts artifacts under ./mlruns: keep them out of the repo
    # pyfunc picks CUDA when it can; exactness is compared against the in-memory model on the CPU.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(flavor, "_digest_cache_dir", lambda: tmp_path / "digest-cache")


def base_args(mode: str, tiny_path: str) -> dict:
    # Embedded from the built-in name (as the train command passes it); reference to a local
    # directory, which records its path and exercises the same fingerprint check a Hub base gets.
    return {"base_model": "builtin:tiny", "base_mode": "embedded"} if mode == "embedded" else {
        "base_model": tiny_path, "base_mode": "reference"}


def logits(model, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def mlmodel(path: Path) -> dict:
    return yaml.safe_load((path / "MLmodel").read_text())


def write_mlmodel(path: Path, doc: dict) -> None:
    (path / "MLmodel").write_text(yaml.safe_dump(doc))


@pytest.fixture
def saved(tmp_path, peft_model, tiny_tokenizer):
    path = tmp_path / "model"
    flavor.save_model(peft_model, path, tiny_tokenizer, base_model="builtin:tiny")
    return path


# ---------------------------------------------------------------------------------------------
# Fingerprints and what is saved.


def test_fingerprint_is_the_same_with_and_without_peft_wrappers(tiny_model):
    before = flavor.base_fingerprint(tiny_model)
    wrapped = make_peft_model(tiny_model)  # wraps in place and perturbs only adapter weights
    assert flavor.base_fingerprint(wrapped) == before
    with torch.no_grad():
        wrapped.get_base_model().model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert flavor.base_fingerprint(wrapped) != before


def test_models_saved_with_the_sequential_fingerprint_still_load_and_are_checked(saved, peft_model):
    base = peft_model.get_base_model()
    old = flavor.base_fingerprint(base, scheme="sha256")
    assert old.startswith("sha256:") and old != flavor.base_fingerprint(base)
    doc = mlmodel(saved)
    doc["flavors"]["loraflow"]["base"]["fingerprint"] = old  # as loraflow before `sha256-tensors` wrote it
    write_mlmodel(saved, doc)
    assert flavor.load_model(str(saved)).model is not None
    doc["flavors"]["loraflow"]["base"]["fingerprint"] = "sha256:" + "0" * 64
    write_mlmodel(saved, doc)
    with pytest.raises(MlflowException, match="does not match"):
        flavor.load_model(str(saved))
    doc["flavors"]["loraflow"]["base"]["fingerprint"] = "blake3:" + "0" * 64
    write_mlmodel(saved, doc)
    with pytest.raises(MlflowException, match="unknown base fingerprint scheme 'blake3'.*upgrade loraflow"):
        flavor.load_model(str(saved))


def test_digests_of_the_stored_tensors_are_those_of_the_loaded_ones(tiny_path, tiny_model):
    stored = flavor.stored_tensor_digests([Path(tiny_path) / "model.safetensors"])
    inputs = flavor._fingerprint_inputs(tiny_model)
    assert {header for header, _ in inputs.tensors} <= set(stored)  # every loaded tensor is found stored
    assert flavor._fingerprint(inputs, "sha256-tensors", stored) == flavor.base_fingerprint(tiny_model)


def test_a_sharded_base_is_hashed_from_every_shard_its_index_names(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    base = {"mode": "reference", "kind": "local", "name": str(tmp_path / "sharded")}
    assert flavor._base_weight_files(tmp_path, base) == shards
    inputs = flavor._fingerprint_inputs(tiny_model)
    stored = flavor.stored_tensor_digests(shards, workers=2)
    assert {header for header, _ in inputs.tensors} <= set(stored)
    assert flavor._fingerprint(inputs, "sha256-tensors", stored) == flavor.base_fingerprint(tiny_model)


def test_loading_takes_every_base_digest_from_the_files_hashed_while_it_loaded(saved, monkeypatch):
    calls = []
    fingerprint = flavor._fingerprint

    def spy(inputs, scheme, known=None):
        calls.append(sum(header not in (known or {}) for header, _ in inputs.tensors))
        return fingerprint(inputs, scheme, known)

    monkeypatch.setattr(flavor, "_fingerprint", spy)
    assert flavor.load_model(str(saved)).model is not None
    assert calls == [0]  # one fingerprint, and no loaded tensor had to be hashed itself


def test_stored_digests_that_do_not_match_are_rechecked_on_the_loaded_tensors(saved, monkeypatch):
    """If loading changed a tensor's values, the file's digest is not the loaded tensor's: a
    mismatch then re-hashes what was loaded before judging, so a good base still loads and a
    changed one is still refused."""
    stored_tensor_digests = flavor.stored_tensor_digests
    wrong = lambda files, workers=1, cache=False: {h: b"\0" * 32 for h in stored_tensor_digests(files, workers)}  # noqa: E731
    monkeypatch.setattr(flavor, "stored_tensor_digests", wrong)
    assert flavor.load_model(str(saved)).model is not None  # the loaded tensors match: loads
    _perturb_safetensors(saved / "base" / "model.safetensors")
    with pytest.raises(MlflowException, match="does not match"):
        flavor.load_model(str(saved))


@pytest.fixture
def referenced(tmp_path, peft_model, tiny_tokenizer, tiny_path, monkeypatch):
    """A model referencing a local copy of the base; returns (model dir, the copy's weights file)."""
    monkeypatch.setattr(flavor, "_RACY_NS", 0)  # the copy was just written (see the racy test below)
    base_copy = tmp_path / "base-copy"
    shutil.copytree(tiny_path, base_copy)
    path = tmp_path / "model"
    flavor.save_model(peft_model, path, tiny_tokenizer, base_model=str(base_copy), base_mode="reference")
    return path, base_copy / "model.safetensors"


@pytest.fixture
def hashed_files(monkeypatch) -> list[Path]:
    """The weight files hashed from disk (each is memory-mapped only to be hashed)."""
    opened: list[Path] = []
    mapped = flavor._mapped

    def spy(file):
        opened.append(Path(file))
        return mapped(file)

    monkeypatch.setattr(flavor, "_mapped", spy)
    return opened


def cache_entries(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "digest-cache").glob("*.json"))


def test_a_referenced_base_is_hashed_once_then_its_digests_come_from_the_cache(referenced, hashed_files, tmp_path):
    path, weights = referenced
    assert flavor.load_model(str(path)).model is not None
    assert hashed_files == [weights] and len(cache_entries(tmp_path)) == 1
    hashed_files.clear()
    assert flavor.load_model(str(path)).model is not None
    assert hashed_files == []


def _flip_first_stored_byte(file: Path) -> None:
    """Change one byte of the first tensor's data in place: same file, same size."""
    with open(file, "r+b") as f:
        data_start = 8 + int.from_bytes(f.read(8), "little")
        f.seek(data_start)
        byte = f.read(1)
        f.seek(data_start)
        f.write(bytes([byte[0] ^ 0x01]))


def test_a_base_changed_in_place_is_refused_even_with_its_old_modification_time(referenced, hashed_files):
    """Only the change time shows this change (same inode and size, mtime set back): still caught."""
    import os

    path, weights = referenced
    flavor.load_model(str(path))  # records the digests
    before = weights.stat()
    _flip_first_stored_byte(weights)
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = weights.stat()
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    hashed_files.clear()
    with pytest.raises(MlflowException, match="does not match"):
        flavor.load_model(str(path))
    assert hashed_files == [weights]


def test_an_embedded_base_is_never_cached(saved, tmp_path, hashed_files, monkeypatch):
    """MLflow hands every load a fresh copy of the artifact: its base is hashed every time."""
    monkeypatch.setattr(flavor, "_RACY_NS", 0)  # would be recorded, were it not embedded
    for _ in range(2):
        assert flavor.load_model(str(saved)).model is not None
    assert len(hashed_files) == 2 and cache_entries(tmp_path) == []


def test_the_digest_cache_can_be_turned_off(referenced, hashed_files, tmp_path, monkeypatch):
    monkeypatch.setenv(flavor.DIGEST_CACHE_ENV, "0")
    path, weights = referenced
    for _ in range(2):
        assert flavor.load_model(str(path)).model is not None
    assert hashed_files == [weights, weights] and cache_entries(tmp_path) == []


def test_an_unreadable_cache_entry_is_hashed_over(referenced, hashed_files, tmp_path):
    path, weights = referenced
    flavor.load_model(str(path))
    (entry,) = cache_entries(tmp_path)
    entry.write_text("{not json")
    hashed_files.clear()
    assert flavor.load_model(str(path)).model is not None
    assert hashed_files == [weights] and flavor._cached_file_digests(weights) is not None  # rewritten


def test_recording_an_entry_drops_the_entries_of_files_that_are_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(flavor, "_RACY_NS", 0)
    files = {}
    for name in ("kept", "deleted", "new"):
        files[name] = tmp_path / f"{name}.safetensors"
        files[name].write_bytes(b"weights of " + name.encode())
    digests = {"t": ("header", b"\x00" * 32)}

    def record(name):
        file = files[name]
        flavor._record_file_digests(file, flavor._file_identity(file), time.time_ns() + 1, digests)

    record("kept")
    record("deleted")
    (tmp_path / "digest-cache" / "stray.json").write_text("{not json")
    files["deleted"].unlink()
    assert len(cache_entries(tmp_path)) == 3  # nothing is dropped before the next record
    record("new")
    assert cache_entries(tmp_path) == sorted(flavor._digest_cache_entry(files[n]) for n in ("kept", "new"))
    assert flavor._cached_file_digests(files["kept"]) == digests


def test_a_file_changed_just_before_it_is_hashed_is_not_recorded(tmp_path, tiny_path):
    """A change in the same clock tick as the hashing would not show: such digests are not kept,
    even with the modification time set back (the change time cannot be)."""
    import os

    weights = tmp_path / "model.safetensors"
    shutil.copy(Path(tiny_path) / "model.safetensors", weights)
    os.utime(weights, ns=(0, 0))
    digests = flavor.stored_tensor_digests([weights], cache=True)
    assert digests == flavor.stored_tensor_digests([Path(tiny_path) / "model.safetensors"])
    assert cache_entries(tmp_path) == []


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
    assert base["fingerprint"] == flavor.base_fingerprint(peft_model) and base["dtype"] == "float32"
    assert (saved / "adapter" / "adapter_model.safetensors").is_file()
    assert (saved / "base" / "model.safetensors").is_file() and (saved / "base" / "config.json").is_file()
    assert (saved / "code" / "loraflow" / "flavor.py").is_file()
    pyfunc_conf = mlmodel(saved)["flavors"]["python_function"]
    assert pyfunc_conf["loader_module"] == "loraflow.flavor" and pyfunc_conf["code"] == "code"
    requirements = (saved / "requirements.txt").read_text().split()
    assert {r.split("==")[0] for r in requirements} >= {"mlflow", "torch", "transformers", "peft", "safetensors"}
    assert not any(r.startswith("loraflow") for r in requirements)  # shipped as code instead
    pickles = [p for p in saved.rglob("*") if p.suffix in (".bin", ".pkl", ".pickle", ".pt", ".pth")]
    assert pickles == []
    shipped = sorted(p.name for p in (saved / "code" / "loraflow").iterdir())
    assert shipped == sorted(saving.LOADER_MODULES)  # no training code, tests, caches or resources


def test_the_saved_model_loads_where_loraflow_is_not_installed(saved, tmp_path):
    """Only the shipped `code/loraflow` is importable: loading and predicting must not need more."""
    import subprocess
    import sys

    src = str(Path(flavor.__file__).resolve().parent.parent)  # the installed (editable) package's root
    script = f"""
import sys
sys.path = [p for p in sys.path if p != {src!r}]
import importlib.util
assert importlib.util.find_spec("loraflow") is None, "loraflow is still importable"
import mlflow.pyfunc
model = mlflow.pyfunc.load_model({str(saved)!r})
print(model.predict(["Hello"], params={{"max_new_tokens": 3}})["text"].tolist())
code = {str(saved / "code" / "loraflow")!r}
outside = [n for n, m in sys.modules.items() if n.split(".")[0] == "loraflow" and not m.__file__.startswith(code)]
assert not outside, outside
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_after_a_pyfunc_load_the_rest_of_an_installed_loraflow_still_imports(saved, tmp_path):
    """MLflow puts the model's partial `code/loraflow` first on `sys.path`: the package's other
    modules (training, the LoRAManager) must still import from the installed loraflow."""
    import subprocess
    import sys

    script = f"""
import mlflow.pyfunc
mlflow.pyfunc.load_model({str(saved)!r})
import loraflow.flavor, loraflow.train
from loraflow import LoRAManager
code = {str(saved / "code" / "loraflow")!r}
assert loraflow.flavor.__file__.startswith(code), loraflow.flavor.__file__
assert not loraflow.train.__file__.startswith(code), loraflow.train.__file__
assert LoRAManager.__module__ == "loraflow.manager"
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_a_referenced_builtin_base_ships_the_resources_to_rebuild_it(tmp_path, peft_model, tiny_tokenizer):
    path = tmp_path / "model"
    flavor.save_model(peft_model, path, tiny_tokenizer, base_model="builtin:tiny", base_mode="reference")
    assert (path / "code" / "loraflow" / "resources" / "corpus.txt").is_file()
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
    assert saving._resolve_base_mode("hub", "auto") == "reference"


# ---------------------------------------------------------------------------------------------
# Exact round trips.


@pytest.mark.parametrize("mode", ["embedded", "reference"])
def test_native_round_trip_is_exact(mode, tmp_path, peft_model, tiny_tokenizer, tiny_path, tracking_uri):
    expected = logits(peft_model, tiny_tokenizer)
    with mlflow.start_run():
        info = flavor.log_model(peft_model, "model", tiny_tokenizer, **base_args(mode, tiny_path))
    loaded = flavor.load_model(info.model_uri)
    model, tokenizer = loaded  # unpacking works as well as .model / .tokenizer
    assert loaded.model is model and type(model).__name__ == "PeftModelForCausalLM"
    assert (logits(model, tokenizer) - expected).abs().max().item() == 0.0
    assert not any(p.requires_grad for p in model.parameters())
    assert tokenizer.pad_token_id == tiny_tokenizer.pad_token_id


def test_load_model_casts_to_the_requested_dtype(saved):
    model, _ = flavor.load_model(str(saved), dtype="float64", device="cpu")
    assert {p.dtype for p in model.parameters()} == {torch.float64}


@pytest.mark.parametrize("mode", ["embedded", "reference"])
def test_pyfunc_round_trip_is_exact(mode, peft_model, tiny_tokenizer, tiny_path, tracking_uri):
    with mlflow.start_run():
        info = flavor.log_model(peft_model, "model", tiny_tokenizer, **base_args(mode, tiny_path), batch_size=2)
    params = {"max_new_tokens": 12}

    # 1. pyfunc vs the in-memory model through the same batching helper and micro-batch size: the
    #    same left-padded batches, so any difference could only come from the saved weights.
    served = mlflow.pyfunc.load_model(info.model_uri)
    got = served.predict(pd.DataFrame({"prompt": PROMPTS}), params=params)
    assert list(got.columns) == ["text"] and len(got) == len(PROMPTS)
    expected = generation.generate_texts(peft_model, tiny_tokenizer, PROMPTS, batch_size=2, max_new_tokens_cap=64, **params)
    assert got["text"].tolist() == expected

    # 2. pyfunc with micro-batch size 1 vs plain `generate` on one unpadded prompt at a time: an
    #    independent check that nothing but the continuation is returned, in input order.
    single = mlflow.pyfunc.load_model(info.model_uri, model_config={"batch_size": 1})
    got_single = single.predict(pd.DataFrame({"prompt": PROMPTS}), params=params)["text"].tolist()
    plain = []
    for prompt in PROMPTS:
        ids = tiny_tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = peft_model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tiny_tokenizer.pad_token_id)
        plain.append(tiny_tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    assert got_single == plain


def test_logged_signature_has_params_schema_and_input_example(peft_model, tiny_tokenizer, tracking_uri):
    with mlflow.start_run():
        info = flavor.log_model(peft_model, "model", tiny_tokenizer, base_model="builtin:tiny",
                                generation_defaults={"max_new_tokens": 16})
    params = {p.name: p.default for p in info.signature.params.params}
    assert params == {"max_new_tokens": 16, "temperature": 1.0, "top_p": 1.0, "do_sample": False,
                      "repetition_penalty": 1.0, "seed": 0}
    assert info.signature.outputs.input_names() == ["text"]
    # The default example is read back as it was logged, and is a request the model answers.
    local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    meta = Model.load(local)
    example, example_params = meta.load_input_example(local), meta.load_input_example_params(local)
    assert (example, example_params) == flavor.default_input_example()
    texts = mlflow.pyfunc.load_model(info.model_uri).predict(example, params=example_params)["text"].tolist()
    assert len(texts) == 1 and isinstance(texts[0], str)


def test_max_new_tokens_param_changes_the_output_length(saved, tiny_tokenizer):
    model = mlflow.pyfunc.load_model(str(saved))
    prompts = pd.DataFrame({"prompt": PROMPTS[:2]})
    short = model.predict(prompts, params={"max_new_tokens": 2})["text"].tolist()
    long = model.predict(prompts, params={"max_new_tokens": 16})["text"].tolist()
    for s, l in zip(short, long):
        assert len(tiny_tokenizer(s, add_special_tokens=False)["input_ids"]) <= 2
        assert l.startswith(s)
    assert sum(map(len, long)) > sum(map(len, short))  # a row may stop early at EOS, not all of them


def test_sampling_is_reproducible_with_a_seed(saved):
    model = mlflow.pyfunc.load_model(str(saved))
    params = {"do_sample": True, "temperature": 1.5, "top_p": 0.95, "max_new_tokens": 12}
    first = model.predict(PROMPTS[:2], params={**params, "seed": 7})["text"].tolist()
    again = model.predict(PROMPTS[:2], params={**params, "seed": 7})["text"].tolist()
    assert first == again


def test_every_accepted_input_form_gives_the_same_text(saved):
    model = mlflow.pyfunc.load_model(str(saved))
    params = {"max_new_tokens": 4}
    expected = model.predict(pd.DataFrame({"prompt": PROMPTS[:2]}), params=params)["text"].tolist()
    assert model.predict(PROMPTS[:2], params=params)["text"].tolist() == expected
    assert model.predict({"prompt": PROMPTS[:2]}, params=params)["text"].tolist() == expected
    assert model.predict({"prompt": PROMPTS[0]}, params=params)["text"].tolist() == expected[:1]
    assert model.predict(PROMPTS[0], params=params)["text"].tolist() == expected[:1]


# ---------------------------------------------------------------------------------------------
# Trainable reload.


def test_trainable_reload_matches_the_saved_parameter_counts(saved, peft_model):
    before = peft_model.get_nb_trainable_parameters()
    model, _ = flavor.load_model(str(saved), is_trainable=True)
    assert model.get_nb_trainable_parameters() == before
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or ".modules_to_save." in n for n in trainable)
    assert any(".modules_to_save." in n for n in trainable)

    frozen, _ = flavor.load_model(str(saved), is_trainable=False)
    assert frozen.get_nb_trainable_parameters() == (0, before[1])


# ---------------------------------------------------------------------------------------------
# Tampering: a base that does not match, a missing or corrupt adapter, a newer format.


def _perturb_safetensors(file: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    name = sorted(k for k in tensors if "layers.0" in k)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_reference_to_a_changed_base_fails_naming_both_fingerprints(tmp_path, peft_model, tiny_tokenizer, tiny_path):
    base_copy = tmp_path / "base-copy"
    shutil.copytree(tiny_path, base_copy)
    path = tmp_path / "model"
    flavor.save_model(peft_model, path, tiny_tokenizer, base_model=str(base_copy), base_mode="reference")
    assert flavor.load_model(str(path)).model is not None  # untouched: loads
    _perturb_safetensors(base_copy / "model.safetensors")
    recorded = mlmodel(path)["flavors"]["loraflow"]["base"]["fingerprint"]
    with pytest.raises(MlflowException, match="does not match") as err:
        flavor.load_model(str(path))
    message = err.value.message
    assert recorded in message and message.count(f"{flavor.FINGERPRINT_SCHEME}:") == 2 and str(base_copy) in message


def test_embedded_base_with_modified_weights_fails(saved):
    _perturb_safetensors(saved / "base" / "model.safetensors")
    with pytest.raises(MlflowException, match=f"does not match.*expected {flavor.FINGERPRINT_SCHEME}:"):
        flavor.load_model(str(saved))


def test_missing_base_directory_fails_clearly(saved):
    shutil.rmtree(saved / "base")
    with pytest.raises(MlflowException, match="cannot load the embedded base model"):
        flavor.load_model(str(saved))


def test_missing_adapter_file_fails(saved):
    (saved / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(MlflowException, match="adapter_model.safetensors.* is missing"):
        flavor.load_model(str(saved))
    with pytest.raises(MlflowException, match="is missing"):
        mlflow.pyfunc.load_model(str(saved))


def test_flipped_bytes_in_the_adapter_fail_even_if_safetensors_would_parse(saved):
    file = saved / "adapter" / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01  # last byte of the last tensor: still a valid safetensors file
    file.write_bytes(bytes(data))
    with pytest.raises(MlflowException, match="adapter_model.safetensors.* is corrupt: its sha256 is"):
        flavor.load_model(str(saved))


def test_an_unparseable_adapter_fails_with_the_file_name(saved):
    # Truncate the file and record the new hash, so the safetensors/peft error itself is reached.
    file = saved / "adapter" / "adapter_model.safetensors"
    file.write_bytes(file.read_bytes()[:100])
    doc = mlmodel(saved)
    doc["flavors"]["loraflow"]["adapter_sha256"]["adapter_model.safetensors"] = flavor._file_sha256(file)
    write_mlmodel(saved, doc)
    with pytest.raises(MlflowException, match="cannot load the adapter from .*adapter_model.safetensors"):
        flavor.load_model(str(saved))


def test_a_newer_flavor_version_asks_to_upgrade(saved):
    doc = mlmodel(saved)
    doc["flavors"]["loraflow"]["flavor_version"] = flavor.FLAVOR_VERSION + 1
    write_mlmodel(saved, doc)
    with pytest.raises(MlflowException, match="upgrade loraflow"):
        flavor.load_model(str(saved))


# ---------------------------------------------------------------------------------------------
# Bad input: every case is an MlflowException with INVALID_PARAMETER_VALUE (HTTP 400 when served).


@pytest.fixture
def pyfunc_model(saved):
    return mlflow.pyfunc.load_model(str(saved))


LONG_PROMPT = "word " * 400  # the built-in model's context is 256 tokens


@pytest.mark.parametrize(
    ("data", "params", "match"),
    [
        (pd.DataFrame({"question": ["hi"]}), None, "no `prompt` column"),
        (pd.DataFrame({"prompt": ["hi", None]}), None, "must be a string"),
        ([1, 2], None, "must be a string"),
        (pd.DataFrame({"prompt": pd.Series([], dtype=object)}), None, "no prompts"),
        ([], None, "no prompts"),
        (["hi"], {"max_new_tokens": 0}, "`max_new_tokens` must be an integer in 1..4096, got 0"),
        (["hi"], {"max_new_tokens": -3}, "`max_new_tokens`"),
        (["hi"], {"max_new_tokens": 5000}, "`max_new_tokens` must be an integer in 1..4096, got 5000"),
        (["hi"], {"temperature": 0.0, "do_sample": True}, "`temperature`"),
        (["hi"], {"top_p": 1.5}, "`top_p`"),
        ([LONG_PROMPT], None, "exceeds the model's context of 256 tokens"),
        (["hi", "hi " * 220], {"max_new_tokens": 64}, "prompt 1 has .* tokens; with max_new_tokens=64"),
    ],
)
def test_bad_input_is_rejected_clearly(pyfunc_model, data, params, match):
    # Through MLflow's PyFuncModel (its schema enforcement runs first and may word a wrong type
    # itself), then through our wrapper alone, whose message is checked.
    with pytest.raises(MlflowException) as err:
        pyfunc_model.predict(data, params=params)
    assert err.value.error_code == INVALID, err.value.message
    with pytest.raises(MlflowException, match=match) as err:
        pyfunc_model._model_impl.predict(data, params=params)
    assert err.value.error_code == INVALID


def test_unknown_params_get_a_did_you_mean(pyfunc_model):
    with pytest.raises(MlflowException, match="did you mean `max_new_tokens`"):
        pyfunc_model._model_impl.predict(["hi"], params={"max_new_token": 3})


def test_max_new_tokens_cap_is_configurable(pyfunc_model, saved):
    capped = mlflow.pyfunc.load_model(str(saved), model_config={"max_new_tokens_cap": 8})
    with pytest.raises(MlflowException, match=r"1\.\.8, got 9"):
        capped.predict(["hi"], params={"max_new_tokens": 9})


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


def test_on_device_needs_every_parameter_and_buffer_there():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    assert flavor._on_device(model, torch.device("cpu"))
    model[1].register_buffer("moved", torch.zeros(1, device="meta"))
    assert not flavor._on_device(model, torch.device("cpu"))
    assert not flavor._on_device(torch.nn.Linear(2, 2), torch.device("meta"))
