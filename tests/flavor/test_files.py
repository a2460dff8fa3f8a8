"""Atomic writes and file digests (loraflow.flavor.files)."""

from __future__ import annotations

import hashlib
import os

import pytest

from loraflow.flavor.files import atomic_dir, atomic_file, file_sha256
from loraflow.flavor.save import temporary_env


def test_a_folder_appears_only_once_complete(tmp_path):
    target = tmp_path / "out" / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("a")
        assert not target.exists() and tmp.parent == target.parent
    assert (target / "a.txt").read_text() == "a"
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # no temporary sibling left


def test_a_failure_inside_leaves_nothing_behind(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            (tmp / "half").write_text("x")
            raise OSError(28, "disk full")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_never_overwritten_unless_asked(tmp_path):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep").write_text("old")
    with pytest.raises(FileExistsError):
        with atomic_dir(target):
            pass
    assert (target / "keep").read_text() == "old"
    with atomic_dir(target, replace=True) as tmp:
        (tmp / "new").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(RuntimeError):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]
    with atomic_file(target) as tmp:
        tmp.write_text("new\n")
    assert target.read_text() == "new\n" and [p.name for p in tmp_path.iterdir()] == ["out.jsonl"]


def test_file_sha256_is_the_digest_of_the_bytes(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(os.urandom(3 << 20))  # more than one 1 MiB chunk
    assert file_sha256(path) == "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_temporary_env_restores_what_was_there(monkeypatch):
    monkeypatch.setenv("LORAFLOW_TEST_VAR", "before")
    with temporary_env("LORAFLOW_TEST_VAR", "during"):
        assert os.environ["LORAFLOW_TEST_VAR"] == "during"
    assert os.environ["LORAFLOW_TEST_VAR"] == "before"
    monkeypatch.delenv("LORAFLOW_TEST_VAR")
    with temporary_env("LORAFLOW_TEST_VAR", "during"):
        pass
    assert "LORAFLOW_TEST_VAR" not in os.environ
    with temporary_env("LORAFLOW_TEST_VAR", None):
        assert "LORAFLOW_TEST_VAR" not in os.environ


def test_a_folder_gets_the_umask_mode_not_mkdtemps_0700(tmp_path):
    """A saved model or an export must be readable by another user (a serving account)."""
    for umask, mode in ((0o022, 0o755), (0o077, 0o700)):
        old = os.umask(umask)
        try:
            with atomic_dir(tmp_path / f"model-{umask:o}") as tmp:
                (tmp / "a.txt").write_text("a")
        finally:
            os.umask(old)
        assert (tmp_path / f"model-{umask:o}").stat().st_mode & 0o777 == mode


def test_a_failure_removes_the_parent_folders_it_created_and_only_those(tmp_path):
    (tmp_path / "kept").mkdir()
    target = tmp_path / "kept" / "new" / "deeper" / "model"
    with pytest.raises(OSError, match="disk full"):
        with atomic_dir(target) as tmp:
            assert (tmp_path / "kept" / "new" / "deeper").is_dir()
            raise OSError(28, "disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and list((tmp_path / "kept").iterdir()) == []
    with atomic_dir(target) as tmp:  # on success they stay, of course
        (tmp / "a.txt").write_text("a")
    assert (target / "a.txt").read_text() == "a"


def test_a_failed_rename_into_place_puts_the_previous_folder_back(tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "keep").write_text("old")
    real_rename = os.rename

    def rename(src, dst):
        if os.path.basename(src).startswith(".tmp-model-"):
            raise OSError(5, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_dir(target, replace=True) as tmp:
            (tmp / "new").write_text("new")
    monkeypatch.undo()
    assert [p.name for p in target.iterdir()] == ["keep"] and [p.name for p in tmp_path.iterdir()] == ["model"]


def test_an_atomic_file_gets_the_umask_mode_not_a_private_one(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_file(tmp_path / "out.csv") as tmp:
            tmp.write_text("a\n")
    finally:
        os.umask(old)
    assert (tmp_path / "out.csv").stat().st_mode & 0o777 == 0o644
