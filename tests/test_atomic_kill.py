"""A save killed with SIGKILL leaves the previous model intact and loadable; the next save cleans up after it.

The saving process is real (python -m style subprocess) and is killed at a known point: in the middle of
writing model.safetensors (half the bytes on disk), or between the two renames that swap the folders.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftkit.io import clean_stale, save_pretrained_atomic, stale_siblings
from sftkit.paths import REPO_ROOT, TINY_MODEL_DIR

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}

# The child saves a changed copy of the tiny model to OUT through sftkit.io.save_pretrained_atomic.
CHILD = """
import os, signal, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from sftkit.io import save_pretrained_atomic

out, where, base = sys.argv[1], sys.argv[2], sys.argv[3]
model = AutoModelForCausalLM.from_pretrained(base)
tok = AutoTokenizer.from_pretrained(base)
with torch.no_grad():
    model.lm_head.weight.add_(1.0)

if where == "mid-write":
    import safetensors.torch
    import transformers.modeling_utils as mu

    def half_then_die(tensors, filename, metadata=None):
        data = safetensors.torch.save(tensors, metadata=metadata)
        with open(filename, "wb") as f:
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    mu.safe_save_file = half_then_die
elif where == "between-renames":
    import sftkit.io as io

    real_replace, calls = os.replace, []

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the old folder is already aside, the new one not yet in place
            os.kill(os.getpid(), signal.SIGKILL)
        real_replace(src, dst)

    io.os.replace = replace_then_die
save_pretrained_atomic(out, model, tok)
print("saved without being killed")
"""


def _kill_child(out: Path, where: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(out), where, str(TINY_MODEL_DIR)],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, (proc.returncode, proc.stdout, proc.stderr[-2000:])


def _lm_head(folder: Path) -> torch.Tensor:
    return AutoModelForCausalLM.from_pretrained(folder).lm_head.weight.detach()


@pytest.fixture
def previous(tmp_path) -> tuple[Path, torch.Tensor]:
    """A complete earlier save at tmp_path/out (the tiny model as shipped)."""
    out = tmp_path / "out"
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    save_pretrained_atomic(out, model, AutoTokenizer.from_pretrained(TINY_MODEL_DIR))
    return out, model.lm_head.weight.detach().clone()


def test_killed_mid_write_keeps_the_previous_model(previous):
    out, weight = previous
    files_before = sorted(p.name for p in out.iterdir())
    _kill_child(out, "mid-write")

    # The destination is the previous, complete model: same files, loads, same weights.
    assert sorted(p.name for p in out.iterdir()) == files_before
    torch.testing.assert_close(_lm_head(out), weight)
    AutoTokenizer.from_pretrained(out)
    # The half-written folder is a hidden sibling, and it really was cut off mid-file.
    (stale,) = stale_siblings(out)
    assert stale.name.startswith(".out.tmp-")
    partial = stale / "model.safetensors"
    assert 0 < partial.stat().st_size < (out / "model.safetensors").stat().st_size
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["out", stale.name])

    # The next save cleans the stale folder and replaces the model completely.
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    save_pretrained_atomic(out, model, AutoTokenizer.from_pretrained(TINY_MODEL_DIR))
    assert stale_siblings(out) == [] and sorted(p.name for p in out.parent.iterdir()) == ["out"]
    torch.testing.assert_close(_lm_head(out), 2.0 * weight)


def test_killed_between_the_renames_restores_the_previous_model(previous):
    out, weight = previous
    _kill_child(out, "between-renames")

    # Never a half-written folder at the destination: here there is none at all for a moment, the previous
    # model sits complete in .out.old-*, the finished new one in .out.tmp-*.
    assert not out.exists()
    names = sorted(p.name.split("-")[0] for p in stale_siblings(out))
    assert names == [".out.old", ".out.tmp"], names
    removed = clean_stale(out)  # what every atomic save does first
    assert [p.name.split("-")[0] for p in removed] == [".out.tmp"]
    torch.testing.assert_close(_lm_head(out), weight)
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
