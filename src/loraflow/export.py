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
written into a temporary sibling of `--output` and renamed into place at the end, so a failure
(a full disk included) leaves neither a half-written output nor the temporary folder behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

from loraflow.errors import ConfigError, LoraflowError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FORMATS = ("merged", "adapter", "transformers")
DTYPES = {"auto": None, "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
EXPORT_RECORD = "loraflow_export.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# vLLM's LoRA limits (vllm.config.lora.LoRAConfig, vllm.lora.peft_helper.PEFTHelper._validate_features).
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
TAG_PREFIX = "loraflow.export."


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


# ---------------------------------------------------------------------------------------------
# Validation (all of it before the model is loaded).


def validate_options(export_format: str, output: str | None, dtype: str, registered_model_name: str | None) -> None:
    """Check the options together; raise one ConfigError listing every problem."""
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


def check_target(output: str | os.PathLike, overwrite: bool) -> Path:
    """The absolute output folder, after checking it can be written (nothing is created yet).

    Raises:
        ExportError: it is a file, a non-empty folder without `overwrite`, or under a path that is a
            file or cannot be written.
    """
    target = Path(os.path.abspath(os.path.expanduser(output)))
    if target.exists() and not target.is_dir():
        raise ExportError(f"`output` {str(target)!r} is a file, not a folder: choose a folder path for --output")
    try:
        not_empty = target.is_dir() and any(target.iterdir())
    except OSError as e:
        raise ExportError(f"`output` {str(target)!r} cannot be read ({e.strerror}): choose a folder you can "
                          "write to") from e
    if not_empty and not overwrite:
        raise ExportError(f"`output` {str(target)!r} exists and is not empty: choose a new folder, or pass "
                          "--overwrite to replace its contents")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"`output` {str(target)!r} cannot be created: {str(ancestor)!r} is a file, not a "
                          "folder; choose another --output")
    return target


def check_not_inside(target: Path, source_dir: Path) -> None:
    """Refuse an output folder that is the source model's folder or inside it."""
    source = source_dir.resolve()
    resolved = target.resolve()
    if resolved == source or source in resolved.parents:
        raise ExportError(f"`output` {str(target)!r} is inside the source model's folder {str(source)!r}: "
                          "exporting there would mix the export into the model; choose a folder outside it")


# ---------------------------------------------------------------------------------------------
# The source model.


@dataclass
class Source:
    """A downloaded loraflow model: its local folder and flavor config."""

    uri: str
    path: Path
    conf: dict[str, Any]


@contextmanager
def open_source(model_uri: str) -> Iterator[Source]:
    """The loraflow model at `model_uri`, read where it is (a local folder) or downloaded into a
    temporary folder that is removed afterwards (`runs:/`, `models:/`, other artifact URIs).

    Raises:
        ExportError: nothing is there, or it is not a loraflow model.
    """
    local = Path(os.path.expanduser(model_uri))
    if "://" not in model_uri and ":/" not in model_uri and local.is_dir():
        yield read_source(model_uri, local.resolve())
        return
    with tempfile.TemporaryDirectory(prefix="loraflow-export-source-") as download:
        yield read_source(model_uri, _download(model_uri, download))


def _download(model_uri: str, dst_path: str) -> Path:
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=dst_path))
    except (MlflowException, OSError) as e:
        raise ExportError(f"no model at `model_uri` {model_uri!r}: {e}. Give models:/NAME@ALIAS, "
                          "runs:/RUN_ID/model or a local model folder") from e


def read_source(model_uri: str, local: Path) -> Source:
    """Read the loraflow flavor config of the model folder `local`.

    Raises:
        ExportError: it is not an MLflow model, or not a loraflow one.
    """
    from mlflow.models import Model

    from loraflow.flavor import FLAVOR_NAME

    if not (local / "MLmodel").is_file():
        raise ExportError(f"`model_uri` {model_uri!r} is not an MLflow model (no MLmodel file in "
                          f"{str(local)!r}): give a model logged by loraflow (loraflow train, flavor.log_model)")
    try:
        flavors = Model.load(str(local)).flavors
    except Exception as e:
        raise ExportError(f"`model_uri` {model_uri!r}: its MLmodel file cannot be read ({e}); re-log the model") from e
    conf = flavors.get(FLAVOR_NAME)
    if not isinstance(conf, dict) or not isinstance(conf.get("base"), dict):
        raise ExportError(f"`model_uri` {model_uri!r} is not a loraflow model: its flavors are "
                          f"{sorted(flavors)}, not {FLAVOR_NAME!r}. Export works on models logged by loraflow")
    return Source(model_uri, local, conf)


def provenance(source: Source, export_format: str, dtype: str | None) -> dict[str, Any]:
    """The small record of where an export came from (`loraflow_export.json`, run tags)."""
    from loraflow import __version__

    base = source.conf["base"]
    return {
        "format": export_format,
        "source_model_uri": source.uri,
        "base": {key: base.get(key) for key in ("kind", "name", "revision", "dtype", "fingerprint")},
        "base_fingerprint": base.get("fingerprint"),
        "adapter_sha256": dict(source.conf.get("adapter_sha256") or {}),
        "dtype": dtype,
        "loraflow_version": __version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


class Merged(NamedTuple):
    """What `load_source` returns."""

    model: "PreTrainedModel"
    tokenizer: "PreTrainedTokenizerBase"
    base_tied: bool
    """Whether the base tied its input and output embeddings (the merged model may no longer)."""


def load_source(source: Source) -> Merged:
    """Load the model in fp32 (verified by loraflow) and merge the adapter into the base.

    Raises:
        ExportError: the model cannot be loaded (corrupt adapter, different base, ...), or the merged
            model does not compute what the adapter model computes.
    """
    from mlflow.exceptions import MlflowException

    from loraflow.flavor import load_model

    try:
        loaded = load_model(str(source.path), dtype="float32")
    except (MlflowException, LoraflowError, OSError) as e:
        raise ExportError(f"cannot load the loraflow model {source.uri!r}: {e}") from e
    base_tied = bool(getattr(_text_config(loaded.model.get_base_model()), "tie_word_embeddings", False))
    return Merged(merge(loaded.model, loaded.tokenizer, source.uri), loaded.tokenizer, base_tied)


def _text_config(model: Any) -> Any:
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def untie_adapted_embeddings(peft_model: Any) -> bool:
    """Give the output embedding its own weight when LoRA adapts a tied embedding; return whether it did.

    `merge_and_unload` adds a LoRA delta into the adapted module's weight in place. When that weight
    is shared (tied input and output embeddings), the delta lands in both: a LoRA on `lm_head`
    would change the input embeddings too (and the logits), so the tie is cut first.
    """
    base = peft_model.get_base_model()
    config = _text_config(base)
    output, inputs = base.get_output_embeddings(), base.get_input_embeddings()
    if not getattr(config, "tie_word_embeddings", False) or output is None:
        return False
    if not any(hasattr(module, "lora_A") or hasattr(module, "lora_embedding_A") for module in (output, inputs)):
        return False
    import torch

    head = getattr(output, "base_layer", output)
    head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    config.tie_word_embeddings = False
    return True


def merge(peft_model: Any, tokenizer: "PreTrainedTokenizerBase | None" = None, uri: str = "") -> "PreTrainedModel":
    """`merge_and_unload`, with embeddings tied only where they still are, checked against the adapter model.

    A tied model whose `lm_head` was trained as a modules_to_save copy cannot stay tied: peft unties
    it on merge (`tie_word_embeddings=False`); a LoRA on a tied embedding is untied here first (see
    `untie_adapted_embeddings`). With a tokenizer, the merged model's logits on a probe prompt must
    match the adapter model's (fp32, within 1e-3 of the largest logit, at least 1e-3), so a wrong
    merge is never written.
    """
    import torch

    probe = reference = None
    if tokenizer is not None:
        probe = tokenizer(["The quick brown fox"], return_tensors="pt")
        with torch.no_grad():
            reference = peft_model(**probe).logits.float()
    untie_adapted_embeddings(peft_model)
    model = peft_model.merge_and_unload()
    output, inputs = model.get_output_embeddings(), model.get_input_embeddings()
    config = _text_config(model)
    if getattr(config, "tie_word_embeddings", False) and output is not None and output.weight is not inputs.weight:
        if torch.equal(output.weight, inputs.weight):
            model.tie_weights()
        else:
            config.tie_word_embeddings = False
    model.eval()
    if probe is not None:
        with torch.no_grad():
            diff = (model(**probe).logits.float() - reference).abs().max().item()
        if diff > 1e-3 * max(1.0, reference.abs().max().item()):
            raise ExportError(f"merging the adapter of {uri!r} changed the model's logits by {diff:.3g}: this adapter "
                              "cannot be merged correctly; export it with --format adapter instead")
    return model


def target_dtype(source: Source, dtype: str) -> str:
    """The torch dtype name to export in: `--dtype`, or (auto) the base's recorded dtype."""
    if DTYPES[dtype] is not None:
        return DTYPES[dtype]
    recorded = str(source.conf["base"].get("dtype") or "")
    if recorded not in DTYPES.values():
        raise ExportError(f"the model records base dtype {recorded!r}, which --dtype auto cannot export: pass "
                          "--dtype bf16, fp16 or fp32")
    return recorded


# ---------------------------------------------------------------------------------------------
# Writing: into a temporary sibling folder, renamed into place at the end.


def _make_staging(target: Path) -> tuple[Path, list[Path]]:
    """Create the missing parents of `target` and a temporary folder beside it.

    Returns the staging folder and the parents created (removed again on failure).
    """
    created: list[Path] = []
    missing = []
    parent = target.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    try:
        for folder in reversed(missing):
            folder.mkdir()
            created.append(folder)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.export-", dir=target.parent))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the export from a serving user
    except OSError as e:
        _remove_created(created)
        raise ExportError(f"`output` {str(target)!r} cannot be written: {e.strerror or e} ({str(e.filename or target)!r}); "
                          "choose a folder you can write to") from e
    return staging, created


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            pass


def _publish(staging: Path, target: Path) -> None:
    """Rename the staging folder to `target`, replacing what is there (only once all is written)."""
    old = None
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.rmdir(old)
        os.rename(target, old)
    try:
        os.rename(staging, target)
    except OSError:
        if old is not None:
            os.rename(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_folder(target: Path, steps: list[tuple[str, Callable[[Path], None]]], progress: bool = True) -> None:
    """Run each `(description, write(staging))` step into a staging folder, then publish it as `target`.

    On any failure the staging folder (and any parent created for it) is removed and the previous
    `target`, if any, is left as it was.

    Raises:
        ExportError: a write failed for an OS reason (a full disk, a file too large, a permission);
            other errors pass on unchanged (after the cleanup).
    """
    from tqdm.auto import tqdm

    staging, created = _make_staging(target)
    try:
        with tqdm(total=len(steps), desc=f"export to {target.name}", unit="step", disable=not progress) as bar:
            for description, write in steps:
                bar.set_postfix_str(description)
                write(staging)
                bar.update()
        _publish(staging, target)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if not target.exists():
            _remove_created(created)
        code = os_errno(e)
        if code is not None:
            raise ExportError(_write_failure(target, e, code)) from e
        raise


def os_errno(error: BaseException) -> int | None:
    """The OS error code behind an exception: an OSError's `errno`, or the "(os error N)" that
    safetensors' Rust writer puts in its `SafetensorError` message (it is no OSError), also in the
    exceptions it was raised from."""
    import re

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        if match := re.search(r"\(os error (\d+)\)", str(seen)):
            return int(match.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def _write_failure(target: Path, e: BaseException, code: int) -> str:
    reason = getattr(e, "strerror", None) or os.strerror(code)
    if code == errno.ENOSPC:
        fix = "the disk is full: free space or choose --output on another disk"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a folder you can write to"
    else:
        fix = "check the path and retry"
    return f"could not write `output` {str(target)!r}: {reason}; nothing was written ({fix})"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_file(source: Path, destination: Path) -> None:
    """Copy one file (its bytes only). A single place to write files, so tests can fail it."""
    shutil.copyfile(source, destination)


def save_model_files(model: "PreTrainedModel", directory: Path) -> None:
    """`save_pretrained` with safetensors: config, generation config and weights."""
    model.save_pretrained(str(directory), safe_serialization=True)


def save_tokenizer(tokenizer: "PreTrainedTokenizerBase", directory: Path) -> None:
    """The tokenizer's `save_pretrained` (with its chat template, if it has one)."""
    tokenizer.save_pretrained(str(directory))


# ---------------------------------------------------------------------------------------------
# The formats.


def export_model(
    model_uri: str,
    export_format: str,
    output: str | os.PathLike | None = None,
    *,
    dtype: str = "auto",
    overwrite: bool = False,
    registered_model_name: str | None = None,
    name: str = "model",
    progress: bool = True,
) -> ExportResult:
    """Export a loraflow model as a merged HF folder, a peft adapter folder, or an MLflow transformers model.

    Args:
        model_uri: `models:/NAME@ALIAS`, `runs:/RUN_ID/model`, a local model folder, ...
        export_format: `merged`, `adapter` or `transformers` (see the module docstring).
        output: the folder to write (merged, adapter); not used by `transformers`.
        dtype: `auto` (the base's recorded dtype), `bf16`, `fp16` or `fp32` (merged, transformers).
        overwrite: replace a non-empty output folder (only once the new one is complete).
        registered_model_name: register the `transformers` export as a version of this model.
        name: the logged model's name (`transformers`).
        progress: show a progress bar.

    Raises:
        ConfigError: invalid options. ExportError: a source that is not a loraflow model, an
            output that cannot be written, or a write that failed (nothing is left behind).
    """
    validate_options(export_format, str(output) if output else None, dtype, registered_model_name)
    target = check_target(output, overwrite) if output else None
    with open_source(model_uri) as source:
        if target is not None:
            check_not_inside(target, source.path)
        if export_format == "adapter":
            return export_adapter(source, target, progress=progress)
        if export_format == "merged":
            return export_merged(source, target, dtype=dtype, progress=progress)
        return export_transformers(source, dtype=dtype, registered_model_name=registered_model_name, name=name,
                                   progress=progress)


def export_merged(source: Source, target: Path, *, dtype: str = "auto", progress: bool = True) -> ExportResult:
    """Write the merged model as a plain Hugging Face folder at `target`."""
    import torch

    torch_dtype = target_dtype(source, dtype)
    _make_staging_probe(target)  # fail on an unwritable target before the model loads
    model, tokenizer, base_tied = load_source(source)
    model.to(getattr(torch, torch_dtype))
    record = provenance(source, "merged", torch_dtype)
    record["tie_word_embeddings"] = bool(getattr(model.config, "tie_word_embeddings", False))
    write_folder(target, [
        ("weights", lambda d: save_model_files(model, d)),
        ("tokenizer", lambda d: save_tokenizer(tokenizer, d)),
        ("record", lambda d: write_json(d / EXPORT_RECORD, record)),
    ], progress=progress)
    notes = [f"serve it with: vllm serve {target}"]
    if base_tied and not record["tie_word_embeddings"]:
        notes.append("the base ties its input and output embeddings, but the adapter changes lm_head or the "
                     "embeddings on their own, so the merged model stores both matrices (tie_word_embeddings=false)")
    return ExportResult("merged", str(target), record, notes)


def _make_staging_probe(target: Path) -> None:
    """Create and remove the staging folder once: an unwritable target fails before any loading."""
    staging, created = _make_staging(target)
    shutil.rmtree(staging, ignore_errors=True)
    _remove_created(created)


def export_adapter(source: Source, target: Path, *, progress: bool = True) -> ExportResult:
    """Write the adapter's files (byte for byte) and the tokenizer as a plain peft folder at `target`."""
    adapter_dir = source.path / source.conf.get("adapter", "adapter")
    tokenizer_dir = source.path / source.conf.get("tokenizer", "tokenizer")
    _verify_adapter(source, adapter_dir)
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    needs, adapter_config = _name_base(source, adapter_config)
    record = provenance(source, "adapter", None)
    record["base_model_name_or_path"] = adapter_config.get("base_model_name_or_path")
    record["revision"] = adapter_config.get("revision")
    record["needs_base"] = needs

    def write_adapter(d: Path) -> None:
        copy_file(adapter_dir / "adapter_model.safetensors", d / "adapter_model.safetensors")
        write_json(d / "adapter_config.json", adapter_config)

    def write_tokenizer(d: Path) -> None:
        for file in sorted(tokenizer_dir.iterdir()):
            if file.is_file():
                copy_file(file, d / file.name)

    write_folder(target, [
        ("adapter", write_adapter),
        ("tokenizer", write_tokenizer),
        ("record", lambda d: write_json(d / EXPORT_RECORD, record)),
    ], progress=progress)
    notes = [needs, *vllm_limits(adapter_config)]
    return ExportResult("adapter", str(target), record, notes)


def _verify_adapter(source: Source, adapter_dir: Path) -> None:
    """The adapter files must have the sha256 recorded when the model was saved."""
    for name, expected in (source.conf.get("adapter_sha256") or {}).items():
        file = adapter_dir / name
        if not file.is_file():
            raise ExportError(f"adapter file {str(file)!r} is missing from {source.uri!r}: the model artifact is "
                              "incomplete; re-log the model")
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        if digest.hexdigest() != str(expected).removeprefix("sha256:"):  # recorded as "sha256:<hex>"
            raise ExportError(f"adapter file {str(file)!r} is corrupt: its sha256 is {digest.hexdigest()}, but "
                              f"{expected} was recorded; re-download or re-log the model")


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
        from loraflow.builtin import builtin_path

        adapter_config["base_model_name_or_path"] = str(builtin_path(name))
        adapter_config["revision"] = None
        return (f"base model: loraflow's {name} (not on the Hub; built locally at "
                f"{adapter_config['base_model_name_or_path']}), fingerprint {fingerprint}; "
                "to serve without it, use --format merged"), adapter_config
    adapter_config["base_model_name_or_path"] = name
    adapter_config["revision"] = None
    return (f"base model: the local folder {name} (fingerprint {fingerprint}); copy that folder to the "
            "serving machine, or use --format merged"), adapter_config


def vllm_limits(adapter_config: dict[str, Any]) -> list[str]:
    """What keeps vLLM (`--enable-lora --lora-modules name=DIR`) from serving this adapter as it is."""
    notes = []
    if adapter_config.get("use_dora"):
        notes.append("vLLM does not support DoRA adapters (use_dora=true): serve --format merged instead")
    if adapter_config.get("modules_to_save"):
        notes.append(f"vLLM's LoRA loader refuses modules_to_save (recent versions accept only None, some older "
                     f"ones lm_head/embed_tokens), this adapter has {sorted(adapter_config['modules_to_save'])}: "
                     "serve --format merged instead")
    ranks = [int(adapter_config.get("r") or 0), *(int(r) for r in (adapter_config.get("rank_pattern") or {}).values())]
    rank = max(ranks)
    if rank > VLLM_DEFAULT_MAX_LORA_RANK:
        allowed = next((r for r in VLLM_MAX_LORA_RANKS if r >= rank), None)
        if allowed is None:
            notes.append(f"rank {rank} exceeds vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]}): "
                         "serve --format merged instead")
        else:
            notes.append(f"rank {rank} exceeds vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_LORA_RANK}: start "
                         f"vLLM with --max-lora-rank {allowed}, or serve --format merged")
    if adapter_config.get("bias", "none") != "none":
        notes.append(f"vLLM does not support LoRA bias={adapter_config['bias']!r}: serve --format merged instead")
    return notes


def chat_task(source: Source, tokenizer: "PreTrainedTokenizerBase") -> str:
    """`llm/v1/chat` for a model recorded as a chat model (flavor conf `task: chat`), else `text-generation`."""
    task = source.conf.get("task")
    if task == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ExportError(f"the model {source.uri!r} records `task` 'chat' but its tokenizer has no chat "
                              "template: re-log it with a tokenizer that has one")
        return "llm/v1/chat"
    return "text-generation"


def export_transformers(
    source: Source,
    *,
    dtype: str = "auto",
    registered_model_name: str | None = None,
    name: str = "model",
    progress: bool = True,
) -> ExportResult:
    """Log the merged model with `mlflow.transformers.log_model` into a new run; tag the run with the source.

    The run is new, nested under an active run if there is one; under `mlflow run . -e export` it is
    the project's run (MLflow starts it for the entry point). MLflow's transformers pyfunc strips
    whitespace around every generated text, so its continuations can lack the loraflow model's
    leading space; the tokens are the same (greedy).
    """
    import mlflow
    import torch
    from tqdm.auto import tqdm

    torch_dtype = target_dtype(source, dtype)
    with tqdm(total=3, desc="export transformers", unit="step", disable=not progress) as bar:
        bar.set_postfix_str("load")
        model, tokenizer, _ = load_source(source)
        model.to(getattr(torch, torch_dtype))
        bar.update()
        task = chat_task(source, tokenizer)
        record = provenance(source, "transformers", torch_dtype)
        record["task"] = task
        tags = {
            f"{TAG_PREFIX}source_model_uri": source.uri,
            f"{TAG_PREFIX}base_fingerprint": str(record["base_fingerprint"]),
            f"{TAG_PREFIX}adapter_sha256": str(record["adapter_sha256"].get("adapter_model.safetensors")),
            f"{TAG_PREFIX}format": "transformers",
        }
        bar.set_postfix_str("log")
        with mlflow.start_run(run_name="loraflow-export", nested=mlflow.active_run() is not None) as run:
            mlflow.set_tags(tags)
            mlflow.log_dict(record, EXPORT_RECORD)
            info = mlflow.transformers.log_model(
                transformers_model={"model": model, "tokenizer": tokenizer},
                name=name,
                task=task,
                registered_model_name=registered_model_name or None,
                pip_requirements=_transformers_requirements(),
                **_text_generation_arguments(source, task),
            )
        bar.update(2)
    version = str(info.registered_model_version) if getattr(info, "registered_model_version", None) else None
    served = f"models:/{registered_model_name}/{version}" if version else info.model_uri
    notes = [f"task {task}; serve it with: mlflow models serve -m {served}"]
    return ExportResult("transformers", info.model_uri, record, notes, run_id=run.info.run_id,
                        registered_version=version)


def _transformers_requirements() -> list[str]:
    """transformers, torch, accelerate pinned to this environment. (`mlflow.transformers`' default
    also pins torchvision, which a text model does not need and which may not be installed.)"""
    import importlib.util

    from mlflow.utils.requirements_utils import _get_pinned_requirement

    return [_get_pinned_requirement(p) for p in ("transformers", "torch", "accelerate")
            if importlib.util.find_spec(p) is not None]


def _text_generation_arguments(source: Source, task: str) -> dict[str, Any]:
    """For `text-generation`: return only the continuation, and accept generation params at predict time."""
    if task != "text-generation":
        return {}
    from mlflow.models import infer_signature

    defaults = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "repetition_penalty": 1.0}
    recorded = source.conf.get("generation_defaults") or {}
    params = {key: type(value)(recorded.get(key, value)) for key, value in defaults.items()}
    return {
        "model_config": {"return_full_text": False},
        "signature": infer_signature(["prompt"], ["text"], params=params),
    }
