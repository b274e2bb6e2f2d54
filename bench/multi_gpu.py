"""Two-GPU benchmark of the recipe command under DDP, ZeRO-2, ZeRO-3 and FSDP2 (run by bench/multi_gpu.sh).

    python bench/multi_gpu.py prepare --out /tmp/mg              # random model, tokenizer and data, built in code
    accelerate launch --config_file configs/accelerate/zero2.yaml --num_processes 2 \
        bench/multi_gpu.py train --strategy zero2 --prepared /tmp/mg --results out.jsonl [recipe overrides]

`train` is `python -m sftkit train --config bench/multi_gpu_recipe.yaml` plus a step timer: the same parsing,
checks, model loading and SFTTrainer, so the numbers describe the recipe users run. It prints one JSON line per
strategy: steady-state tokens/s over the timed window, the peak memory of every GPU, and the model-state memory
the arithmetic of sftkit.sharding predicts. Nothing is downloaded: the model is a Llama-3.2-1B-shaped
LlamaForCausalLM with random weights, the tokenizer a word-level one over 128,256 made-up words.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # sftkit is used from the repository, not installed
    sys.path.insert(0, str(REPO))

# Llama-3.2-1B (public config.json values): 1.236 B parameters with the tied embedding counted once.
SHAPES = {
    "1b": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
        rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
    ),
    # for CPU smoke tests of this script
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=2000, tie_word_embeddings=True,
        rope_theta=10000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
    ),
}  # fmt: skip
SPECIALS = ["<|eot|>", "<|pad|>", "<|unk|>"]


def prepare(out: Path, shape: str, rows: int, words_per_row: int, seed: int, device: str) -> dict:
    """Write a random-weight model + word-level tokenizer to out/model and random text to out/train.jsonl."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = SHAPES[shape]
    n_words = cfg["vocab_size"] - len(SPECIALS)
    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(n_words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|eot|>", pad_token="<|pad|>", unk_token="<|unk|>"
    )
    config = LlamaConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None, **cfg
    )
    torch.manual_seed(seed)
    t0 = time.time()
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    (out / "model").mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    rng = random.Random(seed)
    with open(out / "train.jsonl", "w") as f:
        for _ in range(rows):
            f.write(
                json.dumps({"text": " ".join(f"w{rng.randrange(n_words)}" for _ in range(words_per_row))})
                + "\n"
            )
    n_params = sum(p.numel() for p in model.parameters())
    info = {"shape": shape, "parameters": n_params, "rows": rows, "words_per_row": words_per_row,
            "seconds": round(time.time() - t0, 1)}  # fmt: skip
    (out / "prepared.json").write_text(json.dumps(info))
    return info


class StepTimer:
    """A TrainerCallback timing optimizer steps ``warmup+1 .. max_steps`` with device syncs at both ends."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.t0: float | None = None
        self.t1: float | None = None
        self.timed_steps = 0

    @staticmethod
    def _sync() -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self._sync()
            self.t0 = time.perf_counter()
        elif state.global_step > self.warmup:
            self._sync()
            self.t1 = time.perf_counter()
            self.timed_steps = state.global_step - self.warmup

    # the remaining TrainerCallback hooks are no-ops
    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda *a, **k: None
        raise AttributeError(name)


def train(argv: list[str]) -> None:
    """Run the recipe under the launcher's strategy and print/append one JSON line of results."""
    parser = argparse.ArgumentParser(prog="bench/multi_gpu.py train")
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--prepared", required=True, type=Path)
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--warmup", type=int, default=5)
    ours, overrides = parser.parse_known_args(argv)

    from transformers import TrainerCallback

    from sftkit.recipe import parse_args
    from sftkit.recipe import train as run_recipe
    from sftkit.sharding import model_state_gib

    recipe_argv = [
        "--config", str(REPO / "bench" / "multi_gpu_recipe.yaml"),
        "--model_name_or_path", str(ours.prepared / "model"),
        "--train_file", str(ours.prepared / "train.jsonl"),
        "--output_dir", str(ours.prepared / f"run_{ours.strategy}"),
        *overrides,
    ]  # fmt: skip
    recipe, model_args, train_args = parse_args(recipe_argv)
    timer = type("Timer", (StepTimer, TrainerCallback), {})(ours.warmup)
    metrics = run_recipe(recipe, model_args, train_args, recipe_argv, callbacks=[timer])
    if train_args.process_index != 0:
        return
    prepared = json.loads((ours.prepared / "prepared.json").read_text())
    n_gpus = metrics["num_processes"]
    block = train_args.max_length
    window = (timer.t1 - timer.t0) if timer.t0 and timer.t1 else None
    tokens = (
        timer.timed_steps * metrics["global_batch_size"] * block
    )  # corpus mode: every row is `block` tokens
    losses = [r["loss"] for r in metrics["log_history"] if "loss" in r]
    strategy_for_arithmetic = ours.strategy if ours.strategy in ("ddp", "zero2", "zero3", "fsdp2") else "ddp"
    result = {
        "strategy": ours.strategy,
        "status": "ok",
        "gpus": n_gpus,
        "parameters": prepared["parameters"],
        "global_batch_size": metrics["global_batch_size"],
        "block": block,
        "timed_steps": timer.timed_steps,
        "window_s": round(window, 3) if window else None,
        "s_per_step": round(window / timer.timed_steps, 4) if window else None,
        "tokens_per_s": round(tokens / window, 1) if window else None,
        "peak_allocated_gib_per_gpu": [r["peak_memory_gb"] for r in metrics["ranks"]],
        "peak_reserved_gib_per_gpu": [r.get("peak_reserved_gb") for r in metrics["ranks"]],
        "model_states_gib_per_gpu_arithmetic": round(
            model_state_gib(prepared["parameters"], strategy_for_arithmetic, n_gpus)["total"], 2
        ),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
        "precision": "bf16" if train_args.bf16 else "fp16" if train_args.fp16 else "fp32",
        "versions": json.loads((Path(train_args.output_dir) / "run_info.json").read_text())["versions"],
        "hardware": json.loads((Path(train_args.output_dir) / "run_info.json").read_text())["hardware"].get(
            "gpus"
        ),
    }
    line = json.dumps(result)
    print("RESULT " + line, flush=True)
    if ours.results:
        with open(ours.results, "a") as f:
            f.write(line + "\n")


def main() -> None:
    """`prepare` or `train` (see the module docstring)."""
    if len(sys.argv) > 1 and sys.argv[1] == "train":
        train(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(prog="bench/multi_gpu.py")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    p.add_argument("--rows", type=int, default=320, help="rows of random text (each ~1 block after grouping)")
    p.add_argument("--words-per-row", type=int, default=2100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" else "cpu")
    sub.add_parser("train", help="see the module docstring")
    args = parser.parse_args()
    import torch

    device = args.device if (args.device != "cuda" or torch.cuda.is_available()) else "cpu"
    print(
        json.dumps(prepare(args.out, args.shape, args.rows, args.words_per_row, args.seed, device)),
        flush=True,
    )


if __name__ == "__main__":
    main()
