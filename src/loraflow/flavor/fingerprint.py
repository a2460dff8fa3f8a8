"""Fingerprints: what proves that a loaded base and adapter are the ones a model was saved with.

Base fingerprint (scheme `sha256-tensors`): `sha256` over the base's normalised config and, for
every base tensor in name order (tied ones once, peft's wrappers stripped), its name, dtype, shape
and the sha256 of its bytes. The adapter is checked by the sha256 of its files.

Two shortcuts keep verifying cheap (`LORAFLOW_DISABLE` names them; figures in docs/benchmarks.md):
safetensors stores a tensor's bytes as a CPU tensor holds them, so the stored tensors are hashed
from the files while `from_pretrained` loads them (`start_stored_digests`); and the digest cache
keeps the digests of a base outside the artifact per file while the file is unchanged. Should the
result not match, the loaded tensors themselves are hashed before a mismatch is reported.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple

from mlflow.exceptions import MlflowException

from loraflow.flavor.bases import local_weight_files
from loraflow.flavor.files import atomic_file
from loraflow.flavor.layout import cache_root
from loraflow.flavor.switches import enabled

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

FINGERPRINT_SCHEME = "sha256-tensors"  # what `save_model` records, and the only scheme a load verifies

# safetensors dtype codes (the format's spec) as torch names them in a tensor's fingerprint header
SAFETENSORS_DTYPES = {
    "F64": "torch.float64", "F32": "torch.float32", "F16": "torch.float16", "BF16": "torch.bfloat16",
    "I64": "torch.int64", "I32": "torch.int32", "I16": "torch.int16", "I8": "torch.int8", "U8": "torch.uint8",
    "BOOL": "torch.bool",
}
# Set on a base cast after loading (`convert_base`), so that its fingerprint stays that of its
# weights as stored: {tensor name: dtype as loaded}, and {header: sha256} of tensors cast with a loss.
STORED_DTYPES_ATTR = "_loraflow_stored_dtypes"
STORED_DIGESTS_ATTR = "_loraflow_stored_digests"
# Config keys that describe how a model was loaded or run, not what it is.
VOLATILE_CONFIG_KEYS = ("transformers_version", "dtype", "torch_dtype", "use_cache")

_logger = logging.getLogger(__name__)

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


def base_state_dict(model: "torch.nn.Module") -> dict[str, "torch.Tensor"]:
    """The base's tensors by original name (peft's wrappers stripped, tied ones once), each in the
    dtype it was stored in (a tensor cast down after loading keeps the digest recorded before)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    stored = getattr(base, STORED_DTYPES_ATTR, None) or {}
    tensors = {}
    for name, tensor in _base_tensors(base).items():
        if (as_stored := stored.get(name)) is not None and tensor.dtype != as_stored:
            tensor = tensor.detach().to(as_stored)
        tensors[name] = tensor
    return tensors


def remember_stored_dtypes(model: "torch.nn.Module", target: "torch.dtype") -> None:
    """Record what the base's fingerprint needs before it is cast to `target`: each tensor's stored
    dtype, and the digests of tensors whose cast loses bits (a cast up is undone exactly)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, STORED_DTYPES_ATTR, None):
        setattr(base, STORED_DTYPES_ATTR, {name: t.dtype for name, t in _base_tensors(base).items()})
    if all(_exact_cast(str(dtype), target) for dtype in getattr(base, STORED_DTYPES_ATTR).values()):
        return  # a cast up, undone exactly when fingerprinting
    known = getattr(base, STORED_DIGESTS_ATTR, None) or {}
    lossy = [(header, flat) for header, flat in _fingerprint_inputs(base).tensors
             if header not in known and not _exact_cast(header.split("|")[1], target)]
    if lossy:
        setattr(base, STORED_DIGESTS_ATTR, {**known, **_tensor_digests(lossy)})


def convert_base(model: "torch.nn.Module", dtype: str) -> "torch.nn.Module":
    """Cast an unquantized base's floating-point parameters to `dtype` in place, after
    `remember_stored_dtypes`; buffers (rotary frequencies) and a quantized model are left as they are."""
    import torch

    if getattr(model, "hf_quantizer", None) is not None or getattr(model, "is_loaded_in_4bit", False):
        return model
    target = getattr(torch, dtype)
    params = [p for p in model.parameters() if p.is_floating_point() and p.dtype != target]
    if params:
        remember_stored_dtypes(model, target)
        for param in params:  # `Parameter`s are unique here: a tied matrix is cast once
            param.data = param.data.to(target)
    if hasattr(model, "config"):
        model.config.dtype = target
    return model


def _exact_cast(stored: str, target: "torch.dtype") -> bool:
    """Whether every value of dtype `stored` (its torch name) survives a cast to `target`."""
    import torch

    dtype = getattr(torch, stored.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point or dtype == target:
        return True
    return target in (torch.float32, torch.float64) and target.itemsize > dtype.itemsize


def _normalized_config(model: "PreTrainedModel") -> dict[str, Any]:
    config = model.config.to_dict()
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in VOLATILE_CONFIG_KEYS}


def base_fingerprint(model: "torch.nn.Module") -> str:
    """`sha256-tensors:<hex>` of the base model's config and weights; a PeftModel gives its base's."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return _fingerprint(_fingerprint_inputs(model), getattr(base, STORED_DIGESTS_ATTR, None))


class _FingerprintInputs(NamedTuple):
    config: bytes
    tensors: list[tuple[str, "torch.Tensor"]]
    """(`name|dtype|shape`, the tensor's bytes as a flat uint8 CPU tensor), sorted by name."""


def _tensor_header(name: str, dtype: Any, shape: Any) -> str:
    return f"{name}|{dtype}|{tuple(shape)}"


def _fingerprint_inputs(model: "torch.nn.Module") -> _FingerprintInputs:
    """What a fingerprint hashes, taken now (another thread hashes it while the model changes)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = json.dumps(_normalized_config(base), sort_keys=True, default=str).encode()
    tensors = []
    for name, tensor in sorted(base_state_dict(base).items()):
        if tensor.device.type == "meta":
            raise MlflowException(f"cannot fingerprint `{name}`: its weights are on the meta device (offloaded)")
        header = _tensor_header(name, tensor.dtype, tensor.shape)
        tensors.append((header, tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)))
    return _FingerprintInputs(config, tensors)


def _fingerprint(inputs: _FingerprintInputs, known: dict[str, bytes] | None = None) -> str:
    """`sha256-tensors:<hex>` of `inputs`; a tensor whose header is in `known` takes that digest."""
    known = known or {}
    hashed = _tensor_digests([(header, flat) for header, flat in inputs.tensors if header not in known])
    digest = hashlib.sha256(inputs.config)
    for header, _ in inputs.tensors:
        digest.update(f"\n{header}\n".encode())
        digest.update(known[header] if header in known else hashed[header])
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()}"


def _tensor_digests(tensors: list[tuple[str, "torch.Tensor"]]) -> dict[str, bytes]:
    """sha256 of each flat byte tensor, by header."""
    # hashlib releases the GIL on large buffers, so tensors hash on every core at once
    workers = max(1, min(len(tensors), os.cpu_count() or 1, 8))
    with ThreadPoolExecutor(workers, thread_name_prefix="loraflow-fingerprint") as pool:
        digests = pool.map(lambda flat: hashlib.sha256(memoryview(flat.numpy())).digest(), (f for _, f in tensors))
        return dict(zip((header for header, _ in tensors), digests))


def check_scheme(fingerprint: str) -> None:
    """Refuse a fingerprint of a scheme this loraflow cannot verify (a newer loraflow's)."""
    scheme = fingerprint.split(":", 1)[0]
    if scheme != FINGERPRINT_SCHEME:
        raise MlflowException(
            f"unknown base fingerprint scheme {scheme!r} (known: {FINGERPRINT_SCHEME}): "
            "the model was saved by a newer loraflow; upgrade loraflow"
        )


def stored_tensor_digests(files: list[Path], workers: int = 1, cache: bool = False) -> dict[str, bytes]:
    """sha256 of each tensor's bytes as stored in these safetensors files, by the `name|dtype|shape`
    header a loaded tensor with those bytes has. Dtypes not in `SAFETENSORS_DTYPES` and names stored
    twice are left out. With `cache`, through the digest cache."""
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
    digests = _hashed_ranges(file, [(start, end) for *_, start, end in jobs], workers)
    result = {name: (header, digest) for (name, header, *_), digest in zip(jobs, digests)}
    if cache:
        _record_file_digests(file, identity, started_ns, result)
    return result


# The digest cache (`$LORAFLOW_HOME/digests`): like Git's index, an entry holds while the file's path,
# size, inode, modification and change times are unchanged; a file modified within `_RACY_NS` of
# being hashed is not recorded. It is as trustworthy as whoever can write that folder.
_RACY_NS = 2_000_000_000


def _digest_cache_enabled() -> bool:
    return enabled("digest_cache")


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
        with atomic_file(target) as temp:  # a concurrent reader sees the old entry or the new one
            temp.write_text(json.dumps(entry))
    except OSError as e:
        _logger.debug("could not record the digests of %s: %s", file, e)
        return
    _prune_digest_cache(target.parent)


def _prune_digest_cache(directory: Path) -> None:
    """Drop the entries of files that are gone (run on a cache miss only)."""
    for entry in directory.glob("*.json"):
        try:
            gone = not Path(json.loads(entry.read_text())["identity"]["path"]).exists()
        except (OSError, ValueError, KeyError, TypeError):
            gone = True  # unreadable: it would be hashed over anyway
        if gone:
            entry.unlink(missing_ok=True)


def _base_weight_files(path: Path, base: dict[str, Any]) -> list[Path]:
    """The safetensors files `from_pretrained` reads for this base, when all of them are local now."""
    if base["mode"] == "embedded":
        return local_weight_files(str(path / base["path"]))
    return local_weight_files(base["name"], base.get("revision"))


def start_stored_digests(path: Path, base: dict[str, Any]) -> "Future[dict[str, bytes]]":
    """Hash the base's stored tensors in the background while `from_pretrained` loads them (or take
    them from the digest cache). Only a shortcut: whatever fails here, the loaded tensors are hashed."""
    # not in the background: a built-in base is built here once, and transformers' lazy imports
    # are not thread-safe beside the load's own
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

    return in_background(run)


def in_background(work: Callable[[], Any]) -> Future:
    """Start `work` in its own thread now; its Future gives the result (or raises its error)."""
    pool = ThreadPoolExecutor(1, thread_name_prefix="loraflow-fingerprint")
    try:
        return pool.submit(work)
    finally:
        pool.shutdown(wait=False)  # the submitted work still runs to the end


# Hashed through a buffer, not mapped: mapped pages stay resident (benchmarks/bench_qlora.py).
_READ_CHUNK = 4 << 20


def _hashed_ranges(file: Path, ranges: list[tuple[int, int]], workers: int) -> list[bytes]:
    """sha256 of each byte range [start, end) of a file, on `workers` threads."""
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="loraflow-fingerprint") as pool:
        return list(pool.map(lambda span: _range_sha256(file, *span), ranges))


def _range_sha256(file: Path, start: int, end: int) -> bytes:
    """sha256 of the bytes [start, end) of a file."""
    digest = hashlib.sha256()
    buffer = memoryview(bytearray(min(_READ_CHUNK, max(end - start, 1))))
    with open(file, "rb", buffering=0) as f:
        f.seek(start)
        while (left := end - f.tell()) > 0:
            read = f.readinto(buffer[:min(left, len(buffer))])
            if not read:
                raise OSError(f"{file} ended before byte {end}: it changed while being read")
            digest.update(buffer[:read])
    return digest.digest()


def start_base_fingerprint(
    model: "PreTrainedModel", expected: str, stored: "Future[dict[str, bytes]] | None" = None
) -> "Future[str]":
    """Capture the base's tensors now (before the adapter wraps them) and fingerprint them in the
    background; a tensor matching a `stored` digest's header takes it, and a mismatch is rechecked
    on the loaded tensors themselves, so a good base is never refused for how its files store it."""
    inputs = _fingerprint_inputs(model)

    def run() -> str:
        known = stored.result() if stored is not None else {}
        actual = _fingerprint(inputs, known)
        return _fingerprint(inputs) if actual != expected and known else actual

    return in_background(run)


# A quantized base holds packed weights, so its fingerprint is its files': the config without
# `quantization_config` and every tensor as stored (for most bases, the unquantized base's fingerprint).


def _stored_fingerprint(config: bytes, digests: dict[str, bytes]) -> str:
    digest = hashlib.sha256(config)
    for header in sorted(digests, key=lambda h: h.split("|", 1)[0]):
        digest.update(f"\n{header}\n".encode())
        digest.update(digests[header])
    return f"{FINGERPRINT_SCHEME}:{digest.hexdigest()}"


def _unquantized_config(model: "torch.nn.Module") -> bytes:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = {k: v for k, v in _normalized_config(base).items() if k != "quantization_config"}
    return json.dumps(config, sort_keys=True, default=str).encode()


def quantized_base_fingerprint(model: "torch.nn.Module", base: dict[str, Any]) -> str:
    """The fingerprint of a quantized base, from the files its `base` section names.

    Raises:
        MlflowException: the base's safetensors files are not on this machine.
    """
    digests = stored_tensor_digests(local_weight_files(base["name"], base.get("revision")),
                                    workers=os.cpu_count() or 1, cache=_digest_cache_enabled())
    if not digests:
        raise MlflowException(f"cannot fingerprint the quantized base {base.get('name')!r}: its *.safetensors "
                              "files are not on this machine")
    return _stored_fingerprint(_unquantized_config(model), digests)


def start_quantized_fingerprint(model: "torch.nn.Module", stored: "Future[dict[str, bytes]]") -> "Future[str]":
    """`quantized_base_fingerprint` of a loaded base, from the digests of its files (`start_stored_digests`)."""
    config = _unquantized_config(model)  # now, before anything changes the model
    return in_background(lambda: _stored_fingerprint(config, stored.result()))


def check_base(fingerprint: "Future[str]", base: dict[str, Any], where: str) -> None:
    """Wait for the base's fingerprint and refuse a base that is not the one the model recorded."""
    actual = fingerprint.result()
    if actual != base["fingerprint"]:
        raise MlflowException(
            f"base model {where!r} does not match the one the adapter was trained on: its fingerprint "
            f"is {actual}, expected {base['fingerprint']}. Point the model at the original base "
            "weights (same files, same revision), or re-log the model with base_mode='embedded'"
        )


