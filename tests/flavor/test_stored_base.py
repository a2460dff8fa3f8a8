"""A local base stored once: logged per fingerprint to the tracking store, referenced by every model
trained on it, downloaded once per machine, and checked by fingerprint on every load."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from model_helpers import logits, make_peft_model

from loraflow import flavor
from loraflow.flavor import stored_base
from loraflow.flavor.layout import HOME_ENV


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """Downloaded bases go to this test's own cache."""
    monkeypatch.setenv(HOME_ENV, str(tmp_path / "home"))


def base_record(model_dir: Path) -> dict:
    return yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["loraflow"]["base"]


def log(peft_model, tokenizer, **kwargs):
    with mlflow.start_run():
        return flavor.log_model(peft_model, "model", tokenizer, **kwargs)


def base_runs() -> list:
    experiment = MlflowClient().get_experiment_by_name(stored_base.BASES_EXPERIMENT)
    return [] if experiment is None else MlflowClient().search_runs([experiment.experiment_id])


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def test_two_models_on_one_local_base_store_it_once_and_load_exactly(tiny_model, tiny_path, tiny_tokenizer,
                                                                      tracking_uri, tmp_path):
    import copy

    first, second = make_peft_model(copy.deepcopy(tiny_model), seed=1), make_peft_model(tiny_model, seed=2)
    infos = [log(model, tiny_tokenizer, base_model=tiny_path) for model in (first, second)]  # base_mode auto

    runs = base_runs()
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    records = [base_record(Path(mlflow.artifacts.download_artifacts(info.model_uri))) for info in infos]
    assert {r["mode"] for r in records} == {"logged"}
    assert records[0]["uri"] == records[1]["uri"] == f"runs:/{runs[0].info.run_id}/base"
    assert records[0]["fingerprint"] == runs[0].data.tags[stored_base.FINGERPRINT_TAG]
    base_dir = Path(mlflow.artifacts.download_artifacts(records[0]["uri"]))
    for info in infos:
        model_dir = Path(mlflow.artifacts.download_artifacts(info.model_uri))
        assert not (model_dir / "base").exists()
        assert folder_bytes(model_dir) < folder_bytes(base_dir) / 2  # the adapter, not a second base

    for model, info in zip((first, second), infos):
        loaded, tokenizer = flavor.load_model(info.model_uri)
        assert (logits(loaded, tokenizer) - logits(model, tiny_tokenizer)).abs().max().item() == 0.0
    assert len(list((tmp_path / "home" / "bases").iterdir())) == 1  # downloaded once


def test_embedding_stays_available_on_request(peft_model, tiny_path, tiny_tokenizer, tracking_uri):
    info = log(peft_model, tiny_tokenizer, base_model=tiny_path, base_mode="embedded")
    model_dir = Path(mlflow.artifacts.download_artifacts(info.model_uri))
    assert base_record(model_dir)["mode"] == "embedded" and (model_dir / "base" / "config.json").is_file()
    assert base_runs() == []


def test_save_model_has_no_store_so_logged_embeds(peft_model, tiny_path, tiny_tokenizer, tmp_path):
    flavor.save_model(peft_model, tmp_path / "m", tiny_tokenizer, base_model=tiny_path, base_mode="logged")
    assert base_record(tmp_path / "m")["mode"] == "embedded" and (tmp_path / "m" / "base").is_dir()


def test_a_base_run_whose_files_are_gone_is_not_reused(tiny_model, tiny_path, tiny_tokenizer, tracking_uri):
    import copy

    log(make_peft_model(copy.deepcopy(tiny_model)), tiny_tokenizer, base_model=tiny_path)
    (gone,) = base_runs()
    shutil.rmtree(Path(gone.info.artifact_uri.removeprefix("file://")) / "base")
    info = log(make_peft_model(tiny_model), tiny_tokenizer, base_model=tiny_path)
    assert len(base_runs()) == 2
    loaded, tokenizer = flavor.load_model(info.model_uri)
    assert loaded is not None and tokenizer is not None


def test_without_the_tracking_store_the_recorded_artifact_location_serves(peft_model, tiny_path, tiny_tokenizer,
                                                                          tracking_uri, tmp_path, monkeypatch):
    info = log(peft_model, tiny_tokenizer, base_model=tiny_path)
    model_dir = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "copy")))
    shutil.rmtree(tmp_path / "home" / "bases", ignore_errors=True)  # the copy logging's input check downloaded
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'other.db'}")  # runs:/ finds nothing there
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'other.db'}")
    loaded, tokenizer = flavor.load_model(str(model_dir))
    assert (logits(loaded, tokenizer) - logits(peft_model, tiny_tokenizer)).abs().max().item() == 0.0


def test_a_base_that_cannot_be_downloaded_is_one_clear_error(peft_model, tiny_path, tiny_tokenizer, tracking_uri,
                                                             tmp_path):
    info = log(peft_model, tiny_tokenizer, base_model=tiny_path)
    model_dir = Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "copy")))
    (run,) = base_runs()
    shutil.rmtree(Path(run.info.artifact_uri.removeprefix("file://")) / "base")
    shutil.rmtree(tmp_path / "home" / "bases", ignore_errors=True)  # the copy logging's input check downloaded
    with pytest.raises(MlflowException, match=r"logged at runs:/.*could not be downloaded.*MLFLOW_TRACKING_URI") as err:
        flavor.load_model(str(model_dir))
    assert err.value.error_code == "RESOURCE_DOES_NOT_EXIST"  # the CLI reports it as the user's to fix (exit 2)
    assert not (tmp_path / "home" / "bases").exists() or not any((tmp_path / "home" / "bases").iterdir())


def test_a_tampered_local_copy_fails_the_fingerprint(peft_model, tiny_path, tiny_tokenizer, tracking_uri, tmp_path):
    from safetensors.torch import load_file, save_file

    info = log(peft_model, tiny_tokenizer, base_model=tiny_path)
    flavor.load_model(info.model_uri)
    (copy_dir,) = (tmp_path / "home" / "bases").iterdir()
    weights = next((copy_dir / "base").glob("*.safetensors"))
    tensors = load_file(str(weights))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(MlflowException, match="fingerprint"):
        flavor.load_model(info.model_uri)


def test_a_base_without_safetensors_is_refused_before_anything_is_logged(peft_model, tiny_path, tiny_tokenizer,
                                                                         tracking_uri, tmp_path):
    pickled_only = tmp_path / "pickled-base"
    pickled_only.mkdir()
    shutil.copy(Path(tiny_path) / "config.json", pickled_only)
    (pickled_only / "pytorch_model.bin").write_bytes(b"not copied")
    with mlflow.start_run() as run, pytest.raises(MlflowException, match="no \\*.safetensors weights"):
        flavor.log_model(peft_model, "model", tiny_tokenizer, base_model=str(pickled_only))
    assert base_runs() == [] and MlflowClient().search_logged_models([run.info.experiment_id]) == []
