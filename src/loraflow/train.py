"""The fine-tuning recipe, top to bottom: setup -> train (evaluating as it goes) -> save_checkpoint ->
log_model -> finish. No framework: one explicit class holds the loop's state, with short methods.

`accelerate` owns devices, mixed precision, gradient accumulation and multiple processes; this
module owns the order of things:

1. read and check the data (`loraflow.data.load_training_data`: each file once, before any model
   is loaded), then check the tracking server answers;
2. load the base model (or a logged loraflow model to continue from), apply LoRA, tokenize;
3. `FineTune`: AdamW over the trainable parameters, linear warmup then cosine decay, gradient
   clipping; evaluate at step 0, every `eval_steps` and at the end; checkpoints on request and on
   SIGINT/SIGTERM; every metric to MLflow;
4. log the model with the loraflow flavor (saved locally instead if tracking fails), and print a
   summary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow import checkpoint as ckpt
from loraflow import config
from loraflow import data as data_lib
from loraflow import speed
from loraflow.config import LoraSettings, TrainSettings, lora_settings
from loraflow.errors import ConfigError
from loraflow.signals import stop_signals

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator

    from loraflow import evaluation, tracking

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
    samples: list[dict[str, Any]] = field(default_factory=list)
    """Generated answers at each evaluation (`evaluation.table_rows`): step, prompt, expected, generated."""


# ---------------------------------------------------------------------------------------------
# Setup.


def load_model_and_tokenizer(lora: LoraSettings, settings: TrainSettings, explicit: set[str]):
    """The PEFT model to train, its tokenizer, and the LoRA settings actually in effect."""
    from loraflow.base_models import load_for_training, training_plan_or_error
    from loraflow.flavor.dtypes import keep_adapter_fp32
    from loraflow.lora import apply_lora

    if settings.init_model:  # its base in `precision`'s dtype (a quantized one as it was trained)
        dtype = training_plan_or_error(settings.precision).base if settings.quantization == "none" else None
        model, tokenizer, lora = _continue_from(settings.init_model, lora, explicit, settings.trust_remote_code, dtype)
    else:
        model, tokenizer = load_for_training(settings.base_model, revision=settings.revision,
                                             trust_remote_code=settings.trust_remote_code,
                                             quantization=settings.quantization, precision=settings.precision)
        model = apply_lora(model, lora)
    return keep_adapter_fp32(model), tokenizer, lora


def _continue_from(uri: str, requested: LoraSettings, explicit: set[str], trust_remote_code: bool = False,
                   dtype: str | None = None):
    """Load a logged model trainable (in `dtype`); its LoRA settings win, and a conflicting request is an error."""
    from loraflow import flavor

    loaded = flavor.load_model(uri, is_trainable=True, trust_remote_code=trust_remote_code, dtype=dtype)
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


def evaluate(model, loader, accelerator: "Accelerator", max_tokens: int | None = None) -> float:
    """Token-weighted mean loss over the eval set, in micro-batches of at most `max_tokens` tokens,
    reduced across processes."""
    import torch
    from accelerate.utils import send_to_device

    model.eval()
    loss_sum = torch.zeros((), device=accelerator.device)
    token_count = torch.zeros((), device=accelerator.device)
    with torch.inference_mode():
        for batch in loader:
            batch = send_to_device(batch, accelerator.device)
            for part in data_lib.split_batch(batch, max_tokens) if max_tokens else [batch]:
                n = (part["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum()
                if n:  # a part with no label tokens has no loss (0/0)
                    loss_sum += speed.causal_lm_loss(model, part).float() * n
                    token_count += n
    model.train()
    loss_sum, token_count = accelerator.reduce(torch.stack([loss_sum, token_count]), reduction="sum")
    return (loss_sum / token_count.clamp(min=1)).item()


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM arrived; a checkpoint was written at `checkpoint`."""

    def __init__(self, checkpoint: Path, signal_name: str):
        self.checkpoint, self.signal_name = checkpoint, signal_name
        super().__init__(f"stopped by {signal_name}; resume with --resume-from {checkpoint}")


def micro_batch_budget(micro_batch_tokens: int, device: "torch.device") -> int | None:
    """Tokens per micro-batch: the setting, or for 0 (auto) 1024 on CPU and no limit elsewhere.

    On CPU, time per token is flat from a few hundred tokens per forward pass up, while
    activation memory grows with every token: small micro-batches cost nothing and bound the peak.
    On a GPU, larger forward passes are faster, so auto never splits there.
    """
    if micro_batch_tokens:
        return micro_batch_tokens
    return CPU_MICRO_BATCH_TOKENS if device.type == "cpu" and speed.enabled("cpu_micro_batches") else None


def forward_backward(model, batch: dict, accelerator: "Accelerator", max_tokens: int | None) -> "torch.Tensor":
    """Forward and backward over one batch, in micro-batches of at most `max_tokens` tokens.

    Each part's mean loss is weighted by its share of the batch's label tokens, so the summed
    gradients are the gradient of the whole batch's mean loss (the same update as one pass).
    Returns that mean loss, detached. Gradients sync only on the last part; no KV cache is built.
    """
    parts = data_lib.split_batch(batch, max_tokens) if max_tokens else [batch]
    counts = [int((part["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum()) for part in parts] if len(parts) > 1 else []
    total = sum(counts)
    if total == 0:  # one part (the common case: nothing to weigh), or no label tokens at all
        loss = speed.causal_lm_loss(model, batch)
        accelerator.backward(loss)
        return loss.detach()
    # A part with no label tokens has nothing to learn from (its mean loss is 0/0): drop it before
    # choosing the last part, which must run, because its backward is the one that syncs.
    kept = [(part, count) for part, count in zip(parts, counts) if count]
    loss_sum = None
    for i, (part, count) in enumerate(kept):
        with contextlib.nullcontext() if i == len(kept) - 1 else accelerator.no_sync(model):
            loss = speed.causal_lm_loss(model, part) * (count / total)
            accelerator.backward(loss)
        loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
    return loss_sum


def _real_tokens(batch: dict, pad_token_id: int) -> int:
    """Non-padding tokens in a batch (packed batches carry no attention mask)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    return int((batch["input_ids"] != pad_token_id).sum())


# ---------------------------------------------------------------------------------------------
# The recipe.


class FineTune:
    """One training run's loop and its state: model, optimizer, schedule, position, history.

    `train()` runs `total_steps` optimizer steps and returns eval loss before, after, and the
    history. With `resume`, the adapter, optimizer, scheduler, RNG and data position come from that
    checkpoint, and the loop continues exactly where it stopped.
    """

    def __init__(self, model, tokenizer, train_examples: data_lib.TokenizedExamples,
                 eval_examples: data_lib.TokenizedExamples, settings: TrainSettings, accelerator: "Accelerator",
                 run: "tracking.RunLogger", *, resume: Path | None = None, flat_settings: dict[str, Any] | None = None,
                 samples: "evaluation.Samples | None" = None, on_evaluate: Callable[..., None] | None = None):
        import torch
        from transformers import get_cosine_schedule_with_warmup

        self.settings, self.accelerator, self.run, self.tokenizer = settings, accelerator, run, tokenizer
        self.flat_settings = flat_settings or {}
        self.samples, self.sample_rows, self.on_evaluate = samples, [], on_evaluate
        self.train_loader, self.eval_loader = self._loader(train_examples, True), self._loader(eval_examples, False)
        self.budget = micro_batch_budget(settings.micro_batch_tokens, accelerator.device)
        self.steps = total_steps(settings, len(self.train_loader))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=settings.learning_rate, weight_decay=settings.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_ratio * self.steps), self.steps)
        # Only the model and optimizer go through accelerate: a prepared scheduler steps num_processes
        # times per optimizer step (it assumes loaders it sharded itself), so this loop steps it once.
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        ckpt.track(accelerator, self.model, self.scheduler)  # save_state/load_state: + scheduler, adapter only
        state = ckpt.restore(resume, accelerator, self.model, self.optimizer, self.scheduler) if resume else None
        self.history = ({k: [tuple(p) for p in v] for k, v in state.history.items()} if state
                        else {"train_loss": [], "eval_loss": []})
        self.step, self.epoch, self.skip = (state.step, state.epoch, state.batches_in_epoch) if state else (0, 0, 0)
        self.consumed, self.tokens, self.started = 0, 0, 0.0
        self.checkpoints = ckpt.run_dir(settings.output_dir, run.run_id)

    def _loader(self, examples: data_lib.TokenizedExamples, shuffle: bool):
        # Each process gets its own disjoint share of every global batch (data.make_dataloader shards
        # them evenly, with no example dropped or repeated), so accelerate must not shard them again.
        return data_lib.make_dataloader(
            examples, self.settings.batch_size, pad_token_id=self.tokenizer.pad_token_id, shuffle=shuffle,
            seed=self.settings.seed, packing=self.settings.packing, max_seq_length=self.settings.max_seq_length,
            num_replicas=self.accelerator.num_processes, rank=self.accelerator.process_index,
        )

    def train(self) -> tuple[float, float, dict[str, list[tuple[int, float]]]]:
        """Run to `total_steps`; eval loss before and after, and the history.

        Raises:
            TrainingInterrupted: after SIGINT/SIGTERM, once a checkpoint is written.
        """
        from tqdm.auto import tqdm

        unwrapped = self.accelerator.unwrap_model(self.model)
        with speed.heap_trim(unwrapped):
            before = self.history["eval_loss"][0][1] if self.history["eval_loss"] else self.evaluate()
            self.model.train()
            bar = tqdm(total=self.steps, initial=self.step, desc="training", unit="step",
                       disable=not self.accelerator.is_local_main_process)
            self.tokens, self.started = 0, time.perf_counter()
            with stop_signals() as stop, speed.cpu_dropout(unwrapped, self.accelerator.device):
                while self.step < self.steps:
                    for batch in self._epoch_batches():
                        if self._train_step(batch):
                            self._after_step(bar, stop)
                        if self.step >= self.steps:
                            break
                    else:
                        self.epoch += 1
            bar.close()
            return before, self.evaluate(), self.history

    def _epoch_batches(self):
        self.train_loader.batch_sampler.set_epoch(self.epoch)
        batches = self.accelerator.skip_first_batches(self.train_loader, self.skip) if self.skip else self.train_loader
        self.consumed, self.skip = self.skip, 0
        return batches

    def _train_step(self, batch: dict) -> bool:
        """Forward, backward and (at the end of an accumulation) an optimizer step; True if it stepped."""
        from accelerate.utils import send_to_device

        batch = send_to_device(batch, self.accelerator.device)
        self.consumed += 1
        with self.accelerator.accumulate(self.model):
            self.loss = forward_backward(self.model, batch, self.accelerator, self.budget)
            if self.accelerator.sync_gradients and self.settings.max_grad_norm:
                self.accelerator.clip_grad_norm_(self.model.parameters(), self.settings.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.tokens += _real_tokens(batch, self.tokenizer.pad_token_id)
        if not self.accelerator.sync_gradients:
            return False
        self.scheduler.step()
        self.step += 1
        return True

    def _after_step(self, bar: Any, stop: dict[str, str | None]) -> None:
        """Log the step; evaluate, checkpoint or stop (a signal arrived, `signals.stop_signals`) when it is time."""
        step_loss = self.accelerator.reduce(self.loss.detach(), reduction="mean").item()
        rate = self.tokens * self.accelerator.num_processes / (time.perf_counter() - self.started)
        self.history["train_loss"].append((self.step, step_loss))
        self.run.log_metrics({"train_loss": step_loss, "learning_rate": self.scheduler.get_last_lr()[0],
                              "tokens_per_second": rate}, self.step)
        bar.set_postfix(loss=f"{step_loss:.4f}", tok_s=f"{rate:,.0f}")
        bar.update()
        if self.step % self.settings.eval_steps == 0 and self.step < self.steps:
            self.evaluate()
        if stop["signal"]:
            bar.close()
            raise TrainingInterrupted(self.save_checkpoint(), stop["signal"])
        if self.settings.checkpoint_steps and self.step % self.settings.checkpoint_steps == 0 and self.step < self.steps:
            self.save_checkpoint()

    def evaluate(self) -> float:
        """Eval loss at the current step (and the generation metrics), recorded in the history and logged."""
        loss = evaluate(self.model, self.eval_loader, self.accelerator, self.budget)
        self.history["eval_loss"].append((self.step, loss))
        logged = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}
        if self.samples is not None and self.samples.prompts and self.accelerator.is_main_process:
            logged.update(self._generation_metrics())
        self.run.log_metrics(logged, self.step)
        if self.on_evaluate is not None:  # (step, metrics, final?): e.g. a sweep's pruner, which may raise to stop
            self.on_evaluate(self.step, logged, self.step >= self.steps)
        return loss

    def _generation_metrics(self) -> dict[str, float]:
        """Answer the eval samples greedily and score them (main process; the others wait at the next sync)."""
        from loraflow import evaluation

        answers = evaluation.answer(self.accelerator.unwrap_model(self.model), self.tokenizer, self.samples)
        scores = evaluation.score(answers, self.samples.expected)
        for key, value in scores.items():
            self.history.setdefault(key, []).append((self.step, value))
        self.sample_rows += evaluation.table_rows(self.step, self.samples, answers)
        return scores

    def save_checkpoint(self) -> Path:
        """Write a resumable checkpoint (every process takes part: each saves its RNG state); returns its folder."""
        history = {k: list(map(list, v)) for k, v in self.history.items()}
        position = ckpt.CheckpointState(self.step, self.epoch, self.consumed, self.run.run_id, self.flat_settings, history)
        path = ckpt.save_checkpoint(self.checkpoints, position, self.accelerator)
        if self.accelerator.is_main_process:
            logger.info("checkpoint written: %s", path)
        return path


def run_training(lora: LoraSettings, settings: TrainSettings, explicit: set[str] | None = None,
                 resume: Path | None = None, on_evaluate: Callable[..., None] | None = None) -> TrainResult:
    """Run the whole recipe in the active MLflow run (or a new one) and log the model.

    Args:
        lora: LoRA settings (ignored in favour of the model's own when `settings.init_model` is set).
        settings: everything else.
        explicit: the setting names the user gave, to detect conflicts with `init_model`.
        resume: a checkpoint folder (`checkpoint.resolve_checkpoint`) to continue from, in the same run that wrote it.
        on_evaluate: called after each evaluation as (step, metrics logged, final evaluation?).

    Raises:
        ConfigError, DataError: bad settings or data, raised before any model is loaded.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was written first.
    """
    from loraflow import evaluation, model_uri, tracking
    from loraflow.base_models import effective_dtypes

    data = data_lib.load_training_data(settings)  # fails on bad data before anything heavy
    settings = model_uri.with_init_quantization(settings, explicit or set()) if settings.init_model else settings
    tracking.check_reachable()  # and on a dead tracking server, within seconds
    accelerator, model, tokenizer, lora = setup(lora, settings, explicit or set())
    template = data_lib.resolve_chat_template(tokenizer, settings.chat_template) if data.columns.is_chat else None
    train_examples, eval_examples = (
        data_lib.tokenize_table(table, tokenizer, data.columns, settings.max_seq_length, settings.overflow,
                                chat_template=template, train_on=settings.train_on)
        for table in (data.train, data.eval)
    )
    samples = (evaluation.pick_samples(data.eval, data.columns, settings.eval_samples, settings.seed, tokenizer, template)
               if settings.eval_samples else None)
    run_id = ckpt.read_state(resume).run_id if resume else None
    with tracking.RunLogger.start(enabled=accelerator.is_main_process, run_id=run_id, run_name=settings.run_name) as run:
        run.log_settings(lora, settings, task="chat" if data.columns.is_chat else "completion",
                         dtypes=effective_dtypes(model, accelerator.mixed_precision))
        run.log_datasets(data.train, data.eval)
        from loraflow.lora import parameter_report
        run.log_metrics(parameter_report(model), None)
        flat = {**config.to_dict(settings), **config.to_dict(lora)}
        recipe = FineTune(model, tokenizer, train_examples, eval_examples, settings, accelerator, run,
                          resume=resume, flat_settings=flat, samples=samples, on_evaluate=on_evaluate)
        before, after, history = recipe.train()
        accelerator.wait_for_everyone()
        result = TrainResult(ok=True, run_id=run.run_id, model_uri=None, eval_loss_before=before,
                             eval_loss_after=after, history=history, samples=recipe.sample_rows)
        if accelerator.is_main_process:
            finish(accelerator.unwrap_model(recipe.model), tokenizer, data, lora, settings, run, result, template)
    if accelerator.is_main_process:
        from loraflow.report import print_summary

        print_summary(result)
    return result


def setup(lora: LoraSettings, settings: TrainSettings, explicit: set[str]):
    """The accelerator, the seeded RNG, and the PEFT model with its tokenizer and LoRA settings."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from accelerate.state import AcceleratorState

    from loraflow.base_models import training_plan_or_error

    mixed = training_plan_or_error(settings.precision).mixed_precision  # `loraflow.flavor.dtypes`
    if AcceleratorState._shared_state.get("_mixed_precision", mixed) != mixed:  # an earlier run in this process:
        AcceleratorState._reset_state()  # accelerate refuses another precision (its process state is kept)
    accelerator = Accelerator(  # without a GPU, accelerate goes multi-process (gloo) only when told it runs on the CPU
        cpu=torch.accelerator.current_accelerator() is None, mixed_precision=mixed,
        gradient_accumulation_steps=settings.grad_accum_steps)
    set_seed(settings.seed)
    if unknown := speed.unknown_names():  # a typo there would silently leave a trick on
        logger.warning("%s names no speed trick: %s (known: %s)", speed.ENV, ", ".join(unknown), ", ".join(speed.TRICKS))
    return (accelerator, *load_model_and_tokenizer(lora, settings, explicit))


def finish(model, tokenizer, data: data_lib.TrainingData, lora: LoraSettings, settings: TrainSettings,
           run: "tracking.RunLogger", result: TrainResult, chat_template: str | None = None) -> None:
    """Log peak memory, the loss curve, the samples and the model (main process); record in `result` what became of them."""
    from loraflow.tracking import peak_memory

    run.log_metrics(peak_memory(), None)  # of training: logging the model comes after
    run.log_loss_curve(result.history)
    if result.samples:
        run.log_samples(result.samples, result.history)
    log_model(model, tokenizer, data, lora, settings, run, result, chat_template)
    run.describe(result, lora, settings)
    result.ok = result.ok and run.failures == 0
    checkpoints = ckpt.run_dir(settings.output_dir, run.run_id)
    result.checkpoint_dir = str(checkpoints.resolve()) if checkpoints.is_dir() else None


def log_model(model, tokenizer, data: data_lib.TrainingData, lora: LoraSettings, settings: TrainSettings,
              run: "tracking.RunLogger", result: TrainResult, chat_template: str | None = None) -> None:
    """Log the model to the run; if tracking fails, save it locally and say where."""
    from loraflow import flavor

    base_model = settings.base_model
    example = (_chat_example(data.eval, data.columns) if chat_template
               else _example_prompts(data.eval, model, tokenizer))
    info = run.log_model(model, tokenizer, base_model=base_model, base_mode=settings.base_mode,
                         registered_model_name=settings.registered_model_name, input_example=example,
                         trust_remote_code=settings.trust_remote_code, chat_template=chat_template)
    if info is not None:
        result.model_uri = info.model_uri
        result.registered_version = run.tag_version(info, settings, lora, result.eval_loss_after)
        return
    local = Path(settings.output_dir) / f"model-{run.run_id or 'untracked'}"
    flavor.save_model(model, str(local), tokenizer, base_model=base_model, base_mode=settings.base_mode,
                      trust_remote_code=settings.trust_remote_code, chat_template=chat_template)
    result.ok, result.local_model_dir = False, str(local.resolve())
    logger.error("the model could not be logged to MLflow; it is saved locally at %s", result.local_model_dir)


def _chat_example(table: data_lib.Table, columns: data_lib.Columns) -> dict[str, Any]:
    """A chat request from the first eval conversation: everything before its first assistant reply."""
    messages = table.frame[columns.messages].iloc[0]
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return {"messages": list(messages[:first]), "max_tokens": 16}


def _example_prompts(table: data_lib.Table, model, tokenizer) -> list[str]:
    """Short prompts of the eval set that the model can answer, cut to fit its context if need be."""
    from loraflow import tracking
    from loraflow.flavor.generation import GENERATION_DEFAULTS, context_length

    column = "prompt" if "prompt" in table.frame.columns else table.frame.columns[0]
    return tracking.input_example_prompts([str(p) for p in table.frame[column].head(64)], tokenizer,
                                          context_length(model, tokenizer), GENERATION_DEFAULTS["max_new_tokens"])
