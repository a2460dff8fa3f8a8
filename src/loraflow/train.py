"""The fine-tuning recipe, top to bottom. No framework: one explicit class, `FineTune`, holds the
loop and its state, in torchtune's shape (`setup` -> `train` -> `save_checkpoint` -> `cleanup`),
and `run_training` runs a whole run as a short sequence of named steps:

1. read and check the data (`loraflow.data.load_training_data`: each file once, before any model
   is loaded), then check the tracking server answers;
2. set up the accelerator and load the model to train: a base with LoRA applied, or a logged
   loraflow model to continue from (`loraflow.training_setup`); tokenize; pick the eval samples;
3. start the MLflow run and log the settings, datasets and parameter report;
4. `FineTune`: AdamW over the trainable parameters, linear warmup then cosine decay, gradient
   clipping; one optimizer step reads top to bottom in `FineTune.train_step`; evaluate at step 0,
   every `eval_steps` and at the end; checkpoints on request and on SIGINT/SIGTERM;
5. log the model with the loraflow flavor (saved locally instead if tracking fails), and print a
   summary.

`accelerate` owns devices, mixed precision, gradient accumulation and multiple processes; speed
tricks stay behind `loraflow.speed`, each switchable with `LORAFLOW_DISABLE`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow import checkpoint as ckpt
from loraflow import config
from loraflow import data as data_lib
from loraflow import speed
from loraflow.config import LoraSettings, OptimSettings, TrainSettings
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
# Pieces of the loop.


def total_steps(optim: OptimSettings, batches_per_epoch: int) -> int:
    if optim.max_steps:
        return optim.max_steps
    return max(1, math.ceil(optim.epochs * batches_per_epoch / optim.grad_accum_steps))


def micro_batch_budget(micro_batch_tokens: int, device: "torch.device") -> int | None:
    """Tokens per micro-batch: the setting, or for 0 (auto) 1024 on CPU and no limit elsewhere.

    On CPU, time per token is flat from a few hundred tokens per forward pass up, while
    activation memory grows with every token: small micro-batches cost nothing and bound the peak.
    On a GPU, larger forward passes are faster, so auto never splits there.
    """
    if micro_batch_tokens:
        return micro_batch_tokens
    return CPU_MICRO_BATCH_TOKENS if device.type == "cpu" and speed.enabled("cpu_micro_batches") else None


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


# ---------------------------------------------------------------------------------------------
# The recipe.


class FineTune:
    """One fine-tuning run's loop and its state, in torchtune's shape: `setup` -> `train` ->
    `save_checkpoint` (on request and on SIGINT/SIGTERM) -> `cleanup`.

    Construction only records the settings. `setup` builds the loaders, AdamW over the trainable
    parameters and the schedule (linear warmup, then cosine decay), hands model and optimizer to
    accelerate and, with `resume`, restores adapter, optimizer, scheduler, RNG and data position
    from that checkpoint, so the loop continues exactly where it stopped. `train` runs to the last
    optimizer step (`train_step`, one batch at a time), evaluating at step 0, every `eval_steps` and
    at the end.
    """

    def __init__(self, settings: TrainSettings, on_evaluate: Callable[..., None] | None = None):
        """`on_evaluate` is called after each evaluation as (step, metrics logged, final evaluation?)."""
        self.optim, self.eval_settings, self.data_settings = settings.optim, settings.eval, settings.data
        self.output_dir, self.on_evaluate = settings.tracking.output_dir, on_evaluate
        self.history: dict[str, list[tuple[int, float]]] = {"train_loss": [], "eval_loss": []}
        self.sample_rows: list[dict[str, Any]] = []
        self.step = self.epoch = self.skip = self.consumed = self.tokens = 0
        self.started = 0.0

    def setup(self, accelerator: "Accelerator", run: "tracking.RunLogger", model, tokenizer,
              train_examples: data_lib.TokenizedExamples, eval_examples: data_lib.TokenizedExamples, *,
              samples: "evaluation.Samples | None" = None, resume: Path | None = None,
              settings_record: dict[str, Any] | None = None) -> None:
        """Loaders, optimizer, schedule and accelerate; with `resume`, the checkpoint's state.

        Args:
            accelerator, run: where the loop runs, and where it logs (`tracking.RunLogger`).
            samples: the eval rows answered at each evaluation (`evaluation.pick_samples`), if any.
            resume: a checkpoint folder of this run to continue from.
            settings_record: the flat settings each checkpoint records (`checkpoint.CheckpointState`).
        """
        import torch
        from transformers import get_cosine_schedule_with_warmup

        self.accelerator, self.run, self.tokenizer, self.samples = accelerator, run, tokenizer, samples
        self.settings_record = settings_record or {}
        self.checkpoints = ckpt.run_dir(self.output_dir, run.run_id)
        self.train_loader, self.eval_loader = self._loader(train_examples, True), self._loader(eval_examples, False)
        self.budget = micro_batch_budget(self.optim.micro_batch_tokens, self.accelerator.device)
        self.steps = total_steps(self.optim, len(self.train_loader))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad],
                                      lr=self.optim.learning_rate, weight_decay=self.optim.weight_decay)
        self.scheduler = get_cosine_schedule_with_warmup(optimizer, int(self.optim.warmup_ratio * self.steps), self.steps)
        # Only the model and optimizer go through accelerate: a prepared scheduler steps num_processes
        # times per optimizer step (it assumes loaders it sharded itself), so this loop steps it once.
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        ckpt.track(self.accelerator, self.model, self.scheduler)  # save_state/load_state: + scheduler, adapter only
        if resume:
            state = ckpt.restore(resume, self.accelerator, self.model, self.optimizer, self.scheduler)
            self.history = {k: [tuple(p) for p in v] for k, v in state.history.items()}
            self.step, self.epoch, self.skip = state.step, state.epoch, state.batches_in_epoch

    def _loader(self, examples: data_lib.TokenizedExamples, shuffle: bool):
        # Each process gets its own disjoint share of every global batch (data.make_dataloader shards
        # them evenly, with no example dropped or repeated), so accelerate must not shard them again.
        return data_lib.make_dataloader(
            examples, self.optim.batch_size, pad_token_id=self.tokenizer.pad_token_id, shuffle=shuffle,
            seed=self.optim.seed, packing=self.data_settings.packing, max_seq_length=self.data_settings.max_seq_length,
            num_replicas=self.accelerator.num_processes, rank=self.accelerator.process_index,
        )

    def train(self) -> tuple[float, float, dict[str, list[tuple[int, float]]]]:
        """Run to the last optimizer step; eval loss before and after, and the history.

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
                    self.train_loader.batch_sampler.set_epoch(self.epoch)
                    batches = (self.accelerator.skip_first_batches(self.train_loader, self.skip) if self.skip
                               else self.train_loader)  # a resumed epoch starts at the checkpoint's batch
                    self.consumed, self.skip = self.skip, 0
                    for batch in batches:
                        if self.train_step(batch):
                            self._after_step(bar, stop)
                        if self.step >= self.steps:
                            break
                    else:
                        self.epoch += 1
            bar.close()
            return before, self.evaluate(), self.history

    def train_step(self, batch: dict) -> bool:
        """Forward and backward over one batch and, at the end of an accumulation, the optimizer step.

        The batch runs in micro-batches of at most `budget` tokens. Each part's mean loss is weighted
        by its share of the batch's label tokens, so the summed gradients are the gradient of the
        whole batch's mean loss (the same update as one pass), and `self.loss` is that mean loss.
        Gradients sync across processes only on the last part; no KV cache is built.

        Returns:
            True if the optimizer stepped (the last batch of an accumulation).
        """
        from accelerate.utils import send_to_device

        accelerator = self.accelerator
        batch = send_to_device(batch, accelerator.device)
        self.consumed += 1
        parts = data_lib.split_batch(batch, self.budget) if self.budget else [batch]
        counts = [int((part["labels"][:, 1:] != data_lib.IGNORE_INDEX).sum()) for part in parts] if len(parts) > 1 else []
        total = sum(counts)
        if total:
            # A part with no label tokens has nothing to learn from (its mean loss is 0/0): drop it before
            # choosing the last part, which must run, because its backward is the one that syncs.
            weighted = [(part, count / total) for part, count in zip(parts, counts) if count]
        else:  # one part (the common case: nothing to weigh), or no label tokens at all
            weighted = [(batch, None)]
        with accelerator.accumulate(self.model):
            loss_sum = None
            for i, (part, weight) in enumerate(weighted):
                with contextlib.nullcontext() if i == len(weighted) - 1 else accelerator.no_sync(self.model):
                    loss = speed.causal_lm_loss(self.model, part)
                    loss = loss if weight is None else loss * weight
                    accelerator.backward(loss)
                loss_sum = loss.detach() if loss_sum is None else loss_sum + loss.detach()
            self.loss = loss_sum
            if accelerator.sync_gradients and self.optim.max_grad_norm:
                accelerator.clip_grad_norm_(self.model.parameters(), self.optim.max_grad_norm)
            self.optimizer.step()  # accelerate's optimizer steps only at the end of an accumulation
            self.optimizer.zero_grad(set_to_none=True)
        # Real tokens, for the throughput (packed batches carry no attention mask: all but padding).
        mask = batch.get("attention_mask")
        self.tokens += int(mask.sum()) if mask is not None else int((batch["input_ids"] != self.tokenizer.pad_token_id).sum())
        if not accelerator.sync_gradients:
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
        if self.step % self.eval_settings.eval_steps == 0 and self.step < self.steps:
            self.evaluate()
        if signal_name := self._agreed_stop(stop["signal"]):
            bar.close()
            raise TrainingInterrupted(self.save_checkpoint(), signal_name)
        every = self.optim.checkpoint_steps
        if every and self.step % every == 0 and self.step < self.steps:
            self.save_checkpoint()

    def _agreed_stop(self, caught: str | None) -> str | None:
        """The stop signal any process caught, the same on every process: one that stopped alone would
        checkpoint while the others wait in the next step's gradient exchange."""
        if self.accelerator.num_processes == 1:
            return caught
        import torch

        number = signal.Signals[caught].value if caught else 0
        agreed = int(self.accelerator.gather(torch.tensor([number], device=self.accelerator.device)).max())
        return signal.Signals(agreed).name if agreed else None

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
        position = ckpt.CheckpointState(self.step, self.epoch, self.consumed, self.run.run_id, self.settings_record,
                                        history)
        path = ckpt.save_checkpoint(self.checkpoints, position, self.accelerator)
        if self.accelerator.is_main_process:
            logger.info("checkpoint written: %s", path)
        return path

    def cleanup(self):
        """Wait for every process to finish training; the trained model, unwrapped from accelerate."""
        self.accelerator.wait_for_everyone()
        return self.accelerator.unwrap_model(self.model)


# ---------------------------------------------------------------------------------------------
# The whole run.


def run_training(lora: LoraSettings, settings: TrainSettings, explicit: set[str] | None = None,
                 resume: Path | None = None, on_evaluate: Callable[..., None] | None = None) -> TrainResult:
    """Run the whole recipe in the active MLflow run (or a new one) and log the model.

    Args:
        lora: LoRA settings (ignored in favour of the model's own when `init_model` is set).
        settings: everything else, in groups (`config.TrainSettings`).
        explicit: the setting names the user gave, to detect conflicts with `init_model`.
        resume: a checkpoint folder (`checkpoint.resolve_checkpoint`) to continue from, in the same run that wrote it.
        on_evaluate: called after each evaluation as (step, metrics logged, final evaluation?).

    Raises:
        ConfigError, DataError: bad settings or data, raised before any model is loaded.
        TrainingInterrupted: SIGINT/SIGTERM; a checkpoint was written first.
    """
    from loraflow import evaluation, tracking, training_setup
    from loraflow.base_models import effective_dtypes
    from loraflow.lora import parameter_report
    from loraflow.report import print_summary

    explicit = explicit or set()
    recipe = FineTune(settings, on_evaluate)  # records the settings; `setup` does the work
    data = data_lib.load_training_data(settings.data, settings.optim.seed)  # fails on bad data before anything heavy
    if settings.model.init_model:  # continuing a logged model: its quantization is the model's
        settings = dataclasses.replace(settings, model=training_setup.with_init_quantization(settings.model, explicit))
    tracking.check_reachable()  # and on a dead tracking server, within seconds
    accelerator = training_setup.make_accelerator(settings.model.precision, settings.optim.grad_accum_steps,
                                                  settings.optim.seed)
    model, tokenizer, lora = training_setup.load_model_and_tokenizer(lora, settings.model, explicit)
    template = data_lib.resolve_chat_template(tokenizer, settings.data.chat_template) if data.columns.is_chat else None
    train_examples, eval_examples = (
        data_lib.tokenize_table(table, tokenizer, data.columns, settings.data.max_seq_length, settings.data.overflow,
                                chat_template=template, train_on=settings.data.train_on)
        for table in (data.train, data.eval)
    )
    samples = (evaluation.pick_samples(data.eval, data.columns, settings.eval.eval_samples, settings.optim.seed,
                                       tokenizer, template) if settings.eval.eval_samples else None)
    run_id = ckpt.read_state(resume).run_id if resume else None
    with tracking.RunLogger.start(enabled=accelerator.is_main_process, run_id=run_id,
                                  run_name=settings.tracking.run_name) as run:
        run.log_settings(lora, settings, task="chat" if data.columns.is_chat else "completion",
                         dtypes=effective_dtypes(model, accelerator.mixed_precision))
        run.log_datasets(data.train, data.eval)
        run.log_metrics(parameter_report(model), None)
        recipe.setup(accelerator, run, model, tokenizer, train_examples, eval_examples, samples=samples,
                     resume=resume, settings_record={**config.to_dict(settings), **config.to_dict(lora)})
        before, after, history = recipe.train()
        trained = recipe.cleanup()
        result = TrainResult(ok=True, run_id=run.run_id, model_uri=None, eval_loss_before=before,
                             eval_loss_after=after, history=history, samples=recipe.sample_rows)
        if accelerator.is_main_process:
            finish(trained, tokenizer, data, lora, settings, run, result, template)
    if accelerator.is_main_process:
        print_summary(result)
    return result


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
    checkpoints = ckpt.run_dir(settings.tracking.output_dir, run.run_id)
    result.checkpoint_dir = str(checkpoints.resolve()) if checkpoints.is_dir() else None


def log_model(model, tokenizer, data: data_lib.TrainingData, lora: LoraSettings, settings: TrainSettings,
              run: "tracking.RunLogger", result: TrainResult, chat_template: str | None = None) -> None:
    """Log the model to the run; if tracking fails, save it locally and say where."""
    from loraflow import flavor

    base, packaging = settings.model, settings.tracking
    example = (_chat_example(data.eval, data.columns) if chat_template
               else _example_prompts(data.eval, model, tokenizer))
    info = run.log_model(model, tokenizer, base_model=base.base_model, base_mode=packaging.base_mode,
                         registered_model_name=packaging.registered_model_name, input_example=example,
                         trust_remote_code=base.trust_remote_code, chat_template=chat_template)
    if info is not None:
        result.model_uri = info.model_uri
        result.registered_version = run.tag_version(info, settings, lora, result.eval_loss_after)
        return
    local = Path(packaging.output_dir) / f"model-{run.run_id or 'untracked'}"
    flavor.save_model(model, str(local), tokenizer, base_model=base.base_model, base_mode=packaging.base_mode,
                      trust_remote_code=base.trust_remote_code, chat_template=chat_template)
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
