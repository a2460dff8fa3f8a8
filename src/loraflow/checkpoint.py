"""Resumable training checkpoints: adapter, optimizer, scheduler, every process's RNG and the data position.

Layout, one folder per run:

    <output_dir>/checkpoints/<run_id>/step-000040/
        adapter_model.safetensors, adapter_config.json   (peft's save_pretrained: the adapter, never the base)
        optimizer.bin, custom_checkpoint_0.pkl           (accelerate's save_state: optimizer, scheduler)
        random_states_0.pkl, random_states_1.pkl, ...    (accelerate's save_state: one per process)
        state.json                                       (step, epoch, batch position, history, settings)

`accelerate.Accelerator.save_state` / `load_state` write and read everything but the adapter and
`state.json`; `track` hooks peft's adapter saving into them, so a frozen base of many GB is never
copied. A checkpoint written before accelerate handled them (`optimizer.pt`, `scheduler.pt` and one
`rng.pt`, process 0's) still resumes.

A checkpoint is written into a hidden temporary sibling and renamed into place
(`loraflow.flavor.files.atomic_dir`), so a crash or `kill -9` mid-write leaves at worst a stray
`.tmp-*` folder, never a broken `step-*` one. Only
`step-*` folders are ever read back. The newest two are kept.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraflow.errors import LoraflowError
from loraflow.flavor.files import atomic_dir

if TYPE_CHECKING:
    from accelerate import Accelerator

logger = logging.getLogger(__name__)

KEEP_LAST = 2
STATE_FILE = "state.json"
ADAPTER_FILE = "adapter_model.safetensors"
OLD_RNG_FILE = "rng.pt"  # the layout before accelerate's save_state: optimizer.pt, scheduler.pt, rng.pt


@dataclass
class CheckpointState:
    """Where training stood: enough to continue as if it had never stopped."""

    step: int
    epoch: int
    batches_in_epoch: int  # batches of `epoch` already consumed
    run_id: str | None
    settings: dict[str, Any]  # the flat, resolved settings the run was started with
    history: dict[str, list[list[float]]] = field(default_factory=dict)


def run_dir(output_dir: str | Path, run_id: str | None) -> Path:
    return Path(output_dir) / "checkpoints" / (run_id or "untracked")


def track(accelerator: "Accelerator", model, scheduler) -> None:
    """Make `accelerator.save_state` / `load_state` cover `scheduler` and keep only `model`'s adapter.

    Args:
        accelerator: the run's accelerator.
        model: the PEFT model as `accelerator.prepare` returned it.
        scheduler: the learning-rate scheduler (not prepared: the loop steps it once per optimizer step).
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    peft_model = accelerator.unwrap_model(model)

    def ours(m) -> bool:  # accelerate lists the model as it was before wrapping (DDP), so compare unwrapped
        return accelerator.unwrap_model(m) is peft_model

    def save_adapter(models: list, weights: list, output_dir: str) -> None:
        index = next(i for i, m in enumerate(models) if ours(m))
        # every process calls it: gathering the weights may be collective; only the main one writes
        peft_model.save_pretrained(output_dir, is_main_process=accelerator.is_main_process, safe_serialization=True)
        if len(weights) == len(models):  # accelerate would save the whole model, frozen base included
            weights.pop(index)

    def load_adapter(models: list, input_dir: str) -> None:
        models[:] = [m for m in models if not ours(m)]
        set_peft_model_state_dict(peft_model, load_file(Path(input_dir) / ADAPTER_FILE))

    accelerator.register_for_checkpointing(scheduler)
    accelerator.register_save_state_pre_hook(save_adapter)
    accelerator.register_load_state_pre_hook(load_adapter)


@contextmanager
def _shared_atomic_dir(final: Path, accelerator: "Accelerator") -> Iterator[Path]:
    """The main process's `atomic_dir(final)`, whose temporary folder every process writes into.

    Only the main process creates and renames the folder (after the block, so after every process
    has written its share); the others get its path from it, and `final` is the main process's.
    """
    from accelerate.utils import broadcast_object_list

    with ExitStack() as stack:
        paths: list[Path | None] = [None]
        if accelerator.is_main_process:
            # replace: the same step written again (a resumed run stopped at once)
            paths = [stack.enter_context(atomic_dir(final, replace=True))]
        broadcast_object_list(paths)
        yield paths[0]
        accelerator.wait_for_everyone()  # every process's files are in before the rename


def save_checkpoint(root: Path, state: CheckpointState, accelerator: "Accelerator") -> Path:
    """Write a checkpoint atomically under `root` and prune old ones; returns its folder.

    Every process must call it (each one saves its own RNG state); the main process's `root` and
    `state` are the ones written, into a folder every process can reach (one machine, or a shared
    file system). It returns once the folder is complete, on every process.
    """
    from accelerate.utils import broadcast_object_list

    final = root / f"step-{state.step:06d}"
    with _shared_atomic_dir(final, accelerator) as tmp:
        accelerator.save_state(tmp)
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1, sort_keys=True))
    if accelerator.is_main_process:
        for old in sorted(root.glob("step-*"))[:-KEEP_LAST]:
            shutil.rmtree(old, ignore_errors=True)
    paths = [final]
    broadcast_object_list(paths)  # the main process's folder, published: `root` differs on the others
    return paths[0]


def latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint folder under `root` (temporary folders are ignored)."""
    complete = [p for p in sorted(root.glob("step-*")) if (p / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def resolve_checkpoint(resume_from: str, output_dir: str | Path) -> Path:
    """A checkpoint folder from `--resume-from`: a checkpoint, a run's checkpoint folder, or a run id.

    Raises:
        LoraflowError: nothing resumable there, saying where it looked.
    """
    path = Path(resume_from)
    try:
        if (path / STATE_FILE).is_file():
            return path
        for root in (path, run_dir(output_dir, resume_from)):
            found = latest_checkpoint(root) if root.is_dir() else None
            if found:
                return found
    except OSError as err:  # e.g. ENAMETOOLONG: is_file/is_dir swallow only "not found"
        raise LoraflowError(
            f"`resume_from` {resume_from[:200]!r} cannot be read as a checkpoint folder: {err.strerror or err}"
        ) from err
    raise LoraflowError(
        f"`resume_from` {resume_from!r}: no checkpoint found (looked in {path} and "
        f"{run_dir(output_dir, resume_from)}); pass a checkpoint folder or the run id of a run "
        "trained with --checkpoint-steps > 0 or stopped with Ctrl-C/SIGTERM"
    )


def read_state(path: Path) -> CheckpointState:
    return CheckpointState(**json.loads((path / STATE_FILE).read_text()))


def restore(path: Path, accelerator: "Accelerator", model, optimizer, scheduler) -> CheckpointState:
    """Load adapter, optimizer, scheduler and RNG states from a checkpoint into live objects (every process).

    Args:
        path: a checkpoint folder (`resolve_checkpoint`).
        accelerator: the run's accelerator, after `track(accelerator, model, scheduler)`.
        model, optimizer, scheduler: the live objects, `model` and `optimizer` as prepared; used as
            such only for a checkpoint in the layout before accelerate's (`OLD_RNG_FILE`).

    Returns:
        Where training stood.

    Raises:
        LoraflowError: the folder holds neither layout's optimizer state.
    """
    if (path / OLD_RNG_FILE).is_file():
        _restore_old_layout(path, accelerator.unwrap_model(model), optimizer, scheduler)
        return read_state(path)
    if not (path / "optimizer.bin").is_file():
        raise LoraflowError(
            f"checkpoint {path} has no optimizer state (optimizer.bin, or optimizer.pt with rng.pt in the "
            "earlier layout): it is incomplete; resume from another checkpoint of the run, or start a new run")
    written = len(list(path.glob("random_states_*.pkl")))
    if written != accelerator.num_processes and accelerator.is_main_process:
        logger.warning("checkpoint %s holds the RNG states of %d processes, this run has %d: processes without one "
                       "continue from the seed, so the run will not match an uninterrupted one exactly",
                       path, written, accelerator.num_processes)
    accelerator.load_state(str(path))
    return read_state(path)


def _restore_old_layout(path: Path, model, optimizer, scheduler) -> None:
    """The layout with one `rng.pt` (process 0's torch RNG): every process continues from that state."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / ADAPTER_FILE))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / OLD_RNG_FILE, weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
