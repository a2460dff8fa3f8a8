"""The output folder of an export: checking it before anything is loaded, and writing it.

Writing goes through `loraflow.flavor.files.atomic_dir`, the one atomic-write mechanism of loraflow:
every step writes into a temporary sibling of the target, which becomes the target only once all
steps are done (with `--overwrite`, the previous folder is replaced only then). On any failure the
temporary folder and the parent folders made for it are gone, and an OS reason (a full disk, a file
too large, a permission) becomes an `ExportError` that says so.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraflow.export import ExportError
from loraflow.flavor.files import atomic_dir


def check_target(output: str | os.PathLike, overwrite: bool) -> Path:
    """The absolute output folder, after checking it can be written (nothing is created yet).

    Raises:
        ExportError: it is a file, a non-empty folder without `overwrite`, or under a path that is a
            file or cannot be read.
    """
    target = Path(os.path.abspath(os.path.expanduser(output)))
    if target.exists() and not target.is_dir():
        raise ExportError(f"`output` {str(target)!r} is a file, not a folder: choose a folder path for --output")
    try:
        not_empty = target.is_dir() and any(target.iterdir())
    except OSError as e:
        raise ExportError(f"`output` {str(target)!r} cannot be read ({e.strerror}): choose a folder you can "
                          "write to") from e
    if not_empty and not overwrite:
        raise ExportError(f"`output` {str(target)!r} exists and is not empty: choose a new folder, or pass "
                          "--overwrite to replace its contents")
    ancestor = target.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ExportError(f"`output` {str(target)!r} cannot be created: {str(ancestor)!r} is a file, not a "
                          "folder; choose another --output")
    return target


def check_not_inside(target: Path, source_dir: Path) -> None:
    """Refuse an output folder that is the source model's folder or inside it."""
    source = source_dir.resolve()
    resolved = target.resolve()
    if resolved == source or source in resolved.parents:
        raise ExportError(f"`output` {str(target)!r} is inside the source model's folder {str(source)!r}: "
                          "exporting there would mix the export into the model; choose a folder outside it")


class _Abandon(Exception):
    """Raised inside `atomic_dir` to leave it without publishing anything."""


def check_writable(target: Path, overwrite: bool) -> None:
    """Prove `target` can be written before the model loads: enter `atomic_dir` and abandon it, which
    makes the missing parents and the temporary folder, then removes them; nothing is published.

    Raises:
        ExportError: a folder cannot be made there (permissions, a read-only or system file system).
    """
    try:
        with atomic_dir(target, replace=overwrite):
            raise _Abandon
    except _Abandon:
        return
    except OSError as e:
        raise ExportError(f"`output` {str(target)!r} cannot be written: {e.strerror or e} "
                          f"({str(e.filename or target)!r}); choose a folder you can write to") from e


def write_folder(target: Path, steps: list[tuple[str, Callable[[Path], None]]], *, overwrite: bool = False,
                 progress: bool = True) -> None:
    """Run each `(description, write(folder))` step into `atomic_dir(target)`, which publishes the
    folder as `target` once every step is done.

    On any failure nothing is left: no temporary folder, no parent made for it, and the previous
    `target` (with `overwrite`) as it was.

    Raises:
        ExportError: a write failed for an OS reason (a full disk, a file too large, a permission), or
            `target` was filled by someone else meanwhile; other errors pass on unchanged.
    """
    from tqdm.auto import tqdm

    try:
        with atomic_dir(target, replace=overwrite) as folder:
            with tqdm(total=len(steps), desc=f"export to {target.name}", unit="step", disable=not progress) as bar:
                for description, write in steps:
                    bar.set_postfix_str(description)
                    write(folder)
                    bar.update()
    except BaseException as e:
        if isinstance(e, FileExistsError) and e.errno is None:  # atomic_dir's check once the steps are done
            raise ExportError(f"`output` {str(target)!r} was filled by something else during the export; nothing "
                              "was written (choose a new folder, or pass --overwrite)") from e
        code = os_errno(e)
        if code is not None:
            raise ExportError(_write_failure(target, e, code)) from e
        raise


def os_errno(error: BaseException) -> int | None:
    """The OS error code behind an exception: an OSError's `errno`, or the "(os error N)" that
    safetensors' Rust writer puts in its `SafetensorError` message (it is no OSError), also in the
    exceptions it was raised from."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno is not None:
            return seen.errno
        if match := re.search(r"\(os error (\d+)\)", str(seen)):
            return int(match.group(1))
        seen = seen.__cause__ or seen.__context__
    return None


def _write_failure(target: Path, e: BaseException, code: int) -> str:
    reason = getattr(e, "strerror", None) or os.strerror(code)
    if code == errno.ENOSPC:
        fix = "the disk is full: free space or choose --output on another disk"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "choose a folder you can write to"
    else:
        fix = "check the path and retry"
    return f"could not write `output` {str(target)!r}: {reason}; nothing was written ({fix})"


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write `data` as indented, key-sorted JSON."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def copy_file(source: Path, destination: Path) -> None:
    """Copy one file (its bytes only). A single place to write files, so tests can fail it."""
    shutil.copyfile(source, destination)
