"""bench/quantized_gpu.py at its CPU smoke-test size: every arm loads through bitsandbytes and trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from sftkit.paths import REPO_ROOT


@pytest.mark.slow
def test_quantized_bench_runs_on_cpu_at_tiny_size():
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "bench" / "quantized_gpu.py"),
            "--shape",
            "tiny",
            "--steps",
            "3",
            "--warmup",
            "2",
            "--batch",
            "2",
            "--seq-len",
            "32",
            "--lr",
            "1e-2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(proc.stdout[proc.stdout.index("{") :])
    arms = {a["arm"]: a for a in report["arms"]}
    assert list(arms) == ["bf16_lora", "int8_lora", "nf4_qlora"]
    assert arms["int8_lora"]["linear_class"].endswith("Linear8bitLt")
    assert arms["nf4_qlora"]["linear_class"].endswith("Linear4bit")
    assert (
        arms["nf4_qlora"]["weights_mib"] < arms["int8_lora"]["weights_mib"] < arms["bf16_lora"]["weights_mib"]
    )
    for arm in arms.values():
        assert arm["trainable_params"] == arms["bf16_lora"]["trainable_params"] > 0
        assert arm["s_per_step"] > 0
        assert arm["loss_last"] < arm["loss_first"], arm  # the same batch every step: training must lower it
