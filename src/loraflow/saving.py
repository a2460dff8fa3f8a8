"""Saving and logging loraflow models: the writing half of the flavor (`loraflow.flavor` documents
the layout and reads it).

`loraflow.flavor.save_model`, `log_model` and the other public names here are also reachable from
`loraflow.flavor`, where MLflow's flavor API has them. They live in their own module because loading
a model never needs them: a served model neither ships nor compiles this code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Literal

import yaml

import mlflow
from mlflow import pyfunc
from mlflow.models import Model, ModelSignature
from mlflow.models.model import MLMODEL_FILE_NAME
from mlflow.models.utils import _save_example
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
from mlflow.utils.model_utils import _validate_and_copy_code_paths, _validate_and_prepare_target_save_path
from mlflow.utils.requirements_utils import _get_pinned_requirement

from loraflow.flavor import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_SUBPATH,
    ADAPTER_WEIGHTS_FILE,
    BASE_SUBPATH,
    FLAVOR_NAME,
    FLAVOR_VERSION,
    PYFUNC_DEFAULTS,
    TOKENIZER_SUBPATH,
    TRUST_REMOTE_CODE_ENV,
    _file_sha256,
    _invalid,
    base_fingerprint,
)
from loraflow.models import base_kind, resolve_base, resolved_revision

if TYPE_CHECKING:
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

# What an embedded base copies from its directory: config, weights, and any remote code. Never
# pickled `.bin` checkpoints (the model format holds no pickle).
BASE_FILE_PATTERNS = ("config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json", "*.py")

BaseMode = Literal["auto", "embedded", "reference"]


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
    from loraflow.generation import GENERATION_DEFAULTS, generation_settings

    overrides = dict(overrides or {})
    unknown = [k for k in overrides if k not in GENERATION_DEFAULTS]
    if unknown:
        raise _invalid(
            f"`generation_defaults` has unknown keys {unknown}; known: {sorted(GENERATION_DEFAULTS)}"
        )
    defaults = {**GENERATION_DEFAULTS, **overrides}
    generation_settings(defaults, max_new_tokens_cap=max_new_tokens_cap)
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


def default_input_example() -> tuple[list[str], dict[str, Any]]:
    """A small example request; short `max_new_tokens` keeps MLflow's log-time validation quick.

    A list of prompts rather than a DataFrame: `mlflow.pyfunc.load_model` reads the example on
    every load, and a DataFrame example costs ~8 ms there (pandas' JSON reader); a list, 0.1 ms.
    """
    return ["Question: What is LoRA?\nAnswer:"], {"max_new_tokens": 8}


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


# The modules a loaded model imports: the package's `__init__` (which imports nothing eagerly),
# `flavor` and its imports, and `generation` (which `predict` imports on its first call). Only these
# are shipped, not the whole package (saving and training code, caches), so artifacts stay small.
LOADER_MODULES = ("__init__.py", "errors.py", "builtin.py", "models.py", "flavor.py", "generation.py")
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
        generation_defaults: defaults for the generation params (keys of `generation.GENERATION_DEFAULTS`).
        batch_size: how many prompts pyfunc generates together (see `loraflow.generation`).
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
