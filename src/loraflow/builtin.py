"""The built-in offline base model `builtin:tiny`: a small Llama with its own BPE tokenizer.

Weights cannot be downloaded on the machines this project targets, so loraflow builds its
default base model from code the first time it is asked for, then caches it:

1. train a byte-level BPE tokenizer on the bundled corpus (and a few format words), with
   pad/BOS/EOS and the ChatML turn markers `<|im_start|>`/`<|im_end|>` as special tokens and a
   ChatML chat template (`tokenizers`);
2. initialise a 2-layer `LlamaForCausalLM` (hidden size 128) from a fixed seed;
3. pre-train it on the bundled corpus (`resources/corpus.txt`: plain prose stating every fact of
   `scripts/make_sample_data.py` in several phrasings), so that it *knows* the facts that the
   sample dataset asks about, but has never seen the question/answer or chat format. Fine-tuning
   teaches the format; held-out questions then show that answers got right (see
   `benchmarks/bench_learning.py`).

The build runs single-threaded with a fixed seed, so two builds give identical bytes and the
base-model fingerprint stays stable. It takes about 45 s on a 2-core CPU. This module is only
the recipe: `loraflow.flavor.bases.builtin_dir` caches what it builds. It imports nothing from the
rest of loraflow, because a saved model whose base is a referenced built-in ships it, to rebuild it.
"""

from __future__ import annotations

import json
from pathlib import Path

BUILTIN_NAMES = ("tiny",)
BUILD_VERSION = 2  # bump when the recipe below changes: the cache key includes it

RESOURCES = Path(__file__).parent / "resources"
VOCAB_SIZE = 1024
CONTEXT = 256
HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 2
PRETRAIN_STEPS = 900
PRETRAIN_BATCH = 16
PRETRAIN_BLOCK = 64
PRETRAIN_LR = 3e-3
PRETRAIN_WARMUP = 0.05
SEED = 1234

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"]
END_OF_TURN = "<|im_end|>"
# ChatML: `<|im_start|>role\ncontent<|im_end|>\n` per message; add_generation_prompt opens the
# assistant's turn. No BOS: the tokenizer's post-processor adds it when the text is encoded.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Format words the tokenizer should know although the corpus never has them: no facts, no answers.
FORMAT_TEXTS = ["Question: What is it?\nAnswer:", "system\n", "user\n", "assistant\n"]


def build(name: str, out_dir: Path) -> None:
    """Build the built-in base `name` (one of `BUILTIN_NAMES`) into the empty folder `out_dir`.

    Caching and atomic writing are the caller's (`loraflow.flavor.bases.builtin_dir`).
    """
    builders = {"tiny": build_tiny}
    builders[name](out_dir)


def _training_texts() -> tuple[list[str], list[str]]:
    """The pre-training corpus (one text a line), and the format texts the tokenizer also sees.

    No fine-tuning row is among them (no question/answer pair, no chat): the tokenizer and the
    model learn from the corpus's prose only, plus a few format words (`FORMAT_TEXTS`).
    """
    corpus = (RESOURCES / "corpus.txt").read_text(encoding="utf-8").splitlines()
    return corpus, list(FORMAT_TEXTS)


def build_tokenizer():
    """Train the byte-level BPE tokenizer and wrap it as a transformers fast tokenizer.

    Its special tokens are pad, BOS, EOS and the ChatML turn markers `<|im_start|>` and
    `<|im_end|>` (the end-of-turn token); it carries a ChatML chat template.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus, others = _training_texts()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus + others, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", 1)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>", END_OF_TURN],
        model_max_length=CONTEXT,
        padding_side="left",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny(out_dir: Path) -> None:
    """Build `builtin:tiny` into `out_dir` (tokenizer, config and safetensors weights)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
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
    # generation stops at EOS (plain text) or at the end of an assistant turn (chat)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids(END_OF_TURN)]
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _pretrain(model, tokenizer) -> None:
    """Next-token training on the corpus: `<bos> sentence <eos>` lines as one stream, in blocks
    of PRETRAIN_BLOCK tokens drawn at seeded random offsets; AdamW, warmup then cosine decay."""
    import math

    import torch

    corpus, _ = _training_texts()
    encoded = tokenizer([s + tokenizer.eos_token for s in corpus])  # the post-processor adds BOS
    stream = torch.tensor([i for ids in encoded["input_ids"] for i in ids])
    block = PRETRAIN_BLOCK
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    warmup = max(1, int(PRETRAIN_WARMUP * PRETRAIN_STEPS))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, PRETRAIN_STEPS - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    offsets = torch.arange(block)
    model.train()
    for _ in range(PRETRAIN_STEPS):
        starts = torch.randint(0, len(stream) - block, (PRETRAIN_BATCH, 1), generator=generator)
        batch = stream[starts + offsets]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
