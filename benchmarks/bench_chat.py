"""Chat: loraflow's chat training against TRL's `SFTTrainer`, and the chat pyfunc against raw `generate`.

    python benchmarks/bench_chat.py --repeats 3 --write   # the chat section of RESULTS.md (~10 min)
    python benchmarks/bench_chat.py --quick               # a smoke run: tiny model, 1 repeat (not a result)
    python benchmarks/run.py --only chat                  # the same, as part of the whole report

Training (each side in a fresh process, alternating; round i uses seed `work.seed + i` on both):
the benchmark's saved random Llama (`fixtures.build`), the same seeded conversations
(`fixtures.conversations`, written as JSONL), the same ChatML template text (`TEMPLATE`, written
as a .jinja file; it carries `{% generation %}` markers so that TRL's `assistant_only_loss` works,
which loraflow's masks do not need), the loss on assistant replies and their `<|im_end|>\\n`,
LoRA r/alpha/dropout/targets, batch size, optimizer steps (one epoch), learning rate, warmup +
cosine schedule, clipping, max_seq_length 1024 (no conversation is cut), fp32.

- loraflow: `--train-data FILE --chat-template FILE --train-on assistant` as `run_training` does it
  (`load_examples`, `resolve_chat_template`, `tokenize_table`, `FineTune`), tracking off.
- TRL: `SFTTrainer(model=base, peft_config=LoraConfig, train_dataset=Dataset of messages,
  args=SFTConfig(assistant_only_loss=True, chat_template_path=FILE, ...))`. TRL's defaults are kept
  (no packing, no padding_free, which TRL documents as needing FlashAttention; its default data
  collator; `group_by_length` off, the Trainer's default) except two it sets for GPUs, both
  overridden to what the loraflow side does: `gradient_checkpointing=False` (TRL's default True
  recomputes activations, trading speed for memory) and `bf16=False` (this CPU's bf16 matmul runs
  at half its fp32 rate; loraflow trains in fp32 here).

Both sides train on identical token ids and labels: the TRL side compares its tokenized train set
with loraflow's (`tokenize_conversations`) and reports the counts. Timed window: as in
`bench_train` (first optimizer step to the end of the last). Eval loss: `masked_eval_loss`, the
same function in both processes, over the held-out conversations' assistant tokens.

Inference: the adapter of the first loraflow training run, saved as a chat model
(`loraflow.flavor.save_model(chat_template=TEMPLATE)`) and loaded with `mlflow.pyfunc.load_model`,
against the same base + adapter (`PeftModel.from_pretrained`) calling `model.generate` on batches
of `apply_chat_template(add_generation_prompt=True)`, left-padded, in request order. Same 64
requests, greedy, max 64 new tokens, batches of 32, stopping at EOS or `<|im_end|>`; generated
tokens counted the same way (up to and including the stop token). Timed: the predict call / the
batched loop, prompt rendering and decoding included; each in a fresh process after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_train, common, fixtures  # noqa: E402

TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""loraflow's built-in ChatML (`flavor.chat.CHATML_TEMPLATE`) rendered identically, with TRL's
generation markers around each reply and its end-of-turn text."""

MAX_SEQ_LENGTH = 1024
MAX_NEW_TOKENS = 64
N_REQUESTS = 64
INFER_BATCH = 32  # the pyfunc model's default batch size, used on both sides


def _chat_dir(root: Path) -> Path:
    return root / "chat"


def write_data(root: Path, requests: int = N_REQUESTS) -> dict[str, Any]:
    """The template file, train/eval JSONL and `requests` inference requests (seeded, from the workload)."""
    work = fixtures.load_workload(root)
    out = _chat_dir(root)
    out.mkdir(exist_ok=True)
    (out / "template.jinja").write_text(TEMPLATE)
    chats = fixtures.conversations(work.train_examples + work.eval_examples, work.seed)
    for name, rows in (("train", chats[: work.train_examples]), ("eval", chats[work.train_examples :])):
        (out / f"{name}.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in rows))
    # requests: fresh conversations cut before their last reply (what a client sends)
    cut = [m[:-1] for m in fixtures.conversations(requests, work.seed + 1000, max_turns=2)]
    (out / "requests.json").write_text(json.dumps(cut))
    return {"template": str(out / "template.jinja"), "train": str(out / "train.jsonl"), "eval": str(out / "eval.jsonl")}


def loraflow_tokens(root: Path, split: str) -> tuple[list[list[int]], list[list[int]]]:
    """loraflow's ids and labels for `split`, as `loraflow train --chat-template FILE` makes them."""
    from loraflow import data as data_lib
    from loraflow.flavor.bases import load_tokenizer

    chat, tokenizer = _chat_dir(root), load_tokenizer(str(root / "base"))
    columns = data_lib.Columns(messages="messages")
    template = data_lib.resolve_chat_template(tokenizer, str(chat / "template.jinja"))
    table = data_lib.load_examples(chat / f"{split}.jsonl", columns, f"{split}_data", "assistant")
    examples = data_lib.tokenize_table(table, tokenizer, columns, MAX_SEQ_LENGTH, chat_template=template,
                                       train_on="assistant")
    return [list(r) for r in examples.input_ids], [list(r) for r in examples.labels]


def masked_eval_loss(model, ids: list[list[int]], labels: list[list[int]], pad_token_id: int, batch_size: int = 8) -> float:
    """Token-weighted mean next-token loss over the labelled (assistant) tokens, in file order."""
    import torch

    model.eval()
    total, count = 0.0, 0
    with torch.inference_mode():
        for s in range(0, len(ids), batch_size):
            rows, labs = ids[s : s + batch_size], labels[s : s + batch_size]
            width = max(map(len, rows))
            batch_ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
            mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
            batch_labels = torch.tensor([r + [-100] * (width - len(r)) for r in labs])
            n = int((batch_labels[:, 1:] != -100).sum())
            total += float(model(input_ids=batch_ids, attention_mask=mask, labels=batch_labels).loss) * n
            count += n
    return total / count


def _counts(ids: list[list[int]], labels: list[list[int]]) -> dict[str, int]:
    return {"tokens": sum(map(len, ids)), "trained_tokens": sum(t != -100 for r in labels for t in r[1:])}


# ---------------------------------------------------------------------------------------------
# Training sides (each in a fresh process).


class _CpuTimingRunLogger:
    """Around `bench_train`'s timing logger: this process's CPU time at the same two moments too.

    CPU time (all threads) is less sensitive than wall time to other processes on a shared machine.
    """

    def __init__(self, timing: bench_train._TimingRunLogger):
        self.timing, self.cpu_start, self.cpu_end = timing, None, None

    def log_metrics(self, metrics, step):
        self.timing.log_metrics(metrics, step)
        if self.start is not None and self.cpu_start is None:
            self.cpu_start = time.process_time()
        if "train_loss" in metrics:
            self.cpu_end = time.process_time()

    def __getattr__(self, name):  # start, end, run_id: the timing logger's
        return getattr(self.timing, name)


def loraflow_side(root: str, seed: int, save_adapter: bool = False) -> dict[str, Any]:
    """Train with loraflow's recipe on the chat files; `save_adapter` keeps it for the inference side."""
    import dataclasses

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from loraflow import data as data_lib
    from loraflow import tracking
    from loraflow.config import TrainSettings, lora_settings
    from loraflow.flavor.bases import load_base_model, load_tokenizer
    from loraflow.lora import apply_lora

    root_path = Path(root)
    work = dataclasses.replace(fixtures.load_workload(root_path), seed=seed)
    settings = TrainSettings.from_flat(
        base_model=str(root_path / "base"), max_seq_length=MAX_SEQ_LENGTH, max_steps=work.steps,
        batch_size=work.batch_size, learning_rate=work.learning_rate, warmup_ratio=work.warmup_ratio,
        eval_steps=10**6, seed=seed, precision="fp32", output_dir=str(root_path / "chat-out"),
        chat_template=str(_chat_dir(root_path) / "template.jinja"), train_on="assistant",
    )
    accelerator = Accelerator(mixed_precision="no")
    set_seed(seed)
    tokenizer = load_tokenizer(settings.model.base_model)
    model = apply_lora(load_base_model(settings.model.base_model), lora_settings(bench_train._lora_values(work)))
    prep_started = time.perf_counter()
    train_ids, train_labels = loraflow_tokens(root_path, "train")
    prep_s = time.perf_counter() - prep_started
    eval_ids, eval_labels = loraflow_tokens(root_path, "eval")
    train_examples = data_lib.TokenizedExamples(train_ids, train_labels)
    eval_examples = data_lib.TokenizedExamples(eval_ids, eval_labels)
    timing = _CpuTimingRunLogger(bench_train._TimingRunLogger(tracking.RunLogger(None, enabled=False)))
    bench_train._train(settings, accelerator, timing, model, tokenizer, train_examples, eval_examples)
    model = accelerator.unwrap_model(model)
    peak = common.matmul_flops()  # after training, so its buffers never raise this side's peak RSS
    if save_adapter:
        model.save_pretrained(str(root_path / "chat-adapter"))
    return {
        "train_s": timing.end - timing.start, "train_cpu_s": timing.cpu_end - timing.cpu_start, "prep_s": prep_s,
        **_counts(train_ids, train_labels), "lengths": [len(r) for r in train_ids],
        "computed_tokens": bench_train._computed_tokens(train_examples, settings, tokenizer.pad_token_id,
                                                        accelerator.device),
        "eval_loss": masked_eval_loss(model, eval_ids, eval_labels, tokenizer.pad_token_id),
        "matmul_flops": peak, "torch_threads": torch.get_num_threads(),
    }


def trl_side(root: str, seed: int) -> dict[str, Any]:
    """Train with TRL's SFTTrainer (assistant_only_loss) on the same conversations and template."""
    import torch
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, set_seed

    root_path, chat = Path(root), _chat_dir(Path(root))
    work = fixtures.load_workload(root_path)
    set_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(root_path / "base"))
    tokenizer.padding_side = "right"  # TRL's collator pads on the right itself; stated for clarity
    model = AutoModelForCausalLM.from_pretrained(str(root_path / "base"))

    class Timer(TrainerCallback):
        start = end = cpu_start = cpu_end = None

        def on_train_begin(self, args, state, control, **kw):
            Timer.start, Timer.cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kw):
            Timer.end, Timer.cpu_end = time.perf_counter(), time.process_time()

    args = SFTConfig(
        output_dir=str(root_path / "trl-out"), per_device_train_batch_size=work.batch_size, max_steps=work.steps,
        learning_rate=work.learning_rate, warmup_steps=work.warmup_ratio, lr_scheduler_type="cosine",
        weight_decay=0.0, max_grad_norm=1.0, seed=seed, logging_strategy="no", save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, use_cpu=True, dataloader_pin_memory=False,
        assistant_only_loss=True, max_length=MAX_SEQ_LENGTH, chat_template_path=str(chat / "template.jinja"),
        gradient_checkpointing=False, bf16=False,
    )
    rows = [json.loads(line) for line in (chat / "train.jsonl").read_text().splitlines()]
    prep_started = time.perf_counter()
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=LoraConfig(task_type="CAUSAL_LM", **bench_train._lora_values(work)),
                         callbacks=[Timer()])
    prep_s = time.perf_counter() - prep_started
    trl_ids, trl_labels = trainer.train_dataset["input_ids"], trainer.train_dataset["labels"]
    ours_ids, ours_labels = loraflow_tokens(root_path, "train")
    computed = []  # tokens each batch makes the model compute, padding included
    collate = trainer.data_collator

    def counting(features):
        batch = collate(features)
        computed.append(batch["input_ids"].numel())
        return batch

    trainer.data_collator = counting
    trainer.train()
    eval_ids, eval_labels = loraflow_tokens(root_path, "eval")
    return {
        "train_s": Timer.end - Timer.start, "train_cpu_s": Timer.cpu_end - Timer.cpu_start, "prep_s": prep_s,
        **_counts(trl_ids, trl_labels),
        "computed_tokens": sum(computed[: work.steps]),  # the Trainer may collate one batch ahead
        "eval_loss": masked_eval_loss(trainer.model, eval_ids, eval_labels, tokenizer.pad_token_id),
        "identical_ids": sum(list(a) == b for a, b in zip(trl_ids, ours_ids)),
        "identical_labels": sum(list(a) == b for a, b in zip(trl_labels, ours_labels)),
        "examples": len(ours_ids), "torch_threads": torch.get_num_threads(),
    }


# ---------------------------------------------------------------------------------------------
# Inference sides (each in a fresh process).


def save_chat_model(root: str) -> dict[str, Any]:
    """Save the chat-trained adapter as a loraflow chat model (base embedded: a local base)."""
    from peft import PeftModel

    from loraflow import flavor
    from loraflow.flavor.bases import load_base_model, load_tokenizer

    root_path = Path(root)
    base = str(root_path / "base")
    model = PeftModel.from_pretrained(load_base_model(base), str(root_path / "chat-adapter")).eval()
    path = root_path / "chat-model"
    flavor.save_model(model, path, load_tokenizer(base), base_model=base, chat_template=TEMPLATE)
    return {"uri": str(path)}


def pyfunc_side(root: str, uri: str) -> dict[str, Any]:
    """`mlflow.pyfunc.load_model(uri).predict(requests)`: the chat model as MLflow serves it."""
    import mlflow

    requests = json.loads((_chat_dir(Path(root)) / "requests.json").read_text())
    model = mlflow.pyfunc.load_model(uri)
    body = [{"messages": m, "max_tokens": MAX_NEW_TOKENS, "temperature": 0} for m in requests]
    model.predict(body[:2])  # warm-up
    started, cpu_started = time.perf_counter(), time.process_time()
    answers = model.predict(body)
    predict_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    return {"predict_s": predict_s, "predict_cpu_s": cpu_s, "texts": [a["choices"][0]["message"]["content"] for a in answers],
            "generated_tokens": sum(a["usage"]["completion_tokens"] for a in answers)}


def raw_side(root: str) -> dict[str, Any]:
    """Batched `model.generate` on `apply_chat_template(add_generation_prompt=True)`, as a user writes it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root_path = Path(root)
    requests = json.loads((_chat_dir(root_path) / "requests.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(root_path / "base"), padding_side="left")
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(root_path / "base")),
                                      str(root_path / "chat-adapter")).eval()
    stop = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def generate(batch: list) -> list[list[int]]:
        enc = tokenizer.apply_chat_template(batch, chat_template=TEMPLATE, add_generation_prompt=True, tokenize=True,
                                            padding=True, return_tensors="pt", return_dict=True)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, eos_token_id=stop,
                                 pad_token_id=tokenizer.pad_token_id)
        rows = []
        for row in out[:, enc["input_ids"].shape[1] :].tolist():
            ends = [k for k, t in enumerate(row) if t in stop]
            rows.append(row[: ends[0] + 1] if ends else row)  # up to and including the stop token
        return rows

    generate(requests[:2])  # warm-up
    started, cpu_started = time.perf_counter(), time.process_time()
    tokens = [row for s in range(0, len(requests), INFER_BATCH) for row in generate(requests[s : s + INFER_BATCH])]
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    predict_s, cpu_s = time.perf_counter() - started, time.process_time() - cpu_started
    return {"predict_s": predict_s, "predict_cpu_s": cpu_s, "texts": texts, "generated_tokens": sum(map(len, tokens))}


# ---------------------------------------------------------------------------------------------
# The comparison.


def require_trl() -> None:
    """Stop with the install command when TRL (a benchmark-only dependency) is missing."""
    import importlib.util

    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"the chat benchmark compares against TRL's SFTTrainer, but {', '.join(missing)} "
                         "is not installed; install the benchmark extra: pip install -e '.[bench]'")


def run(root: Path, repeats: int, log=print, requests: int = N_REQUESTS) -> dict[str, Any]:
    """Both sub-benchmarks, alternating sides, each side in a fresh process; medians and ratios."""
    require_trl()
    work = fixtures.load_workload(root)
    write_data(root, requests)
    train = common.alternate(
        {"loraflow": lambda i: common.run_child("bench_chat", "loraflow_side",
                                                {"root": str(root), "seed": work.seed + i, "save_adapter": i == 0}),
         "trl": lambda i: common.run_child("bench_chat", "trl_side", {"root": str(root), "seed": work.seed + i})},
        repeats, log)
    uri = common.run_child("bench_chat", "save_chat_model", {"root": str(root)})["uri"]
    infer = common.alternate(
        {"pyfunc": lambda i: common.run_child("bench_chat", "pyfunc_side", {"root": str(root), "uri": uri}),
         "raw": lambda i: common.run_child("bench_chat", "raw_side", {"root": str(root)})},
        repeats, log)
    return summarize(train, infer, work)


def summarize(train: dict[str, list], infer: dict[str, list], work: fixtures.Workload) -> dict[str, Any]:
    out: dict[str, Any] = {"train_samples": train, "infer_samples": infer, "workload": work,
                           "settings": {"max_seq_length": MAX_SEQ_LENGTH, "max_new_tokens": MAX_NEW_TOKENS,
                                        "requests": len(infer["pyfunc"][0]["texts"]), "batch": INFER_BATCH}}
    for side, rows in train.items():
        out[side] = {
            "tokens_per_s": common.median([r["tokens"] / r["train_s"] for r in rows]),
            "trained_tokens_per_s": common.median([r["trained_tokens"] / r["train_s"] for r in rows]),
            "tokens_per_cpu_s": common.median([r["tokens"] / r["train_cpu_s"] for r in rows]),
            "peak_rss_mib": common.median([r["peak_rss_mib"] for r in rows]),
            "eval_loss": common.median([r["eval_loss"] for r in rows]),
            "computed_tokens": common.median([r["computed_tokens"] for r in rows]),
            "us_per_computed_token": common.median([1e6 * r["train_s"] / r["computed_tokens"] for r in rows]),
            "prep_s": common.median([r["prep_s"] for r in rows]),
        }
    first = train["loraflow"][0]
    flops = bench_train.flops_per_run(work, len(fixtures.tokenizer()), first["lengths"])
    out["flops"] = flops
    out["efficiency"] = common.median([flops["flops"] / r["train_s"] / r["matmul_flops"] for r in train["loraflow"]])
    out["tokens"], out["trained_tokens"] = first["tokens"], first["trained_tokens"]
    for side, rows in infer.items():
        out[side] = {"tokens_per_s": common.median([r["generated_tokens"] / r["predict_s"] for r in rows]),
                     "tokens_per_cpu_s": common.median([r["generated_tokens"] / r["predict_cpu_s"] for r in rows]),
                     "predict_s": common.median([r["predict_s"] for r in rows]),
                     "generated_tokens": rows[0]["generated_tokens"],
                     "deterministic": all(r["texts"] == rows[0]["texts"] for r in rows)}
    out["equal_outputs"] = sum(a == b for a, b in zip(infer["pyfunc"][0]["texts"], infer["raw"][0]["texts"]))
    out["train_speedup"] = out["loraflow"]["tokens_per_s"] / out["trl"]["tokens_per_s"]
    out["infer_ratio"] = out["pyfunc"]["tokens_per_s"] / out["raw"]["tokens_per_s"]
    return out


def main() -> None:
    import os
    import shlex
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny model, 1 repeat: checks the harness only")
    parser.add_argument("--repeats", type=common.positive_int, default=None, help="rounds per comparison (default 3; quick: 1)")
    parser.add_argument("--write", action="store_true", help="replace the chat section of benchmarks/RESULTS.md")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads in every side's process (OMP_NUM_THREADS; default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:  # read by torch when each child imports it
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    require_trl()
    repeats = args.repeats or (1 if args.quick else 3)
    command = "python benchmarks/bench_chat.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    began = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f}s] {msg}", flush=True)

    with tempfile.TemporaryDirectory(prefix="loraflow-bench-") as tmp:
        root = Path(tmp)
        os.environ["HF_HUB_CACHE"] = str(root / "hub")
        fixtures.build(root, fixtures.Workload.quick() if args.quick else fixtures.Workload.full())
        log(f"chat benchmark in {root}")
        result = run(root, repeats, log)
    from benchmarks import chat_results

    lines = chat_results.standalone_text(result, command, time.perf_counter() - began, args.quick)
    if args.write:
        chat_results.write_section(common.BENCH_DIR / "RESULTS.md", lines)
        log("wrote the chat section of benchmarks/RESULTS.md")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
