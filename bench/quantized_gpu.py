#!/usr/bin/env python3
"""bf16 LoRA vs int8 LoRA vs NF4 QLoRA on one GPU: weights' memory, peak training memory, seconds per step.

Self-contained: builds a model of a public config's *shape* with random weights (nothing is downloaded), saves it
once to a temporary folder in bf16, then runs each arm in its own process (so peak-memory figures do not mix):

  bf16_lora  the base in bf16, LoRA r=16 on all linear layers
  int8_lora  the base through BitsAndBytesConfig(load_in_8bit=True) (LLM.int8 kernels), same LoRA
  nf4_qlora  the base through BitsAndBytesConfig(load_in_4bit=True, nf4, double quantisation, bf16 compute):
             QLoRA, same LoRA

Every arm: prepare_model_for_kbit_training for the quantized ones, gradient checkpointing on, torch AdamW on the
adapter, the same random batch every step (so the loss must fall if training works), `--warmup` untimed steps and
`--steps` timed steps (torch.cuda.synchronize around each). Prints one JSON object.

  python bench/quantized_gpu.py                       # Llama-3.2-1B shape on CUDA (about 2-3 minutes on an H100)
  python bench/quantized_gpu.py --shape tiny --steps 3 --warmup 1   # CPU smoke test (bitsandbytes' CPU backend)

Needs torch, transformers, peft, accelerate and bitsandbytes; not trl or datasets.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

SHAPES = {
    # meta-llama/Llama-3.2-1B config.json (public): 1.24 B parameters, tied embeddings.
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
    ),
    # A CPU smoke-test size; dimensions are multiples of 64 like real models'.
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=1024,
        tie_word_embeddings=True,
        max_position_embeddings=512,
    ),
}
ARMS = ("bf16_lora", "int8_lora", "nf4_qlora")


def build(shape: str, out: str, device: str) -> dict:
    """Random-weight LlamaForCausalLM of the given shape, saved in bf16 to ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    start = time.perf_counter()
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    del model
    return {"parameters": n, "build_s": round(time.perf_counter() - start, 1)}


def run_arm(arm: str, model_dir: str, args: argparse.Namespace) -> dict:
    """Load one arm, train it for warmup + steps, and return its measurements."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    compute = torch.bfloat16 if cuda else torch.float32
    quant = {
        "bf16_lora": None,
        "int8_lora": BitsAndBytesConfig(load_in_8bit=True),
        "nf4_qlora": BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        ),
    }[arm]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=compute, quantization_config=quant, device_map={"": 0} if cuda else {"": "cpu"}
    )
    load_s = time.perf_counter() - start
    q_proj = model.model.layers[0].self_attn.q_proj
    result = {
        "arm": arm,
        "linear_class": f"{type(q_proj).__module__}.{type(q_proj).__name__}",
        "load_s": round(load_s, 1),
        "weights_mib": round(model.get_memory_footprint() / 2**20, 2),
    }
    if cuda:
        result["allocated_after_load_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    if quant is not None:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=args.gradient_checkpointing)
    elif args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    lora = LoraConfig(
        r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        lora_dropout=0.0,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    trainable = [p for p in model.parameters() if p.requires_grad]
    result["trainable_params"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)

    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    input_ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=gen).to(device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}

    def step() -> float:
        with torch.autocast(device, dtype=compute, enabled=cuda):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    model.train()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    losses = [step() for _ in range(args.warmup)]
    if cuda:
        torch.cuda.synchronize()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        losses.append(step())
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    result.update(
        {
            "s_per_step": round(median, 4),
            "s_per_step_min_max": [round(min(times), 4), round(max(times), 4)],
            "tokens_per_s": round(args.batch * args.seq_len / median, 1),
            "loss_first": round(losses[0], 4),
            "loss_last": round(losses[-1], 4),
        }
    )
    if cuda:
        result["peak_train_allocated_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["peak_train_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    return result


def versions() -> dict:
    from importlib import metadata

    import torch

    out = {}
    for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["cuda"] = torch.version.cuda
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=list(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {','.join(ARMS)}")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per arm")
    parser.add_argument(
        "--warmup", type=int, default=5, help="untimed steps first (kernel autotuning, allocator)"
    )
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false")
    parser.add_argument("--model-dir", default=None, help="reuse a folder written by an earlier run")
    parser.add_argument(
        "--arm", default=None, help=argparse.SUPPRESS
    )  # internal: run one arm, print its JSON
    args = parser.parse_args(argv)

    if args.arm:
        print("ARM_RESULT " + json.dumps(run_arm(args.arm, args.model_dir, args)), flush=True)
        return 0

    import torch

    arms = [a for a in args.arms.split(",") if a]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    report: dict = {
        "shape": args.shape,
        "config": SHAPES[args.shape],
        "batch": args.batch,
        "seq_len": args.seq_len,
        "steps": args.steps,
        "warmup": args.warmup,
        "lora_r": args.lora_r,
        "gradient_checkpointing": args.gradient_checkpointing,
        "versions": versions(),
        "arms": [],
    }
    with tempfile.TemporaryDirectory(prefix="quantized_gpu_") as tmp:
        model_dir = args.model_dir or tmp
        if not args.model_dir:
            report["model"] = build(args.shape, model_dir, "cuda" if torch.cuda.is_available() else "cpu")
        passthrough = [
            f"--shape={args.shape}",
            f"--batch={args.batch}",
            f"--seq-len={args.seq_len}",
            f"--steps={args.steps}",
            f"--warmup={args.warmup}",
            f"--lora-r={args.lora_r}",
            f"--lr={args.lr}",
            f"--model-dir={model_dir}",
        ]
        if not args.gradient_checkpointing:
            passthrough.append("--no-gradient-checkpointing")
        for arm in arms:
            proc = subprocess.run(
                [sys.executable, os.path.abspath(__file__), f"--arm={arm}", *passthrough],
                capture_output=True,
                text=True,
            )
            lines = [line for line in proc.stdout.splitlines() if line.startswith("ARM_RESULT ")]
            if proc.returncode == 0 and lines:
                report["arms"].append(json.loads(lines[-1][len("ARM_RESULT ") :]))
            else:
                report["arms"].append(
                    {"arm": arm, "error": f"exit {proc.returncode}", "stderr": proc.stderr[-3000:]}
                )
    print(json.dumps(report, indent=2))
    return 0 if all("error" not in a for a in report["arms"]) else 1


if __name__ == "__main__":
    sys.exit(main())
