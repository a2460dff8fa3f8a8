"""Resumable training checkpoints: adapter, optimizer, scheduler, RNG and data position, written atomically.

Layout, one folder per run:

    <output_dir>/checkpoints/<run_id>/step-000040/
        adapter_model.safetensors, adapter_config.json   (peft's save_pretrained)
        optimizer.pt, scheduler.pt, rng.pt               (tensors only: loaded with weights_only=True)
        state.json                                       (step, epoch, batch position, history, settings)

A checkpoint is written into a hidden temporary sibling and renamed into place
(`loraflow.flavor.files.atomic_dir`), so a crash or `kill -9` mid-write leaves at worst a stray
`.tmp-*` folder, never a broken `step-*` one. Only
`step-*` folders are ever read back. The newest two are kept.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from loraflow.errors import LoraflowError
from loraflow.flavor.files import atomic_dir

KEEP_LAST = 2
STATE_FILE = "state.json"


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


def save_checkpoint(root: Path, state: CheckpointState, model, optimizer, scheduler) -> Path:
    """Write a checkpoint atomically under `root` and prune old ones; returns its folder."""
    import torch

    final = root / f"step-{state.step:06d}"
    # replace: the same step written again (a resumed run stopped at once)
    with atomic_dir(final, replace=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1, sort_keys=True))
    for old in sorted(root.glob("step-*"))[:-KEEP_LAST]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def restore(path: Path, model, optimizer, scheduler) -> CheckpointState:
    """Load adapter weights, optimizer, scheduler and RNG states from a checkpoint into live objects."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rng = torch.load(path / "rng.pt", weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return read_state(path)
