"""Atomic writes and file digests (loraflow.flavor.files)."""

from __future__ import annotations

import hashlib
import os

import pytest

from loraflow.flavor.files import atomic_dir, atomic_file, file_sha256, temporary_env


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
