"""The `loraflow` MLflow flavor: save, log, load and serve PEFT LoRA models without losing a bit.

Shaped like MLflow's own flavor modules (`mlflow/spacy/__init__.py`, `mlflow/lightgbm/__init__.py`):
`FLAVOR_NAME`, `get_default_pip_requirements`, `save_model`, `log_model`, `load_model`, plus the
private `_load_pyfunc` that `mlflow.pyfunc.load_model` and `mlflow models serve` call. torch,
transformers and peft are imported inside functions, so importing this module stays cheap.

Why a custom flavor: `mlflow.transformers` round-trips a LoRA model on a local base with different
logits and reloads the adapter frozen. This one reloads the exact weights (max abs logit diff 0.0 in
fp32 on CPU) and can reload them trainable, with the same trainable/total parameter counts.

Layout of a saved model (no pickle anywhere: safetensors, JSON and YAML only)::

    MLmodel            flavors: loraflow (the config below) and python_function
    adapter/           peft `save_pretrained`: adapter_config.json + adapter_model.safetensors
                       (LoRA A/B and any modules_to_save weights)
    tokenizer/         the tokenizer's `save_pretrained`
    base/              embedded mode only: the base model's config.json, generation_config.json
                       and *.safetensors, copied from its local directory
    code/loraflow/     the modules of this package that loading imports (see "Requirements" below)

The base model is stored in one of two modes:

- `embedded` (default for `builtin:*` and local directories): the base weights are copied into the
  artifact, so the model loads anywhere with no network.
- `reference` (default for a Hub id): the Hub id plus the exact resolved commit hash, so artifacts
  stay small. `base_mode="reference"` with a local directory records the absolute path.

Base fingerprint: `sha256` over the base model's normalised config and every base weight tensor's
name, dtype, shape and bytes (sorted by name, tied tensors once), computed from the in-memory model
with peft's wrappers stripped, so `base_fingerprint(base) == base_fingerprint(get_peft_model(base))`.
Each tensor's bytes are hashed on their own, in parallel threads (scheme `sha256-tensors`; models
saved before record the sequential scheme `sha256`, which is still verified). On load the base is
loaded in the recorded dtype, and a mismatch raises an `MlflowException` naming both fingerprints
(before the model is returned) instead of silently producing different outputs. Verifying costs
little time: safetensors stores a tensor's bytes exactly as a CPU tensor holds them, so the stored
tensors are hashed straight from the base's files, on the cores `from_pretrained` leaves free, while
it loads them; each loaded tensor whose name, dtype and shape match a stored one takes that digest,
and any other is hashed from memory. Only if that fingerprint does not match is every loaded tensor
hashed itself before judging, so a good base is never refused for how its files store it.
The adapter file's sha256 is recorded and checked too, so flipped bytes are caught even where
safetensors would still parse them.

Remote code (`trust_remote_code`): a base model whose config has an `auto_map` runs Python code
shipped with it. Whether the model was trained with that permission is recorded as
`base.trust_remote_code`, and an embedded base carries its `*.py` files. The record is *not* a
permission: a model artifact is data, and data must not be able to grant itself code execution on
the machine that loads it. So loading always re-states permission: `load_model(...,
trust_remote_code=True)`, or the environment variable `LORAFLOW_TRUST_REMOTE_CODE=1` (the only way
for `mlflow.pyfunc.load_model` and `mlflow models serve`, whose loaders take no such argument).
Without it, a model recorded with `trust_remote_code: true` is refused before anything is loaded,
with a message saying how to allow it; a model recorded without it is always loaded with
`trust_remote_code=False`, so a tampered artifact (an `auto_map` added to its base) is refused too.

Requirements: the model's requirements pin only third-party packages (mlflow, torch, transformers,
peft, accelerate, safetensors, tokenizers), and the `loraflow` package itself is shipped with
`code_paths` (under `code/loraflow/`: only the modules loading imports, `LOADER_MODULES`, plus the
builtin resources for a referenced `builtin:*` base). We chose this over pinning
`loraflow==<version>` because loraflow is usually installed editable from a checkout, so such a pin
would not resolve on PyPI in a fresh serving environment; shipping the code also guarantees that the
loader that reads a model is the code that wrote it (MLflow puts `code/` first on `sys.path` before
importing the loader module). The package's `__path__` is extended (`pkgutil.extend_path`), so in
a process that also has loraflow installed, its other modules (training, tracking) still import.
Importing `loraflow` needs only the standard library, so no other pins are needed for it.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import mmap
import numbers
import os
import shutil
import tempfile
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal, NamedTuple

import yaml

import mlflow
from mlflow import pyfunc
from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.utils.environment import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import get_total_file_size, write_to
from mlflow.utils.model_utils import (
    _add_code_from_conf_to_system_path,
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)
from mlflow.utils.requirements_utils import _get_pinned_requirement

from loraflow.errors import LoraflowError
from loraflow.models import base_kind, load_base_model, remote_code_refused, resolve_base, resolved_revision

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

FLAVOR_NAME = "loraflow"
FLAVOR_VERSION = 1  # bump when the layout or the flavor config changes incompatibly

ADAPTER_SUBPATH = "adapter"
TOKENIZER_SUBPATH = "tokenizer"
BASE_SUBPATH = "base"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
# What an embedded base copies from its directory: config, weights, and any remote code. Never
# pickled `.bin` checkpoints (the model format holds no pickle).
BASE_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "*.py")

BaseMode = Literal["auto", "embedded", "reference"]

# Generation settings a request may pass as `params`; their defaults become the params schema.
GENERATION_DEFAULTS: dict[str, Any] = {
    "max_new_tokens": 64,
    "temperature": 1.0,
    "top_p": 1.0,
    "do_sample": False,
    "repetition_penalty": 1.0,
    "seed": 0,
}
# Settings of the served model itself (pyfunc `model_config`; override with
# `mlflow.pyfunc.load_model(uri, model_config={...})`).
PYFUNC_DEFAULTS: dict[str, Any] = {
    "batch_size": 32,  # prompts per micro-batch; sorted by length so padding stays small
    "max_new_tokens_cap": 4096,  # larger requests are refused rather than tying up a server
    # Served requests only (`mlflow models serve`): MLflow's scoring server (uvicorn) has no body
    # size limit and keeps computing after its timeout answers 504, so the model refuses oversized
    # requests with a 400 before tokenizing. In-process predict (batch-predict) is not limited.
    "max_request_prompts": 256,
    "max_request_chars": 1_000_000,
    "device": None,  # None: CUDA when available, else CPU
}
# Set to 1 to allow loading models whose base runs its own code (see "Remote code" above).
TRUST_REMOTE_CODE_ENV = "LORAFLOW_TRUST_REMOTE_CODE"
# How `base_fingerprint` hashes: what `save_model` records, and every scheme a load can verify.
FINGERPRINT_SCHEME = "sha256-tensors"
FINGERPRINT_SCHEMES = ("sha256-tensors", "sha256")
# safetensors dtype codes (the format's spec) as torch names them in a tensor's fingerprint header
SAFETENSORS_DTYPES = {
    "F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16",
    "I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8", "U8": "torch.uint8",
    "BOOL": "torch.bool",
}
# Config keys that describe how a model was loaded or run, not what it is.
VOLATILE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype", "use_cache")

_logger = logging.getLogger(__name__)


class LoadedModel(NamedTuple):
    """What `load_model` returns: unpack it as `model, tokenizer = load_model(uri)`."""

    model: "PeftModel"
    """The base model with the adapter applied."""
    tokenizer: "PreTrainedTokenizerBase"
    """The tokenizer saved with the model (a pad token is guaranteed)."""


def _invalid(message: str) -> MlflowException:
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


# ---------------------------------------------------------------------------------------------
# Fingerprints.


def _original_name(name: str) -> str | None:
    """A base tensor's name with peft's wrappers removed; None for an adapter's own tensors."""
    parts = name.split(".")
    if any(part.startswith("lora_") or part == "modules_to_save" for part in parts):
        return None
    return ".".join(p for p in parts if p not in ("base_layer", "original_module"))


def _base_tensors(model: "torch.nn.Module") -> dict[str, "torch.Tensor"]:
    """Parameters and persistent buffers of the base model, by original name (tied ones once)."""
    tensors = {}
    for name, param in model.named_parameters():  # deduplicates tied weights
        if (original := _original_name(name)) is not None:
            tensors[original] = param
    for module_name, module in model.named_modules():
        for buffer_name, buffer in module.named_buffers(recurse=False):
            if buffer_name in module._non_persistent_buffers_set:
                continue  # derived from the config (e.g. rotary inv_freq), which is hashed
            full = f"{module_name}.{buffer_name}" if module_name else buffer_name
            if (original := _original_name(full)) is not None:
                tensors[original] = buffer
    return tensors


def _normalized_config(model: "PreTrainedModel") -> dict[str, Any]:
    config = model.config.to_dict()
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}


def base_fingerprint(model: "torch.nn.Module", scheme: str | None = None) -> str:
    """`<scheme>:<hex>` of the base model's config and weights; a PeftModel gives its base's.

    Hashes the normalised config (volatile keys such as `_name_or_path` and `transformers_version`
    dropped) and each base tensor's name, dtype, shape and bytes, in name order. `scheme` (default
    `FINGERPRINT_SCHEME`): `sha256-tensors` hashes each tensor's bytes on its own, in parallel
    threads, then the names, dtypes, shapes and those digests in order; `sha256` (models saved by
    earlier versions) hashes everything in one sequential stream.
    """
    return _fingerprint(_fingerprint_inputs(model), scheme or FINGERPRINT_SCHEME)


class _FingerprintInputs(NamedTuple):
    config: bytes
    tensors: list[tuple[str, "torch.Tensor"]]
    """(`name|dtype|shape`, the tensor's bytes as a flat uint8 CPU tensor), sorted by name."""


def _tensor_header(name: str, dtype: Any, shape: Any) -> str:
    return f"{name}|{dtype}|{tuple(shape)}"


def _fingerprint_inputs(model: "torch.nn.Module") -> _FingerprintInputs:
    """What a fingerprint hashes, taken from the model now: hashing it later (in another thread)
    sees these tensors even if the model's modules are wrapped or moved meanwhile."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = json.dumps(_normalized_config(base), sort_keys=True, default=str).encode()
    tensors = []
    for name, tensor in sorted(_base_tensors(base).items()):
        if tensor.device.type == "meta":
            raise MlflowException(f"cannot fingerprint `{name}`: its weights are on the meta device (offloaded)")
        header = _tensor_header(name, tensor.dtype, tensor.shape)
        tensors.append((header, tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)))
    return _FingerprintInputs(config, tensors)


def _fingerprint(inputs: _FingerprintInputs, scheme: str, known: dict[str, bytes] | None = None) -> str:
    """`<scheme>:<hex>` of `inputs`. `known` (scheme `sha256-tensors` only): tensor digests already
    computed, by `name|dtype|shape` header; a tensor with a matching header is not hashed again."""
    digest = hashlib.sha256(inputs.config)
    if scheme == "sha256":
        for header, flat in inputs.tensors:
            digest.update(f"\n{header}\n".encode())
            digest.update(memoryview(flat.numpy()))
    elif scheme == "sha256-tensors":
        known = known or {}
        todo = [(header, flat) for header, flat in inputs.tensors if header not in known]
        # hashlib releases the GIL on large buffers, so tensors hash on every core at once
        workers = max(1, min(len(todo), os.cpu_count() or 1, 8))
        with ThreadPoolExecutor(workers, thread_name_prefix="loraflow-fingerprint") as pool:
            digests = pool.map(lambda flat: hashlib.sha256(memoryview(flat.numpy())).digest(), (f for _, f in todo))
            hashed = dict(zip((header for header, _ in todo), digests))
        for header, _ in inputs.tensors:
            digest.update(f"\n{header}\n".encode())
            digest.update(known[header] if header in known else hashed[header])
    else:
        raise _unknown_scheme(scheme)
    return f"{scheme}:{digest.hexdigest()}"


def _scheme_of(fingerprint: str) -> str:
    scheme = fingerprint.split(":", 1)[0]
    if scheme not in FINGERPRINT_SCHEMES:
        raise _unknown_scheme(scheme)
    return scheme


def stored_tensor_digests(files: list[Path], workers: int = 1) -> dict[str, bytes]:
    """sha256 of each tensor's bytes as stored in these safetensors files, by the `name|dtype|shape`
    header a loaded tensor with those bytes has in a `sha256-tensors` fingerprint.

    safetensors stores each tensor's bytes contiguously, little-endian, exactly as a CPU tensor holds
    them, so these digests are those of the loaded tensors whenever loading keeps the name, dtype,
    shape and values. Hashing them from the file can therefore start before the model is loaded.
    Tensors of a dtype not in `SAFETENSORS_DTYPES`, and names stored more than once, are left out.
    """
    jobs: list[tuple[str, str, int, int, int]] = []  # (name, header, file index, start, end)
    for index, file in enumerate(files):
        with open(file, "rb") as f:
            header_size = int.from_bytes(f.read(8), "little")
            layout = json.loads(f.read(header_size))
        for name, info in layout.items():
            if name != "__metadata__" and info["dtype"] in SAFETENSORS_DTYPES:
                begin, end = info["data_offsets"]
                header = _tensor_header(name, SAFETENSORS_DTYPES[info["dtype"]], info["shape"])
                jobs.append((name, header, index, 8 + header_size + begin, 8 + header_size + end))
    counts = Counter(name for name, *_ in jobs)
    jobs = [job for job in jobs if counts[job[0]] == 1]
    with ExitStack() as stack:
        maps = [stack.enter_context(_mapped(file)) for file in files]
        with ThreadPoolExecutor(max(1, workers), thread_name_prefix="loraflow-fingerprint") as pool:
            digests = pool.map(lambda job: _range_sha256(maps[job[2]], job[3], job[4]), jobs)
            return {header: digest for (_, header, *_), digest in zip(jobs, digests)}


def _base_weight_files(path: Path, base: dict[str, Any]) -> list[Path]:
    """The safetensors files `from_pretrained` reads for this base, as far as they are local now."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    if base["mode"] == "embedded" or base["kind"] != "hub":
        root = path / base["path"] if base["mode"] == "embedded" else Path(resolve_base(base["name"]))

        def locate(name: str) -> Path | None:
            return root / name
    else:
        from huggingface_hub import try_to_load_from_cache

        def locate(name: str) -> Path | None:
            found = try_to_load_from_cache(base["name"], name, revision=base.get("revision"))
            return Path(found) if isinstance(found, str) else None

    index = locate(SAFE_WEIGHTS_INDEX_NAME)
    if index is not None and index.is_file():
        files = [locate(shard) for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = [locate(SAFE_WEIGHTS_NAME)]
    return [file for file in files if file is not None and file.is_file()]


def _start_stored_digests(path: Path, base: dict[str, Any]) -> "Future[dict[str, bytes]]":
    """Hash the base's stored tensors in the background while `from_pretrained` loads them, on all
    cores but the one loading. Only a shortcut: whatever fails here, the loaded tensors are hashed."""
    try:  # here, not in the background: a `builtin:*` base is built on first use, once
        files = _base_weight_files(path, base)
    except Exception as e:  # the load itself reports a base it cannot find
        _logger.debug("not hashing the base's files ahead of loading: %s", e)
        files = []

    def run() -> dict[str, bytes]:
        try:
            return stored_tensor_digests(files, workers=min(8, (os.cpu_count() or 2) - 1))
        except Exception as e:
            _logger.debug("not hashing the base's files ahead of loading: %s", e)
            return {}

    return _in_background(run)


def _in_background(work: Callable[[], Any]) -> Future:
    """Start `work` in its own thread now; its Future gives the result (or raises its error)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="loraflow-fingerprint")
    try:
        return pool.submit(work)
    finally:
        pool.shutdown(wait=False)  # the submitted work still runs to the end


@contextmanager
def _mapped(file: Path) -> Iterator[mmap.mmap]:
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        yield mapped


def _range_sha256(mapped: mmap.mmap, start: int, end: int) -> bytes:
    with memoryview(mapped) as whole, whole[start:end] as view:  # no copy; released before unmapping
        return hashlib.sha256(view).digest()


def _unknown_scheme(scheme: str) -> MlflowException:
    return MlflowException(
        f"unknown base fingerprint scheme {scheme!r} (known: {', '.join(FINGERPRINT_SCHEMES)}): "
        "the model was saved by a newer loraflow; upgrade loraflow"
    )


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Requirements and signature.


def get_default_pip_requirements() -> list[str]:
    """Third-party pins of a saved model. `loraflow` itself travels with `code_paths` (see the
    module docstring for why)."""
    packages = ["mlflow", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"]
    return [_get_pinned_requirement(p) for p in packages]


def _validated_generation_defaults(
    overrides: dict[str, Any] | None, max_new_tokens_cap: int = PYFUNC_DEFAULTS["max_new_tokens_cap"]
) -> dict[str, Any]:
    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in GENERATION_DEFAULTS]
    if unknown:
        raise _invalid(
            f"`generation_defaults` has unknown keys {unknown}; known: {sorted(GENERATION_DEFAULTS)}"
        )
    defaults = {**GENERATION_DEFAULTS, **overrides}
    _generation_settings(defaults, max_new_tokens_cap=max_new_tokens_cap)
    return defaults


def default_signature(
    generation_defaults: dict[str, Any] | None = None, max_new_tokens_cap: int = PYFUNC_DEFAULTS["max_new_tokens_cap"]
) -> ModelSignature:
    """Input: one string column; output `text` (string); and a params schema for generation.

    Without a params schema MLflow silently drops the params of a request. The input column is
    left unnamed on purpose: MLflow's schema enforcement turns a list of strings or a single string
    into a DataFrame with column `0` and would reject it against a named `prompt` column; `predict`
    then reads the `prompt` column, or that single unnamed column, and rejects anything else.
    """
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    d = _validated_generation_defaults(generation_defaults, max_new_tokens_cap)
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string", "text")]),
        params=ParamSchema([
            ParamSpec("max_new_tokens", "long", int(d["max_new_tokens"])),
            ParamSpec("temperature", "double", float(d["temperature"])),
            ParamSpec("top_p", "double", float(d["top_p"])),
            ParamSpec("do_sample", "boolean", bool(d["do_sample"])),
            ParamSpec("repetition_penalty", "double", float(d["repetition_penalty"])),
            ParamSpec("seed", "long", int(d["seed"])),
        ]),
    )


def default_input_example() -> tuple["pd.DataFrame", dict[str, Any]]:
    """A small example request; short `max_new_tokens` keeps MLflow's log-time validation quick."""
    import pandas as pd

    return pd.DataFrame({"prompt": ["Question: What is LoRA?\nAnswer:"]}), {"max_new_tokens": 8}


# ---------------------------------------------------------------------------------------------
# Saving.


def _lora_settings(peft_model: "PeftModel") -> dict[str, Any]:
    config = peft_model.peft_config[peft_model.active_adapter].to_dict()

    def plain(value: Any) -> Any:  # YAML-safe: sets sorted, enums as their value
        if isinstance(value, (set, frozenset, list, tuple)):
            items = [plain(v) for v in value]
            return sorted(items) if isinstance(value, (set, frozenset)) else items
        return getattr(value, "value", value)

    keys = ("peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules",
            "modules_to_save", "bias", "use_rslora", "use_dora", "fan_in_fan_out")
    return {k: plain(config.get(k)) for k in keys if k in config}


def _resolve_base_mode(kind: str, base_mode: str) -> str:
    if base_mode not in ("auto", "embedded", "reference"):
        raise _invalid(f"`base_mode` must be one of 'auto', 'embedded', 'reference', got {base_mode!r}")
    if base_mode == "auto":
        return "reference" if kind == "hub" else "embedded"
    return base_mode


def _base_source_dir(base_model: str, kind: str, revision: str | None) -> Path:
    """The local directory holding the base model's files (for an embedded copy)."""
    if kind != "hub":
        return Path(resolve_base(base_model)).expanduser().resolve()
    from huggingface_hub import snapshot_download

    try:  # the weights are already in the Hub cache: the model in memory was loaded from there
        return Path(snapshot_download(base_model, revision=revision, local_files_only=True))
    except Exception as e:
        raise _invalid(
            f"cannot embed base model {base_model!r}@{revision}: its files are not in the local Hub "
            f"cache ({e}). Load it with from_pretrained first, or use base_mode='reference'"
        ) from e


def _base_files(source: Path) -> list[Path]:
    return sorted({p for pattern in BASE_FILE_PATTERNS for p in source.glob(pattern) if p.is_file()})


def _check_base_files(source: Path) -> None:
    if not any(p.suffix == ".safetensors" for p in _base_files(source)):
        raise _invalid(
            f"cannot embed the base model from {str(source)!r}: it has no *.safetensors weights "
            "(pickled .bin checkpoints are not copied). Re-save it with "
            "`model.save_pretrained(dir, safe_serialization=True)` or use base_mode='reference'"
        )


def _copy_base_files(source: Path, target: Path) -> None:
    target.mkdir(parents=True)
    for path in _base_files(source):
        shutil.copy2(path, target / path.name)


def _base_section(peft_model: "PeftModel", base_model: str, base_mode: str, trust_remote_code: bool) -> dict[str, Any]:
    """The `base` section of the flavor config. Checks everything before anything is written."""
    kind = base_kind(base_model)
    mode = _resolve_base_mode(kind, base_mode)
    base = peft_model.get_base_model()
    revision = resolved_revision(base) if kind == "hub" else None
    if kind == "hub" and revision is None:
        raise _invalid(
            f"cannot record base model {base_model!r}: the loaded model has no resolved Hub commit "
            "(`config._commit_hash`). Load it with `from_pretrained` from the Hub, or pass a local "
            "directory as `base_model`"
        )
    section = {
        "mode": mode,
        "kind": kind,
        "name": str(Path(base_model).expanduser().resolve()) if kind == "local" else base_model,
        "revision": revision,
        "dtype": str(base.dtype).removeprefix("torch."),
        "architectures": list(getattr(base.config, "architectures", None) or []),
        "fingerprint": base_fingerprint(base),
        "trust_remote_code": bool(trust_remote_code),
    }
    if mode == "embedded":
        section["path"] = BASE_SUBPATH
        section["source_dir"] = str(_base_source_dir(base_model, kind, revision))
    return section


# The modules loading a model imports: the package's `__init__` (which imports nothing eagerly),
# this module and its imports (`_load_pyfunc` imports nothing else from loraflow). Only these are
# shipped, not the whole package (training code, caches), so artifacts stay small.
LOADER_MODULES = ("__init__.py", "errors.py", "builtin.py", "models.py", "flavor.py")
# Data files `builtin.py` builds `builtin:*` bases from: shipped with a model that references one.
BUILTIN_RESOURCES = "resources"


def _stage_loader_package(target: Path, with_builtin_resources: bool) -> str:
    """Copy the loader's modules into `target/loraflow` (for `code_paths`); return that directory."""
    source = Path(__file__).resolve().parent
    package = target / "loraflow"
    package.mkdir(parents=True)
    for name in LOADER_MODULES:
        shutil.copy2(source / name, package / name)
    if with_builtin_resources:
        shutil.copytree(source / BUILTIN_RESOURCES, package / BUILTIN_RESOURCES)
    return str(package)


def save_model(
    peft_model: "PeftModel",
    path: str | os.PathLike,
    tokenizer: "PreTrainedTokenizerBase",
    *,
    base_model: str | None = None,
    base_mode: BaseMode = "auto",
    mlflow_model: Model | None = None,
    signature: ModelSignature | None = None,
    input_example: Any = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    code_paths: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    generation_defaults: dict[str, Any] | None = None,
    batch_size: int = PYFUNC_DEFAULTS["batch_size"],
    max_new_tokens_cap: int = PYFUNC_DEFAULTS["max_new_tokens_cap"],
    trust_remote_code: bool = False,
) -> None:
    """Save a PEFT LoRA model, its tokenizer and its base model (embedded or referenced) to `path`.

    Args:
        peft_model: a `peft.PeftModel` with one adapter.
        path: a new (or empty) local directory.
        tokenizer: the tokenizer to save with it.
        base_model: `builtin:*`, a local directory or a Hub id; default: the adapter config's
            `base_model_name_or_path`.
        base_mode: `"embedded"` copies the base weights into the artifact; `"reference"` records the
            Hub id + resolved commit (or a local path); `"auto"`: reference for a Hub id, else embedded.
        mlflow_model: the `mlflow.models.Model` this flavor is added to (set by `log_model`).
        signature: default: `default_signature(generation_defaults)`, with a params schema.
        input_example: default: `default_input_example()` when no signature is given.
        pip_requirements: replace the default requirements.
        extra_pip_requirements: add to the default requirements.
        code_paths: extra code to ship; the `loraflow` package is always added.
        metadata: custom metadata for the MLmodel file.
        generation_defaults: defaults for the generation params (keys of `GENERATION_DEFAULTS`).
        batch_size: pyfunc micro-batch size.
        max_new_tokens_cap: the largest `max_new_tokens` pyfunc accepts.
        trust_remote_code: whether the base model was loaded with code shipped with it; recorded
            as `base.trust_remote_code` (loading such a model needs permission again).

    Raises:
        MlflowException: an invalid argument, a non-empty `path`, or a base model that cannot be
            embedded or referenced.
    """
    import peft
    import torch
    import transformers

    _validate_env_arguments(None, pip_requirements, extra_pip_requirements)
    if not isinstance(peft_model, peft.PeftModel):
        raise _invalid(f"`peft_model` must be a peft.PeftModel, got {type(peft_model).__name__}")
    if len(peft_model.peft_config) != 1:
        raise _invalid(
            f"`peft_model` has {len(peft_model.peft_config)} adapters {sorted(peft_model.peft_config)}; "
            "save one adapter per model (delete the others with `delete_adapter`)"
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise _invalid(f"`batch_size` must be a positive integer, got {batch_size!r}")
    if not isinstance(max_new_tokens_cap, int) or max_new_tokens_cap < 1:
        raise _invalid(f"`max_new_tokens_cap` must be a positive integer, got {max_new_tokens_cap!r}")
    if not isinstance(trust_remote_code, bool):
        raise _invalid(f"`trust_remote_code` must be True or False, got {trust_remote_code!r}")
    generation_defaults = _validated_generation_defaults(generation_defaults, max_new_tokens_cap)
    adapter_config = peft_model.peft_config[peft_model.active_adapter]
    base_model = base_model or adapter_config.base_model_name_or_path
    if not base_model:
        raise _invalid("`base_model` is unknown: pass it, e.g. base_model='builtin:tiny'")

    base_section = _base_section(peft_model, base_model, base_mode, trust_remote_code)
    source_dir = base_section.pop("source_dir", None)
    if source_dir is not None:
        _check_base_files(Path(source_dir))
    path = Path(os.path.abspath(path))
    _validate_and_prepare_target_save_path(str(path))

    # 1. The native artifacts: adapter, tokenizer, base (embedded copy or reference).
    adapter_dir = path / ADAPTER_SUBPATH
    peft_model.save_pretrained(str(adapter_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(path / TOKENIZER_SUBPATH))
    if source_dir is not None:
        _copy_base_files(Path(source_dir), path / BASE_SUBPATH)
    with tempfile.TemporaryDirectory(prefix="loraflow-code-") as staging:
        # a referenced builtin base is rebuilt on load, from the bundled resources
        builtin_reference = base_section["kind"] == "builtin" and base_section["mode"] == "reference"
        loader_package = _stage_loader_package(Path(staging), with_builtin_resources=builtin_reference)
        code_dir_subpath = _validate_and_copy_code_paths([*(code_paths or []), loader_package], str(path))

    # 2. MLmodel: signature, example, pyfunc and loraflow flavors.
    if mlflow_model is None:
        mlflow_model = Model()
    if signature is None:
        signature = default_signature(generation_defaults, max_new_tokens_cap)
        if input_example is None:
            input_example = default_input_example()
    _save_example(mlflow_model, input_example, str(path))
    mlflow_model.signature = signature
    if metadata is not None:
        mlflow_model.metadata = metadata
    pyfunc.add_to_model(
        mlflow_model,
        loader_module="loraflow.flavor",
        code=code_dir_subpath,
        conda_env=_CONDA_ENV_FILE_NAME,
        python_env=_PYTHON_ENV_FILE_NAME,
        model_config={**PYFUNC_DEFAULTS, "batch_size": batch_size, "max_new_tokens_cap": max_new_tokens_cap},
    )
    from loraflow import __version__ as loraflow_version

    mlflow_model.add_flavor(
        FLAVOR_NAME,
        flavor_version=FLAVOR_VERSION,
        loraflow_version=loraflow_version,
        peft_version=str(peft.__version__),
        transformers_version=str(transformers.__version__),
        torch_version=str(torch.__version__),
        adapter=ADAPTER_SUBPATH,
        adapter_sha256={
            name: _file_sha256(adapter_dir / name) for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE)
        },
        tokenizer=TOKENIZER_SUBPATH,
        lora=_lora_settings(peft_model),
        base=base_section,
        generation_defaults=generation_defaults,
        code=code_dir_subpath,
    )
    if size := get_total_file_size(str(path)):
        mlflow_model.model_size_bytes = size
    mlflow_model.save(str(path / MLMODEL_FILE_NAME))

    # 3. The environment. Requirements are not inferred by loading the model in a subprocess (as
    # some MLflow flavors do): the defaults cover every import, and inference costs a model load.
    default_reqs = None if pip_requirements is not None else get_default_pip_requirements()
    conda_env, pip_reqs, pip_constraints = _process_pip_requirements(
        default_reqs, pip_requirements, extra_pip_requirements
    )
    with open(path / _CONDA_ENV_FILE_NAME, "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_to(str(path / _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(str(path / _REQUIREMENTS_FILE_NAME), "\n".join(pip_reqs))
    _PythonEnv.current().to_yaml(str(path / _PYTHON_ENV_FILE_NAME))


def log_model(
    peft_model: "PeftModel",
    name: str,
    tokenizer: "PreTrainedTokenizerBase",
    *,
    registered_model_name: str | None = None,
    signature: ModelSignature | None = None,
    input_example: Any = None,
    pip_requirements: list[str] | str | None = None,
    extra_pip_requirements: list[str] | str | None = None,
    code_paths: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    base_model: str | None = None,
    base_mode: BaseMode = "auto",
    generation_defaults: dict[str, Any] | None = None,
    batch_size: int = PYFUNC_DEFAULTS["batch_size"],
    max_new_tokens_cap: int = PYFUNC_DEFAULTS["max_new_tokens_cap"],
    trust_remote_code: bool = False,
    **kwargs: Any,
) -> "mlflow.models.model.ModelInfo":
    """Log a PEFT LoRA model to the active run (one is started if none is active).

    Args:
        peft_model, tokenizer, base_model, base_mode, generation_defaults, batch_size,
        max_new_tokens_cap, trust_remote_code, signature, input_example, pip_requirements,
        extra_pip_requirements, code_paths, metadata: as for `save_model`.
        name: the logged model's name (MLflow 3).
        registered_model_name: also register a version under this name.
        kwargs: passed to `mlflow.models.Model.log` (e.g. `params`, `tags`, `step`).

    Returns:
        The `ModelInfo` of the logged model (`.model_uri` loads it).
    """
    import loraflow.flavor

    # MLflow checks the input example by loading the logged model through pyfunc in this process;
    # the caller's permission for this model covers that load (and only for this call).
    with _env(TRUST_REMOTE_CODE_ENV, "1" if trust_remote_code else None):
        return Model.log(
            artifact_path=None,
            name=name,
            flavor=loraflow.flavor,
            registered_model_name=registered_model_name,
            metadata=metadata,
            peft_model=peft_model,
            tokenizer=tokenizer,
            base_model=base_model,
            base_mode=base_mode,
            signature=signature,
            input_example=input_example,
            pip_requirements=pip_requirements,
            extra_pip_requirements=extra_pip_requirements,
            code_paths=code_paths,
            generation_defaults=generation_defaults,
            batch_size=batch_size,
            max_new_tokens_cap=max_new_tokens_cap,
            trust_remote_code=trust_remote_code,
            **kwargs,
        )


@contextmanager
def _env(name: str, value: str | None) -> Iterator[None]:
    """Set an environment variable for the duration of a block (None: leave it as it is)."""
    if value is None:
        yield
        return
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


# ---------------------------------------------------------------------------------------------
# Loading.


def _flavor_conf(path: Path) -> dict[str, Any]:
    # Read as `mlflow.models.Model.load` does, with libyaml's parser where PyYAML has it (10x faster).
    try:
        with open(path / MLMODEL_FILE_NAME, encoding="utf-8") as f:
            doc = yaml.load(f, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except FileNotFoundError as e:
        raise MlflowException(f"no MLmodel file in {str(path)!r}: not an MLflow model", RESOURCE_DOES_NOT_EXIST) from e
    conf = (doc.get("flavors") or {}).get(FLAVOR_NAME) if isinstance(doc, dict) else None
    if not isinstance(conf, dict):
        raise MlflowException(f'the model at {str(path)!r} has no "{FLAVOR_NAME}" flavor', RESOURCE_DOES_NOT_EXIST)
    version = conf.get("flavor_version")
    if not isinstance(version, int) or version > FLAVOR_VERSION:
        raise MlflowException(
            f"the model at {str(path)!r} has loraflow flavor_version {version!r}, but this loraflow "
            f"reads versions up to {FLAVOR_VERSION}: upgrade loraflow "
            f"(it was saved by loraflow {conf.get('loraflow_version')})"
        )
    return conf


def _verify_adapter_files(adapter_dir: Path, conf: dict[str, Any]) -> None:
    for name, expected in conf["adapter_sha256"].items():
        file = adapter_dir / name
        if not file.is_file():
            raise MlflowException(
                f"adapter file {str(file)!r} is missing: the model artifact is incomplete; re-log the model",
                RESOURCE_DOES_NOT_EXIST,
            )
        if (actual := _file_sha256(file)) != expected:
            raise MlflowException(
                f"adapter file {str(file)!r} is corrupt: its sha256 is {actual}, but {expected} was "
                "recorded when the model was saved; re-download or re-log the model"
            )


def _remote_code_allowed(path: Path, base: dict[str, Any], trust_remote_code: bool | None) -> bool:
    """Whether the base may run its own code: only if recorded *and* allowed again by the caller.

    Raises:
        MlflowException: the model was saved with `trust_remote_code` and the caller did not allow it.
    """
    if not base.get("trust_remote_code", False):
        return False  # never run code the model did not record needing (a tampered artifact)
    if trust_remote_code is None:
        trust_remote_code = os.environ.get(TRUST_REMOTE_CODE_ENV, "").strip().lower() in ("1", "true", "yes")
    if not trust_remote_code:
        raise MlflowException(
            f"the model at {str(path)!r} was trained with trust_remote_code=True: its base model "
            f"{base.get('name')!r} runs Python code shipped with it. Loading it runs that code, so allow "
            f"it explicitly: `loraflow.flavor.load_model(uri, trust_remote_code=True)`, or set "
            f"{TRUST_REMOTE_CODE_ENV}=1 for `mlflow.pyfunc.load_model` and `mlflow models serve`",
            INVALID_PARAMETER_VALUE,
        )
    return True


def _load_base(path: Path, base: dict[str, Any], trust_remote_code: bool = False) -> tuple["PreTrainedModel", str]:
    """Load the base in the recorded dtype; return it and where it came from (for messages).

    Its fingerprint is not checked here: see `_verify_base`.
    """
    if base["mode"] == "embedded":
        source, revision = str(path / base["path"]), None
    else:
        source, revision = base["name"], base.get("revision")
    where = f"{source}@{revision}" if revision else source
    try:
        model = load_base_model(source, revision=revision, dtype=base["dtype"], trust_remote_code=trust_remote_code).eval()
    except LoraflowError as e:
        if base.get("trust_remote_code", False):
            raise MlflowException(f"cannot load the {base['mode']} base model {where!r}: {e}") from e
        raise MlflowException(
            f"the {base['mode']} base model {where!r} wants to run its own code, but the model was saved with "
            "trust_remote_code=False, so it is not run: the base is not the one the model was saved with. "
            "Re-log the model (with trust_remote_code=True if its base really needs code)"
        ) from e
    except Exception as e:
        raise MlflowException(f"cannot load the {base['mode']} base model {where!r}: {e}") from e
    return model, where


def _start_base_fingerprint(
    model: "PreTrainedModel", expected: str, stored: "Future[dict[str, bytes]] | None" = None
) -> "Future[str]":
    """Capture the base's tensors now (before the adapter wraps its modules) and fingerprint them in
    a background thread, in the scheme of the `expected` fingerprint.

    `stored`: digests of the tensors as stored in the base's files (`_start_stored_digests`); a
    loaded tensor with the same name, dtype and shape takes its digest from there, which relies on
    `from_pretrained` keeping a safetensors tensor's bytes when it keeps its name, dtype and shape
    (converting loaders rename, reshape or recast). Should the result not match, every loaded tensor
    is hashed itself before a mismatch is reported, so a good base is never refused for its files.
    """
    scheme = _scheme_of(expected)
    inputs = _fingerprint_inputs(model)

    def run() -> str:
        known = stored.result() if stored is not None else {}
        actual = _fingerprint(inputs, scheme, known)
        return _fingerprint(inputs, scheme) if actual != expected and known else actual

    return _in_background(run)


def _verify_base(fingerprint: "Future[str]", base: dict[str, Any], where: str) -> None:
    actual = fingerprint.result()
    if actual != base["fingerprint"]:
        raise MlflowException(
            f"base model {where!r} does not match the one the adapter was trained on: its fingerprint "
            f"is {actual}, expected {base['fingerprint']}. Point the model at the original base "
            "weights (same files, same revision), or re-log the model with base_mode='embedded'"
        )


def _apply_adapter(base: "PreTrainedModel", adapter_dir: Path, is_trainable: bool) -> "PeftModel":
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
    except Exception as e:
        raise MlflowException(f"cannot load the adapter from {str(adapter_dir / ADAPTER_WEIGHTS_FILE)!r}: {e}") from e


def _load_tokenizer(tokenizer_dir: Path, trust_remote_code: bool = False) -> "PreTrainedTokenizerBase":
    from transformers import AutoTokenizer

    with remote_code_refused(str(tokenizer_dir)):
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_local(
    path: Path,
    *,
    is_trainable: bool = False,
    device: "str | torch.device | None" = None,
    dtype: "torch.dtype | str | None" = None,
    trust_remote_code: bool | None = None,
) -> LoadedModel:
    import torch

    conf = _flavor_conf(path)
    allowed = _remote_code_allowed(path, conf["base"], trust_remote_code)  # before any code can run
    _add_code_from_conf_to_system_path(str(path), conf)
    adapter_dir = path / conf["adapter"]
    _verify_adapter_files(adapter_dir, conf)
    # The base's stored tensors are hashed while it loads; the loaded ones are captured before the
    # adapter touches it and fingerprinted meanwhile. Nothing is returned before it matches.
    stored = None
    if _scheme_of(conf["base"]["fingerprint"]) == "sha256-tensors":
        stored = _start_stored_digests(path, conf["base"])
    base, where = _load_base(path, conf["base"], allowed)
    fingerprint = _start_base_fingerprint(base, conf["base"]["fingerprint"], stored)
    try:
        model = _apply_adapter(base, adapter_dir, is_trainable)
        tokenizer = _load_tokenizer(path / conf["tokenizer"], allowed)
    except Exception:
        _verify_base(fingerprint, conf["base"], where)  # a different base explains a failure best
        raise
    _verify_base(fingerprint, conf["base"], where)
    if dtype is not None:
        model.to(dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device is not None:
        model.to(device)
    return LoadedModel(model, tokenizer)


def load_model(
    model_uri: str,
    is_trainable: bool = False,
    device: "str | torch.device | None" = None,
    dtype: "torch.dtype | str | None" = None,
    dst_path: str | None = None,
    trust_remote_code: bool | None = None,
) -> LoadedModel:
    """Load a model saved by this flavor: the base (verified by fingerprint) plus the adapter.

    Args:
        model_uri: `runs:/...`, `models:/...`, a local path, or any MLflow artifact URI.
        is_trainable: reload LoRA (and modules_to_save) parameters as trainable, to continue training.
        device: where to put the model; default: the CPU.
        dtype: cast the loaded model to this dtype; default: the base's saved dtype.
        dst_path: where to download the artifacts; default: a temporary directory.
        trust_remote_code: allow a base recorded with `trust_remote_code` to run its code; default
            (None): the `LORAFLOW_TRUST_REMOTE_CODE` environment variable, else not allowed. Never
            turns remote code on for a model that did not record it.

    Returns:
        `LoadedModel(model, tokenizer)`: use `.model`/`.tokenizer` or unpack it.

    Raises:
        MlflowException: a URI with no model, a newer flavor version, a missing or corrupt adapter,
            a base that needs remote code that was not allowed, or a base model that cannot be
            loaded or does not match the recorded fingerprint.
    """
    try:
        local_path = _download_artifact_from_uri(artifact_uri=model_uri, output_path=dst_path)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise MlflowException(f"no loraflow model at {model_uri!r}: {e.message}", RESOURCE_DOES_NOT_EXIST) from e
    return _load_local(
        Path(local_path), is_trainable=is_trainable, device=device, dtype=dtype, trust_remote_code=trust_remote_code
    )


# ---------------------------------------------------------------------------------------------
# Inference.


def _prompts_from_input(data: Any) -> list[str]:
    """Accept a DataFrame with a `prompt` column, a list of strings, a dict or a single string."""
    import numpy as np
    import pandas as pd

    if isinstance(data, str):
        prompts: Any = [data]
    elif isinstance(data, pd.DataFrame):
        if "prompt" in data.columns:
            prompts = data["prompt"].tolist()
        elif list(data.columns) == [0]:  # how MLflow's schema enforcement passes a list or a string
            prompts = data[0].tolist()
        else:
            raise _invalid(
                f"the input has no `prompt` column (columns: {[str(c) for c in data.columns]}); "
                'send e.g. {"dataframe_records": [{"prompt": "..."}]}'
            )
        if len(prompts) == 1 and isinstance(prompts[0], (list, tuple, np.ndarray)):
            prompts = list(prompts[0])  # {"prompt": [...]} arrives as one row holding the list
    elif isinstance(data, dict):
        if "prompt" not in data:
            raise _invalid(f"the input dict has no `prompt` key (keys: {sorted(map(str, data))})")
        value = data["prompt"]
        prompts = [value] if isinstance(value, str) else list(value)
    elif isinstance(data, (list, tuple, pd.Series, np.ndarray)):
        prompts = list(data)
    else:
        raise _invalid(
            f"unsupported input type {type(data).__name__}: pass a DataFrame with a `prompt` column, "
            "a list of strings, a dict or a string"
        )
    if not prompts:
        raise _invalid("the input holds no prompts: send at least one")
    bad = [(i, type(p).__name__) for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise _invalid(f"every `prompt` must be a string; not strings (row, type): {bad[:5]}")
    return [str(p) for p in prompts]


def _generation_settings(params: dict[str, Any] | None, *, max_new_tokens_cap: int) -> dict[str, Any]:
    """Merge `params` over the defaults and check every value; one error lists every problem."""
    import numpy as np
    params = dict(params or {})
    unknown = [k for k in params if k not in GENERATION_DEFAULTS]
    problems = []
    for key in unknown:
        close = difflib.get_close_matches(key, GENERATION_DEFAULTS, n=1)
        hint = f" (did you mean `{close[0]}`?)" if close else ""
        problems.append(f"unknown param `{key}`{hint}; known: {sorted(GENERATION_DEFAULTS)}")
    s = {**GENERATION_DEFAULTS, **{k: v for k, v in params.items() if v is not None and k not in unknown}}

    def is_int(v: Any) -> bool:  # numpy integers too, as MLflow may pass them; never bools
        return isinstance(v, numbers.Integral) and not isinstance(v, (bool, np.bool_))

    def is_number(v: Any) -> bool:
        return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))

    if not is_int(s["max_new_tokens"]) or not 0 < s["max_new_tokens"] <= max_new_tokens_cap:
        problems.append(
            f"`max_new_tokens` must be an integer in 1..{max_new_tokens_cap}, got {s['max_new_tokens']!r}"
        )
    if not is_number(s["temperature"]) or s["temperature"] <= 0:
        problems.append(f"`temperature` must be a number > 0, got {s['temperature']!r} (greedy: do_sample=false)")
    if not is_number(s["top_p"]) or not 0 < s["top_p"] <= 1:
        problems.append(f"`top_p` must be a number in (0, 1], got {s['top_p']!r}")
    if not is_number(s["repetition_penalty"]) or s["repetition_penalty"] <= 0:
        problems.append(f"`repetition_penalty` must be a number > 0, got {s['repetition_penalty']!r} (off: 1.0)")
    if not is_int(s["seed"]) or s["seed"] < 0:
        problems.append(f"`seed` must be a non-negative integer, got {s['seed']!r}")
    if isinstance(s["do_sample"], np.bool_):
        s["do_sample"] = bool(s["do_sample"])
    if not isinstance(s["do_sample"], bool):
        problems.append(f"`do_sample` must be true or false, got {s['do_sample']!r}")
    if problems:
        raise _invalid("invalid generation params:\n" + "\n".join(f"  - {p}" for p in problems))
    return {**s, "max_new_tokens": int(s["max_new_tokens"]), "seed": int(s["seed"])}


def context_length(model: "torch.nn.Module", tokenizer: "PreTrainedTokenizerBase") -> int | None:
    """The longest sequence (prompt + generation) the model takes, when it says."""
    config = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(value := getattr(config, key, None), int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and limit < 10**8 else None


def _left_pad(rows: list[list[int]], pad_id: int, device: "torch.device") -> tuple["torch.Tensor", "torch.Tensor"]:
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, width - len(row):] = torch.tensor(row, dtype=torch.long)
        attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


@contextmanager
def _seeded(seed: int | None, device: "torch.device") -> Iterator[None]:
    """Seed torch for one sampling call without changing the caller's random state."""
    import torch

    if seed is None:
        yield
        return
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def generate_texts(
    model: "torch.nn.Module",
    tokenizer: "PreTrainedTokenizerBase",
    prompts: list[str],
    *,
    batch_size: int = PYFUNC_DEFAULTS["batch_size"],
    max_new_tokens_cap: int = PYFUNC_DEFAULTS["max_new_tokens_cap"],
    **params: Any,
) -> list[str]:
    """Generate a continuation for each prompt, in input order.

    Prompts are tokenized once, sorted by length into micro-batches of `batch_size`, padded on the
    left and run under `torch.inference_mode()` (on CPU with a static KV cache, see
    `_static_cache_pays`). `params` are generation settings (`GENERATION_DEFAULTS` keys). Returns
    only the generated text, without the prompt.

    Raises:
        MlflowException: (INVALID_PARAMETER_VALUE) an invalid param, an empty prompt or one that
            does not fit the model's context with `max_new_tokens` more tokens.
    """
    import torch

    settings = _generation_settings(params, max_new_tokens_cap=max_new_tokens_cap)
    encoded = tokenizer(prompts)["input_ids"]
    limit = context_length(model, tokenizer)
    problems = []
    for i, ids in enumerate(encoded):
        if not ids:
            problems.append(f"prompt {i} is empty after tokenization")
        elif limit is not None and len(ids) + settings["max_new_tokens"] > limit:
            problems.append(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={settings['max_new_tokens']} "
                f"that exceeds the model's context of {limit} tokens (shorten it or lower max_new_tokens)"
            )
    if problems:
        raise _invalid("prompts that cannot be generated from:\n" + "\n".join(f"  - {p}" for p in problems[:10]))

    kwargs: dict[str, Any] = {
        "max_new_tokens": settings["max_new_tokens"],
        "do_sample": settings["do_sample"],
        "repetition_penalty": float(settings["repetition_penalty"]),
        "pad_token_id": tokenizer.pad_token_id,
    }
    if settings["do_sample"]:  # passing these to greedy search only makes transformers warn
        kwargs.update(temperature=float(settings["temperature"]), top_p=float(settings["top_p"]))
    device = next(model.parameters()).device
    static_cache = _static_cache_pays(model, device)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    with torch.inference_mode(), _seeded(settings["seed"] if settings["do_sample"] else None, device):
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            input_ids, attention_mask = _left_pad([encoded[i] for i in batch], tokenizer.pad_token_id, device)
            if static_cache:  # sized for this batch (cache_implementation="static" keeps the largest ever)
                kwargs["cache"] = _static_cache(model, input_ids.shape[1] + settings["max_new_tokens"])
            output = model.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            decoded = tokenizer.batch_decode(output[:, input_ids.shape[1]:], skip_special_tokens=True)
            for i, text in zip(batch, decoded):
                texts[i] = text
    return texts


def _static_cache_pays(model: "torch.nn.Module", device: "torch.device") -> bool:
    """Generate with a preallocated (static) KV cache: on CPU, for models that support one.

    The default dynamic cache concatenates every layer's keys and values at every new token (14% of
    CPU generation time on the benchmark model); a static cache writes in place, and gives the same
    tokens. Not on GPUs: there transformers compiles the model whenever the cache is static.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return device.type == "cpu" and bool(getattr(base, "_can_compile_fullgraph", False))


def _static_cache(model: "torch.nn.Module", length: int) -> Any:
    """A fresh static KV cache of `length` positions (one per `generate` call, so concurrent
    requests never share one, and a long request never enlarges the caches of later ones)."""
    from transformers import StaticCache

    return StaticCache(config=model.config.get_text_config(decoder=True), max_cache_len=length)


class _LoraflowPyfunc:
    """The pyfunc model: a DataFrame with a `prompt` column in, a DataFrame with `text` out."""

    def __init__(
        self,
        loaded: LoadedModel,
        *,
        batch_size: int,
        max_new_tokens_cap: int,
        max_request_prompts: int = PYFUNC_DEFAULTS["max_request_prompts"],
        max_request_chars: int = PYFUNC_DEFAULTS["max_request_chars"],
    ):
        self.loaded = loaded
        self.batch_size = batch_size
        self.max_new_tokens_cap = max_new_tokens_cap
        self.max_request_prompts = max_request_prompts
        self.max_request_chars = max_request_chars

    def get_raw_model(self) -> LoadedModel:
        return self.loaded

    def predict(self, data: Any, params: dict[str, Any] | None = None) -> "pd.DataFrame":
        import pandas as pd

        prompts = _prompts_from_input(data)
        if _MLFLOW_IS_IN_SERVING_ENVIRONMENT.get():  # set by MLflow's scoring server
            self._check_request_size(prompts)
        texts = generate_texts(
            self.loaded.model,
            self.loaded.tokenizer,
            prompts,
            batch_size=self.batch_size,
            max_new_tokens_cap=self.max_new_tokens_cap,
            **(params or {}),
        )
        return pd.DataFrame({"text": texts})

    def _check_request_size(self, prompts: list[str]) -> None:
        problems = []
        if len(prompts) > self.max_request_prompts:
            problems.append(f"it holds {len(prompts)} prompts; the limit is {self.max_request_prompts} "
                            "(model_config `max_request_prompts`)")
        if (chars := sum(map(len, prompts))) > self.max_request_chars:
            problems.append(f"its prompts total {chars} characters; the limit is {self.max_request_chars} "
                            "(model_config `max_request_chars`)")
        if problems:
            raise _invalid("the request is too large: " + "; ".join(problems) + ". Split it into smaller requests")


def _pyfunc_config(model_config: dict[str, Any] | None) -> dict[str, Any]:
    config = {**PYFUNC_DEFAULTS, **(model_config or {})}
    problems = [f"unknown model_config key `{k}`; known: {sorted(PYFUNC_DEFAULTS)}" for k in config if k not in PYFUNC_DEFAULTS]
    for key in ("batch_size", "max_new_tokens_cap", "max_request_prompts", "max_request_chars"):
        if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
            problems.append(f"model_config `{key}` must be a positive integer, got {config[key]!r}")
    if problems:
        raise _invalid("; ".join(problems))
    return config


def _load_pyfunc(path: str, model_config: dict[str, Any] | None = None) -> _LoraflowPyfunc:
    """Called by `mlflow.pyfunc.load_model` with the model's local directory."""
    import torch

    config = _pyfunc_config(model_config)
    device = config["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = _load_local(Path(path), device=device)
    loaded.model.eval()
    return _LoraflowPyfunc(
        loaded,
        batch_size=config["batch_size"],
        max_new_tokens_cap=config["max_new_tokens_cap"],
        max_request_prompts=config["max_request_prompts"],
        max_request_chars=config["max_request_chars"],
    )
