"""Write outputs completely or not at all, so a crash never leaves a half-written file or folder."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sftkit.errors import SftkitError


def _sibling(path: Path, tag: str) -> Path:
    """A hidden, unused name next to ``path`` (same filesystem, so os.replace is atomic)."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:8]}")


def _fsync_dir(directory: Path) -> None:
    """Flush a directory entry so a rename survives a power cut (best effort; not on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as pretty JSON to ``path`` atomically (temp file, fsync, os.replace)."""
    # Serialize first: a non-JSON value then fails before anything on disk is touched.
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` atomically: a reader sees the old file or the whole new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    try:
        # Mode "x" with a fresh name (not tempfile) so the file gets normal umask permissions.
        with open(tmp, "x", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def stale_siblings(path: str | os.PathLike) -> list[Path]:
    """Hidden temp/backup siblings of ``path`` left by an interrupted atomic save (``.name.tmp-*``, ``.name.old-*``)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(
        p for p in path.parent.iterdir() if p.name.startswith((f".{path.name}.tmp-", f".{path.name}.old-"))
    )


def clean_stale(path: str | os.PathLike) -> list[Path]:
    """Remove what an interrupted save of ``path`` left behind; restore the previous output if a crash hid it.

    A save killed while writing leaves a hidden ``.name.tmp-*`` folder (deleted here). A save killed between
    its two renames leaves the previous output as ``.name.old-*`` and nothing at ``path``: it is moved back.
    Returns the paths removed.
    """
    path = Path(path)
    stale = stale_siblings(path)
    backups = [p for p in stale if p.name.startswith(f".{path.name}.old-")]
    if not path.exists() and len(backups) == 1:
        os.replace(backups[0], path)
        stale.remove(backups[0])
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return stale


def replace_dir(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished folder ``tmp`` to ``path``, replacing what is there; the old folder goes last."""
    tmp, path = Path(tmp), Path(path)
    backup = _sibling(path, "old") if path.exists() else None
    if backup is not None:
        # A directory cannot be renamed over a non-empty one, so move the old one aside first
        # and delete it only once the new one is in place.
        os.replace(path, backup)
    try:
        os.replace(tmp, path)
    except BaseException:
        if backup is not None:
            os.replace(backup, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(path.parent)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder that replaces ``path`` only if the block succeeds.

    Leftovers of an earlier interrupted save of the same ``path`` are cleaned first (see :func:`clean_stale`).
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SftkitError(
            f"{str(path)!r} exists and is a file, but atomic_dir writes a folder there.",
            "remove or rename that file, or choose another output folder.",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = _sibling(path, "tmp")
    # os.mkdir rather than tempfile.mkdtemp: mkdtemp creates mode 0700, which would become the
    # final folder's permissions after the rename.
    os.mkdir(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def save_pretrained_atomic(path: str | os.PathLike, *objects: Any) -> Path:
    """``obj.save_pretrained`` for each object (model, tokenizer, ...) into ``path``, complete or not at all."""
    with atomic_dir(path) as tmp:
        for obj in objects:
            obj.save_pretrained(tmp)
    return Path(path)
