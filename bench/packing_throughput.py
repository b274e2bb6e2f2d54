"""How fast is packing itself? sftkit's packers against ``trl.pack_dataset``, on a CPU, on 100 k+ documents.

Not a test and not timed by CI: run it when you change the packer.

    python bench/packing_throughput.py                    # 100,000 documents (about a minute or two)
    python bench/packing_throughput.py --examples 300000 --block-length 2048 --out packing.json

The documents are the Isle of Merrow pretraining corpus (``sftkit.world.corpus``: biographies, gazette notes,
town pages; about 52 tokens each with the shipped tokenizer). Two questions, each answered in examples/s and
tokens/s (tokens = the tokens in the packed output):

* **pack only**, from token ids already in memory: ``sftkit.packing.pack_eager``, the lazy
  ``ConstantLengthPacker`` (fed ``input_ids``), and ``trl.pack_dataset`` with ``bfd``, ``bfd_split`` and
  ``wrapped`` on a ``datasets.Dataset`` of ``input_ids`` (the shape SFTTrainer packs);
* **tokenize and pack**, from text: the lazy packer as a trainer would draw it, against ``Dataset.map``
  tokenization followed by ``trl.pack_dataset(bfd)``.

It prints a table and one JSON object (also written to ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def _row(n_examples: int, tokens: int, rows: int, seconds: float) -> dict:
    return {
        "seconds": round(seconds, 3),
        "examples_per_s": round(n_examples / seconds),
        "tokens_per_s": round(tokens / seconds),
        "rows": rows,
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000, help="documents to pack (default 100000)")
    parser.add_argument("--block-length", type=int, default=1024, help="packed row length (default 1024)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    from datasets import Dataset, disable_progress_bars
    from transformers import AutoTokenizer
    from trl import pack_dataset

    from sftkit import world
    from sftkit.packing import ConstantLengthPacker, pack_eager

    disable_progress_bars()
    n, length = args.examples, args.block_length
    tokenizer = AutoTokenizer.from_pretrained(REPO / "data" / "tiny-base")
    eos = tokenizer.eos_token_id
    texts, gen_s = _timed(lambda: world.corpus(world.make_people(), n, seed=7))
    rows = [{"text": t} for t in texts]
    ids, tok_s = _timed(lambda: [d + [eos] for d in tokenizer(texts)["input_ids"]])
    total = sum(len(d) for d in ids)
    results: dict[str, dict] = {}

    # Pack only: token ids already in memory.
    blocks, s = _timed(lambda: pack_eager(ids, length))
    results["pack only | sftkit pack_eager"] = _row(
        n, sum(len(b["input_ids"]) for b in blocks), len(blocks), s
    )
    id_rows = [{"input_ids": d} for d in ids]
    packer = ConstantLengthPacker(id_rows, tokenizer, block_length=length, tokenize_batch_size=1024)
    blocks, s = _timed(lambda: list(packer))
    results["pack only | sftkit ConstantLengthPacker"] = _row(
        n, sum(len(b["input_ids"]) for b in blocks), len(blocks), s
    )
    shuffled = ConstantLengthPacker(
        id_rows, tokenizer, block_length=length, tokenize_batch_size=1024, shuffle=True, shuffle_buffer=256
    )
    blocks, s = _timed(lambda: list(shuffled))
    results["pack only | sftkit ConstantLengthPacker, shuffled"] = _row(
        n, sum(len(b["input_ids"]) for b in blocks), len(blocks), s
    )
    del blocks
    dataset = Dataset.from_dict({"input_ids": [d for d in ids]})
    for strategy in ("bfd", "bfd_split", "wrapped"):
        packed, s = _timed(lambda strategy=strategy: pack_dataset(dataset, length, strategy))
        tokens = sum(len(r) for r in packed["input_ids"])
        results[f"pack only | trl pack_dataset {strategy}"] = _row(n, tokens, len(packed), s)

    # Tokenize and pack: text in, blocks out.
    packer = ConstantLengthPacker(rows, tokenizer, block_length=length, tokenize_batch_size=256)
    blocks, s = _timed(lambda: list(packer))
    results["tokenize+pack | sftkit ConstantLengthPacker"] = _row(
        n, sum(len(b["input_ids"]) for b in blocks), len(blocks), s
    )
    del blocks

    def trl_pipeline():
        text_ds = Dataset.from_dict({"text": texts})
        tokenized = text_ds.map(
            lambda batch: {"input_ids": [d + [eos] for d in tokenizer(batch["text"])["input_ids"]]},
            batched=True,
            remove_columns=["text"],
        )
        return pack_dataset(tokenized, length, "bfd")

    packed, s = _timed(trl_pipeline)
    results["tokenize+pack | Dataset.map + trl pack_dataset bfd"] = _row(
        n, sum(len(r) for r in packed["input_ids"]), len(packed), s
    )

    report = {
        "examples": n,
        "block_length": length,
        "tokens_in": total,
        "mean_tokens_per_example": round(total / n, 1),
        "corpus_seconds": round(gen_s, 2),
        "tokenize_seconds": round(tok_s, 2),
        "versions": {
            "python": platform.python_version(),
            **{p: metadata.version(p) for p in ("torch", "transformers", "trl", "datasets", "tokenizers")},
        },
        "cpu_count": os.cpu_count(),
        "results": results,
    }
    width = max(len(k) for k in results)
    print(f"{n} documents, {total} tokens (mean {total / n:.1f}), block length {length}")
    print(f"{'':{width}}  {'examples/s':>12} {'tokens/s':>13} {'rows':>8} {'seconds':>8}")
    for name, r in results.items():
        print(
            f"{name:{width}}  {r['examples_per_s']:>12,} {r['tokens_per_s']:>13,} {r['rows']:>8,} {r['seconds']:>8.2f}"
        )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
