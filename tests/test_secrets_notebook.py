"""A notebook run with real-looking tokens in the environment: the executed notebook and every file it wrote
(metrics, generation samples, the offline W&B run) hold none of them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from nbrun import run_notebook


@pytest.mark.slow
def test_tracking_notebook_never_writes_tokens(tmp_path, monkeypatch):
    hf_token = "hf_FAKE" + uuid.uuid4().hex  # unique, so a hit can only come from this run
    wandb_key = ("FAKE" + uuid.uuid4().hex * 2)[:40]  # W&B keys are 40 characters
    monkeypatch.setenv("HF_TOKEN", hf_token)
    monkeypatch.setenv("WANDB_API_KEY", wandb_key)
    monkeypatch.setenv("WANDB_MODE", "offline")  # a key is set: without this the notebook would go online
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    metrics = run_notebook("07_tracking_and_samples.ipynb", tmp_path)
    assert metrics["wandb"]["mode"] == "offline"
    files = [p for p in Path(tmp_path).rglob("*") if p.is_file() and not p.is_symlink()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.name == "samples.jsonl" for p in files)
    assert any(p.name == "07_tracking_and_samples.ipynb" for p in files)  # the executed copy, with outputs
    leaks = [
        str(p.relative_to(tmp_path))
        for p in files
        for secret in (hf_token, wandb_key)
        if secret.encode() in p.read_bytes()
    ]
    assert not leaks, f"tokens found in: {leaks}"
