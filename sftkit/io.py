"""Write outputs completely or not at all, so a crash never leaves a half-written file or folder."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    path = Path(path)
    # Serialize first: a non-JSON value then fails before anything on disk is touched.
    text = json.dumps(obj, indent=2, ensure_ascii=False) + "\n"
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


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary sibling folder that replaces ``path`` only if the block succeeds."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise SftkitError(
            f"{str(path)!r} exists and is a file, but atomic_dir writes a folder there.",
            "remove or rename that file, or choose another output folder.",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, "tmp")
    # os.mkdir rather than tempfile.mkdtemp: mkdtemp creates mode 0700, which would become the
    # final folder's permissions after the rename.
    os.mkdir(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

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
