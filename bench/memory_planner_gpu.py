"""Measure peak training memory on a GPU and compare it with ``sftkit.memory.estimate``.

Each configuration builds a model with random weights from the public config numbers in
``sftkit.memory.MODEL_SHAPES`` (nothing is downloaded), trains a few SFTTrainer steps on synthetic
equal-length sequences, and measures ``torch.cuda.max_memory_allocated`` / ``max_memory_reserved`` over the
steps after the first (the first one creates the optimizer state). It runs each configuration in a fresh
subprocess so one run's cached memory cannot leak into the next, and prints one JSON document:
the error table ``predicted / measured - 1`` per configuration, the components, and the versions used.

    python bench/memory_planner_gpu.py --out bench/results/memory_planner_h100.json     # ~3-6 min on one H100
    python bench/memory_planner_gpu.py --device cpu --tiny                            # CPU smoke test (~1-2 min)

On a CPU the peak is counted with ``sftkit.memory.TensorMemoryTracker`` (live tensor bytes), the CPU analogue
of max_memory_allocated; ``--tiny`` shrinks the shapes (2 layers, narrow) so the test is quick.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

# name: (model shape, method, batch, seq_len, checkpointing, optimizer)
CONFIGS: dict[str, tuple[str, str, int, int, bool, str]] = {
    "qwen0.5b-full": ("Qwen2.5-0.5B", "full", 8, 1024, False, "adamw"),
    "qwen0.5b-qlora": ("Qwen2.5-0.5B", "qlora", 8, 1024, False, "adamw"),
    "llama1b-lora": ("Llama-3.2-1B", "lora", 8, 1024, False, "adamw"),
    "llama1b-full-ckpt": ("Llama-3.2-1B", "full", 8, 1024, True, "adamw"),
    "qwen1.5b-lora-ckpt": ("Qwen2.5-1.5B", "lora", 8, 2048, True, "adamw"),
    "llama3b-qlora-ckpt": ("Llama-3.2-3B", "qlora", 4, 2048, True, "adamw"),
    "llama3b-lora": ("Llama-3.2-3B", "lora", 4, 1024, False, "adamw"),
    "llama3b-full-8bit-ckpt": ("Llama-3.2-3B", "full", 4, 1024, True, "adamw_8bit"),
}
LORA_R = 16


def _shape(name: str, tiny: bool):
    from sftkit.memory import MODEL_SHAPES

    shape = MODEL_SHAPES[name]
    if tiny:
        # Keep the proportions that matter (GQA ratio, MLP width, tying) at a size a CPU trains in seconds.
        scale = max(1, shape.hidden // 256)
        heads = max(2, shape.heads // scale)
        kv = max(1, heads // max(1, shape.heads // shape.kv_heads))
        shape = replace(
            shape,
            hidden=shape.hidden // scale,
            intermediate=shape.intermediate // scale,
            layers=2,
            heads=heads,
            kv_heads=kv,
            vocab=40000,
            head_dim=(shape.hidden // scale) // heads,
        )
    return shape


def _hf_config(shape):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        vocab_size=shape.vocab,
        tie_word_embeddings=shape.tied,
        head_dim=shape.d,
        max_position_embeddings=4096,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        use_cache=False,
    )
    if shape.qkv_bias:
        return Qwen2Config(**common)
    return LlamaConfig(**common)


def _tokenizer():
    """A 3-token tokenizer: SFTTrainer needs a processing_class, the data is already token ids."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={"<pad>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def run_one(
    name: str, device: str, tiny: bool, steps: int, batch: int | None = None, seq_len: int | None = None
) -> dict:
    """Train one configuration and return measured and predicted memory."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from sftkit.memory import (
        GiB,
        MemoryReportCallback,
        estimate,
        optimizer_bytes,
        weight_bytes,
    )

    model_name, method, default_batch, default_seq, ckpt, optim = CONFIGS[name]
    if tiny:
        default_batch, default_seq = 2, 128
    batch, seq_len = batch or default_batch, seq_len or default_seq
    shape = _shape(model_name, tiny)
    precision = "bf16"
    torch.manual_seed(0)
    t0 = time.time()
    config = _hf_config(shape)
    if method == "qlora":
        # 4-bit loading needs a checkpoint: save the random bf16 model locally, then load it quantized.
        with tempfile.TemporaryDirectory() as tmp:
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
            model.save_pretrained(tmp)
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
            bnb = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16,
            )
            model = AutoModelForCausalLM.from_pretrained(
                tmp,
                quantization_config=bnb,
                dtype=torch.bfloat16,
                device_map={"": 0} if device == "cuda" else "cpu",
            )
    else:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    build_s = time.time() - t0

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, shape.vocab, (batch * (steps + 1), seq_len), generator=gen).tolist()
    dataset = Dataset.from_dict({"input_ids": ids})
    peft_config = None
    if method != "full":
        peft_config = LoraConfig(
            r=LORA_R,
            lora_alpha=2 * LORA_R,
            lora_dropout=0.0,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        )
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="memplan-"),
        max_steps=steps,
        per_device_train_batch_size=batch,
        learning_rate=1e-5,
        gradient_checkpointing=ckpt,
        optim="adamw_torch_fused" if optim == "adamw" else "adamw_8bit",
        bf16=True,
        use_cpu=device == "cpu",
        max_length=seq_len,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        seed=0,
    )
    memory = MemoryReportCallback(track_tensors=device == "cpu", skip_first_step=True)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=_tokenizer(),
        peft_config=peft_config,
        callbacks=[memory],
    )
    t1 = time.time()
    trainer.train()
    train_s = time.time() - t1
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
        reserved = torch.cuda.max_memory_reserved()
    else:
        peak, reserved = memory.tracker.peak_bytes, None
    measured = {
        "peak_gib": peak / GiB,
        "peak_reserved_gib": reserved / GiB if reserved is not None else None,
        "weights_gib": weight_bytes(trainer.model) / GiB,
        "gradients_gib": memory.gradients_bytes / GiB,
        "optimizer_gib": optimizer_bytes(trainer.optimizer) / GiB,
    }
    est = estimate(
        shape, method, seq_len, batch, optim, ckpt, precision=precision, lora_r=LORA_R, device=device
    )
    predicted = {k.replace(" ", "_") + "_gib": v for k, v in est.components_gib().items()}
    return {
        "name": name,
        "model": model_name + (" (tiny)" if tiny else ""),
        "shape": shape.__dict__,
        "parameters": shape.parameters,
        "method": method,
        "batch": batch,
        "seq_len": seq_len,
        "checkpointing": ckpt,
        "optimizer": optim,
        "precision": precision,
        "measured": measured,
        "predicted": predicted,
        "predicted_phase": est.phase,
        "error_pct": round(100 * (est.peak_bytes / peak - 1), 1),
        "weights_error_pct": round(100 * (est.weights / GiB / measured["weights_gib"] - 1), 1),
        "seconds": {"build": round(build_s, 1), "train": round(train_s, 1)},
    }


def _versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="all", help=f"comma-separated subset of: {', '.join(CONFIGS)}")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument(
        "--tiny", action="store_true", help="2-layer narrow shapes, batch 2 x 128 (CPU smoke test)"
    )
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps; the peak is taken after the first"
    )
    parser.add_argument("--out", default=None, help="also write the JSON here")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = parser.parse_args(argv)

    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.device, args.tiny, args.steps)), flush=True)
        return 0

    names = list(CONFIGS) if args.configs == "all" else [c.strip() for c in args.configs.split(",")]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        parser.error(f"unknown configs {unknown}; choose from {list(CONFIGS)}")
    results, failures = [], []
    env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "")}
    for name in names:
        cmd = [sys.executable, __file__, "--one", name, "--device", args.device, "--steps", str(args.steps)]
        if args.tiny:
            cmd.append("--tiny")
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            failures.append({"name": name, "returncode": proc.returncode, "stderr_tail": proc.stderr[-3000:]})
            print(
                f"{name}: FAILED (rc {proc.returncode})\n{proc.stderr[-3000:]}", file=sys.stderr, flush=True
            )
            continue
        result = json.loads(lines[-1][len("RESULT ") :])
        results.append(result)
        print(
            f"{name:24s} measured {result['measured']['peak_gib']:7.2f} GiB  predicted "
            f"{result['predicted']['peak_gib']:7.2f} GiB  error {result['error_pct']:+6.1f}%  "
            f"({time.time() - t0:.0f} s)",
            file=sys.stderr,
            flush=True,
        )

    import torch

    errors = [abs(r["error_pct"]) for r in results]
    doc = {
        "command": "python bench/memory_planner_gpu.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": torch.cuda.get_device_name(0) if args.device == "cuda" else f"CPU ({os.cpu_count()} cores)",
        "measure": "torch.cuda.max_memory_allocated over steps 2..n"
        if args.device == "cuda"
        else "sftkit.memory.TensorMemoryTracker peak live tensor bytes over steps 2..n",
        "versions": _versions(),
        "results": results,
        "failures": failures,
        "max_abs_error_pct": max(errors) if errors else None,
        "within_15pct": bool(errors) and all(e <= 15 for e in errors) and not failures,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if results and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
