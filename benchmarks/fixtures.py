"""The benchmark workload: a seeded random Llama (saved as a local dir and as a Hub-cache repo) and
token-id data of widely varying lengths. Built once per run into a temporary folder.

Why token ids, not text: both training sides must see *identical* tokens, and re-encoding decoded
windows of byte-level BPE does not round-trip exactly. So examples are windows of the token stream
of loraflow's bundled corpus (BOS + window + EOS, exactly what `tokenize_examples` makes of a text
row), stored as JSON; tokenization is not part of any timed window.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

HUB_REPO = "loraflow-bench/llama-bench"
HUB_COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass(frozen=True)
class Workload:
    """Model shape and data sizes; `full()` is what RESULTS.md reports, `quick()` a smoke run."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    train_examples: int
    eval_examples: int
    min_len: int
    max_len: int
    batch_size: int
    r: int = 16
    lora_alpha: float = 32.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 2e-3
    warmup_ratio: float = 0.1
    seed: int = 42

    @property
    def steps(self) -> int:
        # exactly one epoch: both sides process the same examples, so the same real tokens
        return self.train_examples // self.batch_size

    @classmethod
    def full(cls) -> "Workload":
        # ~22M parameters, wide enough (d=768) that matmuls dominate. 48 steps x 4 examples of
        # 16-512 tokens: enough batches that the padding the baseline computes is typical of these
        # lengths (with 12 steps it ranged from 1.44x to 1.72x between draws; see `padding_spread`)
        return cls(hidden_size=768, intermediate_size=2048, num_layers=3, num_heads=12,
                   train_examples=192, eval_examples=16, min_len=16, max_len=512, batch_size=4)

    @classmethod
    def quick(cls) -> "Workload":
        return cls(hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4,
                   train_examples=24, eval_examples=8, min_len=16, max_len=128, batch_size=4)


def tokenizer():
    from loraflow.flavor.bases import builtin_dir as builtin_path
    from loraflow.flavor.bases import load_tokenizer

    return load_tokenizer(str(builtin_path("builtin:tiny")))


def build(root: Path, work: Workload) -> dict[str, str]:
    """Write base/ (model + tokenizer), hub/ (the same files as a Hub cache repo) and data.json."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    root.mkdir(parents=True, exist_ok=True)
    tok = tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=work.hidden_size, intermediate_size=work.intermediate_size,
        num_hidden_layers=work.num_layers, num_attention_heads=work.num_heads, num_key_value_heads=work.num_heads,
        max_position_embeddings=max(1024, work.max_len), tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(work.seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    base = root / "base"
    model.save_pretrained(base)
    tok.save_pretrained(base)

    # The same files as a Hugging Face cache entry, so `from_pretrained(HUB_REPO)` works offline
    # and records a commit hash: the "Hub-reference base" of the artifact-size benchmark.
    repo = root / "hub" / ("models--" + HUB_REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / HUB_COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_COMMIT)
    for f in base.iterdir():
        os.link(f, snapshot / f.name)

    stream = _token_stream(tok)
    rng = np.random.default_rng(work.seed)

    def examples(n: int) -> list[list[int]]:
        out = []
        for _ in range(n):
            length = int(rng.integers(work.min_len, work.max_len + 1)) - 2  # + BOS + EOS
            start = int(rng.integers(0, len(stream) - length))
            out.append([tok.bos_token_id] + stream[start : start + length] + [tok.eos_token_id])
        return out

    data = {"train": examples(work.train_examples), "eval": examples(work.eval_examples)}
    (root / "data.json").write_text(json.dumps(data))
    (root / "workload.json").write_text(json.dumps(asdict(work)))
    return {"base": str(base), "hub_cache": str(root / "hub"), "data": str(root / "data.json")}


def _token_stream(tok) -> list[int]:
    """The bundled corpus and sample rows as one token stream, repeated to >= 4096 tokens."""
    from loraflow.builtin import _training_texts

    corpus, samples = _training_texts()
    ids: list[int] = []
    for text in corpus + samples:
        ids += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    while len(ids) < 4096:
        ids = ids + ids
    return ids


def load_hub_base():
    """The base loaded by its Hub id (from the offline cache), with its commit recorded.

    transformers 5 no longer keeps `config._commit_hash` after `from_pretrained`, which
    `loraflow.flavor.save` records as a Hub base's revision; set it here
    (as tests/flavor/test_fingerprint.py does) so the reference mode can be measured.
    """
    from loraflow.flavor.bases import load_base_model

    model = load_base_model(HUB_REPO)
    if getattr(model.config, "_commit_hash", None) is None:
        model.config._commit_hash = HUB_COMMIT
    return model


def load_workload(root: Path) -> Workload:
    raw = json.loads((root / "workload.json").read_text())
    raw["target_modules"] = tuple(raw["target_modules"])
    return Workload(**raw)


def load_data(root: Path) -> dict[str, list[list[int]]]:
    return json.loads((root / "data.json").read_text())


def prompts(root: Path, n: int = 64, seed: int = 0) -> list[str]:
    """n prompts of mixed length (4 to 96 tokens of corpus text), decoded to strings."""
    import numpy as np

    tok = tokenizer()
    stream = _token_stream(tok)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        length = int(rng.integers(4, 97))
        start = int(rng.integers(0, len(stream) - length))
        out.append(tok.decode(stream[start : start + length], skip_special_tokens=True).strip() or "The")
    return out


def conversations(n: int, seed: int, *, max_turns: int = 3, user_len: tuple[int, int] = (4, 48),
                  reply_len: tuple[int, int] = (8, 160)) -> list[list[dict[str, str]]]:
    """n seeded chats of widely varying length, in OpenAI `messages` format (the chat benchmark's data).

    Each has a system message half the time, then 1 to `max_turns` user/assistant turns; every
    content is a window of the bundled corpus's token stream (lengths uniform in `user_len` /
    `reply_len` tokens), decoded to text. Both training sides render the same text with the same
    template, so (unlike `build`'s data) text is what they share; the benchmark checks that they
    train on identical token ids.
    """
    import numpy as np

    tok = tokenizer()
    stream = _token_stream(tok)
    rng = np.random.default_rng(seed)

    def text(bounds: tuple[int, int]) -> str:
        length = int(rng.integers(bounds[0], bounds[1] + 1))
        start = int(rng.integers(0, len(stream) - length))
        return tok.decode(stream[start : start + length], skip_special_tokens=True).strip() or "The"

    out = []
    for _ in range(n):
        messages = [{"role": "system", "content": text((4, 16))}] if rng.random() < 0.5 else []
        for _ in range(int(rng.integers(1, max_turns + 1))):
            messages += [{"role": "user", "content": text(user_len)}, {"role": "assistant", "content": text(reply_len)}]
        out.append(messages)
    return out
