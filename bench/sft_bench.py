#!/usr/bin/env python3
"""SFT throughput benchmark: naive TRL versus the sftkit fast recipe, measured by the anchor's rules.

    python bench/sft_bench.py build --workload w1 --out /tmp/model_w1      # random weights from a public shape
    python bench/sft_bench.py run --workload w1 --arm fast --model-dir /tmp/model_w1 --results out.jsonl
    python bench/sft_bench.py check --workload w2 --model-dir /tmp/model_w2   # fast loss == naive loss?

Rules shared with ``../shared/bench`` (so figures compare): random weights built from public configs, nothing
downloaded; pre-tokenized synthetic examples, lognormal lengths (median 400, sigma 1.0, clipped to
[32, 2048], seed 1234); loss on all tokens; the same examples in the same order for every arm (TRL's seeded
random sampler, seed 3407); timed window from the end of warm-up step 5 to the end of the last step with
``torch.cuda.synchronize()`` at both ends; tokens/s counts non-pad tokens only; peak memory is
``torch.cuda.max_memory_{reserved,allocated}`` since train begin (weights included);
MFU = tokens/s x (6 N_layers + 4 N_lm_head) / 989e12 for LoRA, and tokens/s x 6 N / 989e12 for full
fine-tuning (N = decoder linear weights + lm_head, embeddings tied). The LoRA formula credits a recompute pass
(gradient checkpointing) whether or not the arm runs one; ``mfu_needed`` uses 4 N_layers + 4 N_lm_head, the
FLOPs a LoRA step needs without recompute.

Workloads:
  w1  Llama-3.2-3B shape, QLoRA nf4 (double quant, bf16 compute), LoRA r=16 a=16 on the 7 projections,
      max length 2048, exactly 8 examples per optimizer step, adamw_8bit (the recipe users copy)
  w2  Llama-3.2-1B shape, bf16 LoRA r=16 all-linear, 28 examples (about 16.7k tokens) per optimizer step
  w3  Qwen2.5-0.5B shape, full fine-tuning in bf16, 28 examples (about 16.7k tokens) per optimizer step
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # import sftkit from this checkout

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
SHAPES = {
    "llama3b": dict(arch="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                    num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                    rope_parameters=LLAMA3_ROPE),
    "llama1b": dict(arch="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
                    rope_parameters=LLAMA3_ROPE),
    "qwen05b": dict(arch="qwen2", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                    num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
    "tiny": dict(arch="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=1024, rope_parameters=None),
}
WORKLOADS = {
    "w1": dict(shape="llama3b", method="qlora", examples_per_step=8, optim="adamw_8bit",
               naive=dict(batch=2, accum=4), fast=dict(batch=8, accum=1),
               fast_overrides={"activation_checkpointing": True}),  # the memory goal needs recompute
    "w2": dict(shape="llama1b", method="lora", examples_per_step=28, optim="adamw_torch",
               naive=dict(batch=4, accum=7), fast=dict(batch=28, accum=1)),
    "w3": dict(shape="qwen05b", method="full", examples_per_step=28, optim="adamw_torch",
               naive=dict(batch=4, accum=7), fast=dict(batch=28, accum=1)),
    "tiny": dict(shape="tiny", method="lora", examples_per_step=4, optim="adamw_torch",  # CPU dry runs
                 naive=dict(batch=2, accum=2), fast=dict(batch=4, accum=1), median=100, hi=512),
}
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK = 989e12  # H100 SXM dense bf16


def make_examples(n=2000, seed=1234, median=400.0, sigma=1.0, lo=32, hi=2048, vocab_hi=128000):
    """The anchor's synthetic examples: lognormal lengths, uniform ids below the special tokens."""
    import numpy as np

    rng = np.random.default_rng(seed)
    lens = np.clip(np.rint(np.exp(rng.normal(math.log(median), sigma, size=n))), lo, hi).astype(int)
    return [rng.integers(0, vocab_hi, size=int(n_)).tolist() for n_ in lens]


def build(workload: str, out: str) -> None:
    """Save a random-weight bf16 checkpoint of the workload's shape plus a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    shape = dict(SHAPES[WORKLOADS[workload]["shape"]])
    arch, vocab = shape.pop("arch"), shape["vocab_size"]
    if shape.get("rope_parameters") is None:
        shape.pop("rope_parameters")
    pad = vocab - 1
    cfg = AutoConfig.for_model(arch, tie_word_embeddings=True, max_position_embeddings=32768, pad_token_id=pad,
                               eos_token_id=vocab - 2, bos_token_id=None, dtype="bfloat16", **shape)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=f"t{vocab - 2}", pad_token=f"t{pad}").save_pretrained(out)
    print(f"[build] {workload}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params -> {out}")


def matmul_params(config) -> dict:
    h, i, n_layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    hd = getattr(config, "head_dim", None) or h // config.num_attention_heads
    attn = 2 * h * config.num_attention_heads * hd + 2 * h * config.num_key_value_heads * hd
    return {"layers": n_layers * (attn + 3 * h * i), "lm_head": config.vocab_size * h}


def make_trainer(workload: str, arm: str, model_dir: str, steps: int, n_examples: int, output_dir: str,
                 overrides: dict | None = None):
    """The real SFTTrainer of one arm (naive or fast), ready to train."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from sftkit.fast import fast_recipe

    w = WORKLOADS[workload]
    cuda = torch.cuda.is_available()
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = make_examples(n_examples, median=w.get("median", 400.0), hi=w.get("hi", 2048),
                        vocab_hi=min(128000, len(tok) - 2))
    ds = datasets.Dataset.from_dict({"input_ids": ids})
    model_kw: dict = {"dtype": torch.bfloat16 if cuda else torch.float32, "attn_implementation": "sdpa"}
    sft_kw: dict = dict(
        output_dir=output_dir, per_device_train_batch_size=w[arm]["batch"],
        gradient_accumulation_steps=w[arm]["accum"], max_steps=steps, learning_rate=2e-4 if w["method"] != "full"
        else 1e-5, warmup_steps=5, lr_scheduler_type="linear", weight_decay=0.01, optim=w["optim"], seed=3407,
        bf16=cuda, logging_steps=5, report_to="none", save_strategy="no", max_length=2048, disable_tqdm=True,
        gradient_checkpointing=True, packing=False,
    )
    recipe = None
    if arm == "fast":
        recipe = fast_recipe(**{**w.get("fast_overrides", {}), **(overrides or {})})
        sft_kw.update(recipe.sft_config)
        model_kw.update(recipe.model_kwargs)
    if cuda:
        model_kw["device_map"] = {"": 0}
    if w["method"] == "qlora":
        model_kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(model_dir, **model_kw)
    peft_config = None
    if w["method"] in ("lora", "qlora"):
        peft_config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                 task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=SFTConfig(**sft_kw), train_dataset=ds, processing_class=tok,
                         peft_config=peft_config)
    return trainer, tok, recipe


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("torch", "transformers", "trl", "peft", "accelerate", "bitsandbytes", "liger_kernel", "datasets"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def measure(args) -> dict:
    """Train one arm and return the anchor-format result record."""
    import torch
    from transformers import TrainerCallback

    cuda = torch.cuda.is_available()
    total = args.warmup + args.steps
    overrides = json.loads(args.overrides) if args.overrides else None
    trainer, tok, recipe = make_trainer(args.workload, args.arm, args.model_dir, total, args.n_examples,
                                        args.output_dir, overrides)
    pad = tok.pad_token_id
    count = {"tok": 0, "elems": 0}
    orig = trainer.training_step

    def counting_step(model, inputs, *a, **k):
        ids = inputs["input_ids"]
        count["tok"] += int((ids != pad).sum())  # pad ids never occur in the data
        count["elems"] += ids.numel()
        return orig(model, inputs, *a, **k)

    trainer.training_step = counting_step
    marks: dict[int, tuple] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            marks[0] = (time.perf_counter(), 0, 0)

        def on_step_end(self, a, state, c, **k):
            if cuda:
                torch.cuda.synchronize()
            marks[state.global_step] = (time.perf_counter(), count["tok"], count["elems"])

    trainer.add_callback(Clock())
    trainer.train()
    (t0, k0, e0), (t1, k1, e1) = marks[args.warmup], marks[total]
    dt, toks = t1 - t0, k1 - k0
    steps_s = sorted(marks[i][0] - marks[i - 1][0] for i in range(args.warmup + 1, total + 1))
    w = WORKLOADS[args.workload]
    n = matmul_params(trainer.model.config)
    if w["method"] == "full":
        flops, needed = 6 * (n["layers"] + n["lm_head"]), 6 * (n["layers"] + n["lm_head"])
    else:
        flops, needed = 6 * n["layers"] + 4 * n["lm_head"], 4 * n["layers"] + 4 * n["lm_head"]
    rec = dict(
        workload=args.workload, arm=args.arm, device=torch.cuda.get_device_name(0) if cuda else "cpu",
        tokens_per_s=round(toks / dt, 1), s_per_step=round(dt / args.steps, 4),
        median_s_per_step=round(steps_s[len(steps_s) // 2], 4), tokens_per_step=round(toks / args.steps, 1),
        padding_efficiency=round(toks / max(1, e1 - e0), 4),
        peak_reserved_gb=round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        peak_allocated_gb=round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
        mfu=round(toks / dt * flops / PEAK, 4), mfu_needed=round(toks / dt * needed / PEAK, 4),
        flops_per_token=flops, examples_per_step=w["examples_per_step"], micro_batch=w[args.arm],
        levers=(recipe.notes if recipe else ["pad to longest", "sdpa", "gradient checkpointing"]),
        overrides=overrides, alloc_conf=os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), attn=trainer.model.config._attn_implementation, timed_steps=args.steps,
        warmup_steps=args.warmup, repeats=1, versions=_versions(), date=str(date.today()),
        final_loss=next((h["loss"] for h in reversed(trainer.state.log_history) if "loss" in h), None),
    )
    return rec


def check(args) -> dict:
    """Per-token loss of the fast recipe's batch equals the naive padded batch's, on the same examples."""
    import torch

    res = {}
    losses = {}
    for arm in ("naive", "fast"):
        trainer, tok, _ = make_trainer(args.workload, arm, args.model_dir, 1, 64, args.output_dir)
        examples = [trainer.train_dataset[i] for i in range(8)]
        batch = trainer.data_collator(examples)
        batch = {k: (v.to(trainer.model.device) if hasattr(v, "to") else v) for k, v in batch.items()}
        trainer.model.eval()
        with torch.no_grad():
            out = trainer.model(**batch)
        losses[arm] = float(out.loss)
        res[f"{arm}_keys"] = sorted(batch)
        res[f"{arm}_label_tokens"] = int((batch["labels"] != -100).sum())
        del trainer
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    res.update(losses=losses, abs_diff=abs(losses["naive"] - losses["fast"]), workload=args.workload)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--workload", choices=WORKLOADS, required=True)
    b.add_argument("--out", required=True)
    for name in ("run", "check"):
        r = sub.add_parser(name)
        r.add_argument("--workload", choices=WORKLOADS, required=True)
        r.add_argument("--arm", choices=["naive", "fast"], default="fast")
        r.add_argument("--model-dir", required=True)
        r.add_argument("--warmup", type=int, default=5)
        r.add_argument("--steps", type=int, default=20)
        r.add_argument("--n-examples", type=int, default=2000)
        r.add_argument("--overrides", default=None, help='JSON for fast_recipe(), e.g. {"varlen": false}')
        r.add_argument("--output-dir", default="/tmp/sft_bench_out")
        r.add_argument("--results", default=None)
    args = p.parse_args()
    if args.cmd == "build":
        return build(args.workload, args.out)
    try:
        rec = measure(args) if args.cmd == "run" else check(args)
        rec["status"] = "ok"
    except Exception as err:  # record the exact error, keep going with the next run
        traceback.print_exc()
        rec = dict(workload=args.workload, arm=args.arm, overrides=args.overrides, status="error",
                   error=f"{type(err).__name__}: {err}"[:2000])
    line = json.dumps(rec)
    print("[result] " + line, flush=True)
    if args.results:
        with open(args.results, "a") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()
