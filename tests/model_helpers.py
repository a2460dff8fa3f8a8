"""Helpers shared by the flavor tests: a LoRA model with non-zero weights, and MLmodel editing."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

PROMPTS = [
    "Question: What is the capital?\nAnswer:",
    "The sky",
    "Once upon a time there was a small model that",
    "Hello",
    "Question: Why?\nAnswer:",
]


def make_peft_model(base, seed: int = 0):
    """LoRA on q/v plus a trainable copy of the (tied) lm_head, with non-zero weights.

    peft initialises lora_B to zero (an untrained adapter is a no-op), so B and the lm_head copy
    are perturbed from a fixed seed: a round trip that dropped them would change the logits. peft
    draws lora_A from torch's global generator, whose seed differs from run to run: it is drawn
    under the same fixed seed, so every run tests the same model.
    """
    import peft

    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", modules_to_save=["lm_head"]
    )
    with torch.random.fork_rng(devices=[]):  # the caller's random state stays as it was
        torch.manual_seed(seed)
        model = peft.get_peft_model(base, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or ".modules_to_save." in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.02)
    return model.eval()



def base_args(mode: str, tiny_path: str) -> dict:
    # Embedded from the built-in name (as the train command passes it); reference to a local
    # directory, which records its path and exercises the same fingerprint check a Hub base gets;
    # logged: the local directory stored once in the tracking store.
    if mode == "embedded":
        return {"base_model": "builtin:tiny", "base_mode": "embedded"}
    return {"base_model": tiny_path, "base_mode": mode}


def logits(model, tokenizer, prompts=PROMPTS) -> torch.Tensor:
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def generate_texts(model, tokenizer, prompts: list[str], **settings) -> list[str]:
    """The generated texts alone of `loraflow.flavor.generation.generate` (same arguments), in input order."""
    from loraflow.flavor.generation import generate

    return [g.text for g in generate(model, tokenizer, prompts, **settings)]


def mlmodel(path: Path) -> dict:
    return yaml.safe_load((path / "MLmodel").read_text())


def write_mlmodel(path: Path, doc: dict) -> None:
    (path / "MLmodel").write_text(yaml.safe_dump(doc))


def perturb_safetensors(file: Path) -> None:
    """Add 1e-3 to one weight of a safetensors file, in place."""
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(file))
    name = sorted(k for k in tensors if "layers.0" in k)[0]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[0] += 1e-3
    save_file(tensors, str(file), metadata={"format": "pt"})


# Three short conversations for the chat-model tests (batch-predict, Spark).
CHATS = [[{"role": "user", "content": "What does a duck say?"}],
         [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
         [{"role": "user", "content": "What colour is the sky?"}]]


def save_chat_model(path: Path, tiny_path: str, tiny_tokenizer) -> str:
    """A chat model (ChatML template, `task: chat`) on the built-in base, saved at `path`."""
    from loraflow import flavor
    from loraflow.flavor.bases import load_base_model
    from loraflow.flavor.chat import CHATML_TEMPLATE

    flavor.save_model(make_peft_model(load_base_model(tiny_path).eval()), path, tiny_tokenizer,
                      base_model="builtin:tiny", chat_template=CHATML_TEMPLATE)
    return str(path)
