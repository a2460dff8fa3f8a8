"""Loading a saved loraflow model as a `PeftModel`: the base, the adapter and the tokenizer, each checked.

The flavor configuration is read and the remote-code gate passed before any code can run. The
adapter's files and the base's stored tensors are hashed while the base loads (`fingerprint`), and
nothing is returned before both match what was recorded: a mismatch raises an `MlflowException`
naming both fingerprints instead of silently changing outputs.

Remote code (a base config's `auto_map`) runs only where the model recorded it and the loader
allows it again: an artifact is data and cannot grant itself code execution (docs/flavor.md).
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_DOES_NOT_EXIST

from loraflow.flavor import fingerprint
from loraflow.flavor.bases import NeedsRemoteCode, load_base_model, load_tokenizer, peft_wrapping
from loraflow.flavor.dtypes import serving_dtype
from loraflow.flavor.files import atomic_dir, file_sha256
from loraflow.flavor.layout import (
    ADAPTER_WEIGHTS_FILE,
    BASE_ARTIFACT,
    TRUST_REMOTE_CODE_ENV,
    cache_root,
    env_flag,
    invalid,
    read_flavor_conf,
)
from loraflow.flavor.mlflow_private import _add_code_from_conf_to_system_path
from loraflow.flavor.quantization import dequantizing, keep_trainable_layout
from loraflow.flavor.quantization import load_kwargs as quantization_load_kwargs

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


class LoadedModel(NamedTuple):
    """What `load_model` returns: unpack it as `model, tokenizer = load_model(uri)`."""

    model: "PeftModel"
    """The base model with the adapter applied."""
    tokenizer: "PreTrainedTokenizerBase"
    """The tokenizer saved with the model (a pad token is guaranteed)."""


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
        if (actual := file_sha256(file)) != expected:
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
        trust_remote_code = env_flag(TRUST_REMOTE_CODE_ENV, default=False)
    if not trust_remote_code:
        raise MlflowException(
            f"the model at {str(path)!r} was trained with trust_remote_code=True: its base model "
            f"{base.get('name')!r} runs Python code shipped with it. Loading it runs that code, so allow "
            f"it explicitly: `loraflow.flavor.load_model(uri, trust_remote_code=True)`, or set "
            f"{TRUST_REMOTE_CODE_ENV}=1 for `mlflow.pyfunc.load_model` and `mlflow models serve`",
            INVALID_PARAMETER_VALUE,
        )
    return True


def _load_base(path: Path, base: dict[str, Any], trust_remote_code: bool = False,
               quantization: dict[str, Any] | None = None, device: Any = None) -> tuple["PreTrainedModel", str]:
    """Load the base as stored (quantized as `quantization` says, on `device`); return it and where
    it came from (for messages). Its fingerprint is checked by the caller."""
    if base["mode"] == "embedded":
        source, revision = str(path / base["path"]), None
    else:
        source, revision = base["name"], base.get("revision")
    where = f"{source}@{revision}" if revision else source
    try:
        quantized = quantization_load_kwargs(quantization, device) if quantization else {}
    except ImportError as e:
        raise MlflowException(f"the model at {str(path)!r} was trained on a quantized base: loading it as it was "
                              f"trained needs {e}; or load it unquantized with `load_model(uri, quantization='none')` "
                              "(outputs change slightly)", INVALID_PARAMETER_VALUE) from e
    try:
        # in eval mode: `from_pretrained` sets it
        model = load_base_model(source, revision=revision, dtype=base["dtype"], trust_remote_code=trust_remote_code,
                                **quantized)
    except NeedsRemoteCode as e:
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


def _apply_adapter(base: "PreTrainedModel", adapter_dir: Path, is_trainable: bool) -> "PeftModel":
    from peft import PeftModel

    try:
        with peft_wrapping():
            return PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=is_trainable)
    except Exception as e:
        raise MlflowException(f"cannot load the adapter from {str(adapter_dir / ADAPTER_WEIGHTS_FILE)!r}: {e}") from e


def load_local(
    path: Path,
    *,
    is_trainable: bool = False,
    device: "str | torch.device | None" = None,
    dtype: "torch.dtype | str | None" = None,
    trust_remote_code: bool | None = None,
    conf: dict[str, Any] | None = None,
    quantization: str | None = None,
    dequantize: bool = False,
) -> LoadedModel:
    """Load the model saved in the local folder `path` (see `load_model`); `conf`: its flavor
    configuration, when the caller read it already. `dequantize`: a quantized base is quantized as
    recorded, then dequantized (in fp32) before the adapter is applied (what a merge starts from)."""
    import torch

    conf = conf or read_flavor_conf(path)
    record = _quantization(conf, quantization, dtype)
    # where it computes: `device`, else the CPU (a quantized base: the first GPU, else the CPU; `load_kwargs`)
    placed = device or ("cuda" if record and torch.cuda.is_available() else "cpu")
    compute_dtype = _compute_dtype(dtype, placed)  # a bad name is refused before anything loads
    if record and "compute_dtype" in record:  # 4-bit: computes in the device's dtype too, whatever it trained in
        record = {**record, "compute_dtype": compute_dtype}
    allowed = _remote_code_allowed(path, conf["base"], trust_remote_code)  # before any code can run
    _add_code_from_conf_to_system_path(str(path), conf)
    fingerprint.check_scheme(conf["base"]["fingerprint"])
    conf = {**conf, "base": localized(conf["base"])}  # a logged base: its local copy, downloaded once
    adapter_dir = path / conf["adapter"]
    adapter_files = _adapter_files(adapter_dir, conf)
    adapter_checked = fingerprint.in_background(lambda: _verify_adapter_files(adapter_files))
    stored = fingerprint.start_stored_digests(path, conf["base"])
    try:
        base, where = _load_base(path, conf["base"], allowed, record, device)
    except Exception:
        adapter_checked.result()  # a corrupt artifact explains a failure best
        raise
    if conf.get("quantization"):  # a quantized base's fingerprint is its files' (`fingerprint`)
        base_checked = fingerprint.start_quantized_fingerprint(base, stored)
    else:
        base_checked = fingerprint.start_base_fingerprint(base, conf["base"]["fingerprint"], stored)
    if not record:  # after the fingerprint captured the tensors as stored
        fingerprint.convert_base(base, compute_dtype)
    base = _for_use(base, record, is_trainable, dequantize)
    adapter_checked.result()  # before peft reads the adapter, so its errors never come first
    try:
        model = _apply_adapter(base, adapter_dir, is_trainable)
        tokenizer = load_tokenizer(str(path / conf["tokenizer"]), trust_remote_code=allowed)
    except Exception:
        fingerprint.check_base(base_checked, conf["base"], where)  # a different base explains a failure best
        raise
    fingerprint.check_base(base_checked, conf["base"], where)
    if dtype is not None and dtype != "auto":  # asked for: the adapter too
        model.to(dtype=getattr(torch, compute_dtype))
    if device is not None and not (record and not dequantize) and not _on_device(model, torch.device(device)):
        model.to(device)  # walks every module even when nothing moves: skipped then
    return LoadedModel(model, tokenizer)


def _compute_dtype(dtype: Any, device: Any) -> str:
    """The dtype the base computes in: `dtype` when given, else the policy's for `device` (`dtypes`).

    Raises:
        MlflowException: an unknown dtype.
    """
    try:
        return serving_dtype(dtype, device)
    except ValueError as e:
        raise invalid(str(e)) from e


def _quantization(conf: dict[str, Any], quantization: str | None, dtype: Any) -> dict[str, Any] | None:
    """The quantization to load with: as recorded (None), or none (`"none"`: the unquantized base).

    Raises:
        MlflowException: another value, or a `dtype` cast asked of a quantized model.
    """
    if quantization not in (None, "none"):
        raise invalid(f"`quantization` must be None (as the model was trained) or 'none' (the unquantized base), "
                      f"got {quantization!r}")
    record = conf.get("quantization") if quantization is None else None
    if record and dtype not in (None, "auto"):
        raise invalid(f"`dtype` {dtype!r} cannot be set on a model trained on a {record['method']}-quantized base: "
                      "drop it, or pass quantization='none' to load the unquantized base in that dtype")
    return record


def _for_use(base: "PreTrainedModel", record: dict[str, Any] | None, is_trainable: bool,
             dequantize: bool) -> "PreTrainedModel":
    """A quantized base prepared for training (peft's recipe) or dequantized in fp32 for a merge."""
    import torch

    if record and dequantize:
        with dequantizing():
            base = base.dequantize(dtype=torch.float32)
    elif record and is_trainable:
        from loraflow.flavor.trainable import prepare_for_training  # training's: never a pyfunc load's

        base = prepare_for_training(base)
    elif record:
        keep_trainable_layout(base)  # computes as in training (see there)
    return base


def _on_device(model: "torch.nn.Module", device: "torch.device") -> bool:
    """Whether every parameter and buffer is already on `device` (`cuda` matches `cuda:<current>`)."""
    import torch

    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return all(t.device == device for t in itertools.chain(model.parameters(), model.buffers()))


def localized(base: dict[str, Any]) -> dict[str, Any]:
    """The `base` record of a model with a logged base, pointing at a local copy of it (downloaded
    once per machine); other records unchanged.

    Raises:
        MlflowException: the base cannot be downloaded from either recorded location.
    """
    if base.get("mode") != "logged":
        return base
    target = cache_root() / "bases" / str(base["fingerprint"]).split(":")[-1]
    if not (target / BASE_ARTIFACT).is_dir():
        _download(base, target)
    return {**base, "kind": "local", "name": str(target / BASE_ARTIFACT), "revision": None}


def _download(base: dict[str, Any], target: Path) -> None:
    from mlflow.artifacts import download_artifacts
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST

    errors = []
    for uri in dict.fromkeys((base["uri"], base.get("artifact_uri"))):
        if not uri:
            continue
        try:
            with atomic_dir(target) as tmp:  # both URIs end in BASE_ARTIFACT: it lands in tmp/BASE_ARTIFACT
                download_artifacts(artifact_uri=uri, dst_path=str(tmp))
            return
        except FileExistsError:  # another process downloaded it meanwhile
            return
        except Exception as e:
            errors.append(f"{uri}: {' '.join(str(e).split())}")  # one line, whatever MLflow wrote
    raise MlflowException(
        f"the model's base is logged at {base['uri']} and could not be downloaded: point MLFLOW_TRACKING_URI at "
        "the tracking server the model was logged to, or re-log the model with base_mode='embedded' "
        f"(fingerprint {base['fingerprint']}; {'; '.join(errors)})",  # the fix first: a command cuts long messages
        RESOURCE_DOES_NOT_EXIST,  # the user's to fix: a command reports it as such, not as a bug
    )


def device_problem(device: Any) -> str | None:
    """Why `device` cannot hold a model on this machine (naming the devices that exist), or None."""
    import torch

    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as err:
        return f"`device` {device!r} is not a torch device ({err}); use e.g. 'cpu' or 'cuda:0'"
    available = ["cpu"]
    if torch.cuda.is_available():
        available += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if wanted.type == "cpu" or (wanted.type == "cuda" and torch.cuda.is_available()
                                and (wanted.index or 0) < torch.cuda.device_count()):
        return None
    return f"`device` {device!r} does not exist on this machine; devices here: {', '.join(available)}"
