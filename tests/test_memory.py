"""Memory measuring (report, tensor tracker) and the planner, checked against real models and real training."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from sftkit.errors import SftkitError
from sftkit.memory import (
    GPUS_GIB,
    MODEL_SHAPES,
    GiB,
    MemoryReportCallback,
    ModelShape,
    TensorMemoryTracker,
    estimate,
    gradient_bytes,
    memory_report,
    model_shape,
    optimizer_bytes,
    peak_rss_bytes,
    reset_peak_rss,
    weight_bytes,
)
from sftkit.paths import TINY_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bench"))


@pytest.mark.parametrize("name", list(MODEL_SHAPES))
def test_shapes_count_the_parameters_transformers_builds(name):
    from memory_planner_gpu import _hf_config
    from transformers import AutoModelForCausalLM

    shape = MODEL_SHAPES[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(_hf_config(shape))
    assert shape.parameters == sum(p.numel() for p in model.parameters())


def test_model_shape_sources():
    assert model_shape("Qwen/Qwen2.5-0.5B-Instruct") is MODEL_SHAPES["Qwen2.5-0.5B"]
    assert model_shape("meta-llama/Llama-3.2-1B") is MODEL_SHAPES["Llama-3.2-1B"]
    tiny = model_shape(TINY_MODEL_DIR)
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    assert tiny.parameters == model.num_parameters() and tiny.tied
    assert model_shape(AutoConfig.from_pretrained(TINY_MODEL_DIR)) == tiny
    with pytest.raises(SftkitError, match="unknown model"):
        model_shape("no-such-model-7B")
    with pytest.raises(SftkitError, match="lacks"):
        model_shape({"hidden_size": 8})


def test_tracker_counts_live_tensor_bytes_exactly():
    with TensorMemoryTracker() as tracker:
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # another 4 MB
        view = b[:10]  # a view: no new storage
        assert tracker.current_bytes == 8_000_000
        del b, view
        assert tracker.current_bytes == 4_000_000 and tracker.peak_bytes == 8_000_000
        tracker.reset_peak()
        x = torch.randn(512, 512, requires_grad=True)
        (x @ x).relu().sum().backward()
    # a, x, x @ x, its relu (kept for backward) and their gradients at the top of the backward pass
    assert tracker.peak_bytes > 4_000_000 + 3 * 512 * 512 * 4
    assert tracker.current_bytes == 4_000_000 + 2 * 512 * 512 * 4  # a, x and x.grad
    del a, x


def test_weight_gradient_and_optimizer_bytes_of_a_tied_model():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    params = model.num_parameters()  # the tied embedding is counted once
    assert weight_bytes(model) == params * 4 + sum(b.numel() * b.element_size() for b in model.buffers())
    assert gradient_bytes(model) == 0
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 1000, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    assert gradient_bytes(model) == params * 4
    opt.step()
    n_tensors = len(list(model.parameters()))
    assert optimizer_bytes(opt) == 2 * params * 4 + 4 * n_tensors  # two moments + a step counter each


def test_memory_report_on_cpu():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    report = memory_report(model, device="cpu")
    assert report["device"] == "cpu" and report["weights_gib"] == pytest.approx(weight_bytes(model) / GiB)
    assert report["gradients_gib"] == 0 and report["optimizer_gib"] == 0
    if sys.platform.startswith("linux"):
        assert 0 < report["rss_gib"] <= report["peak_rss_gib"] < report["device_total_gib"]
        assert 0 < report["peak_share_of_device"] < 1


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/clear_refs is Linux only")
def test_peak_rss_can_be_reset():
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    high = peak_rss_bytes()
    del big
    assert reset_peak_rss()
    assert peak_rss_bytes() < high - 32 * 2**20


def test_estimate_refuses_bad_input():
    with pytest.raises(SftkitError, match="method"):
        estimate("Qwen2.5-0.5B", "prefix-tuning")
    with pytest.raises(SftkitError, match="optimizer"):
        estimate("Qwen2.5-0.5B", "lora", optimizer="lion")
    with pytest.raises(SftkitError, match="seq_len"):
        estimate("Qwen2.5-0.5B", "lora", seq_len=1)
    with pytest.raises(SftkitError, match="QLoRA computes in 16-bit"):
        estimate("Qwen2.5-0.5B", "qlora", precision="fp32")
    with pytest.raises(SftkitError, match="LoRA modules"):
        estimate("Qwen2.5-0.5B", "lora", lora_modules=("qkv",))


def test_estimate_behaves_like_memory_does():
    full = estimate("Llama-3.1-8B", "full", 2048, 1, checkpointing=True)
    lora = estimate("Llama-3.1-8B", "lora", 2048, 1, checkpointing=True)
    qlora = estimate("Llama-3.1-8B", "qlora", 2048, 1, checkpointing=True)
    assert full.peak_bytes > lora.peak_bytes > qlora.peak_bytes
    # Pure bf16 full fine-tuning: 2 bytes weights + 2 gradients + 4 AdamW state per parameter.
    p = MODEL_SHAPES["Llama-3.1-8B"].parameters
    assert (full.weights, full.gradients, full.optimizer) == (2 * p, 2 * p, 4 * p)
    # fp16 (a T4) trains fully with fp32 master weights: 16 bytes per parameter before activations.
    t4 = estimate("Llama-3.1-8B", "full", 2048, 1, precision="fp16", checkpointing=True)
    assert t4.weights + t4.gradients + t4.optimizer == 16 * p
    # QLoRA: about 4.13 bits per linear weight (NF4 + double-quantized scales); embeddings stay bf16.
    s = MODEL_SHAPES["Llama-3.1-8B"]
    linear = s.layers * s.layer_linear_params
    frozen_16bit = (p - linear) * 2
    assert 0.515 < (qlora.weights - frozen_16bit - qlora.inputs["trainable_parameters"] * 2) / linear < 0.52
    # Checkpointing cuts activations; activations grow with tokens.
    a1 = estimate("Llama-3.2-1B", "lora", 1024, 4)
    a2 = estimate("Llama-3.2-1B", "lora", 1024, 8)
    ck = estimate("Llama-3.2-1B", "lora", 1024, 8, checkpointing=True)
    assert 1.9 < a2.activations / a1.activations < 2.05 and ck.peak_bytes < a2.peak_bytes / 2
    assert not full.fits(GPUS_GIB["T4 16 GB"]) and full.fits(GPUS_GIB["H100 80 GB"])
    assert qlora.fits(GPUS_GIB["T4 16 GB"])
    json.dumps(full.as_dict())  # serializable


def _measure_tiny(
    method: str, batch: int, seq_len: int, checkpointing: bool, attention: str = "sdpa"
) -> float:
    """Peak live tensor bytes of SFTTrainer steps 2-3 on the tiny model (fp32, CPU), equal-length rows."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from sftkit.loading import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer(TINY_MODEL_DIR, dtype="fp32", attn_implementation=attention)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, len(tok), (3 * batch, seq_len), generator=gen).tolist()
    peft = None
    if method == "lora":
        peft = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    callback = MemoryReportCallback(track_tensors=True, skip_first_step=True)
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(), max_steps=3, per_device_train_batch_size=batch, learning_rate=1e-4,
        gradient_checkpointing=checkpointing, bf16=False, fp16=False, max_length=seq_len, save_strategy="no",
        report_to="none", use_cpu=True, logging_steps=1,
    )  # fmt: skip
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids}),
                         processing_class=tok, peft_config=peft, callbacks=[callback])  # fmt: skip
    trainer.train()
    return callback.tracker.peak_bytes


def _check_tiny(method, batch, seq_len, checkpointing, attention="sdpa"):
    measured = _measure_tiny(method, batch, seq_len, checkpointing, attention)
    predicted = estimate(
        TINY_MODEL_DIR, method, seq_len, batch, "adamw", checkpointing, precision="fp32", device="cpu",
        attention=attention,
    ).peak_bytes  # fmt: skip
    assert abs(predicted / measured - 1) < 0.03, (predicted / 2**20, measured / 2**20)


def test_planner_matches_a_measured_tiny_run():
    _check_tiny("lora", 4, 128, False)


@pytest.mark.slow
@pytest.mark.parametrize(
    "method,batch,seq_len,checkpointing,attention",
    [
        ("full", 4, 256, True, "sdpa"),
        ("lora", 4, 128, False, "eager"),
    ],
)
def test_planner_matches_measured_tiny_runs(method, batch, seq_len, checkpointing, attention):
    _check_tiny(method, batch, seq_len, checkpointing, attention)


def test_qlora_weights_on_cpu():
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    bnb = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(
        TINY_MODEL_DIR, quantization_config=bnb, dtype=torch.bfloat16
    )
    est = estimate(TINY_MODEL_DIR, "qlora", 64, 1)
    base_weights = est.weights - est.inputs["trainable_parameters"] * 2  # without the bf16 adapters
    assert base_weights == pytest.approx(weight_bytes(model), rel=0.01)
    assert weight_bytes(model) < 0.45 * model_shape(TINY_MODEL_DIR).parameters * 2  # far below bf16


@pytest.mark.slow
def test_gpu_bench_script_runs_on_cpu(tmp_path):
    """The script the lead runs on an H100, at tiny size on CPU: it runs, and the planner is within 3%."""
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "memory_planner_gpu.py"), "--device", "cpu", "--tiny",
           "--configs", "qwen0.5b-qlora,llama1b-full-ckpt", "--steps", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["within_15pct"] and not doc["failures"]
    assert [r["name"] for r in doc["results"]] == ["qwen0.5b-qlora", "llama1b-full-ckpt"]
    for r in doc["results"]:
        assert abs(r["error_pct"]) < 3, r
        assert abs(r["weights_error_pct"]) < 1, r


def test_model_shape_head_dim_default():
    shape = ModelShape(hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=100, tied=False)
    assert shape.d == 16
    assert (
        shape.parameters == 2 * (64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64) + 2 * 100 * 64 + 64
    )


def test_committed_gpu_error_table_matches_the_planner_code():
    """bench/results/memory_planner_h100.json: the planner's GPU error table. Its predictions must be what the
    current code predicts (else the table is stale: rerun the bench), and every error within the ±15% target."""
    doc = json.loads((REPO_ROOT / "bench" / "results" / "memory_planner_h100.json").read_text())
    assert len(doc["results"]) >= 4 and not doc["failures"]
    assert {r["method"] for r in doc["results"]} >= {"full", "lora", "qlora"}
    sizes = [r["parameters"] for r in doc["results"]]
    assert min(sizes) < 0.6e9 and max(sizes) > 2.9e9  # spans 0.5B to 3B shapes
    for r in doc["results"]:
        shape = ModelShape(**r["shape"])
        est = estimate(
            shape, r["method"], r["seq_len"], r["batch"], r["optimizer"], r["checkpointing"],
            precision=r["precision"], lora_r=16, device="cuda",
        )  # fmt: skip
        assert est.peak_gib == pytest.approx(r["predicted"]["peak_gib"], rel=1e-6), r["name"]
        error = 100 * (r["predicted"]["peak_gib"] / r["measured"]["peak_gib"] - 1)
        assert error == pytest.approx(r["error_pct"], abs=0.06) and abs(error) <= 15, r["name"]
