"""The fine-tuning recipe: setup -> evaluate -> fit -> evaluate -> log, as one explicit loop.

`accelerate` owns devices, mixed precision, gradient accumulation and multiple processes; this
file owns the order of things, so a reader sees the whole training run top to bottom:

1. read and check the data (before any model is loaded), tokenize it;
2. load the base model (or a logged loraflow model to continue from) and apply LoRA;
3. AdamW over the trainable parameters, linear warmup then cosine decay, gradient clipping;
4. evaluate at step 0, every `eval_steps` and at the end; log everything to MLflow;
5. log the model with the loraflow flavor (saved locally instead if tracking fails).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow import checkpoint as ckpt
from loraflow import data as data_lib
from loraflow import config
from loraflow.config import LoraSettings, TrainSettings, lora_settings
from loraflow.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd
    import torch
    from accelerate import Accelerator

    from loraflow import tracking

logger = logging.getLogger(__name__)

MODEL_ARTIFACT = "model"
CPU_MICRO_BATCH_TOKENS = 1024  # auto micro-batch size on CPU (see micro_batch_budget)


@dataclass
class TrainResult:
    """What a training run produced. `ok` is False when anything could not be recorded."""

    ok: bool
    run_id: str | None
    model_uri: str | None
    eval_loss_before: float
    eval_loss_after: float
    local_model_dir: str | None = None
    checkpoint_dir: str | None = None
    registered_version: str | None = None
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


@dataclass
class PreparedData:
    """Checked, split and tokenized data, plus the frames MLflow logs as dataset inputs."""

    train_frame: "pd.DataFrame"
    eval_frame: "pd.DataFrame"
    train: data_lib.TokenizedExamples
    eval: data_lib.TokenizedExamples
    train_source: str
    eval_source: str


# ---------------------------------------------------------------------------------------------
# Setup.


def columns_of(settings: TrainSettings) -> data_lib.Columns:
    if settings.text_column:
        return data_lib.Columns(text=settings.text_column)
    return data_lib.Columns(prompt=settings.prompt_column or "prompt", completion=settings.completion_column or "completion")


def read_data(settings: TrainSettings) -> tuple["pd.DataFrame", "pd.DataFrame", str, str]:
    """Read and check the train/eval tables (no tokenizer needed): fails before any model loads."""
    columns = columns_of(settings)
    train_path = settings.train_data or str(data_lib.SAMPLE_DATA)
    frame = data_lib.load_examples(train_path, columns, role="train_data")
    if settings.eval_data:
        return frame, data_lib.load_examples(settings.eval_data, columns, role="eval_data"), train_path, settings.eval_data
    train_frame, eval_frame = data_lib.split_examples(frame, settings.eval_fraction, settings.seed)
    return train_frame, eval_frame, train_path, f"{train_path} (seeded split, eval_fraction={settings.eval_fraction})"


def prepare_data(settings: TrainSettings, tokenizer) -> PreparedData:
    train_frame, eval_frame, train_source, eval_source = read_data(settings)
    columns = columns_of(settings)

    def tokenize(frame):
        return data_lib.tokenize_examples(frame, tokenizer, columns, settings.max_seq_length, overflow=settings.overflow)

    return PreparedData(train_frame, eval_frame, tokenize(train_frame), tokenize(eval_frame), train_source, eval_source)


def mixed_precision(precision: str) -> str:
    """accelerate's mixed_precision for our `precision` setting (`auto`: bf16 where the GPU has it)."""
    import torch

    if precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "no"
    if precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("`precision` fp16 needs a CUDA GPU, none is available; use auto, fp32 or bf16")
    return {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision]


def load_model_and_tokenizer(lora: LoraSettings, settings: TrainSettings, explicit: set[str]):
    """The PEFT model to train, its tokenizer, and the LoRA settings actually in effect."""
    from loraflow.lora import apply_lora
    from loraflow.models import load_base_model, load_tokenizer

    if settings.init_model:
        return _continue_from(settings.init_model, lora, explicit, settings.trust_remote_code)
    tokenizer = load_tokenizer(settings.base_model, revision=settings.revision, trust_remote_code=settings.trust_remote_code)
    model = load_base_model(settings.base_model, revision=settings.revision, trust_remote_code=settings.trust_remote_code)
    return apply_lora(model, lora, log=False), tokenizer, lora


def _continue_from(uri: str, requested: LoraSettings, explicit: set[str], trust_remote_code: bool = False):
    """Load a logged model trainable; its LoRA settings win, and a conflicting request is an error."""
    from loraflow import flavor

    loaded = flavor.load_model(uri, is_trainable=True, trust_remote_code=trust_remote_code)
    peft_config = loaded.model.peft_config["default"]
    names = [f.name for f in dataclasses.fields(LoraSettings)]
    from_model = lora_settings({n: _peft_value(getattr(peft_config, n)) for n in names if hasattr(peft_config, n)})
    defaults = LoraSettings()
    conflicts = [
        f"`{n}` is {getattr(requested, n)!r} but init_model {uri!r} was trained with {getattr(from_model, n)!r}; "
        f"omit `{n}` (the model's value is used) or start a new adapter without init_model"
        for n in names
        if n in explicit and getattr(requested, n) != getattr(defaults, n) and getattr(requested, n) != getattr(from_model, n)
    ]
    if conflicts:
        raise ConfigError(conflicts)
    return loaded.model, loaded.tokenizer, from_model


def _peft_value(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return tuple(sorted(value))
    if hasattr(value, "value"):  # peft's TaskType enum
        return value.value
    return value if value is not None else ()


# ---------------------------------------------------------------------------------------------
# The loop.


def total_steps(settings: TrainSettings, batches_per_epoch: int) -> int:
    if settings.max_steps:
        return settings.max_steps
    return max(1, math.ceil(settings.epochs * batches_per_epoch / settings.grad_accum_steps))


def evaluate(model, loader, accelerator: "Accelerator") -> float:
    """Token-weighted mean loss over the eval set, reduced across processes."""
    import torch
    from accelerate.utils import send_to_device

    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device)
    token_count = torch.zeros((), device=accelerator.device)
    with torch.inference_mode():
        for batch in loader:
            batch = send_to_device(batch, accelerator.device)
            labels = batch["labels"]
            n = (labels[:, 1:] != -100).sum()
            loss = model(**batch).loss
            loss_sum += loss.float() * n
            token_count += n
    model.train()
    loss_sum, token_count = accelerator.reduce(torch.stack([loss_sum, token_count]), reduction="sum")
    return (loss_sum / token_count.clamp(min=1)).item()


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint was written at `checkpoint`."""

    def __init__(self, checkpoint: Path, signal_name: str):
        self.checkpoint, self.signal_name = checkpoint, signal_name
        super().__init__(f"stopped by {signal_name}; resume with --resume-from {checkpoint}")


@contextlib.contextmanager
def stop_on_signals() -> Iterator[dict[str, str | None]]:
    """Turn SIGINT/SIGTERM into a flag the loop checks after each optimizer step."""
    requested: dict[str, str | None] = {"signal": None}

    def handler(signum, frame):
        requested["signal"] = signal.Signals(signum).name

    if threading.current_thread() is not threading.main_thread():
        yield requested  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield requested
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def fit(
    model,
    tokenizer,
    data: PreparedData,
    settings: TrainSettings,
    accelerator: "Accelerator",
    run: "tracking.RunLogger",
    *,
    resume: Path | None = None,
    flat_settings: dict[str, Any] | None = None,
) -> tuple[float, float, dict[str, list[tuple[int, float]]]]:
    """Train for `total_steps` optimizer steps; returns eval loss before, after, and the history.

    With `resume`, the adapter, optimizer, scheduler, RNG and data position come from that
    checkpoint, and the loop continues exactly where it stopped.

    Raises:
        TrainingInterrupted: after SIGINT/SIGTERM, once a checkpoint is written.
    """
    import torch
    from accelerate.utils import send_to_device
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from loraflow import dropout as lora_dropout

    # Each process gets its own disjoint share of every global batch (data.make_dataloader shards
    # them evenly, with no example dropped or repeated), so accelerate must not shard them again.
    def loader(examples, shuffle: bool):
        return data_lib.make_dataloader(
            examples,
            settings.batch_size,
            pad_token_id=tokenizer.pad_token_id,
            shuffle=shuffle,
            seed=settings.seed,
            packing=settings.packing,
            max_seq_length=settings.max_seq_length,
            num_replicas=accelerator.num_processes,
            rank=accelerator.process_index,
        )

    train_loader, eval_loader = loader(data.train, True), loader(data.eval, False)
    budget = micro_batch_budget(settings.micro_batch_tokens, accelerator.device)
    steps = total_steps(settings, len(train_loader))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_ratio * steps), steps)
    # Only the model and optimizer go through accelerate: a prepared scheduler steps num_processes
    # times per optimizer step (it assumes loaders it sharded itself), so this loop steps it once.
    model, optimizer = accelerator.prepare(model, optimizer)
    state = ckpt.restore(resume, accelerator.unwrap_model(model), optimizer, scheduler) if resume else None
    history = {k: [tuple(p) for p in v] for k, v in state.history.items()} if state else {"train_loss": [], "eval_loss": []}
    checkpoints = ckpt.run_dir(settings.output_dir, run.run_id)

    def record_eval(step: int) -> float:
        loss = evaluate(model, eval_loader, accelerator)
        history["eval_loss"].append((step, loss))
        run.log_metrics({"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}, step)
        return loss

    def save(step: int, epoch: int, consumed: int) -> Path:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return checkpoints
        position = ckpt.CheckpointState(step, epoch, consumed, run.run_id, flat_settings or {}, {k: list(map(list, v)) for k, v in history.items()})
        path = ckpt.save_checkpoint(checkpoints, position, accelerator.unwrap_model(model), optimizer, scheduler)
        logger.info("checkpoint written: %s", path)
        return path

    before = history["eval_loss"][0][1] if state else record_eval(0)
    step, epoch, skip = (state.step, state.epoch, state.batches_in_epoch) if state else (0, 0, 0)
    model.train()
    bar = tqdm(total=steps, initial=step, desc="training", unit="step", disable=not accelerator.is_local_main_process)
    tokens, started = 0, time.perf_counter()
    # on CPU, LoRA dropout draws its masks the cheaper way while training (see loraflow.dropout)
    unwrapped = accelerator.unwrap_model(model)
    dropouts = lora_dropout.on_cpu(unwrapped) if accelerator.device.type == "cpu" else contextlib.nullcontext()
    with stop_on_signals() as stop, dropouts:
        while step < steps:
            train_loader.batch_sampler.set_epoch(epoch)
            batches = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
            consumed, skip = skip, 0
            for batch in batches:
                batch = send_to_device(batch, accelerator.device)
                consumed += 1
                with accelerator.accumulate(model):
                    loss = forward_backward(model, batch, accelerator, budget)
                    if accelerator.sync_gradients and settings.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), settings.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                tokens += _real_tokens(batch, tokenizer.pad_token_id)
                if not accelerator.sync_gradients:
                    continue
                scheduler.step()
                step += 1
                step_loss = accelerator.reduce(loss.detach(), reduction="mean").item()
                rate = tokens * accelerator.num_processes / (time.perf_counter() - started)
                history["train_loss"].append((step, step_loss))
                run.log_metrics({"train_loss": step_loss, "learning_rate": scheduler.get_last_lr()[0], "tokens_per_second": rate}, step)
                bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{rate:,.0f}")
                bar.update()
                if step % settings.eval_steps == 0 and step < steps:
                    record_eval(step)
                if stop["signal"]:
                    bar.close()
                    raise TrainingInterrupted(save(step, epoch, consumed), stop["signal"])
                if settings.checkpoint_steps and step % settings.checkpoint_steps == 0 and step < steps:
                    save(step, epoch, consumed)
                if step >= steps:
                    break
            else:
                epoch += 1
    bar.close()
    after = record_eval(step)
    return before, after, history


def micro_batch_budget(micro_batch_tokens: int, device: "torch.device") -> int | None:
    """Tokens per micro-batch: the setting, or for 0 (auto) 1024 on CPU and no limit elsewhere.

    On CPU, time per token is flat from a few hundred tokens per forward pass up, while
    activation memory grows with every token: small micro-batches cost nothing and bound the peak.
    On a GPU, larger forward passes are faster, so auto never splits there.
    """
    if micro_batch_tokens:
        return micro_batch_tokens
    return CPU_MICRO_BATCH_TOKENS if device.type == "cpu" else None


def forward_backward(model, batch: dict, accelerator: "Accelerator", max_tokens: int | None) -> "torch.Tensor":
    """Forward and backward over one batch, in micro-batches of at most `max_tokens` tokens.

    Each part's mean loss is weighted by its share of the batch's label tokens, so the summed
    gradients are the gradient of the whole batch's mean loss (the same update as one pass).
    Returns that mean loss, detached. Gradients sync across processes only on the last part.
    """
    parts = data_lib.split_batch(batch, max_tokens) if max_tokens else [batch]
    counts = [int((part["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum()) for part in parts] if len(parts) > 1 else []
    total = sum(counts)
    if total == 0:  # one part (the common case: nothing to weigh), or no label tokens at all
        loss = model(**batch).loss
        accelerator.backward(loss)
        return loss.detach()
    # A part with no label tokens has nothing to learn from (its mean loss is 0/0): drop it before
    # choosing the last part, which must run, because its backward is the one that syncs.
    kept = [(part, count) for part, count in zip(parts, counts) if count]
    loss_sum = None
    for i, (part, count) in enumerate(kept):
        with contextlib.nullcontext() if i == len(kept) - 1 else accelerator.no_sync(model):
            loss = model(**part).loss * (count / total)
            accelerator.backward(loss)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    return loss_sum


def _real_tokens(batch: dict, pad_token_id: int) -> int:
    """Non-padding tokens in a batch (packed batches carry no attention mask)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["input_ids"] != pad_token_id).sum())


def run_training(
    lora: LoraSettings, settings: TrainSettings, explicit: set[str] | None = None, resume: Path | None = None
) -> TrainResult:
    """Run the whole recipe in the active MLflow run (or a new one) and log the model.

    Args:
        lora: LoRA settings (ignored in favour of the model's own when `settings.init_model` is set).
        settings: everything else.
        explicit: the setting names the user gave, to detect conflicts with `init_model`.
        resume: a checkpoint folder (`checkpoint.resolve_checkpoint`) to continue from, in the
            same MLflow run that wrote it.

    Raises:
        ConfigError, DataError: bad settings or data, raised before any model is loaded.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was written first.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from loraflow import tracking
    from loraflow.models import load_tokenizer

    read_data(settings)  # fail on bad data before anything heavy (tokenizing needs the tokenizer)
    tracking.check_reachable()  # and on a dead tracking server, within seconds
    import torch

    accelerator = Accelerator(
        # Without a GPU, accelerate goes multi-process (gloo) only when told it runs on the CPU.
        cpu=torch.accelerator.current_accelerator() is None,
        mixed_precision=mixed_precision(settings.precision), gradient_accumulation_steps=settings.grad_accum_steps
    )
    set_seed(settings.seed)
    model, tokenizer, lora = load_model_and_tokenizer(lora, settings, explicit or set())
    prepared = prepare_data(settings, tokenizer)
    run_id = ckpt.read_state(resume).run_id if resume else None
    with tracking.RunLogger.start(enabled=accelerator.is_main_process, run_id=run_id) as run:
        run.log_settings(lora, settings)
        run.log_datasets(prepared.train_frame, prepared.eval_frame, prepared.train_source, prepared.eval_source)
        from loraflow.lora import parameter_report

        run.log_metrics(parameter_report(model), None)
        flat = {**config.to_dict(settings), **config.to_dict(lora)}
        before, after, history = fit(model, tokenizer, prepared, settings, accelerator, run, resume=resume, flat_settings=flat)
        accelerator.wait_for_everyone()
        result = TrainResult(ok=True, run_id=run.run_id, model_uri=None, eval_loss_before=before, eval_loss_after=after, history=history)
        if accelerator.is_main_process:
            run.log_loss_curve(history)
            _log_or_save_model(accelerator.unwrap_model(model), tokenizer, prepared, lora, settings, run, result)
            result.ok = result.ok and run.failures == 0
            checkpoints = ckpt.run_dir(settings.output_dir, run.run_id)
            result.checkpoint_dir = str(checkpoints.resolve()) if checkpoints.is_dir() else None
    if accelerator.is_main_process:
        print_summary(result)
    return result


def _log_or_save_model(model, tokenizer, prepared: PreparedData, lora, settings, run, result: TrainResult) -> None:
    from loraflow import flavor

    base_model = settings.base_model
    prompts = _example_prompts(prepared)
    info = run.log_model(model, tokenizer, base_model=base_model, base_mode=settings.base_mode,
                         registered_model_name=settings.registered_model_name, input_example=prompts,
                         trust_remote_code=settings.trust_remote_code)
    if info is not None:
        result.model_uri = info.model_uri
        result.registered_version = run.tag_version(info, settings, lora, result.eval_loss_after)
        return
    local = Path(settings.output_dir) / f"model-{run.run_id or 'untracked'}"
    flavor.save_model(model, str(local), tokenizer, base_model=base_model, base_mode=settings.base_mode,
                      trust_remote_code=settings.trust_remote_code)
    result.ok, result.local_model_dir = False, str(local.resolve())
    logger.error("the model could not be logged to MLflow; it is saved locally at %s", result.local_model_dir)


def _example_prompts(prepared: PreparedData) -> list[str]:
    column = "prompt" if "prompt" in prepared.eval_frame.columns else prepared.eval_frame.columns[0]
    return [str(p) for p in prepared.eval_frame[column].head(2)]


def print_summary(result: TrainResult) -> None:
    change = f"{result.eval_loss_before:.4f} -> {result.eval_loss_after:.4f}"
    lines = ["", "loraflow: training finished", f"  run id:     {result.run_id}", f"  eval loss:  {change}"]
    if result.model_uri:
        lines += [
            f"  model URI:  {result.model_uri}",
            "  load it:",
            f"    mlflow.pyfunc.load_model({result.model_uri!r}).predict(['Question: What does a cow say?\\nAnswer:'])",
            f"    model, tokenizer = loraflow.flavor.load_model({result.model_uri!r}, is_trainable=True)",
        ]
    if result.local_model_dir:
        lines.append(f"  NOT logged to MLflow; the model is saved at {result.local_model_dir}")
        lines.append(f"  log it later with: loraflow upload {result.local_model_dir}")
    if not result.ok:
        lines.append("  some tracking calls failed: see the warnings above")
        if result.checkpoint_dir:
            lines.append(f"  checkpoints: {result.checkpoint_dir}")
    print("\n".join(lines), flush=True)
