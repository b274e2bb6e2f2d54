"""Weights & Biases without surprises: offline unless you configured it, never a login prompt, files you can read.

``setup_wandb`` only sets the ``WANDB_*`` environment variables that wandb and transformers' ``WandbCallback``
read; training still goes through ``SFTConfig(report_to="wandb", run_name=...)``. The readers below open an
offline run folder (``<WANDB_DIR>/wandb/offline-run-*``) without syncing it anywhere: the logged tables are
plain JSON files, and the history lives in the run's ``.wandb`` file, a LevelDB-style log of wandb's own
protobuf ``Record`` messages.
"""

from __future__ import annotations

import json
import netrc
import os
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from sftkit.errors import SftkitError

MODES = ("online", "offline", "disabled")
_MODE_ALIASES = {"dryrun": "offline", "run": "online", "shared": "online"}
_DEFAULT_HOST = "https://api.wandb.ai"


@dataclass(frozen=True)
class WandbSetup:
    """What ``setup_wandb`` chose: the mode and why, where runs go, and the project and tags."""

    mode: str
    reason: str
    wandb_dir: Path
    project: str
    tags: tuple[str, ...] = field(default_factory=tuple)

    @property
    def runs_dir(self) -> Path:
        """The folder wandb creates run folders in (``<wandb_dir>/wandb``)."""
        return self.wandb_dir / "wandb"

    def __str__(self) -> str:
        where = f"runs under {self.runs_dir}" if self.mode != "disabled" else "nothing is written"
        return f"W&B {self.mode} ({self.reason}); project {self.project!r}, tags {list(self.tags)}; {where}"


def wandb_credentials_found() -> bool:
    """True when an API key is set (``WANDB_API_KEY``) or stored by ``wandb login`` (netrc); nothing is contacted."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", _DEFAULT_HOST)).netloc
    path = os.environ.get("NETRC") or os.path.join(os.path.expanduser("~"), ".netrc")
    try:
        creds = netrc.netrc(path).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return bool(creds and creds[2])


def _normalize_mode(mode: str, source: str) -> str:
    key = str(mode).strip().lower()
    key = _MODE_ALIASES.get(key, key)
    if key not in MODES:
        raise SftkitError(
            f"W&B mode {mode!r} (from {source}) is not one of {', '.join(MODES)}.",
            'use "offline" (default, nothing leaves the machine), "online" (needs an API key) or "disabled".',
        )
    return key


def setup_wandb(
    output_dir: str | os.PathLike,
    project: str = "sftkit",
    tags: str | list[str] | tuple[str, ...] = (),
    mode: str | None = None,
) -> WandbSetup:
    """Point W&B at ``output_dir`` and pick its mode: ``mode``, else ``$WANDB_MODE``, else online only with a key."""
    if mode:
        mode, reason = _normalize_mode(mode, "the mode argument"), "asked for"
    elif os.environ.get("WANDB_MODE", "").strip():
        mode, reason = _normalize_mode(os.environ["WANDB_MODE"], "$WANDB_MODE"), "from $WANDB_MODE"
    elif wandb_credentials_found():
        mode, reason = "online", "an API key is configured"
    else:
        mode, reason = "offline", "no API key configured"
    if mode == "online" and not wandb_credentials_found():
        # Online without a key makes wandb ask for one: a prompt in a terminal, a hang or an error headless.
        raise SftkitError(
            "W&B online mode was requested but no API key is configured, so wandb would ask for a login.",
            "set WANDB_API_KEY (or run `wandb login` once in a terminal), or use mode='offline' and upload "
            "later with `wandb sync <run folder>`.",
        )
    if isinstance(tags, str):
        tags = [t for t in tags.split(",")]
    tags = tuple(t.strip() for t in tags if t and t.strip())
    bad = [t for t in tags if len(t) > 64]
    if bad:
        raise SftkitError(f"W&B tags must be at most 64 characters: {bad}.", "shorten the tags.")

    _restart_wandb_session()
    wandb_dir = Path(output_dir).expanduser().resolve()
    wandb_dir.mkdir(parents=True, exist_ok=True)
    os.environ["WANDB_MODE"] = mode
    os.environ["WANDB_DIR"] = str(wandb_dir)
    os.environ["WANDB_PROJECT"] = project  # read by transformers' WandbCallback (default "huggingface")
    if tags:
        os.environ["WANDB_TAGS"] = ",".join(tags)
    else:
        os.environ.pop("WANDB_TAGS", None)
    return WandbSetup(mode=mode, reason=reason, wandb_dir=wandb_dir, project=project, tags=tags)


def _restart_wandb_session() -> None:
    """Make wandb read the environment again: it reads WANDB_* once per session and ignores later changes."""
    if "wandb" not in sys.modules:
        return
    import wandb

    if wandb.run is not None:
        raise SftkitError(
            "a W&B run is still active, and wandb would ignore the new settings.",
            "call wandb.finish() first (transformers' WandbCallback leaves the run open after training).",
        )
    wandb.teardown()


def offline_runs(runs_dir: str | os.PathLike) -> list[Path]:
    """Offline run folders under ``runs_dir`` (a ``.../wandb`` folder or its parent), oldest first."""
    runs_dir = Path(runs_dir)
    if (runs_dir / "wandb").is_dir():
        runs_dir = runs_dir / "wandb"
    return sorted(runs_dir.glob("offline-run-*"), key=lambda p: p.name)


def sync_command(run_dir: str | os.PathLike) -> str:
    """The command that uploads an offline run once you are online and logged in."""
    return f"wandb sync {Path(run_dir)}"


_BLOCK = 32768
_HEADER = 7  # b":W&B", a 2-byte magic and a version byte
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _raw_records(path: Path) -> list[bytes]:
    """Split a ``.wandb`` file into its records (LevelDB log framing: 32 KiB blocks, 7-byte chunk headers)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise SftkitError(
            f"{path} is not a W&B run file (it does not start with ':W&B').", "pass a run-*.wandb file."
        )
    records, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        left_in_block = _BLOCK - pos % _BLOCK
        if left_in_block < 7:  # a block's tail too short for a header is zero padding
            pos += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            records.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            records.append(pending + chunk)
            pending = b""
    return records


def _run_file(run_dir: Path) -> Path:
    files = sorted(Path(run_dir).glob("run-*.wandb"))
    if not files:
        raise SftkitError(
            f"no run-*.wandb file in {run_dir}.",
            "pass an offline run folder (…/wandb/offline-run-<date>-<id>); call wandb.finish() first.",
        )
    return files[0]


def _records(run_dir: Path, timeout: float) -> list:
    """The run file's records once it is complete: wandb.finish() returns before wandb-core has written it."""
    from wandb.proto import wandb_internal_pb2

    path = _run_file(Path(run_dir))
    deadline = time.monotonic() + timeout
    while True:
        records = []
        for raw in _raw_records(path):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(raw)
            records.append(record)
        # The exit record is the last thing wandb writes for a finished run.
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() >= deadline:
            raise SftkitError(
                f"{path} holds no finished run after waiting {timeout:.0f} s ({len(records)} records).",
                "call wandb.finish() (or run.finish()) before reading the run; a killed run can still be "
                "uploaded with `wandb sync`, but it is not complete.",
            )
        time.sleep(0.1)


def read_history(run_dir: str | os.PathLike, timeout: float = 60.0) -> list[dict]:
    """Every ``wandb.log`` row of a finished offline run, in order, with values decoded from JSON."""
    rows = []
    for record in _records(Path(run_dir), timeout):
        if record.WhichOneof("record_type") != "history":
            continue
        row = {}
        for item in record.history.item:
            key = item.key or "/".join(item.nested_key)
            row[key] = json.loads(item.value_json)
        rows.append(row)
    return rows


def read_run_info(run_dir: str | os.PathLike, timeout: float = 60.0) -> dict:
    """Project, run name, tags and id of a finished offline run, read from its ``.wandb`` file."""
    for record in _records(Path(run_dir), timeout):
        if record.WhichOneof("record_type") == "run":
            run = record.run
            return {
                "project": run.project,
                "name": run.display_name,
                "tags": list(run.tags),
                "id": run.run_id,
            }
    raise SftkitError(f"no run record in {_run_file(Path(run_dir))}.", "the run file is truncated or empty.")


def read_tables(run_dir: str | os.PathLike, key: str, timeout: float = 60.0) -> list[dict]:
    """Each table logged under ``key``, in logging order: {"history": row, "columns": [...], "data": [[...]]}."""
    run_dir = Path(run_dir)
    tables = []
    for row in read_history(run_dir, timeout):
        path = row.get(f"{key}/path")
        if row.get(f"{key}/_type") != "table-file" or not path:
            continue
        content = json.loads((run_dir / "files" / path).read_text(encoding="utf-8"))
        tables.append({"history": row, "columns": content["columns"], "data": content["data"]})
    return tables
