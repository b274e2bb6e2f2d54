"""Real 2-process DDP on CPU (gloo) through `accelerate launch` and the shipped configs/accelerate/ddp.yaml.

Checks what DDP promises: (1) both ranks end with bit-identical trainable weights, and (2) training is the
same as one process seeing the same global batch: 2 processes x 4 examples = 1 process x 8 examples gives
the same per-step losses, eval loss and final adapter, up to float rounding in the gradient all-reduce.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Tolerances for "same training": the only difference is the order of float additions in gloo's all-reduce.
# Observed after 8 steps: losses within 4e-7 relative; adapters within 8e-6 in relative norm. Single entries
# can differ by up to ~1e-4 absolute, because Adam divides tiny gradient differences by tiny second moments
# (an update is at most about the learning rate, 1e-3), so the weight check uses the relative norm.
LOSS_RTOL = 1e-4
WEIGHT_RTOL = 1e-4

COMMON = [
    "--config", "configs/recipes/tiny_lora.yaml",
    "--max_steps", "8",
    "--max_train_samples", "64",
    "--max_eval_samples", "16",
    "--logging_steps", "1",
    "--warmup_steps", "0",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    # One thread per process: 2 processes on 2 cores, and no thread oversubscription in the single run either.
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for key in [k for k in env if k.startswith(("ACCELERATE_", "FSDP_"))]:
        env.pop(key)
    return env


def _run(cmd: list[str], out_dir: Path) -> dict:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    metrics["run_info"] = json.loads((out_dir / "run_info.json").read_text())
    metrics["stdout"] = proc.stdout
    return metrics


def _losses(metrics: dict) -> list[float]:
    return [r["loss"] for r in metrics["log_history"] if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[dict, dict, Path, Path]:
    tmp = tmp_path_factory.mktemp("ddp")
    ddp_dir, single_dir = tmp / "ddp", tmp / "single"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch"]
    ddp = _run(
        accelerate
        + [
            "--config_file",
            "configs/accelerate/ddp.yaml",
            "--num_processes",
            "2",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "sftkit",
            "train",
            *COMMON,
            "--per_device_train_batch_size",
            "4",
            "--output_dir",
            str(ddp_dir),
        ],  # fmt: skip
        ddp_dir,
    )
    single = _run(
        [
            sys.executable,
            "-m",
            "sftkit",
            "train",
            *COMMON,
            "--per_device_train_batch_size",
            "8",
            "--output_dir",
            str(single_dir),
        ],  # fmt: skip
        single_dir,
    )
    return ddp, single, ddp_dir, single_dir


@pytest.mark.slow
def test_two_processes_really_ran_as_one_job(runs):
    ddp, single, _, _ = runs
    info = ddp["run_info"]
    assert info["num_processes"] == 2 and info["distributed_type"] == "MULTI_CPU" and info["engine"] == "ddp"
    assert info["global_batch_size"] == 8 == single["run_info"]["global_batch_size"]
    assert "global batch size 8 = 4 per device x 1 accumulation x 2 process(es)" in ddp["stdout"]
    assert [r["rank"] for r in ddp["ranks"]] == [0, 1]


@pytest.mark.slow
def test_ranks_end_bit_identical(runs):
    ddp, _, _, _ = runs
    first, second = ddp["ranks"]
    assert first["local_trainable_numel"] > 0
    assert first["local_trainable_numel"] == second["local_trainable_numel"]
    assert first["local_trainable_sha256"] == second["local_trainable_sha256"]


@pytest.mark.slow
def test_loss_matches_one_process_with_the_same_global_batch(runs):
    ddp, single, _, _ = runs
    a, b = _losses(ddp), _losses(single)
    assert len(a) == len(b) == 8
    assert max(a) - min(a) > 0.1, a  # the loss moved, so agreement is not trivial
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=LOSS_RTOL, atol=0)
    assert ddp["eval_loss"] == pytest.approx(single["eval_loss"], rel=LOSS_RTOL)


@pytest.mark.slow
def test_final_adapters_match(runs):
    from safetensors.torch import load_file

    _, _, ddp_dir, single_dir = runs
    a = load_file(ddp_dir / "final" / "adapter_model.safetensors")
    b = load_file(single_dir / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    diff = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    norm = sum((b[k] ** 2).sum() for k in b) ** 0.5
    assert diff / norm < WEIGHT_RTOL, (diff / norm).item()
    # and training changed the adapter at all (LoRA B starts at zero)
    assert max(t.abs().max().item() for k, t in a.items() if "lora_B" in k) > 1e-3
