"""Fingerprints of the base and the adapter, and the digest cache (loraflow.flavor.fingerprint)."""

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
from loraflow.flavor import fingerprint, generation, load, pyfunc, save, switches
from loraflow.flavor.files import file_sha256

INVALID = ErrorCode.Name(INVALID_PARAMETER_VALUE)
pytestmark = pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")


# ---------------------------------------------------------------------------------------------
# Fingerprints and what is saved.


def test_fingerprint_is_the_same_with_and_without_peft_wrappers(tiny_model):
    before = fingerprint.base_fingerprint(tiny_model)
    wrapped = make_peft_model(tiny_model)  # wraps in place and perturbs only adapter weights
    assert fingerprint.base_fingerprint(wrapped) == before
    with torch.no_grad():
        wrapped.get_base_model().model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    assert fingerprint.base_fingerprint(wrapped) != before


def test_a_fingerprint_of_another_scheme_is_refused_and_a_wrong_one_fails(saved):
    doc = mlmodel(saved)
    doc["flavors"]["loraflow"]["base"]["fingerprint"] = "sha256-tensors:" + "0" * 64
    write_mlmodel(saved, doc)
    with pytest.raises(MlflowException, match="does not match"):
        flavor.load_model(str(saved))
    # the sequential `sha256` scheme was never in a released format: it is unknown now
    for scheme in ("sha256", "blake3"):
        doc["flavors"]["loraflow"]["base"]["fingerprint"] = f"{scheme}:" + "0" * 64
        write_mlmodel(saved, doc)
        with pytest.raises(MlflowException, match=f"unknown base fingerprint scheme '{scheme}'.*upgrade loraflow"):
            flavor.load_model(str(saved))


def test_digests_of_the_stored_tensors_are_those_of_the_loaded_ones(tiny_path, tiny_model):
    stored = fingerprint.stored_tensor_digests([Path(tiny_path) / "model.safetensors"])
    inputs = fingerprint._fingerprint_inputs(tiny_model)
    assert {header for header, _ in inputs.tensors} <= set(stored)  # every loaded tensor is found stored
    assert fingerprint._fingerprint(inputs, stored) == fingerprint.base_fingerprint(tiny_model)


def test_a_files_ranges_are_hashed_through_the_buffer_as_a_whole(tmp_path, monkeypatch):
    """Files are read through a small buffer, not mapped: a range hashes as its bytes do, across
    chunk boundaries, and a file that ends early is an error, not a short digest."""
    import hashlib

    data = bytes(range(256)) * 40
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(fingerprint, "_READ_CHUNK", 1000)
    for start, end in [(0, len(data)), (7, 7), (13, 2999), (999, 1001)]:
        assert fingerprint._range_sha256(tmp_path / "f", start, end) == hashlib.sha256(data[start:end]).digest()
    with pytest.raises(OSError, match="changed while being read"):
        fingerprint._range_sha256(tmp_path / "f", 10, len(data) + 1)


def test_a_sharded_base_missing_a_shard_has_no_local_files(tmp_path, tiny_model):
    """Hashing part of a base would give another fingerprint: either every shard is here, or none counts."""
    tiny_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    sorted((tmp_path / "sharded").glob("model-*.safetensors"))[-1].unlink()
    base = {"mode": "reference", "kind": "local", "name": str(tmp_path / "sharded")}
    assert fingerprint._base_weight_files(tmp_path, base) == []


def test_a_sharded_base_is_hashed_from_every_shard_its_index_names(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    shards = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    base = {"mode": "reference", "kind": "local", "name": str(tmp_path / "sharded")}
    assert fingerprint._base_weight_files(tmp_path, base) == shards
    inputs = fingerprint._fingerprint_inputs(tiny_model)
    stored = fingerprint.stored_tensor_digests(shards, workers=2)
    assert {header for header, _ in inputs.tensors} <= set(stored)
    assert fingerprint._fingerprint(inputs, stored) == fingerprint.base_fingerprint(tiny_model)


def test_loading_takes_every_base_digest_from_the_files_hashed_while_it_loaded(saved, monkeypatch):
    calls = []
    real = fingerprint._fingerprint

    def spy(inputs, known=None):
        calls.append(sum(header not in (known or {}) for header, _ in inputs.tensors))
        return real(inputs, known)

    monkeypatch.setattr(fingerprint, "_fingerprint", spy)
    assert flavor.load_model(str(saved)).model is not None
    assert calls == [0]  # one fingerprint, and no loaded tensor had to be hashed itself


def test_stored_digests_that_do_not_match_are_rechecked_on_the_loaded_tensors(saved, monkeypatch):
    """If loading changed a tensor's values, the file's digest is not the loaded tensor's: a
    mismatch then re-hashes what was loaded before judging, so a good base still loads and a
    changed one is still refused."""
    stored_tensor_digests = fingerprint.stored_tensor_digests
    wrong = lambda files, workers=1, cache=False: {h: b"\0" * 32 for h in stored_tensor_digests(files, workers)}  # noqa: E731
    monkeypatch.setattr(fingerprint, "stored_tensor_digests", wrong)
    assert flavor.load_model(str(saved)).model is not None  # the loaded tensors match: loads
    perturb_safetensors(saved / "base" / "model.safetensors")
    with pytest.raises(MlflowException, match="does not match"):
        flavor.load_model(str(saved))


@pytest.fixture
def referenced(tmp_path, peft_model, tiny_tokenizer, tiny_path, monkeypatch):
    """A model referencing a local copy of the base; returns (model dir, the copy's weights file)."""
    monkeypatch.setattr(fingerprint, "_RACY_NS", 0)  # the copy was just written (see the racy test below)
    base_copy = tmp_path / "base-copy"
    shutil.copytree(tiny_path, base_copy)
    path = tmp_path / "model"
    flavor.save_model(peft_model, path, tiny_tokenizer, base_model=str(base_copy), base_mode="reference")
    return path, base_copy / "model.safetensors"


@pytest.fixture
def hashed_files(monkeypatch) -> list[Path]:
    """The weight files hashed from disk, once per time each is read."""
    opened: list[Path] = []
    hashed = fingerprint._hashed_ranges

    def spy(file, ranges, workers):
        opened.append(Path(file))
        return hashed(file, ranges, workers)

    monkeypatch.setattr(fingerprint, "_hashed_ranges", spy)
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
    monkeypatch.setattr(fingerprint, "_RACY_NS", 0)  # would be recorded, were it not embedded
    for _ in range(2):
        assert flavor.load_model(str(saved)).model is not None
    assert len(hashed_files) == 2 and cache_entries(tmp_path) == []


def test_the_digest_cache_can_be_turned_off(referenced, hashed_files, tmp_path, monkeypatch):
    monkeypatch.setenv(switches.ENV, "digest_cache")
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
    assert hashed_files == [weights] and fingerprint._cached_file_digests(weights) is not None  # rewritten


def test_recording_an_entry_drops_the_entries_of_files_that_are_gone(tmp_path, monkeypatch):
    monkeypatch.setattr(fingerprint, "_RACY_NS", 0)
    files = {}
    for name in ("kept", "deleted", "new"):
        files[name] = tmp_path / f"{name}.safetensors"
        files[name].write_bytes(b"weights of " + name.encode())
    digests = {"t": ("header", b"\x00" * 32)}

    def record(name):
        file = files[name]
        fingerprint._record_file_digests(file, fingerprint._file_identity(file), time.time_ns() + 1, digests)

    record("kept")
    record("deleted")
    (tmp_path / "digest-cache" / "stray.json").write_text("{not json")
    files["deleted"].unlink()
    assert len(cache_entries(tmp_path)) == 3  # nothing is dropped before the next record
    record("new")
    assert cache_entries(tmp_path) == sorted(fingerprint._digest_cache_entry(files[n]) for n in ("kept", "new"))
    assert fingerprint._cached_file_digests(files["kept"]) == digests


def test_a_file_changed_just_before_it_is_hashed_is_not_recorded(tmp_path, tiny_path):
    """A change in the same clock tick as the hashing would not show: such digests are not kept,
    even with the modification time set back (the change time cannot be)."""
    import os

    weights = tmp_path / "model.safetensors"
    shutil.copy(Path(tiny_path) / "model.safetensors", weights)
    os.utime(weights, ns=(0, 0))
    digests = fingerprint.stored_tensor_digests([weights], cache=True)
    assert digests == fingerprint.stored_tensor_digests([Path(tiny_path) / "model.safetensors"])
    assert cache_entries(tmp_path) == []
