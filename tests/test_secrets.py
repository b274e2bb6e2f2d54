"""Tokens live in the environment only: a real train (W&B offline) + merge writes and prints none of them."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from sftkit.paths import REPO_ROOT

TINY_LORA = REPO_ROOT / "configs" / "recipes" / "tiny_lora.yaml"


def _files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.slow
def test_train_and_merge_never_write_or_print_tokens(tmp_path):
    hf_token = "hf_FAKE" + uuid.uuid4().hex  # unique, so a hit can only come from this run
    wandb_key = ("FAKE" + uuid.uuid4().hex * 2)[:40]  # W&B keys are 40 characters
    env = {
        **os.environ,
        "HF_TOKEN": hf_token,
        "HUGGING_FACE_HUB_TOKEN": hf_token,
        "WANDB_API_KEY": wandb_key,
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_PROJECT": "sftkit-secrets-test",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        # cwd is tmp_path: make sure the child imports this checkout's sftkit, not another installed copy.
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    env.pop("ACCELERATE_USE_DEEPSPEED", None)
    (tmp_path / "wandb").mkdir()
    recipe = yaml.safe_load(TINY_LORA.read_text())
    for key in ("model_name_or_path", "train_file", "validation_file"):
        recipe[key] = str(REPO_ROOT / recipe[key])
    recipe.update(output_dir=str(tmp_path / "run"), report_to="wandb", max_steps=2, per_device_train_batch_size=4,
                  max_train_samples=16, max_eval_samples=4, logging_steps=1, save_strategy="steps",
                  save_steps=2)  # fmt: skip
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))

    def run(*args: str) -> subprocess.CompletedProcess:
        proc = subprocess.run([sys.executable, "-m", "sftkit", *args], cwd=tmp_path, env=env,
                              capture_output=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
        return proc

    train = run("train", "--config", str(tmp_path / "recipe.yaml"))
    merge = run("merge", "--base", recipe["model_name_or_path"], "--adapter", str(tmp_path / "run" / "final"),
                "--out", str(tmp_path / "merged"))  # fmt: skip

    files = _files(tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in files}
    # The run really produced what we search: W&B's offline run, a checkpoint, the adapter, the merged model.
    assert any(n.startswith("wandb/wandb/offline-run-") and n.endswith(".wandb") for n in names), sorted(names)
    assert "run/checkpoint-2/training_args.bin" in names, sorted(names)
    assert "run/sftkit_run.json" in names
    assert "run/final/adapter_model.safetensors" in names and "merged/model.safetensors" in names
    assert "run/final/training_args.bin" not in names  # final/ holds no pickle

    secrets = [hf_token.encode(), wandb_key.encode()]
    leaks = [
        (name, secret.decode()[:8])
        for name, data in [("train stdout", train.stdout), ("train stderr", train.stderr),
                           ("merge stdout", merge.stdout), ("merge stderr", merge.stderr)]
        + [(p.relative_to(tmp_path).as_posix(), p.read_bytes()) for p in files]
        for secret in secrets
        if secret in data
    ]  # fmt: skip
    assert not leaks, leaks

    # training_args.bin is a pickle of the SFTConfig: its hub_token must be empty (the token is read from the env).
    args = torch.load(tmp_path / "run" / "checkpoint-2" / "training_args.bin", weights_only=False)
    assert args.hub_token is None and args.report_to == ["wandb"]
