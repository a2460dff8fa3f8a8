"""`--format adapter`: the adapter's own files, byte for byte and verified against the digests
recorded at save, with the tokenizer beside them, as a plain peft folder (`PeftModel.from_pretrained`,
vLLM's `--lora-modules`). `adapter_config.json` is pointed at the base as recorded, and the result
says which base the adapter needs and what keeps vLLM from serving it (`loraflow.export.vllm`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loraflow.export import EXPORT_RECORD, ExportError, ExportResult
from loraflow.export.source import Source, provenance
from loraflow.export.target import copy_file, write_folder, write_json
from loraflow.export.vllm import vllm_limits
from loraflow.flavor.files import file_sha256
from loraflow.flavor.layout import ADAPTER_CONFIG_FILE, ADAPTER_SUBPATH, ADAPTER_WEIGHTS_FILE, TOKENIZER_SUBPATH


def export_adapter(source: Source, target: Path, *, overwrite: bool = False, progress: bool = True) -> ExportResult:
    """Write the adapter's files (byte for byte) and the tokenizer as a plain peft folder at `target`."""
    adapter_dir = source.path / source.conf.get("adapter", ADAPTER_SUBPATH)
    tokenizer_dir = source.path / source.conf.get("tokenizer", TOKENIZER_SUBPATH)
    _verify_adapter(source, adapter_dir)
    adapter_config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text(encoding="utf-8"))
    needs, adapter_config = _name_base(source, adapter_config)
    record = provenance(source, "adapter", None)
    record["base_model_name_or_path"] = adapter_config.get("base_model_name_or_path")
    record["revision"] = adapter_config.get("revision")
    record["needs_base"] = needs

    def write_adapter(d: Path) -> None:
        copy_file(adapter_dir / ADAPTER_WEIGHTS_FILE, d / ADAPTER_WEIGHTS_FILE)
        write_json(d / ADAPTER_CONFIG_FILE, adapter_config)

    def write_tokenizer(d: Path) -> None:
        for file in sorted(tokenizer_dir.iterdir()):
            if file.is_file():
                copy_file(file, d / file.name)

    write_folder(target, [
        ("adapter", write_adapter),
        ("tokenizer", write_tokenizer),
        ("record", lambda d: write_json(d / EXPORT_RECORD, record)),
    ], overwrite=overwrite, progress=progress)
    notes = [needs, *vllm_limits(adapter_config)]
    return ExportResult("adapter", str(target), record, notes)


def _verify_adapter(source: Source, adapter_dir: Path) -> None:
    """The adapter files must have the sha256 recorded when the model was saved (`sha256:<hex>`)."""
    for name, expected in (source.conf.get("adapter_sha256") or {}).items():
        file = adapter_dir / name
        if not file.is_file():
            raise ExportError(f"adapter file {str(file)!r} is missing from {source.uri!r}: the model artifact is "
                              "incomplete; re-log the model")
        actual = file_sha256(file)
        if actual.removeprefix("sha256:") != str(expected).removeprefix("sha256:"):
            raise ExportError(f"adapter file {str(file)!r} is corrupt: its sha256 is {actual.removeprefix('sha256:')}, "
                              f"but {expected} was recorded; re-download or re-log the model")


def _name_base(source: Source, adapter_config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Point `base_model_name_or_path` (and `revision`) at the base as recorded; say what base it needs."""
    base = source.conf["base"]
    kind, name, fingerprint = base.get("kind"), base.get("name"), base.get("fingerprint")
    adapter_config = dict(adapter_config)
    if kind == "hub":
        adapter_config["base_model_name_or_path"] = name
        adapter_config["revision"] = base.get("revision")
        return f"base model: {name} at revision {base.get('revision')} (Hugging Face Hub)", adapter_config
    if kind == "builtin":
        from loraflow.flavor.bases import builtin_dir

        adapter_config["base_model_name_or_path"] = str(builtin_dir(name))
        adapter_config["revision"] = None
        return (f"base model: loraflow's {name} (not on the Hub; built locally at "
                f"{adapter_config['base_model_name_or_path']}), fingerprint {fingerprint}; "
                "to serve without it, use --format merged"), adapter_config
    adapter_config["base_model_name_or_path"] = name
    adapter_config["revision"] = None
    if base.get("mode") == "logged":
        return (f"base model: {name}, logged once at {base.get('uri')} (fingerprint {fingerprint}); download it "
                f"with `mlflow artifacts download -u {base.get('uri')} -d DIR` and point "
                "base_model_name_or_path at it, or use --format merged"), adapter_config
    if str(name).endswith(".gguf"):
        return (f"base model: the GGUF file {name} (fingerprint {fingerprint}); peft and vLLM read a base "
                "from a Hugging Face folder, not a GGUF file: load it with transformers' "
                "from_pretrained(folder, gguf_file=...) before PeftModel.from_pretrained, or use "
                "--format merged"), adapter_config
    return (f"base model: the local folder {name} (fingerprint {fingerprint}); copy that folder to the "
            "serving machine, or use --format merged"), adapter_config
