"""Writing files and folders so that a reader sees all of them or none, and digests of files.

`atomic_dir` and `atomic_file` write into a hidden temporary sibling of the target (the same file
system) and rename it into place once complete: a crash leaves at most a stray `.tmp-*` entry, never
half a result. The flavor and the rest of loraflow (checkpoints, predictions, exports) use them.
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_dir(target: str | os.PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder that becomes `target` when the block ends without error.

    Its mode is a plain `mkdir`'s (the umask's, so a serving account can read it); a failure removes
    it and the parent folders this call created.

    Args:
        target: the folder to create.
        replace: replace an existing `target` (it is removed only once the new one is complete, and
            put back if the new one cannot be renamed into place); otherwise an existing non-empty
            `target` is an error, and an empty one is replaced.

    Raises:
        FileExistsError: `target` exists, is not empty, and `replace` is False (checked before
            and after the block, so a folder made meanwhile is never overwritten).
    """
    target = Path(target)
    _check_free(target, replace)
    created = _make_parents(target.parent)
    published = False
    try:
        tmp = _new_dir(target.parent, f".tmp-{target.name}-")
        try:
            yield tmp
            _fsync_tree(tmp)
            _check_free(target, replace)
            if target.exists():
                _swap(tmp, target)
            else:
                os.rename(tmp, target)
            published = True
            _fsync(target.parent)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if not published:
            _remove_empty(created)


@contextmanager
def atomic_file(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path (in `target`'s folder, the umask's mode) that replaces `target` when the
    block ends without error."""
    import uuid

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".tmp-{target.name}-{uuid.uuid4().hex[:12]}"
    os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask's mode, not mkstemp's 0600
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, target)  # atomic: a reader sees the old file or the new one
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path: str | os.PathLike) -> str:
    """`sha256:<hex>` of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _make_parents(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones this call created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    created: list[Path] = []
    try:
        for path in reversed(missing):
            try:
                path.mkdir()
            except FileExistsError:
                continue  # made meanwhile by someone else: not ours to remove
            created.append(path)
    except BaseException:
        _remove_empty(created)
        raise
    return created


def _remove_empty(created: list[Path]) -> None:
    """Remove the folders `_make_parents` created, innermost first, where they are still empty."""
    for path in reversed(created):
        try:
            path.rmdir()
        except OSError:
            return  # not empty (someone else wrote there) or gone: leave it and its parents


def _new_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder `parent/<prefix><random>`, made by `os.mkdir` so the umask sets its mode."""
    for _ in range(100):
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
        except FileExistsError:
            continue
        return path
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(parent / prefix))


def _swap(tmp: Path, target: Path) -> None:
    """Replace the folder `target` by `tmp` (a rename cannot replace a folder: the old one moves aside first)."""
    old = _new_dir(target.parent, f".old-{target.name}-")
    os.rename(target, old / target.name)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old / target.name, target)  # the previous folder is back, as if nothing happened
        os.rmdir(old)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _check_free(target: Path, replace: bool) -> None:
    if not replace and target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise FileExistsError(f"{str(target)!r} already exists and is not an empty folder")


def _fsync_tree(root: Path) -> None:
    for folder, _, files in os.walk(root):
        for name in files:
            _fsync(Path(folder) / name)
        _fsync(Path(folder))


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
