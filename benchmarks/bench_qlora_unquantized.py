"""How much a QLoRA model's outputs change when it is loaded unquantized (`quantization="none"`).

Trains the built-in model with `--quantization nf4` (or int8) on the defaults (bundled data,
300 steps, fp32 compute), then loads the logged model twice: as trained (re-quantized) and with
`loraflow.flavor.load_model(uri, quantization="none")`, the adapter on the full-precision base. On
the held-out eval prompts it reports the largest absolute logit difference (and the largest logit
beside it), how often the next-token argmax agrees over every prompt position, and how many
greedy answers (32 new tokens) are identical.

    PYTHONPATH=src python benchmarks/bench_qlora_unquantized.py [--quantization nf4] [--max-steps 300]
"""

from __future__ import annotations

import argparse
import os
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="nf4", choices=["nf4", "fp4", "int8"])
    parser.add_argument("--max-steps", type=int, default=300)
    args = parser.parse_args()

    import mlflow
    import torch

    from loraflow import data as data_lib
    from loraflow import flavor
    from loraflow.config import parse_settings
    from loraflow.flavor.generation import generate
    from loraflow.train import run_training

    tmp = tempfile.mkdtemp(prefix="bench-qlora-")
    os.chdir(tmp)
    mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
    lora, settings = parse_settings({"quantization": args.quantization, "max_steps": args.max_steps,
                                     "precision": "fp32", "output_dir": f"{tmp}/outputs"})
    result = run_training(lora, settings)
    prompts = [str(p) for p in data_lib.load_training_data(settings.data, settings.optim.seed).eval.frame["prompt"]]

    quantized, tokenizer = flavor.load_model(result.model_uri)
    unquantized, _ = flavor.load_model(result.model_uri, quantization="none")
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        a, b = quantized(**batch).logits, unquantized(**batch).logits
    mask = batch["attention_mask"].bool()
    diff = (a - b).abs()[mask].max().item()
    agree = (a.argmax(-1) == b.argmax(-1))[mask].float().mean().item()
    settings_ = {"batch_size": 32, "max_new_tokens_cap": 4096, "max_new_tokens": 32}
    same = sum(x.text == y.text for x, y in zip(generate(quantized, tokenizer, prompts, **settings_),
                                                generate(unquantized, tokenizer, prompts, **settings_)))
    print(f"{args.quantization}, {args.max_steps} steps, {len(prompts)} held-out prompts:")
    print(f"  max |logit difference|: {diff:.3f} (largest logit {a.abs().max().item():.1f})")
    print(f"  next-token argmax agreement over {int(mask.sum())} positions: {100 * agree:.1f}%")
    print(f"  identical greedy answers (32 tokens): {same}/{len(prompts)}")


if __name__ == "__main__":
    main()
