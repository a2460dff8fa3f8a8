"""The `loraflow` MLflow flavor: save, log, load and serve PEFT LoRA models without losing a bit.

Shaped like MLflow's own flavor modules (`mlflow/spacy/__init__.py`, `mlflow/lightgbm/__init__.py`):
`FLAVOR_NAME`, `get_default_pip_requirements`, `save_model`, `log_model`, `load_model`, plus the
private `_load_pyfunc` that `mlflow.pyfunc.load_model` and `mlflow models serve` call (saving is
implemented in `loraflow.saving`, generation in `loraflow.generation`). torch, transformers and peft
are imported inside functions, so importing this module stays cheap.

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
A base outside the artifact (a Hub cache, a local directory) is hashed once: its files' digests are
kept in a cache under `$LORAFLOW_HOME/digests`, valid while each file's path, size, inode and
modification and change times stay as they were (as Git's index trusts them; `LORAFLOW_DIGEST_CACHE=0`
turns the cache off). The adapter file's sha256 is recorded and checked too, so flipped bytes are
caught even where safetensors would still parse them.

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
`code_paths` (under `code/loraflow/`: only the modules a loaded model imports,
`saving.LOADER_MODULES`, plus the builtin resources for a referenced `builtin:*` base). We chose
this over pinning `loraflow==<version>` because loraflow is usually installed editable from a
checkout, so such a pin would not resolve on PyPI in a fresh serving environment; shipping the code
also guarantees that the loader that reads a model is the code that wrote it (MLflow puts `code/`
first on `sys.path` before importing the loader module). The package's `__path__` is extended
(`pkgutil.extend_path`), so in a process that also has loraflow installed, its other modules
(training, tracking) still import. Importing `loraflow` needs only the standard library, so no other
pins are needed for it.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import mmap
import os
import tempfile
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple

import yaml

from mlflow.environment_variables import _MLFLOW_IS_IN_SERVING_ENVIRONMENT
from mlflow.exceptions import MlflowException
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST
from mlflow.tracking.artifact_utils import _download_artifact_from_uri
from mlflow.utils.model_utils import _add_code_from_conf_to_system_path

from loraflow.builtin import cache_root
from loraflow.errors import LoraflowError
from loraflow.models import load_base_model, remote_code_refused, resolve_base

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

# Settings of the served model itself (pyfunc `model_config`; override with
# `mlflow.pyfunc.load_model(uri, model_config={...})`).
PYFUNC_DEFAULTS: dict[str, Any] = {
    "batch_size": 32,  # prompts generated together (sorted by length; see `loraflow.generation`)
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


# The writing half of the flavor lives in `loraflow.saving`: loading never needs it, so a served
# model neither ships nor compiles it. Its public names are reachable here too (PEP 562), where
# MLflow's flavor API has them (`Model.log` calls `flavor.save_model`).
_SAVING_NAMES = ("save_model", "log_model", "get_default_pip_requirements", "default_signature", "default_input_example")


def __getattr__(name: str) -> Any:
    if name in _SAVING_NAMES:
        from loraflow import saving

        return getattr(saving, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def stored_tensor_digests(files: list[Path], workers: int = 1, cache: bool = False) -> dict[str, bytes]:
    """sha256 of each tensor's bytes as stored in these safetensors files, by the `name|dtype|shape`
    header a loaded tensor with those bytes has in a `sha256-tensors` fingerprint.

    safetensors stores each tensor's bytes contiguously, little-endian, exactly as a CPU tensor holds
    them, so these digests are those of the loaded tensors whenever loading keeps the name, dtype,
    shape and values. Hashing them from the file can therefore start before the model is loaded.
    Tensors of a dtype not in `SAFETENSORS_DTYPES`, and names stored more than once, are left out.
    With `cache`, a file's digests come from the digest cache while the file is unchanged
    (`_cached_file_digests`), and are recorded there once hashed.
    """
    per_file = [_file_digests(file, workers, cache) for file in files]
    counts = Counter(name for digests in per_file for name in digests)
    return {header: digest for digests in per_file for name, (header, digest) in digests.items() if counts[name] == 1}


def _file_digests(file: Path, workers: int, cache: bool) -> dict[str, tuple[str, bytes]]:
    """{tensor name: (header, sha256 of its stored bytes)} for one safetensors file."""
    if cache and (cached := _cached_file_digests(file)) is not None:
        return cached
    identity, started_ns = _file_identity(file), time.time_ns()  # before reading: a later change shows
    with open(file, "rb") as f:
        header_size = int.from_bytes(f.read(8), "little")
        layout = json.loads(f.read(header_size))
    jobs = [  # (name, header, start, end)
        (name, _tensor_header(name, SAFETENSORS_DTYPES[info["dtype"]], info["shape"]),
         8 + header_size + info["data_offsets"][0], 8 + header_size + info["data_offsets"][1])
        for name, info in layout.items()
        if name != "__metadata__" and info["dtype"] in SAFETENSORS_DTYPES
    ]
    with _mapped(file) as mapped, ThreadPoolExecutor(max(1, workers), thread_name_prefix="loraflow-fingerprint") as pool:
        digests = list(pool.map(lambda job: _range_sha256(mapped, job[2], job[3]), jobs))
    result = {name: (header, digest) for (name, header, *_), digest in zip(jobs, digests)}
    if cache:
        _record_file_digests(file, identity, started_ns, result)
    return result


# The digest cache: the stored-tensor digests of base weight files that live outside a model
# artifact (a Hub cache, a local directory, a built-in base), so that loading such a model again does
# not hash its whole base again. Like Git's index, an entry holds only while the file's path, size,
# inode and modification and change times are those it had when it was hashed (the change time
# cannot be set back by `touch`); an entry for a file modified within `_RACY_NS` of being hashed is
# never written, as a change in the same clock tick would not show. Whatever the cache says, a
# fingerprint that does not match is rechecked on the loaded tensors themselves (`_start_base_fingerprint`).
DIGEST_CACHE_ENV = "LORAFLOW_DIGEST_CACHE"  # set to 0 to hash every base on every load
_RACY_NS = 2_000_000_000


def _digest_cache_enabled() -> bool:
    return os.environ.get(DIGEST_CACHE_ENV, "1").strip().lower() not in ("0", "false", "no")


def _digest_cache_dir() -> Path:
    return cache_root() / "digests"


def _file_identity(file: Path) -> dict[str, Any]:
    st = file.stat()
    return {"path": str(file.resolve()), "size": st.st_size, "dev": st.st_dev, "ino": st.st_ino,
            "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def _digest_cache_entry(file: Path) -> Path:
    return _digest_cache_dir() / (hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:32] + ".json")


def _cached_file_digests(file: Path) -> dict[str, tuple[str, bytes]] | None:
    """The cached digests of `file`, or None when there is no entry or the file has changed since."""
    try:
        entry = json.loads(_digest_cache_entry(file).read_text())
        if entry["identity"] != _file_identity(file):
            return None
        return {name: (header, bytes.fromhex(digest)) for name, (header, digest) in entry["digests"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _record_file_digests(file: Path, identity: dict[str, Any], started_ns: int,
                         digests: dict[str, tuple[str, bytes]]) -> None:
    if identity["mtime_ns"] >= started_ns - _RACY_NS or identity["ctime_ns"] >= started_ns - _RACY_NS:
        return  # changed too recently to tell a later change in the same clock tick apart
    entry = {"identity": identity, "digests": {name: [header, d.hex()] for name, (header, d) in digests.items()}}
    target = _digest_cache_entry(file)
    try:
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # trusted as far as its writers are
        handle, temp = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
    except OSError as e:
        _logger.debug("could not record the digests of %s: %s", file, e)
        return
    try:
        with os.fdopen(handle, "w") as f:
            json.dump(entry, f)
        os.replace(temp, target)  # atomic: a concurrent reader sees the old entry or the new one
    except OSError as e:
        _logger.debug("could not record the digests of %s: %s", file, e)
        Path(temp).unlink(missing_ok=True)
        return
    _prune_digest_cache(target.parent)


def _prune_digest_cache(directory: Path) -> None:
    """Drop the entries of files that are gone (a deleted Hub snapshot, a moved checkpoint).

    Run only when an entry is recorded, which is a cache miss: a hit never scans the cache. A file
    that changed keeps its entry's key, so its next record replaces that entry.
    """
    for entry in directory.glob("*.json"):
        try:
            gone = not Path(json.loads(entry.read_text())["identity"]["path"]).exists()
        except (OSError, ValueError, KeyError, TypeError):
            gone = True  # unreadable: it would be hashed over anyway
        if gone:
            entry.unlink(missing_ok=True)


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
    cores but the one loading (or take them from the digest cache, for a base outside the artifact).
    Only a shortcut: whatever fails here, the loaded tensors are hashed."""
    # Here, not in the background: a `builtin:*` base is built on first use, once; and finding the
    # files imports from transformers, whose lazy imports are not safe beside the load's own.
    try:
        files = _base_weight_files(path, base)
    except Exception as e:  # the load itself reports a base it cannot find
        _logger.debug("not hashing the base's files ahead of loading: %s", e)
        files = []
    cache = base["mode"] != "embedded" and _digest_cache_enabled()  # an embedded base is a fresh copy

    def run() -> dict[str, bytes]:
        try:
            return stored_tensor_digests(files, workers=min(8, (os.cpu_count() or 2) - 1), cache=cache)
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


def _adapter_files(adapter_dir: Path, conf: dict[str, Any]) -> dict[Path, str]:
    """The adapter's files with their recorded sha256.

    Raises:
        MlflowException: one is missing (checked at once, before anything loads).
    """
    files = {adapter_dir / name: expected for name, expected in conf["adapter_sha256"].items()}
    for file in files:
        if not file.is_file():
            raise MlflowException(
                f"adapter file {str(file)!r} is missing: the model artifact is incomplete; re-log the model",
                RESOURCE_DOES_NOT_EXIST,
            )
    return files


def _verify_adapter_files(files: dict[Path, str]) -> None:
    for file, expected in files.items():
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
        # in eval mode: `from_pretrained` sets it
        model = load_base_model(source, revision=revision, dtype=base["dtype"], trust_remote_code=trust_remote_code)
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
    # Verification runs beside the load: the adapter's files and the base's stored tensors are
    # hashed while the base loads; the loaded tensors are captured before the adapter touches them
    # and fingerprinted meanwhile. Nothing is returned before both match.
    adapter_files = _adapter_files(adapter_dir, conf)
    adapter_checked = _in_background(lambda: _verify_adapter_files(adapter_files))
    stored = None
    if _scheme_of(conf["base"]["fingerprint"]) == "sha256-tensors":
        stored = _start_stored_digests(path, conf["base"])
    try:
        base, where = _load_base(path, conf["base"], allowed)
    except Exception:
        adapter_checked.result()  # a corrupt artifact explains a failure best
        raise
    fingerprint = _start_base_fingerprint(base, conf["base"]["fingerprint"], stored)
    adapter_checked.result()  # before peft reads the adapter, so its errors never come first
    try:
        model = _apply_adapter(base, adapter_dir, is_trainable)
        tokenizer = _load_tokenizer(path / conf["tokenizer"], allowed)
    except Exception:
        _verify_base(fingerprint, conf["base"], where)  # a different base explains a failure best
        raise
    _verify_base(fingerprint, conf["base"], where)
    if dtype is not None:
        model.to(dtype=getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    if device is not None and not _on_device(model, torch.device(device)):
        model.to(device)  # walks every module even when nothing moves: skipped then
    return LoadedModel(model, tokenizer)


def _on_device(model: "torch.nn.Module", device: "torch.device") -> bool:
    """Whether every parameter and buffer is already on `device` (`cuda` matches `cuda:<current>`)."""
    import torch

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return all(t.device == device for t in itertools.chain(model.parameters(), model.buffers()))


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

        from loraflow.generation import generate_texts  # here, not at load: loading never needs it

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
    loaded = _load_local(Path(path), device=device)  # in eval mode: peft sets it unless trainable
    return _LoraflowPyfunc(
        loaded,
        batch_size=config["batch_size"],
        max_new_tokens_cap=config["max_new_tokens_cap"],
        max_request_prompts=config["max_request_prompts"],
        max_request_chars=config["max_request_chars"],
    )
