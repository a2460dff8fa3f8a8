"""Resolve and load base models: the built-in default, a local path, or any Hugging Face Hub id."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.builtin import builtin_path, is_builtin
from loraflow.errors import ConfigError

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_BASE_MODEL = "builtin:tiny"


def resolve_base(name_or_path: str) -> str:
    """Turn a base-model reference into what `from_pretrained` takes.

    `builtin:*` becomes its cached local directory (built on first use); a local path or a Hub
    id is returned unchanged.
    """
    return str(builtin_path(name_or_path)) if is_builtin(name_or_path) else name_or_path


def base_kind(name_or_path: str) -> str:
    """`"builtin"`, `"local"` (an existing directory) or `"hub"` (anything else)."""
    if is_builtin(name_or_path):
        return "builtin"
    return "local" if Path(os.path.expanduser(name_or_path)).is_dir() else "hub"


@contextlib.contextmanager
def remote_code_refused(name_or_path: str) -> Iterator[None]:
    """Turn transformers' "needs custom code" refusal into an error naming the model and the option.

    transformers raises a bare ValueError ("...contains custom code which must be executed...
    pass the argument `trust_remote_code=True`") when a config's `auto_map` points at code shipped
    with the model and `trust_remote_code` is False.

    Raises:
        ConfigError: the model needs remote code that was not allowed.
    """
    try:
        yield
    except ValueError as err:
        if "trust_remote_code=True" not in str(err):
            raise
        raise ConfigError(
            f"`base_model` {name_or_path!r} ships its own Python code (`auto_map` in its config), which "
            "loraflow runs only when you allow it: pass --trust-remote-code (`trust_remote_code: true`) "
            "after reading that code"
        ) from err


def load_config(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """Load only `config.json` (no weights).

    Raises:
        ConfigError: the config needs remote code and `trust_remote_code` is False.
    """
    from transformers import AutoConfig

    # bool(): transformers *prompts on stdin* when trust_remote_code is None and the model has code.
    with remote_code_refused(name_or_path):
        return AutoConfig.from_pretrained(
            resolve_base(name_or_path), revision=revision, trust_remote_code=bool(trust_remote_code)
        )


def load_skeleton(name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False):
    """Build the model's module tree on the meta device from its config: no weights, no memory.

    Used to check target module names against a large model in well under a second.
    """
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = load_config(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
    with remote_code_refused(name_or_path), init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=bool(trust_remote_code))
    skeleton.tie_weights()  # as from_pretrained does, so tied matrices are counted once
    return skeleton


def load_base_model(
    name_or_path: str,
    *,
    revision: str | None = None,
    dtype: "torch.dtype | str | None" = None,
    device: "str | torch.device | None" = None,
    trust_remote_code: bool = False,
) -> "PreTrainedModel":
    """Load a causal LM through `AutoModelForCausalLM`, exactly as a user would.

    Args:
        name_or_path: `builtin:tiny`, a local directory, or a Hub id.
        revision: a Hub branch, tag or commit hash.
        dtype: torch dtype (or its name) to load the weights in; default: as saved, else fp32.
        device: where to put the model; default: stays on the CPU.
        trust_remote_code: run code shipped with the model. Off unless the user asks.

    Raises:
        ConfigError: the model needs remote code and `trust_remote_code` is False.
    """
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": bool(trust_remote_code)}
    if dtype is not None:
        kwargs["dtype"] = dtype
    with remote_code_refused(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(resolve_base(name_or_path), **kwargs)
    if base_kind(name_or_path) == "hub" and getattr(model.config, "_commit_hash", None) is None:
        model.config._commit_hash = _cached_commit(name_or_path, revision)
    if device is not None:
        model.to(device)
    return model


def load_tokenizer(
    name_or_path: str, *, revision: str | None = None, trust_remote_code: bool = False
) -> "PreTrainedTokenizerBase":
    """Load the base model's tokenizer, with a pad token guaranteed (falls back to EOS)."""
    from transformers import AutoTokenizer

    with remote_code_refused(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(
            resolve_base(name_or_path), revision=revision, trust_remote_code=bool(trust_remote_code)
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _cached_commit(repo_id: str, revision: str | None) -> str | None:
    """The commit a Hub download resolved to, read back from the local HF cache.

    transformers 5 does not always set `config._commit_hash`; the cache path of config.json holds it.
    """
    from huggingface_hub import try_to_load_from_cache
    from transformers.utils.hub import extract_commit_hash

    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return extract_commit_hash(cached, None) if isinstance(cached, str) else None


def resolved_revision(model: "PreTrainedModel") -> str | None:
    """The exact Hub commit hash a model was loaded from, when transformers recorded one."""
    return getattr(model.config, "_commit_hash", None)
