"""Export a loraflow model for serving outside loraflow: a merged Hugging Face folder, a plain peft
adapter folder, or a model of MLflow's built-in `transformers` flavor.

    loraflow export models:/NAME@champion --format merged --output ./merged
    loraflow export runs:/RUN_ID/model --format adapter --output ./adapter
    loraflow export ./local-model --format transformers --registered-model-name NAME-hf

Formats:

- `merged`: the adapter merged into the base (`merge_and_unload`), written as a plain Hugging Face
  model folder (`*.safetensors`, `config.json`, `generation_config.json`, tokenizer with its chat
  template). `AutoModelForCausalLM.from_pretrained(DIR)` and `vllm serve DIR` read it. Merged in
  fp32, then cast to `--dtype` (auto: the base's recorded dtype).
- `adapter`: the adapter's own files, byte for byte (`adapter_config.json` +
  `adapter_model.safetensors`), with the tokenizer beside them: what `PeftModel.from_pretrained`
  and vLLM's `--lora-modules name=DIR` read. `adapter_config.json` names the base as recorded
  (a Hub id and its revision; a local path otherwise). Features vLLM does not serve as a LoRA
  (DoRA, modules_to_save, a rank above its `--max-lora-rank` default) are reported, not refused.
- `transformers`: the merged model logged with `mlflow.transformers.log_model` into a new run
  (task `llm/v1/chat` for a model recorded as a chat model, else `text-generation`), optionally
  registered.

Every export records its source (model URI, base fingerprint, adapter digests) in
`loraflow_export.json` in the output folder, and for `transformers` as run tags too. A folder is
written through `loraflow.flavor.files.atomic_dir` (a temporary sibling of `--output`, renamed into
place at the end), so a failure (a full disk included) leaves neither a half-written output nor the
temporary folder behind.

This module is the public surface (`export_model`, `ExportResult`, `ExportError`, the option
checks); the work is in its modules, each imported when an export needs it:

- `source`: the model to export: finding, downloading and reading it, its provenance record;
- `target`: the output folder: checking it before anything loads, and writing it atomically;
- `merged`: loading and merging the adapter into the base (checked), and `--format merged`;
- `adapter`: `--format adapter`: the verified adapter files and the base they need;
- `vllm`: what keeps vLLM from serving an adapter as a LoRA;
- `logged`: `--format transformers`: logging with MLflow's transformers flavor.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from loraflow.errors import ConfigError, LoraflowError

__all__ = ["DTYPES", "EXPORT_RECORD", "FORMATS", "ExportError", "ExportResult", "export_model", "validate_options"]

FORMATS = ("merged", "adapter", "transformers")
DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
EXPORT_RECORD = "loraflow_export.json"


class ExportError(LoraflowError):
    """An export that cannot be done as asked; the message names the value and the fix."""


@dataclass
class ExportResult:
    """What `export_model` produced."""

    format: str
    output: str
    """The output folder, or for `transformers` the logged model's URI."""
    record: dict[str, Any]
    """The provenance written to `loraflow_export.json`."""
    notes: list[str] = field(default_factory=list)
    """Things the user must know to serve the export (vLLM limits, the base an adapter needs)."""
    run_id: str | None = None
    registered_version: str | None = None


def validate_options(export_format: str, output: str | None, dtype: str, registered_model_name: str | None) -> None:
    """Check the options together (before anything is read or loaded); raise one ConfigError listing every problem."""
    problems = []
    if export_format not in FORMATS:
        problems.append(f"`format` {export_format!r} is not a format: use one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        problems.append(f"`dtype` {dtype!r} is not a dtype: use one of {', '.join(DTYPES)}")
    if export_format in ("merged", "adapter") and not output:
        problems.append(f"`output` is missing: --format {export_format} writes a folder, pass --output DIR")
    if export_format == "transformers" and output:
        problems.append(f"`output` {output!r} is not used by --format transformers (it logs to MLflow): drop --output")
    if export_format == "adapter" and dtype != "auto":
        problems.append(f"`dtype` {dtype!r} does not apply to --format adapter (its files are copied as saved): "
                        "drop --dtype or use --format merged")
    if registered_model_name and export_format != "transformers":
        problems.append(f"`registered_model_name` {registered_model_name!r} needs --format transformers "
                        "(a folder is not registered)")
    if problems:
        raise ConfigError(problems)


def export_model(
    model_uri: str,
    export_format: str,
    output: str | os.PathLike | None = None,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    force: bool = False,
    registered_model_name: str | None = None,
    name: str = "model",
    progress: bool = True,
) -> ExportResult:
    """Export a loraflow model as a merged HF folder, a peft adapter folder, or an MLflow transformers model.

    The options, the output folder (that it can be written: its parents and a temporary folder are
    made and removed again) and the source model are all checked before the model is loaded.

    Args:
        model_uri: `models:/NAME@ALIAS`, `runs:/RUN_ID/model`, a local model folder, ...
        export_format: `merged`, `adapter` or `transformers` (see the module docstring).
        output: the folder to write (merged, adapter); not used by `transformers`.
        dtype: `auto` (the base's recorded dtype), `bf16`, `fp16` or `fp32` (merged, transformers).
        overwrite: replace a non-empty output folder (only once the new one is complete).
        force: merge a model trained on a quantized base (QLoRA): onto that base dequantized, in
            16-bit (`--dtype auto`), which is lossy and so refused without it (merged, transformers).
        registered_model_name: register the `transformers` export as a version of this model.
        name: the logged model's name (`transformers`).
        progress: show a progress bar.

    Raises:
        ConfigError: invalid options. ExportError: a source that is not a loraflow model, an
            output that cannot be written, or a write that failed (nothing is left behind).
    """
    from loraflow.export import source as sources
    from loraflow.export import target as targets

    validate_options(export_format, str(output) if output else None, dtype, registered_model_name)
    folder = targets.check_target(output, overwrite) if output else None
    with sources.open_source(model_uri) as source:
        if folder is None:
            from loraflow.export.logged import export_transformers

            return export_transformers(source, dtype=dtype, registered_model_name=registered_model_name, name=name,
                                       progress=progress, force=force)
        targets.check_not_inside(folder, source.path)
        targets.check_writable(folder, overwrite)  # fail on an unwritable folder before the model loads
        if export_format == "adapter":
            from loraflow.export.adapter import export_adapter

            return export_adapter(source, folder, overwrite=overwrite, progress=progress)
        from loraflow.export.merged import export_merged

        return export_merged(source, folder, dtype=dtype, overwrite=overwrite, progress=progress, force=force)
