"""Does fine-tuning make answers better? Exact match and token F1 before and after, on held-out facts.

Standalone (no other benchmark module needed):

    PYTHONPATH=src HF_HUB_OFFLINE=1 LORAFLOW_HOME=/tmp/lf-home python benchmarks/bench_learning.py

1. builds the built-in base model `builtin:tiny` (timed; 0 s when `$LORAFLOW_HOME` already has it);
2. trains with the library on its defaults (`loraflow.train.run_training`), tracking to a
   temporary sqlite MLflow store (timed: this is the default run, step-0 and final eval included);
3. generates greedy answers for the eval split (`loraflow.data.load_training_data`'s split of the training
   file, as training does: facts the fine-tuning split never shows, at most --max-eval of them)
   with the base model and with the trained model loaded back from MLflow, and prints exact match
   and token F1 before and after, and a few examples.

`--set NAME=VALUE` overrides a training setting (`loraflow train` names, e.g. `--set max_steps=100`);
`--builtin NAME=VALUE` overrides a constant of `loraflow.builtin` (e.g. `PRETRAIN_STEPS=600`), for
experiments: use a fresh `--home` with it, since the cache key does not see the override.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def answers(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    from loraflow.flavor.generation import generate

    return [g.text for g in generate(model, tokenizer, prompts, batch_size=32, max_new_tokens_cap=4096,
                                     max_new_tokens=max_new_tokens)]


def scores(predictions: list[str], references: list[str]) -> tuple[float, float]:
    from loraflow.metrics import exact_match, token_f1

    n = max(1, len(references))
    em = sum(exact_match(p, r) for p, r in zip(predictions, references)) / n
    f1 = sum(token_f1(p, r) for p, r in zip(predictions, references)) / n
    return em, f1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", help="LORAFLOW_HOME for the built-in model cache (default: the environment's)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a training setting")
    parser.add_argument("--builtin", action="append", default=[], metavar="NAME=VALUE", help="a loraflow.builtin constant")
    parser.add_argument("--max-eval", type=int, default=64, help="eval questions to generate for (seeded subset)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--examples", type=int, default=3)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    if args.home:
        os.environ["LORAFLOW_HOME"] = args.home
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = Path(tempfile.mkdtemp(prefix="bench-learning-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"

    import numpy as np

    from loraflow import builtin, config, data, flavor, train
    from loraflow.flavor.bases import builtin_dir, load_base_model, load_tokenizer

    for item in args.builtin:
        name, value = item.split("=", 1)
        if not hasattr(builtin, name):
            parser.error(f"loraflow.builtin has no {name}")
        setattr(builtin, name, parse_value(value))

    started = time.perf_counter()
    cached = (builtin.cache_root() / f"tiny-v{builtin.BUILD_VERSION}" / "config.json").exists()
    base_dir = builtin_dir("builtin:tiny")
    build_s = time.perf_counter() - started

    raw = {"output_dir": str(workdir / "outputs")}
    raw.update(dict(item.split("=", 1) for item in args.set))
    lora, settings = config.parse_settings(raw)

    # The eval split exactly as training makes it, then a seeded subset of at most --max-eval rows.
    split = data.load_training_data(settings.data, settings.optim.seed)
    train_frame, eval_frame = split.train.frame, split.eval.frame
    leaked = set(eval_frame["prompt"]) & set(train_frame["prompt"])
    assert not leaked, f"eval questions in the training split: {sorted(leaked)}"
    if len(eval_frame) > args.max_eval:
        keep = np.sort(np.random.default_rng(settings.optim.seed).permutation(len(eval_frame))[: args.max_eval])
        eval_frame = eval_frame.iloc[keep].reset_index(drop=True)
    prompts = [str(p) for p in eval_frame["prompt"]]
    references = [str(c) for c in eval_frame["completion"]]

    base = load_base_model(settings.model.base_model)
    tokenizer = load_tokenizer(settings.model.base_model)
    before = answers(base, tokenizer, prompts, args.max_new_tokens)
    em_before, f1_before = scores(before, references)

    started = time.perf_counter()
    result = train.run_training(lora, settings)
    train_s = time.perf_counter() - started

    loaded = flavor.load_model(result.model_uri)
    after = answers(loaded.model, loaded.tokenizer, prompts, args.max_new_tokens)
    em_after, f1_after = scores(after, references)
    seen = set(train_frame["completion"])

    report = {
        "base_model": str(base_dir),
        "build_s": round(build_s, 2),
        "build_cached": cached,
        "train_s": round(train_s, 2),
        "train_rows": len(train_frame),
        "eval_rows": len(eval_frame),
        "eval_answers_never_a_training_answer": sum(r not in seen for r in references),
        "eval_loss_before": result.eval_loss_before,
        "eval_loss_after": result.eval_loss_after,
        "exact_match_before": em_before,
        "exact_match_after": em_after,
        "token_f1_before": f1_before,
        "token_f1_after": f1_after,
        "settings": {k: v for k, v in raw.items() if k != "output_dir"},
        "builtin_overrides": args.builtin,
    }
    print()
    print(f"built-in model: {'cached' if cached else f'built in {build_s:.1f} s'} ({base_dir})")
    print(f"train (default run, step-0 and final eval, model logged): {train_s:.1f} s")
    print(f"eval split: {len(eval_frame)} held-out questions, train split: {len(train_frame)} rows")
    print(f"eval loss:   {result.eval_loss_before:.3f} -> {result.eval_loss_after:.3f}")
    print(f"exact match: {em_before:.3f} -> {em_after:.3f}")
    print(f"token F1:    {f1_before:.3f} -> {f1_after:.3f}")
    for i in range(min(args.examples, len(prompts))):
        q = prompts[i].removeprefix("Question: ").removesuffix("\nAnswer:")
        print(f"\n  Q: {q}\n     before:   {before[i]!r}\n     after:    {after[i]!r}\n     expected: {references[i]!r}")
    wrong = [(p, a, r) for p, a, r in zip(prompts, after, references) if a.strip().lower() != r.strip().lower()]
    if wrong:
        print("\nwrong after training:", "; ".join(f"{p.split(': ', 1)[1].split(chr(10))[0]} -> {a!r} (want {r!r})" for p, a, r in wrong))
    if args.json:
        report["examples"] = [{"question": p, "before": b, "after": a, "expected": r}
                              for p, b, a, r in zip(prompts, before, after, references)]
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
