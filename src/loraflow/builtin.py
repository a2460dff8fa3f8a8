"""The built-in offline base model `builtin:tiny`: a small Llama with its own BPE tokenizer.

Weights cannot be downloaded on the machines this project targets, so loraflow builds its
default base model from code the first time it is asked for, then caches it:

1. train a byte-level BPE tokenizer on the bundled corpus and sample data (`tokenizers`);
2. initialise a 2-layer `LlamaForCausalLM` from a fixed seed;
3. pre-train it briefly on the bundled corpus, so that it knows the facts that the sample
   dataset asks about but not the question/answer format (fine-tuning visibly changes it).

The build runs single-threaded with a fixed seed, so two builds give identical bytes and the
base-model fingerprint stays stable. It takes a few seconds on a 2-core CPU. This module is only
the recipe: `loraflow.flavor.bases.builtin_dir` caches what it builds. It imports nothing from the
rest of loraflow, because a saved model whose base is a referenced built-in ships it, to rebuild it.
"""

from __future__ import annotations

import json
from pathlib import Path

BUILTIN_NAMES = ("tiny",)
BUILD_VERSION = 1  # bump when the recipe below changes: the cache key includes it

RESOURCES = Path(__file__).parent / "resources"
VOCAB_SIZE = 1024
CONTEXT = 256
PRETRAIN_STEPS = 300
PRETRAIN_BATCH = 16
PRETRAIN_LR = 3e-3
SEED = 1234


def build(name: str, out_dir: Path) -> None:
    """Build the built-in base `name` (one of `BUILTIN_NAMES`) into the empty folder `out_dir`.

    Caching and atomic writing are the caller's (`loraflow.flavor.bases.builtin_dir`).
    """
    builders = {"tiny": build_tiny}
    builders[name](out_dir)


def _training_texts() -> list[str]:
    corpus = (RESOURCES / "corpus.txt").read_text(encoding="utf-8").splitlines()
    with open(RESOURCES / "sample.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return corpus, [r["prompt"] + r["completion"] for r in rows]


def build_tokenizer():
    """Train the byte-level BPE tokenizer and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus, samples = _training_texts()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus + samples, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        model_max_length=CONTEXT,
        padding_side="left",
    )


def build_tiny(out_dir: Path) -> None:
    """Build `builtin:tiny` into `out_dir` (tokenizer, config and safetensors weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a fixed reduction order: identical weights on every build
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = LlamaForCausalLM(config)
            _pretrain(model, tokenizer)
    finally:
        torch.set_num_threads(threads)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _pretrain(model, tokenizer) -> None:
    import torch

    corpus, _ = _training_texts()
    encoded = tokenizer([s + tokenizer.eos_token for s in corpus], add_special_tokens=False)
    stream = torch.tensor([i for ids in encoded["input_ids"] for i in ids])
    block = 64
    n_blocks = (len(stream) - 1) // block
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, PRETRAIN_LR, total_steps=PRETRAIN_STEPS)
    model.train()
    for _ in range(PRETRAIN_STEPS):
        starts = torch.randint(0, n_blocks, (PRETRAIN_BATCH,), generator=generator) * block
        batch = torch.stack([stream[s : s + block] for s in starts])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
