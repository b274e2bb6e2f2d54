"""Packing on a GPU: real-token throughput, padding and memory per strategy, and the contamination check.

Prints one JSON object (and writes it to --out). Two workloads, each timed the way notebook 04 times them
(one forward+backward per batch, strategies interleaved round by round, median step):

* ``chat``: the shipped tiny model on data/world/chat_train.jsonl, exactly notebook 04's setting, once with
  the notebook's batch (16 conversations vs 2 packed rows of 256) and once 4x larger;
* ``long``: a randomly initialised ~0.5 B-parameter Llama (no download) on synthetic documents of
  log-normal length (median 300 tokens, clipped to 16..2048), max_length 2048, about 8 k real tokens a step
  (packed: 4 rows of 2048; unpacked: as many documents as make 8 k tokens on average, padded to the longest).

plus ``contamination``: notebook 04's logit-gap check on the GPU, fp32 and bf16, sdpa and eager.

    python bench/packing_gpu.py --out packing_gpu.json   # GPU: a few minutes
    python bench/packing_gpu.py --quick                  # CPU smoke test with tiny sizes (about a minute)

Needs torch, transformers, trl and datasets; imports sftkit from this checkout (no install needed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

STRATEGIES = ("no packing", "padding_free", "bfd", "bfd_split", "wrapped", "sftkit packer")


def versions() -> dict:
    """Versions of the stack and the device this ran on."""
    out = {"python": platform.python_version()}
    for name in ("torch", "transformers", "trl", "datasets", "accelerate"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    out["device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return out


def strategy_batches(model, tokenizer, dataset, *, max_length, unpacked_bs, packed_bs, rounds, chat) -> dict:
    """The first ``rounds`` collated batches each strategy's SFTTrainer (or the sftkit packer) would train on."""
    from trl import SFTConfig, SFTTrainer

    from sftkit.packing import ConstantLengthPacker

    common = dict(
        output_dir="/tmp/packing_gpu_unused",
        max_steps=rounds,
        report_to="none",
        save_strategy="no",
        gradient_checkpointing=False,
        bf16=False,
        fp16=False,
        dataloader_pin_memory=False,
        assistant_only_loss=chat,
    )
    options = {
        "no packing": dict(per_device_train_batch_size=unpacked_bs, max_length=max_length),
        "padding_free": dict(per_device_train_batch_size=unpacked_bs, padding_free=True, max_length=None),
        "bfd": dict(
            per_device_train_batch_size=packed_bs, packing=True, packing_strategy="bfd", max_length=max_length
        ),
        "bfd_split": dict(
            per_device_train_batch_size=packed_bs,
            packing=True,
            packing_strategy="bfd_split",
            max_length=max_length,
        ),
        "wrapped": dict(
            per_device_train_batch_size=packed_bs,
            packing=True,
            packing_strategy="wrapped",
            max_length=max_length,
        ),
    }
    batches = {}
    for name, opts in options.items():
        trainer = SFTTrainer(
            model=model, args=SFTConfig(**common, **opts), train_dataset=dataset, processing_class=tokenizer
        )
        loader = iter(trainer.get_train_dataloader())
        batches[name] = [next(loader) for _ in range(rounds)]
    # The sftkit packer: blocks of max_length, padding-free collation (every token trained, as it does).
    # Pre-tokenized rows are packed as they are; no EOS added to them, as TRL adds none either.
    packer = ConstantLengthPacker(dataset, tokenizer, block_length=max_length, infinite=True, add_eos=chat)
    opts = dict(
        per_device_train_batch_size=packed_bs,
        padding_free=True,
        max_length=None,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(**{**common, "assistant_only_loss": False}, **opts),
        train_dataset=packer.to_iterable_dataset(),
        processing_class=tokenizer,
    )
    loader = iter(trainer.get_train_dataloader())
    batches["sftkit packer"] = [next(loader) for _ in range(rounds)]
    return batches


def peak_memory_gib(model, batches: dict) -> dict:
    """Peak CUDA memory of one forward+backward on each strategy's first batch (None on CPU)."""
    if not torch.cuda.is_available():
        return {name: None for name in batches}
    out = {}
    for name, bl in batches.items():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        inputs = {k: v.to(model.device) if torch.is_tensor(v) else v for k, v in bl[0].items()}
        model(**inputs, use_cache=False).loss.backward()
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        out[name] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return out


def run_workload(model, tokenizer, dataset, *, rounds, **sizes) -> dict:
    """Throughput (real tokens/s, ratio to no packing), padding fraction and peak memory per strategy."""
    from sftkit.packing import measure_throughput

    batches = strategy_batches(model, tokenizer, dataset, rounds=rounds, **sizes)
    results = measure_throughput(model, batches, warmup=2)
    memory = peak_memory_gib(model, batches)
    base = results["no packing"]["tokens_per_s"]
    for name, r in results.items():
        r["speed_vs_no_packing"] = round(r["tokens_per_s"] / base, 3)
        r["peak_memory_gib"] = memory[name]
        for key in (
            "step_seconds",
            "tokens_per_s",
            "padding_fraction",
            "real_tokens_per_step",
            "slots_per_step",
        ):
            r[key] = round(r[key], 4)
    return {"sizes": sizes, "results": results}


def chat_workload(quick: bool, device: str, dtype: torch.dtype) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tiny = REPO / "data" / "tiny-base"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=dtype, attn_implementation="sdpa").to(device)
    ds = load_dataset("json", data_files=str(REPO / "data/world/chat_train.jsonl"), split="train")
    ds = ds.select_columns(["messages"])
    rounds = 4 if quick else 12
    out = {
        "notebook batch": run_workload(
            model, tokenizer, ds, rounds=rounds, max_length=256, unpacked_bs=16, packed_bs=2, chat=True
        )
    }
    if not quick:
        out["4x batch"] = run_workload(
            model, tokenizer, ds, rounds=rounds, max_length=256, unpacked_bs=64, packed_bs=8, chat=True
        )
    return out


def long_workload(quick: bool, device: str, dtype: torch.dtype) -> dict:
    from datasets import Dataset
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tiny-base")  # only its pad/eos ids are used
    if quick:
        shape = dict(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(tokenizer),
        )
        n_docs, max_length, budget = 300, 512, 2048
    else:  # about Qwen2.5-0.5B's shape, with a 32 k vocabulary
        shape = dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=4,
            vocab_size=32768,
        )
        n_docs, max_length, budget = 4000, 2048, 8192
    config = LlamaConfig(
        **shape,
        max_position_embeddings=max_length,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(dtype)
    model.set_attn_implementation(
        "sdpa"
    )  # the default already; said out loud because the results depend on it
    rng = np.random.default_rng(0)
    lengths = np.clip(rng.lognormal(math.log(300), 1.0, n_docs), 16, max_length).astype(int)
    low = max(tokenizer.pad_token_id, tokenizer.eos_token_id) + 1  # random ids that are neither pad nor EOS
    docs = [rng.integers(low, shape["vocab_size"], n).tolist() for n in lengths]
    dataset = Dataset.from_dict({"input_ids": docs})
    unpacked_bs = max(1, round(budget / lengths.mean()))
    result = run_workload(
        model,
        tokenizer,
        dataset,
        rounds=4 if quick else 10,
        max_length=max_length,
        unpacked_bs=unpacked_bs,
        packed_bs=budget // max_length,
        chat=False,
    )
    result["model"] = {**shape, "parameters_m": round(model.num_parameters() / 1e6, 1)}
    result["lengths"] = {
        "mean": round(float(lengths.mean()), 1),
        "median": float(np.median(lengths)),
        "max": int(lengths.max()),
    }
    return result


def contamination(device: str) -> dict:
    """Max |logit difference| packed vs alone for a bfd-style row, with and without restarted positions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkit.packing import packed_logit_gap

    tiny = REPO / "data" / "tiny-base"
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    rows = [json.loads(line) for line in (REPO / "data/world/chat_train.jsonl").open()][:6]
    docs = [tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"] for r in rows]
    ids, seq_lengths = sum(docs, []), [len(d) for d in docs]
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for attn in ("sdpa", "eager"):
            model = AutoModelForCausalLM.from_pretrained(tiny, dtype=dtype, attn_implementation=attn).to(
                device
            )
            key = f"{str(dtype).split('.')[-1]}, {attn}"
            out[key] = {
                "restarted positions": packed_logit_gap(model, ids, seq_lengths),
                "concatenated": packed_logit_gap(model, ids, seq_lengths, restart_positions=False),
            }
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a CPU smoke test")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    start = time.perf_counter()
    report = {"versions": versions(), "dtype": str(dtype), "quick": args.quick}
    # One failing part (say, out of memory) is reported in the JSON and does not cost the others.
    for name, part in (
        ("contamination", lambda: contamination(device)),
        ("chat", lambda: chat_workload(args.quick, device, dtype)),
        ("long", lambda: long_workload(args.quick, device, dtype)),
    ):
        try:
            report[name] = part()
        except Exception as err:  # noqa: BLE001 - recorded, not swallowed
            report[name] = {"error": f"{type(err).__name__}: {err}"}
        if device == "cuda":
            torch.cuda.empty_cache()
    report["seconds"] = round(time.perf_counter() - start, 1)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
