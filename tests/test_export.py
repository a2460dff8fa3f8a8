"""`loraflow export`: merged HF folders, plain peft adapter folders, MLflow transformers models, and
every way an export can fail without leaving anything behind.

Each format runs on two tiny bases with tied embeddings: a Qwen2-architecture model built here from
`transformers.Qwen2Config` (a local base) and the built-in Llama (`builtin:tiny`).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors import safe_open

from loraflow import export, flavor
from loraflow.export import adapter as adapter_format
from loraflow.export import logged as logged_format
from loraflow.export import merged as merged_format
from loraflow.export import target as export_target
from loraflow.export import vllm as export_vllm
from loraflow.cli import main
from loraflow.errors import ConfigError

PROMPTS = ["Question: What is the capital?\nAnswer:", "The sky", "Once upon a time there was"]
pytestmark = pytest.mark.filterwarnings("ignore")
VARIANTS = {
    "lora": {},
    "dora": {"use_dora": True},
    "modules_to_save": {"modules_to_save": ["lm_head"]},
    # a LoRA on the tied lm_head: merged in place it would change the input embeddings too
    "lora_on_lm_head": {"target_modules": ["q_proj", "v_proj", "lm_head"]},
}
UNTIED = ("modules_to_save", "lora_on_lm_head")


# ---------------------------------------------------------------------------------------------
# Models.


@pytest.fixture(scope="module")
def qwen_path(tmp_path_factory, tiny_tokenizer) -> str:
    """A tiny seeded Qwen2 model with tied embeddings and the built-in tokenizer, saved to a folder."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
        pad_token_id=tiny_tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
    path = tmp_path_factory.mktemp("qwen") / "qwen2-tiny"
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return str(path)


def base_source(which: str, qwen_path: str, tiny_path: str) -> tuple[str, str]:
    """(base_model as given to save_model, the folder its weights are in)."""
    return (qwen_path, qwen_path) if which == "qwen" else ("builtin:tiny", tiny_path)


def make_adapter(base_dir: str, seed: int = 0, r: int = 4, dtype: str | None = None,
                 target_modules: tuple[str, ...] = ("q_proj", "v_proj"), **lora):
    """A LoRA adapter on q/v with non-zero weights (peft starts lora_B at zero: a no-op)."""
    import peft

    from loraflow.flavor.bases import load_base_model

    base = load_base_model(base_dir, dtype=dtype).eval()
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules),
                             task_type="CAUSAL_LM", **lora)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name or "lora_magnitude" in name:
                param.add_((torch.randn(param.shape, generator=generator) * 0.05).to(param.dtype))
    return model.eval()


def save_loraflow(path: Path, which: str, qwen_path: str, tiny_path: str, tokenizer, **adapter) -> Path:
    base_model, base_dir = base_source(which, qwen_path, tiny_path)
    flavor.save_model(make_adapter(base_dir, **adapter), path, tokenizer, base_model=base_model)
    return path


def logits(model, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits.float()


def reference_logits(model_dir: Path) -> tuple[torch.Tensor, object]:
    model, tokenizer = flavor.load_model(str(model_dir))
    return logits(model, tokenizer), tokenizer


def weight_names(folder: Path) -> set[str]:
    names: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            names |= set(f.keys())
    return names


def weight_dtypes(folder: Path) -> set[torch.dtype]:
    dtypes = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            dtypes |= {f.get_tensor(k).dtype for k in f.keys()}
    return dtypes


def leftovers(target: Path) -> list[str]:
    """Anything an export left beside its target: atomic_dir's temporary and backup folders
    (`.tmp-NAME-*`, `.old-NAME-*`), or any other hidden sibling named after it."""
    prefixes = (f".{target.name}.", f".tmp-{target.name}-", f".old-{target.name}-")
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(prefixes))


def cli(*args: str):
    return CliRunner().invoke(main, ["export", *args])


# ---------------------------------------------------------------------------------------------
# --format merged


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_merged_loads_with_plain_transformers_and_matches_the_adapter_model(
    tmp_path, which, variant, qwen_path, tiny_path, tiny_tokenizer
):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = save_loraflow(tmp_path / "model", which, qwen_path, tiny_path, tiny_tokenizer, **VARIANTS[variant])
    expected, _ = reference_logits(source)
    out = tmp_path / "merged"
    result = export.export_model(str(source), "merged", out, progress=False)

    assert result.output == str(out)
    assert {"config.json", "generation_config.json", "tokenizer.json", export.EXPORT_RECORD} <= {
        p.name for p in out.iterdir()}
    assert not (out / "adapter_config.json").exists() and leftovers(out) == []
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any("lora" in name for name, _ in merged.named_parameters())
    actual = logits(merged, AutoTokenizer.from_pretrained(out))
    assert (actual - expected).abs().max().item() < 1e-4

    names = weight_names(out)
    if variant in UNTIED:  # lm_head changed on its own: the merged model cannot stay tied
        assert merged.config.tie_word_embeddings is False
        assert {"lm_head.weight", "model.embed_tokens.weight"} <= names
        assert not torch.equal(merged.lm_head.weight, merged.model.embed_tokens.weight)
        assert any("tie_word_embeddings=false" in note for note in result.notes)
    else:  # tied: one tensor in the checkpoint, one tensor once loaded
        assert merged.config.tie_word_embeddings is True
        assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names
        assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()

    record = json.loads((out / export.EXPORT_RECORD).read_text())
    conf = yaml.safe_load((source / "MLmodel").read_text())["flavors"]["loraflow"]
    assert record["source_model_uri"] == str(source)
    assert record["base_fingerprint"] == conf["base"]["fingerprint"]
    assert record["adapter_sha256"] == conf["adapter_sha256"]
    assert record["dtype"] == "float32"


def test_merged_dtype_auto_is_the_bases_recorded_dtype(tmp_path, qwen_path, tiny_path, tiny_tokenizer):
    source = save_loraflow(tmp_path / "model", "qwen", qwen_path, tiny_path, tiny_tokenizer, dtype="bfloat16")
    assert yaml.safe_load((source / "MLmodel").read_text())["flavors"]["loraflow"]["base"]["dtype"] == "bfloat16"
    export.export_model(str(source), "merged", tmp_path / "auto", progress=False)
    assert weight_dtypes(tmp_path / "auto") == {torch.bfloat16}
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["dtype"] == "bfloat16"
    export.export_model(str(source), "merged", tmp_path / "fp16", dtype="fp16", progress=False)
    assert weight_dtypes(tmp_path / "fp16") == {torch.float16}


def test_merged_keeps_the_chat_template(tmp_path, qwen_path, tiny_path, tiny_tokenizer):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_path)
    tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    source = save_loraflow(tmp_path / "model", "qwen", qwen_path, tiny_path, tokenizer)
    export.export_model(str(source), "merged", tmp_path / "merged", progress=False)
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").chat_template == tokenizer.chat_template


# ---------------------------------------------------------------------------------------------
# --format adapter


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_adapter_folder_loads_with_plain_peft_bit_identically(tmp_path, which, qwen_path, tiny_path, tiny_tokenizer):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = save_loraflow(tmp_path / "model", which, qwen_path, tiny_path, tiny_tokenizer,
                           modules_to_save=["lm_head"])
    expected, _ = reference_logits(source)
    out = tmp_path / "adapter"
    result = export.export_model(str(source), "adapter", out, progress=False)

    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", export.EXPORT_RECORD} <= {
        p.name for p in out.iterdir()}
    assert (out / "adapter_model.safetensors").read_bytes() == (source / "adapter" / "adapter_model.safetensors").read_bytes()
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    _, base_dir = base_source(which, qwen_path, tiny_path)
    # a builtin base points at its local build, a local base at its folder; the output says which base
    assert Path(adapter_config["base_model_name_or_path"]).resolve() == Path(base_dir).resolve()
    assert any(note.startswith("base model:") for note in result.notes)
    base = AutoModelForCausalLM.from_pretrained(adapter_config["base_model_name_or_path"]).eval()
    model = PeftModel.from_pretrained(base, str(out)).eval()
    assert torch.equal(logits(model, AutoTokenizer.from_pretrained(out)), expected)
    assert json.loads((out / export.EXPORT_RECORD).read_text())["needs_base"] == result.notes[0]


def test_adapter_config_names_a_hub_base_and_its_revision(tmp_path, qwen_path, tiny_path, tiny_tokenizer):
    """A model trained from a Hub id: base_model_name_or_path is the id, revision the recorded commit."""
    source = save_loraflow(tmp_path / "model", "qwen", qwen_path, tiny_path, tiny_tokenizer)
    doc = yaml.safe_load((source / "MLmodel").read_text())
    doc["flavors"]["loraflow"]["base"].update(kind="hub", mode="reference", name="acme/qwen2-tiny",
                                              revision="0123456789abcdef0123456789abcdef01234567")
    (source / "MLmodel").write_text(yaml.safe_dump(doc))
    result = export.export_model(str(source), "adapter", tmp_path / "adapter", progress=False)
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "acme/qwen2-tiny"
    assert adapter_config["revision"] == "0123456789abcdef0123456789abcdef01234567"
    assert "acme/qwen2-tiny" in result.notes[0]


@pytest.mark.parametrize("adapter, expected", [
    ({"use_dora": True}, "does not support DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"r": 32}, "--max-lora-rank 32"),
])
def test_adapter_export_warns_about_vllm_limits(tmp_path, adapter, expected, qwen_path, tiny_path, tiny_tokenizer):
    source = save_loraflow(tmp_path / "model", "qwen", qwen_path, tiny_path, tiny_tokenizer, **adapter)
    result = cli(str(source), "--format", "adapter", "--output", str(tmp_path / "adapter"))
    assert result.exit_code == 0, result.output
    assert expected in result.output and "--format merged" in result.output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()  # written anyway


def test_a_plain_rank_16_adapter_has_no_vllm_warning():
    assert export_vllm.vllm_limits({"r": 16, "use_dora": False, "modules_to_save": None, "bias": "none"}) == []


# ---------------------------------------------------------------------------------------------
# --format transformers, and models:/ and runs:/ sources


def predictions(uri: str, params: dict) -> list[str]:
    """The continuations pyfunc returns, stripped: MLflow's transformers pyfunc strips every output
    (`_TransformersWrapper._sanitize_output`), so a continuation's leading space is gone there."""
    frame = mlflow.pyfunc.load_model(uri).predict(PROMPTS, params=params)
    texts = frame["text"] if hasattr(frame, "columns") and "text" in frame.columns else frame
    return [str(x).strip() for x in texts]


@pytest.mark.parametrize("which", ["qwen", "llama"])
def test_transformers_export_generates_what_the_loraflow_model_generates(
    tmp_path, which, tracking_uri, qwen_path, tiny_path, tiny_tokenizer
):
    base_model, base_dir = base_source(which, qwen_path, tiny_path)
    with mlflow.start_run() as run:
        info = flavor.log_model(make_adapter(base_dir, modules_to_save=["lm_head"]), "model", tiny_tokenizer,
                                base_model=base_model)
    source_uri = f"runs:/{run.info.run_id}/model"
    result = export.export_model(source_uri, "transformers", registered_model_name=f"{which}-hf", progress=False)

    params = {"max_new_tokens": 8, "do_sample": False}
    expected = predictions(info.model_uri, params)
    assert all(expected) and predictions(result.output, params) == expected
    exported = mlflow.get_run(result.run_id)
    conf = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "dl")))
                          .joinpath("MLmodel").read_text())["flavors"]["loraflow"]
    assert exported.data.tags["loraflow.export.source_model_uri"] == source_uri
    assert exported.data.tags["loraflow.export.base_fingerprint"] == conf["base"]["fingerprint"]
    assert exported.data.tags["loraflow.export.adapter_sha256"] == conf["adapter_sha256"]["adapter_model.safetensors"]
    assert result.registered_version == "1" and result.record["task"] == "text-generation"
    record = mlflow.artifacts.load_dict(f"runs:/{result.run_id}/{export.EXPORT_RECORD}")
    assert record["source_model_uri"] == source_uri


def test_a_chat_model_is_logged_with_the_chat_task(tmp_path, tracking_uri, qwen_path, tiny_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen_path)
    tokenizer.chat_template = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}<|assistant|>"
    source = save_loraflow(tmp_path / "model", "qwen", qwen_path, tiny_path, tokenizer)
    doc = yaml.safe_load((source / "MLmodel").read_text())
    doc["flavors"]["loraflow"]["task"] = "chat"
    (source / "MLmodel").write_text(yaml.safe_dump(doc))
    result = export.export_model(str(source), "transformers", progress=False)
    assert result.record["task"] == "llm/v1/chat"
    logged = yaml.safe_load(Path(mlflow.artifacts.download_artifacts(result.output, dst_path=str(tmp_path / "dl")))
                            .joinpath("MLmodel").read_text())
    assert logged["metadata"]["task"] == "llm/v1/chat"


def test_cli_exports_a_champion_from_the_registry(tmp_path, tracking_uri, tiny_path, tiny_tokenizer, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    with mlflow.start_run():
        flavor.log_model(make_adapter(tiny_path), "model", tiny_tokenizer, base_model="builtin:tiny",
                         registered_model_name="tiny-lora")
    mlflow.MlflowClient().set_registered_model_alias("tiny-lora", "champion", "1")
    result = cli("models:/tiny-lora@champion", "--format", "merged", "--output", str(tmp_path / "merged"))
    assert result.exit_code == 0, result.output
    assert "exported models:/tiny-lora@champion as merged" in result.output
    record = json.loads((tmp_path / "merged" / export.EXPORT_RECORD).read_text())
    assert record["source_model_uri"] == "models:/tiny-lora@champion"
    assert list((tmp_path / "tmp").iterdir()) == []  # the downloaded copy of the model is gone


def test_cli_takes_the_arguments_as_mlproject_passes_them(tmp_path, source):
    """`--model-uri` instead of the argument, "" for unset values, `--overwrite false`."""
    args = ["--model-uri", str(source), "--format", "adapter", "--output", str(tmp_path / "out"), "--dtype", "auto",
            "--overwrite", "false", "--registered-model-name", ""]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert cli(*args).exit_code == 2  # not empty now, and --overwrite is false
    assert cli(*args[:-4], "--overwrite", "true").exit_code == 0
    result = cli(str(source), "--model-uri", str(source), "--format", "adapter", "--output", str(tmp_path / "x"))
    assert result.exit_code == 2 and "give the model once" in result.output


# ---------------------------------------------------------------------------------------------
# Failures: one message, exit code 2, nothing left behind.


@pytest.fixture
def source(tmp_path, qwen_path, tiny_path, tiny_tokenizer) -> Path:
    return save_loraflow(tmp_path / "model", "qwen", qwen_path, tiny_path, tiny_tokenizer)


@pytest.fixture
def never_loads(monkeypatch):
    """Fail the test if the model gets loaded (checks must come first)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was checked")

    monkeypatch.setattr(merged_format, "load_source", refuse)
    monkeypatch.setattr(logged_format, "load_source", refuse)


def test_a_non_empty_output_is_refused_unless_overwrite(tmp_path, source):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = cli(str(source), "--format", "adapter", "--output", str(out))
    assert result.exit_code == 2 and "exists and is not empty" in result.output and "--overwrite" in result.output
    assert "Traceback" not in result.output and (out / "old.txt").read_text() == "old"

    result = cli(str(source), "--format", "adapter", "--output", str(out), "--overwrite")
    assert result.exit_code == 0, result.output
    assert not (out / "old.txt").exists() and (out / "adapter_config.json").is_file() and leftovers(out) == []


def test_an_empty_output_folder_is_used(tmp_path, source):
    (tmp_path / "out").mkdir()
    result = cli(str(source), "--format", "adapter", "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output


def test_a_plain_folder_is_not_a_loraflow_model(tmp_path):
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "config.json").write_text("{}")
    result = cli(str(tmp_path / "plain"), "--format", "merged", "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "is not an MLflow model" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_a_model_of_another_flavor_is_not_a_loraflow_model(tmp_path):
    from mlflow.models import Model

    (tmp_path / "other").mkdir()
    model = Model()
    model.add_flavor("sklearn", pickled_model="model.pkl")
    model.save(str(tmp_path / "other" / "MLmodel"))
    result = cli(str(tmp_path / "other"), "--format", "adapter", "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "is not a loraflow model" in result.output and "sklearn" in result.output
    assert not (tmp_path / "out").exists()


def test_a_model_of_a_newer_flavor_version_asks_for_a_newer_loraflow(tmp_path, source, never_loads):
    doc = yaml.safe_load((source / "MLmodel").read_text())
    doc["flavors"]["loraflow"]["flavor_version"] = 99
    (source / "MLmodel").write_text(yaml.safe_dump(doc))
    result = cli(str(source), "--format", "merged", "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "upgrade loraflow" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_an_unknown_uri_is_an_error(tmp_path):
    result = cli(str(tmp_path / "missing"), "--format", "adapter", "--output", str(tmp_path / "out"))
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_an_output_under_a_file_is_refused_before_loading(tmp_path, source, never_loads):
    (tmp_path / "file").write_text("x")
    result = cli(str(source), "--format", "merged", "--output", str(tmp_path / "file" / "out"))
    assert result.exit_code == 2 and "is a file, not a folder" in result.output


def test_an_unwritable_system_path_is_refused_before_loading(source, never_loads):
    result = cli(str(source), "--format", "merged", "--output", "/proc/loraflow-export-test/out")
    assert result.exit_code == 2 and "cannot be written" in result.output and "Traceback" not in result.output
    assert not os.path.exists("/proc/loraflow-export-test")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions (see the /proc and file-parent tests)")
def test_a_read_only_folder_is_refused_before_loading(tmp_path, source, never_loads):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = cli(str(source), "--format", "merged", "--output", str(locked / "out"))
    finally:
        locked.chmod(0o755)
    assert result.exit_code == 2 and "cannot be written" in result.output
    assert list(locked.iterdir()) == []


def test_an_output_inside_the_source_model_is_refused(source, never_loads):
    for inside in (source, source / "merged"):
        result = cli(str(source), "--format", "merged", "--output", str(inside), "--overwrite")
        assert result.exit_code == 2 and "inside the source model's folder" in result.output
    assert not (source / "merged").exists() and (source / "MLmodel").is_file()


def test_option_problems_are_reported_together(source):
    result = cli(str(source), "--format", "adapter", "--dtype", "bf16", "--registered-model-name", "x")
    assert result.exit_code == 2
    assert "`output` is missing" in result.output and "`dtype` 'bf16' does not apply" in result.output
    assert "needs --format transformers" in result.output
    with pytest.raises(ConfigError, match="not a format"):
        export.export_model(str(source), "onnx", "out")


def disk_full_after_a_partial_write(path: Path) -> None:
    (path / "partial.bin").write_bytes(b"\0" * 1024)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_full_disk_leaves_no_output_and_no_temp_folder(tmp_path, source, monkeypatch):
    # the merged weights are written, then the disk fills up while the tokenizer is written
    monkeypatch.setattr(merged_format, "save_tokenizer", lambda tokenizer, d: disk_full_after_a_partial_write(d))
    out = tmp_path / "deep" / "merged"
    result = cli(str(source), "--format", "merged", "--output", str(out))
    assert result.exit_code == 2 and "disk is full" in result.output and "Traceback" not in result.output
    assert not out.exists() and not (tmp_path / "deep").exists()  # nor the parent created for it


def test_a_full_disk_keeps_the_previous_export_when_overwriting(tmp_path, source, monkeypatch):
    out = tmp_path / "adapter"
    export.export_model(str(source), "adapter", out, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_copy = adapter_format.copy_file
    calls = []

    def copy_then_fail(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the adapter weights went through; the disk fills on the next file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real_copy(src, dst)

    monkeypatch.setattr(adapter_format, "copy_file", copy_then_fail)
    with pytest.raises(export.ExportError, match="disk is full"):
        export.export_model(str(source), "adapter", out, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and leftovers(out) == []


def test_a_merge_that_changes_the_logits_is_refused_and_nothing_is_written(
    tmp_path, monkeypatch, qwen_path, tiny_path, tiny_tokenizer
):
    """Without untying first, merging a LoRA on a tied lm_head would also change the input embeddings."""
    source = save_loraflow(tmp_path / "model", "qwen", qwen_path, tiny_path, tiny_tokenizer,
                           **VARIANTS["lora_on_lm_head"])
    monkeypatch.setattr(merged_format, "untie_adapted_embeddings", lambda peft_model: False)
    result = cli(str(source), "--format", "merged", "--output", str(tmp_path / "merged"))
    assert result.exit_code == 2 and "cannot be merged correctly" in result.output and "--format adapter" in result.output
    assert not (tmp_path / "merged").exists() and leftovers(tmp_path / "merged") == []


FILE_SIZE_LIMITED_CLI = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv.pop(1)), resource.RLIM_INFINITY))
from loraflow.cli import main
main()
"""


def test_a_real_write_failure_in_the_weights_writer_leaves_nothing(tmp_path, source):
    """Not a monkeypatch: the process may write no file over 20 kB, so safetensors' own writer fails
    mid-file (it raises SafetensorError "... (os error 27)", which is not an OSError)."""
    import subprocess
    import sys

    out = tmp_path / "merged"
    env = {**os.environ, "PYTHONPATH": str(Path(export.__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMITED_CLI, "20000", "export", str(source),
                           "--format", "merged", "--output", str(out)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "could not write" in proc.stderr and "File too large" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and leftovers(out) == []


def test_the_export_folder_is_readable_by_others(tmp_path, source):
    old = os.umask(0o022)
    try:
        export.export_model(str(source), "adapter", tmp_path / "adapter", progress=False)
    finally:
        os.umask(old)
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755


def test_os_error_codes_are_found_in_safetensors_errors():
    from safetensors import SafetensorError

    assert export_target.os_errno(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")) \
        == errno.ENOSPC
    assert export_target.os_errno(OSError(errno.EROFS, "Read-only file system")) == errno.EROFS
    assert export_target.os_errno(ValueError("a bug")) is None
