"""Writing a loraflow model: the adapter, the tokenizer, the base (embedded, logged once or referenced),
the code that loads it, MLmodel and the environment (`layout` describes what is where).

`save_model` runs in MLflow's fixed order: check every argument and that the path can be written,
write the native artifacts, `pyfunc.add_to_model`, `add_flavor`, save MLmodel, write the
requirements. The whole model is written into a temporary sibling folder and renamed into place
when complete (`files.atomic_dir`), so a failed save never leaves half a model at `path`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml

import mlflow
from mlflow import pyfunc as mlflow_pyfunc
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.utils.file_utils import get_total_file_size, write_to

from loraflow.flavor.bases import base_kind, resolve_base
from loraflow.flavor.files import atomic_dir, file_sha256
from loraflow.flavor.fingerprint import STORED_DTYPES_ATTR, base_fingerprint, quantized_base_fingerprint
from loraflow.flavor.layout import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_SUBPATH,
    ADAPTER_WEIGHTS_FILE,
    BASE_SUBPATH,
    FLAVOR_NAME,
    FLAVOR_VERSION,
    TOKENIZER_SUBPATH,
    TRUST_REMOTE_CODE_ENV,
    invalid,
)
from loraflow.flavor.mlflow_private import (
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _get_installed_version,
    _get_pinned_requirement,
    _process_pip_requirements,
    _PythonEnv,
    _save_example,
    _validate_and_copy_code_paths,
    _validate_env_arguments,
)
from loraflow.flavor.pyfunc import PYFUNC_DEFAULTS, pyfunc_config
from loraflow.flavor.signatures import (
    chat_input_example,
    chat_signature,
    default_input_example,
    default_signature,
    validated_generation_defaults,
)
from loraflow.flavor.stored_base import check_base_files, log_base, write_base
from loraflow.flavor.trainable import record_of

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

BaseMode = Literal["auto", "embedded", "logged", "reference"]

PACKAGE_ROOT = Path(__file__).resolve().parents[1]  # src/loraflow

# What every saved model ships under `code/loraflow/`: the modules `mlflow.pyfunc.load_model`,
# `predict` and `mlflow models serve` import, and nothing else (tests/test_structure.py keeps the list
# closed). No `loraflow/__init__.py`: where loraflow is installed, its regular package wins over this
# namespace portion and the installed flavor loads the model; elsewhere these files are the package.
SHIPPED = (
    "flavor/bases.py",
    "flavor/chat.py",
    "flavor/dtypes.py",
    "flavor/files.py",
    "flavor/fingerprint.py",
    "flavor/generation.py",
    "flavor/layout.py",
    "flavor/load.py",
    "flavor/mlflow_private.py",
    "flavor/pyfunc.py",
    "flavor/quantization.py",
    "flavor/switches.py",
)
# ...and, for a referenced built-in base, the recipe that rebuilds it and what the recipe reads.
SHIPPED_FOR_BUILTIN = ("builtin.py", "resources/corpus.txt")


# ---------------------------------------------------------------------------------------------
# Requirements.


def get_default_pip_requirements(quantized: bool = False) -> list[str]:
    """Third-party pins of a saved model (with bitsandbytes for a `quantized` one). `loraflow` itself
    travels as code (`code/loraflow`), see `loraflow.flavor`'s docstring for why."""
    packages = ["mlflow", "torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers"]
    packages += ["bitsandbytes"] if quantized else []
    return [_get_pinned_requirement(p, version=_public_version(p)) for p in packages]


def _public_version(package: str) -> str:
    """The installed version without its local label (`2.13.0+cpu` -> `2.13.0`), as MLflow would
    pin it after warning: a `+cpu` build is not on PyPI, and the pin is ours to write."""
    from packaging.version import InvalidVersion, Version

    installed = _get_installed_version(package)
    try:
        return Version(installed).public
    except InvalidVersion:
        return installed


# ---------------------------------------------------------------------------------------------
# The base section and the code shipped with a model.


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


def _resolve_base_mode(kind: str, base_mode: str, logging: bool = False) -> str:
    """The mode a base is stored in. `auto`: a Hub id is referenced; a local folder or GGUF file is
    logged once to the tracking store when the model is logged, else embedded; a built-in base is
    embedded. A model saved to a local folder has no store to log its base to, so `logged` embeds."""
    if base_mode not in ("auto", "embedded", "logged", "reference"):
        raise invalid(f"`base_mode` must be one of 'auto', 'embedded', 'logged', 'reference', got {base_mode!r}")
    if base_mode == "auto":
        base_mode = "reference" if kind == "hub" else "logged" if kind in ("local", "gguf") else "embedded"
    return "embedded" if base_mode == "logged" and not logging else base_mode


def _base_source_dir(base_model: str, kind: str, revision: str | None) -> Path:
    """The local directory holding the base model's files (for an embedded copy)."""
    if kind != "hub":
        return Path(resolve_base(base_model)).expanduser().resolve()
    from huggingface_hub import snapshot_download

    try:  # the weights are already in the Hub cache: the model in memory was loaded from there
        return Path(snapshot_download(base_model, revision=revision, local_files_only=True))
    except Exception as e:
        raise invalid(
            f"cannot embed base model {base_model!r}@{revision}: its files are not in the local Hub "
            f"cache ({e}). Load it with from_pretrained first, or use base_mode='reference'"
        ) from e


def _base_section(peft_model: "PeftModel", base_model: str, base_mode: str, trust_remote_code: bool,
                  logging: bool = False) -> dict[str, Any]:
    """The `base` section of the flavor config. Checks everything before anything is written.

    A stored base's folder (embedded or logged) is under `source_dir`, which the caller pops."""
    kind = base_kind(base_model)
    mode = _resolve_base_mode(kind, base_mode, logging)
    base = peft_model.get_base_model()
    revision = getattr(base.config, "_commit_hash", None) if kind == "hub" else None  # the exact commit loaded
    if kind == "hub" and revision is None:
        raise invalid(
            f"cannot record base model {base_model!r}: the loaded model has no resolved Hub commit "
            "(`config._commit_hash`). Load it with `from_pretrained` from the Hub, or pass a local "
            "directory as `base_model`"
        )
    section = {
        "mode": mode,
        "kind": kind,
        "name": str(Path(base_model).expanduser().resolve()) if kind in ("local", "gguf") else base_model,
        "revision": revision,
        "dtype": stored_dtype(base),  # as stored, whatever it computed in (`dtypes`)
        "architectures": list(getattr(base.config, "architectures", None) or []),
        "trust_remote_code": bool(trust_remote_code),
    }
    # a quantized base's fingerprint is its files' (it holds packed weights): see `fingerprint`
    section["fingerprint"] = quantized_base_fingerprint(base, section) if record_of(base) else base_fingerprint(base)
    if mode == "embedded":
        section["path"] = BASE_SUBPATH
    if mode in ("embedded", "logged") and kind != "gguf":  # a GGUF base is written from memory (`write_base`)
        section["source_dir"] = str(_base_source_dir(base_model, kind, revision))
    return section


def _stage_code(staging: Path, builtin_reference: bool) -> str:
    """Copy the code a loaded model runs (`SHIPPED`, and `SHIPPED_FOR_BUILTIN` for a referenced
    built-in base) into `staging/loraflow`; return that folder (for `code_paths`)."""
    package = staging / "loraflow"
    for name in (*SHIPPED, *(SHIPPED_FOR_BUILTIN if builtin_reference else ())):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_ROOT / name, package / name)
    return str(package)


def stored_dtype(model: "torch.nn.Module") -> str:
    """The dtype the base's weights were loaded in (before `fingerprint.convert_base`), by torch name."""
    remembered = getattr(model, STORED_DTYPES_ATTR, None)
    if remembered:
        floating = [d for d in remembered.values() if d.is_floating_point]
        if floating:
            return str(max(set(floating), key=floating.count)).removeprefix("torch.")
    return str(model.dtype).removeprefix("torch.")


@contextlib.contextmanager
def temporary_env(name: str, value: str | None) -> Iterator[None]:
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
# Saving.


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
    chat_template: str | None = None,
    validate_serving_input: bool = True,
    base_section: dict[str, Any] | None = None,
) -> None:
    """`loraflow.flavor.save_model`, documented there (its signature is this one: a test keeps them equal)."""
    _validate_env_arguments(None, pip_requirements, extra_pip_requirements)
    _check_model(peft_model, trust_remote_code)
    model_config = pyfunc_config({"batch_size": batch_size, "max_new_tokens_cap": max_new_tokens_cap})
    generation_defaults = validated_generation_defaults(generation_defaults, max_new_tokens_cap)
    if base_section is None:
        base_section = _base_section(peft_model, _base_name(peft_model, base_model), base_mode, trust_remote_code)
    base_section = dict(base_section)
    source_dir = base_section.pop("source_dir", None)
    if source_dir is not None:
        check_base_files(Path(source_dir))
    path = Path(os.path.abspath(path))
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise invalid(f"Path '{path}' already exists and is not empty")
    tokenizer = _with_chat_template(tokenizer, chat_template)
    with atomic_dir(path) as tmp:
        code = _write_artifacts(tmp, peft_model, tokenizer, source_dir, base_section, code_paths)
        mlflow_model = mlflow_model or Model()
        if signature is None and chat_template is not None:
            signature = chat_signature()
            input_example = chat_input_example() if input_example is None else input_example
        elif signature is None:
            signature = default_signature(generation_defaults, max_new_tokens_cap)
            input_example = default_input_example() if input_example is None else input_example
        _save_example(mlflow_model, input_example, str(tmp))
        mlflow_model.signature = signature
        if metadata is not None:
            mlflow_model.metadata = metadata
        mlflow_pyfunc.add_to_model(mlflow_model, loader_module="loraflow.flavor.pyfunc", code=code,
                                   conda_env=_CONDA_ENV_FILE_NAME, python_env=_PYTHON_ENV_FILE_NAME,
                                   model_config=model_config)
        conf = _flavor_conf(tmp, peft_model, base_section, generation_defaults, code)
        mlflow_model.add_flavor(FLAVOR_NAME, **conf, **_task_conf(tokenizer, chat_template))
        if size := get_total_file_size(str(tmp)):
            mlflow_model.model_size_bytes = size
        mlflow_model.save(str(tmp / MLMODEL_FILE_NAME))
        _write_environment(tmp, pip_requirements, extra_pip_requirements, quantized="quantization" in conf)


def _base_name(peft_model: "PeftModel", base_model: str | None) -> str:
    """`base_model`, or else the adapter config's `base_model_name_or_path`."""
    base_model = base_model or peft_model.peft_config[peft_model.active_adapter].base_model_name_or_path
    if not base_model:
        raise invalid("`base_model` is unknown: pass it, e.g. base_model='builtin:tiny'")
    return base_model


def _with_chat_template(tokenizer: "PreTrainedTokenizerBase", chat_template: str | None) -> "PreTrainedTokenizerBase":
    """The tokenizer to save: for a chat model, a copy carrying the template training used."""
    import copy

    if chat_template is None:
        return tokenizer
    if not isinstance(chat_template, str) or not chat_template.strip():
        raise invalid(f"`chat_template` must be the text of a chat template, got {chat_template!r}")
    saved = copy.copy(tokenizer)  # the caller's tokenizer keeps its own template
    saved.chat_template = chat_template
    return saved


def _task_conf(tokenizer: "PreTrainedTokenizerBase", chat_template: str | None) -> dict[str, Any]:
    """The flavor config's `task`, and for a chat model the tokens that end a reply."""
    if chat_template is None:
        return {"task": "completion"}
    from loraflow.flavor.chat import end_of_turn_ids, end_of_turn_text

    return {"task": "chat", "chat": {"end_of_turn_ids": end_of_turn_ids(tokenizer, chat_template),
                                     "end_of_turn_text": end_of_turn_text(tokenizer, chat_template)}}


def _check_model(peft_model: Any, trust_remote_code: Any) -> None:
    import peft

    if not isinstance(peft_model, peft.PeftModel):
        raise invalid(f"`peft_model` must be a peft.PeftModel, got {type(peft_model).__name__}")
    if len(peft_model.peft_config) != 1:
        raise invalid(
            f"`peft_model` has {len(peft_model.peft_config)} adapters {sorted(peft_model.peft_config)}; "
            "save one adapter per model (delete the others with `delete_adapter`)"
        )
    if not isinstance(trust_remote_code, bool):
        raise invalid(f"`trust_remote_code` must be True or False, got {trust_remote_code!r}")


def _write_artifacts(path: Path, peft_model: "PeftModel", tokenizer: "PreTrainedTokenizerBase",
                     source_dir: str | None, base_section: dict[str, Any], code_paths: list[str] | None) -> str:
    """The native artifacts (adapter, tokenizer, an embedded base) and the shipped code; returns the
    code's subpath."""
    import tempfile

    peft_model.save_pretrained(str(path / ADAPTER_SUBPATH), safe_serialization=True)
    tokenizer.save_pretrained(str(path / TOKENIZER_SUBPATH))
    if base_section["mode"] == "embedded":
        write_base(peft_model, source_dir, path / BASE_SUBPATH)
    # a referenced builtin base is rebuilt on load, from the recipe and its resources
    builtin_reference = base_section["kind"] == "builtin" and base_section["mode"] == "reference"
    with tempfile.TemporaryDirectory(prefix="loraflow-code-") as staging:
        shipped = _stage_code(Path(staging), builtin_reference)
        return _validate_and_copy_code_paths([*(code_paths or []), shipped], str(path))


def _flavor_conf(path: Path, peft_model: "PeftModel", base_section: dict[str, Any],
                 generation_defaults: dict[str, Any], code: str) -> dict[str, Any]:
    """The loraflow flavor configuration recorded in MLmodel."""
    import peft
    import torch
    import transformers

    from loraflow import __version__ as loraflow_version

    adapter_dir = path / ADAPTER_SUBPATH
    # a quantized base is saved unquantized and quantized again at load, as this record says
    quantization = record_of(peft_model.get_base_model())
    return {
        "flavor_version": FLAVOR_VERSION,
        "loraflow_version": loraflow_version,
        "peft_version": str(peft.__version__),
        "transformers_version": str(transformers.__version__),
        "torch_version": str(torch.__version__),
        "adapter": ADAPTER_SUBPATH,
        "adapter_sha256": {name: file_sha256(adapter_dir / name) for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE)},
        "tokenizer": TOKENIZER_SUBPATH,
        "lora": _lora_settings(peft_model),
        "base": base_section,
        "generation_defaults": generation_defaults,
        "code": code,
        **({"quantization": quantization} if quantization else {}),
    }


def _write_environment(path: Path, pip_requirements: Any, extra_pip_requirements: Any, quantized: bool) -> None:
    """conda.yaml, requirements.txt, constraints and python_env.yaml.

    Requirements are not inferred by loading the model in a subprocess (as some MLflow flavors do):
    the defaults cover every import, and inference costs a model load.
    """
    default_reqs = None if pip_requirements is not None else get_default_pip_requirements(quantized)
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
    chat_template: str | None = None,
    validate_serving_input: bool = True,
    **kwargs: Any,
) -> "mlflow.models.model.ModelInfo":
    """`loraflow.flavor.log_model`, documented there (its signature is this one: a test keeps them equal)."""
    import loraflow.flavor

    _check_model(peft_model, trust_remote_code)
    base_section = _base_section(peft_model, _base_name(peft_model, base_model), base_mode, trust_remote_code,
                                 logging=True)
    if base_section["mode"] == "logged":  # before the model, so that a failure leaves no model without its base
        source_dir = base_section.pop("source_dir", None)
        if source_dir is not None:
            check_base_files(Path(source_dir))
        base_section.update(log_base(peft_model, base_section, source_dir))
    # MLflow checks the input example by loading the logged model through pyfunc in this process;
    # the caller's permission for this model covers that load (and only for this call).
    with temporary_env(TRUST_REMOTE_CODE_ENV, "1" if trust_remote_code else None):
        return Model.log(
            artifact_path=None,
            name=name,
            flavor=loraflow.flavor,
            registered_model_name=registered_model_name,
            metadata=metadata,
            peft_model=peft_model,
            tokenizer=tokenizer,
            base_section=base_section,
            signature=signature,
            input_example=input_example,
            pip_requirements=pip_requirements,
            extra_pip_requirements=extra_pip_requirements,
            code_paths=code_paths,
            generation_defaults=generation_defaults,
            batch_size=batch_size,
            max_new_tokens_cap=max_new_tokens_cap,
            trust_remote_code=trust_remote_code,
            chat_template=chat_template,
            validate_serving_input=validate_serving_input,
            **kwargs,
        )
