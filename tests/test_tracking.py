"""W&B offline by default, never a prompt, and offline runs read back from the files wandb wrote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftkit.errors import SftkitError
from sftkit.tracking import (
    offline_runs,
    read_history,
    read_run_info,
    read_tables,
    setup_wandb,
    sync_command,
    wandb_credentials_found,
)


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No W&B configuration at all: no key, no mode, an empty home (so no ~/.netrc)."""
    for key in (
        "WANDB_API_KEY",
        "WANDB_MODE",
        "WANDB_DIR",
        "WANDB_PROJECT",
        "WANDB_TAGS",
        "WANDB_BASE_URL",
        "NETRC",
    ):
        monkeypatch.delenv(key, raising=False)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    return home


def test_offline_without_credentials(clean_env, tmp_path):
    info = setup_wandb(tmp_path / "out", project="p", tags="tiny, lora")
    assert info.mode == "offline" and "no API key" in info.reason
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    assert os.environ["WANDB_DIR"] == str((tmp_path / "out").resolve())
    assert os.environ["WANDB_PROJECT"] == "p" and os.environ["WANDB_TAGS"] == "tiny,lora"
    assert info.tags == ("tiny", "lora") and info.runs_dir == (tmp_path / "out").resolve() / "wandb"


def test_online_when_a_key_is_configured(clean_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_credentials_found()
    assert setup_wandb(tmp_path).mode == "online"


def test_netrc_login_counts_as_configured(clean_env, tmp_path):
    netrc = clean_env / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert wandb_credentials_found()
    assert setup_wandb(tmp_path).mode == "online"


def test_user_mode_wins_and_aliases(clean_env, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert setup_wandb(tmp_path).mode == "disabled"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert setup_wandb(tmp_path).mode == "offline"
    assert setup_wandb(tmp_path, mode="disabled").mode == "disabled"


def test_online_without_key_fails_before_anything_prompts(clean_env, tmp_path):
    with pytest.raises(SftkitError, match="no API key"):
        setup_wandb(tmp_path, mode="online")


def test_unknown_mode_is_refused(clean_env, tmp_path):
    with pytest.raises(SftkitError, match="not one of"):
        setup_wandb(tmp_path, mode="cloud")


def test_offline_run_reads_back(clean_env, tmp_path):
    import wandb

    info = setup_wandb(tmp_path, project="sftkit-test", tags=["a", "b"])
    run = wandb.init(name="readback")
    logged = []
    for step in (0, 5, 10):
        data = [[step, f"q{i}", f"g{i}-{step}"] for i in range(2)]
        logged.append(data)
        wandb.log({"tab": wandb.Table(columns=["step", "prompt", "gen"], data=data), "loss": 1 / (step + 1)})
    run.finish()

    runs = offline_runs(info.runs_dir)
    assert len(runs) == 1 and runs[0].name.startswith("offline-run-")
    assert sync_command(runs[0]) == f"wandb sync {runs[0]}"
    assert read_run_info(runs[0]) == {
        "project": "sftkit-test",
        "name": "readback",
        "tags": ["a", "b"],
        "id": runs[0].name.split("-")[-1],
    }
    history = read_history(runs[0])
    assert [row["_step"] for row in history] == [0, 1, 2]
    assert [row["loss"] for row in history] == pytest.approx([1, 1 / 6, 1 / 11])
    tables = read_tables(runs[0], "tab")
    assert [t["data"] for t in tables] == logged
    assert all(t["columns"] == ["step", "prompt", "gen"] for t in tables)
    # The same tables as plain files, read without sftkit.
    on_disk = sorted((runs[0] / "files" / "media" / "table").glob("tab_*.table.json"))
    assert len(on_disk) == 3
    assert sorted(json.loads(p.read_text())["data"][0][0] for p in on_disk) == [0, 5, 10]


def test_setup_refuses_while_a_run_is_active(clean_env, tmp_path):
    import wandb

    setup_wandb(tmp_path)
    run = wandb.init()
    try:
        with pytest.raises(SftkitError, match="still active"):
            setup_wandb(tmp_path / "other")
    finally:
        run.finish()
    assert setup_wandb(tmp_path / "other").mode == "offline"


def test_read_history_refuses_a_non_run_folder(tmp_path):
    with pytest.raises(SftkitError, match="no run-"):
        read_history(tmp_path)
    bad = tmp_path / "run-x.wandb"
    bad.write_bytes(b"not a run")
    with pytest.raises(SftkitError, match="not a W&B run file"):
        read_history(tmp_path)


def test_unfinished_run_is_refused_after_waiting(tmp_path):
    # What wandb.finish() leaves for a moment (wandb-core writes the file afterwards), or a killed run leaves.
    (tmp_path / "run-x.wandb").write_bytes(b":W&B\xe1\xbe\x00")
    with pytest.raises(SftkitError, match="no finished run after waiting"):
        read_history(tmp_path, timeout=0.3)


def _tiny_trainer(model_dir: Path, out: Path, report_to: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok("the capital of france is paris .")["input_ids"]
    rows = [{"input_ids": ids, "labels": ids} for _ in range(4)]
    args = TrainingArguments(
        output_dir=str(out / "ckpt"), max_steps=1, per_device_train_batch_size=2, report_to=report_to,
        save_strategy="no", use_cpu=True, logging_steps=1,
    )  # fmt: skip
    return Trainer(model=model, args=args, train_dataset=rows)


def test_wandb_disabled_is_ignored_by_transformers_5(
    clean_env, tmp_path, monkeypatch, tiny_model_dir_with_pad
):
    """The 2024 switch WANDB_DISABLED no longer stops a run; report_to="none" and WANDB_MODE=disabled do."""
    import wandb
    from transformers.integrations import WandbCallback

    info = setup_wandb(tmp_path / "w")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    trainer = _tiny_trainer(tiny_model_dir_with_pad, tmp_path, "wandb")
    trainer.train()
    wandb.finish()
    assert len(offline_runs(info.runs_dir)) == 1, "WANDB_DISABLED=true still creates a run in transformers 5"

    trainer = _tiny_trainer(tiny_model_dir_with_pad, tmp_path, "none")
    assert not any(isinstance(cb, WandbCallback) for cb in trainer.callback_handler.callbacks)
    trainer.train()
    assert len(offline_runs(info.runs_dir)) == 1

    # wandb reads WANDB_* once per session (it warns that later changes are ignored): start a new one.
    wandb.teardown()
    monkeypatch.setenv("WANDB_MODE", "disabled")
    trainer = _tiny_trainer(tiny_model_dir_with_pad, tmp_path, "wandb")
    trainer.train()
    wandb.finish()
    assert len(offline_runs(info.runs_dir)) == 1
    assert not list(info.runs_dir.glob("run-*"))
