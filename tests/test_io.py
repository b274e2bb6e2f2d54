"""Atomic JSON files and folders: complete or absent, never half-written."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from sftkit import paths
from sftkit.errors import SftkitError
from sftkit.io import atomic_dir, atomic_write_json


def _siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def test_atomic_write_json_round_trip(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "metrics.json"
    data = {"exact_match": 0.5, "name": "café", "rows": [1, 2, 3]}
    atomic_write_json(target, data)
    assert json.loads(target.read_text(encoding="utf-8")) == data
    assert target.read_text(encoding="utf-8").endswith("\n")
    assert _siblings(target) == ["metrics.json"]  # no temp file left behind


def test_atomic_write_json_overwrites_and_keeps_normal_permissions(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    target.write_text("old")
    atomic_write_json(str(target), [1])
    assert json.loads(target.read_text()) == [1]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask


def test_atomic_write_json_unserializable_leaves_old_file(tmp_path: Path) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"ok": True})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": True}
    assert _siblings(target) == ["m.json"]


def test_atomic_dir_creates_new_folder(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with atomic_dir(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target and tmp.is_dir()
        (tmp / "a.txt").write_text("a")
        assert not target.exists()  # nothing visible until the block succeeds
    assert (target / "a.txt").read_text() == "a"
    assert _siblings(target) == ["run"]
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o777 & ~umask


def test_atomic_dir_replaces_existing_folder(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_dir(target) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (target / "old.txt").exists()  # the old output stays usable meanwhile
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert _siblings(target) == ["run"]


def test_atomic_dir_exception_leaves_old_folder_intact(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(target) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"]
    assert (target / "old.txt").read_text() == "old"
    assert _siblings(target) == ["run"]


def test_atomic_dir_exception_without_old_folder_creates_nothing(tmp_path: Path) -> None:
    target = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        with atomic_dir(target):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_refuses_a_file(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.write_text("i am a file")
    with pytest.raises(SftkitError, match="is a file"):
        with atomic_dir(target):
            pass
    assert target.read_text() == "i am a file"


def test_paths_point_into_the_repo() -> None:
    assert (paths.REPO_ROOT / "sftkit" / "paths.py").is_file()
    assert paths.DATA_DIR == paths.REPO_ROOT / "data"
    assert paths.TINY_MODEL_DIR == paths.DATA_DIR / "tiny-base"
    assert paths.WORLD_DIR == paths.DATA_DIR / "world"
    assert paths.OUTPUTS_DIR == paths.REPO_ROOT / "outputs"
