"""Base models and their sources: the built-in base, a local folder, a GGUF file or a Hub id.

One loader for training and serving (`load_base_model`, `load_tokenizer`), so a model is served on
a base loaded as the one it was trained on (its fingerprint depends on that). `builtin:<name>` is
built from code on first use and cached in `$LORAFLOW_HOME/<name>-v<version>`; a `*.gguf` file is
dequantized into the dtype asked for; anything else not a folder is a Hub id, read from transformers'
cache. Code shipped with a base (`auto_map`) runs only when the caller allows it; otherwise
transformers' refusal becomes `NeedsRemoteCode`.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.flavor.files import atomic_dir
from loraflow.flavor.layout import BUILTIN_PREFIX, cache_root
from loraflow.flavor.switches import enabled

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase


class NeedsRemoteCode(Exception):
    """The model ships its own Python code, and `trust_remote_code` is False."""


class UnknownBuiltin(ValueError):
    """A `builtin:` name that loraflow does not know."""


class BadGguf(ValueError):
    """A GGUF base that cannot be loaded: missing, damaged, or of an architecture transformers cannot read."""


def is_builtin(name: str) -> bool:
    """True for names such as `builtin:tiny`."""
    return name.startswith(BUILTIN_PREFIX)


def is_gguf(name_or_path: str) -> bool:
    """True for a path to a GGUF file (`*.gguf`, llama.cpp's and Ollama's format)."""
    return not is_builtin(name_or_path) and name_or_path.lower().endswith(".gguf")


def base_kind(name_or_path: str) -> str:
    """`"builtin"`, `"gguf"` (a `*.gguf` file), `"local"` (an existing directory) or `"hub"` (anything else)."""
    if is_builtin(name_or_path):
        return "builtin"
    if is_gguf(name_or_path):
        return "gguf"
    return "local" if Path(os.path.expanduser(name_or_path)).is_dir() else "hub"


def gguf_location(name_or_path: str) -> dict[str, str]:
    """`from_pretrained` arguments for a GGUF file: its folder, and `gguf_file` (its name).

    Raises:
        BadGguf: the file does not exist.
    """
    path = Path(os.path.expanduser(name_or_path)).resolve()
    if not path.is_file():
        raise BadGguf(f"{name_or_path!r} is not a file: give the path of an existing .gguf file")
    return {"pretrained_model_name_or_path": str(path.parent), "gguf_file": path.name}


def gguf_config(name_or_path: str) -> "PretrainedConfig":
    """The model config a GGUF file's metadata holds, parsed once per file version in a process (it
    parses the whole vocabulary too); each caller gets its own copy.

    Raises:
        BadGguf: the file does not exist, or is not a GGUF transformers can read.
    """
    import copy

    location = gguf_location(name_or_path)
    stat = (Path(location["pretrained_model_name_or_path"]) / location["gguf_file"]).stat()
    key = (location["pretrained_model_name_or_path"], location["gguf_file"], stat.st_size, stat.st_mtime_ns)
    if key not in _GGUF_CONFIGS:
        from transformers import AutoConfig

        with gguf_errors(name_or_path):
            _GGUF_CONFIGS[key] = AutoConfig.from_pretrained(**location)
    return copy.deepcopy(_GGUF_CONFIGS[key])


_GGUF_CONFIGS: dict[tuple, "PretrainedConfig"] = {}


@contextlib.contextmanager
def gguf_errors(name_or_path: str) -> Iterator[None]:
    """Turn failures to read a GGUF file into one `BadGguf` naming the file and the problem."""
    import re

    try:
        yield
    except BadGguf:
        raise
    except ImportError as err:
        raise BadGguf(f"{name_or_path!r} is a GGUF file, which needs the `gguf` package: "
                      "pip install 'loraflow[gguf]'") from err
    except Exception as err:  # the reader raises ValueError, struct/numpy errors or KeyError on a bad file
        text = str(err)
        if match := re.search(r"architecture (\S+) is not supported", text):
            raise BadGguf(f"{name_or_path!r} is a GGUF model of architecture {match.group(1)!r}, which "
                          "transformers cannot read; use a GGUF of a supported architecture (llama, mistral, "
                          "qwen2, gemma, phi3, ...) or the model's Hugging Face folder") from err
        raise BadGguf(f"{name_or_path!r} cannot be read as a GGUF file ({type(err).__name__}: "
                      f"{text[:200]}): it is truncated or corrupt; download it again") from err


def _load_gguf_model(name_or_path: str, dtype: Any, kwargs: dict[str, Any]) -> "PreTrainedModel":
    """A GGUF base dequantized into `dtype` (default fp32), unmarked as quantized (its weights are
    ordinary tensors; the mark would forbid casting and saving it)."""
    from transformers import AutoModelForCausalLM

    kwargs = {k: v for k, v in kwargs.items() if k != "revision"}
    kwargs["dtype"] = dtype or "float32"
    config = gguf_config(name_or_path)
    with gguf_errors(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(**gguf_location(name_or_path), config=config, **kwargs)
    model.hf_quantizer = None
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    model.config.name_or_path = model.name_or_path = str(Path(os.path.expanduser(name_or_path)).resolve())
    return model


def resolve_base(name_or_path: str) -> str:
    """What `from_pretrained` takes for a base: a built-in base's cached folder (built on first use);
    a local path or a Hub id unchanged.

    Raises:
        UnknownBuiltin: an unknown `builtin:` name, listing the known ones.
    """
    return str(builtin_dir(name_or_path)) if is_builtin(name_or_path) else name_or_path


def builtin_dir(name: str) -> Path:
    """The cached folder of a built-in base, built on first use (a few seconds to a minute).

    Raises:
        UnknownBuiltin: an unknown name, listing the known ones.
    """
    from loraflow import builtin

    short = name.removeprefix(BUILTIN_PREFIX)
    if short not in builtin.BUILTIN_NAMES:
        known = ", ".join(BUILTIN_PREFIX + n for n in builtin.BUILTIN_NAMES)
        raise UnknownBuiltin(f"{name!r} is not a built-in base model; known: {known}")
    target = cache_root() / f"{short}-v{builtin.BUILD_VERSION}"
    if not (target / "config.json").exists():
        from filelock import FileLock

        target.parent.mkdir(parents=True, exist_ok=True)
        # one build at a time: processes that start together (torchrun's) wait for the first one's
        with FileLock(target.parent / f".{target.name}.lock"):
            if not (target / "config.json").exists():
                with atomic_dir(target) as tmp:
                    builtin.build(short, tmp)
    return target


@contextlib.contextmanager
def remote_code_refused(name_or_path: str) -> Iterator[None]:
    """Turn transformers' "needs custom code" refusal (a bare ValueError) into `NeedsRemoteCode`."""
    try:
        yield
    except ValueError as err:
        if "trust_remote_code=True" not in str(err):
            raise
        raise NeedsRemoteCode(f"{name_or_path!r} ships its own Python code (`auto_map` in its config)") from err


def load_base_model(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: "torch.dtype | str | None" = None,
    trust_remote_code: bool = False,
    **from_pretrained: Any,
) -> "PreTrainedModel":
    """Load a causal LM through `AutoModelForCausalLM`, exactly as a user would (in eval mode).

    Args:
        name_or_path: `builtin:tiny`, a local directory, a `*.gguf` file, or a Hub id.
        revision: a Hub branch, tag or commit hash.
        dtype: torch dtype (or its name) to load the weights in; default: as saved, else fp32 (a
            GGUF file: dequantized into it, default fp32).
        trust_remote_code: run code shipped with the model. Off unless the user asks.
        from_pretrained: more keyword arguments for `from_pretrained` (e.g. `quantization_config`).

    Raises:
        NeedsRemoteCode: the model needs remote code and `trust_remote_code` is False.
        UnknownBuiltin: an unknown `builtin:` name.
        BadGguf: a GGUF file that is missing, damaged, or of an architecture transformers cannot read.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": bool(trust_remote_code), **from_pretrained}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if is_gguf(name_or_path):
        return _load_gguf_model(name_or_path, kwargs.pop("dtype", None), kwargs)
    with remote_code_refused(name_or_path):
        if "quantization_config" in kwargs and enabled("pread_load"):
            model = _load_quantized(name_or_path, kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(resolve_base(name_or_path), **kwargs)
    if base_kind(name_or_path) == "hub" and getattr(model.config, "_commit_hash", None) is None:
        model.config._commit_hash = _cached_commit(name_or_path, revision)
    return model


def _load_quantized(name_or_path: str, kwargs: dict[str, Any]) -> "PreTrainedModel":
    """`from_pretrained` for a base quantized as it loads, reading its safetensors files with `pread`,
    so each stored tensor lives only while it is quantized (a mapped file stays resident to the end
    of the load: benchmarks/bench_qlora.py). A base not local, with its own code or not in
    safetensors loads as usual, as every base does with the `pread_load` switch off.
    """
    from safetensors import safe_open
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM, GenerationConfig

    from loraflow.flavor.quantization import own_unquantized_tensors

    source = resolve_base(name_or_path)
    hub = {"revision": kwargs.get("revision"), "trust_remote_code": kwargs["trust_remote_code"]}
    files = local_weight_files(name_or_path, kwargs.get("revision"))
    config = AutoConfig.from_pretrained(source, **hub) if files else None
    model_class = None if config is None or getattr(config, "auto_map", None) else (
        MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None))
    if not isinstance(model_class, type) or getattr(model_class, "config_class", None) is not type(config):
        return own_unquantized_tensors(AutoModelForCausalLM.from_pretrained(source, **kwargs))
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(safe_open(str(f), framework="pt", device="cpu", backend="pread"))
                   for f in files]
        state = {name: reader.get_slice(name) for reader in readers for name in reader.keys()}
        rest = {k: v for k, v in kwargs.items() if k not in hub}
        model = model_class.from_pretrained(None, config=config, state_dict=state, **rest)
    model.config.name_or_path = model.name_or_path = source  # as `from_pretrained(source)` records them
    with contextlib.suppress(OSError):  # a base saved without one keeps the config's defaults
        model.generation_config = GenerationConfig.from_pretrained(source, revision=hub["revision"])
    return model


def local_weight_files(name_or_path: str, revision: str | None = None) -> list[Path]:
    """The safetensors files `from_pretrained` reads for a base, as far as they are on this machine
    now (a Hub base's from the local HF cache); empty when it has none here."""
    import json

    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

    if is_gguf(name_or_path):
        return []  # not safetensors: its tensors are hashed as loaded
    if base_kind(name_or_path) != "hub":
        root = Path(os.path.expanduser(resolve_base(name_or_path)))

        def locate(name: str) -> Path | None:
            return root / name
    else:
        from huggingface_hub import try_to_load_from_cache

        def locate(name: str) -> Path | None:
            try:
                found = try_to_load_from_cache(name_or_path, name, revision=revision)
            except ValueError:  # not a valid repo id either (a local base that is gone)
                return None
            return Path(found) if isinstance(found, str) else None

    index = locate(SAFE_WEIGHTS_INDEX_NAME)
    if index is not None and index.is_file():
        files = [locate(shard) for shard in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    else:
        files = [locate(SAFE_WEIGHTS_NAME)]
    found = [file for file in files if file is not None and file.is_file()]
    return found if len(found) == len(files) else []


def load_tokenizer(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> "PreTrainedTokenizerBase":
    """Load a tokenizer (a base's, or one saved with a model), with a pad token guaranteed.

    Raises:
        NeedsRemoteCode: the tokenizer needs remote code and `trust_remote_code` is False.
        BadGguf: a GGUF file that cannot be read.
    """
    from transformers import AutoTokenizer

    if is_gguf(name_or_path):
        with gguf_errors(name_or_path):
            tokenizer = AutoTokenizer.from_pretrained(**gguf_location(name_or_path))
    else:
        with remote_code_refused(name_or_path):
            tokenizer = AutoTokenizer.from_pretrained(
                resolve_base(name_or_path), revision=revision, trust_remote_code=bool(trust_remote_code)
            )
    if tokenizer.pad_token is None:  # batching needs one; EOS is what generation pads with anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub download resolved to, from the HF cache path of its config.json
    (transformers 5 does not always set `config._commit_hash`)."""
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return extract_commit_hash(cached, None) if isinstance(cached, str) else None


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around wrapping a model with peft: ignore the FutureWarning of transformers' deprecated
    `is_gradient_checkpointing`, which peft 0.21 reads (only that one)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated",
                                category=FutureWarning, module=r"transformers\.modeling_utils")
        yield
