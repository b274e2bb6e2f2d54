#!/usr/bin/env python3
"""Summarise bench/results/*.jsonl as markdown: median of repeats per (workload, arm, overrides)."""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def load(paths: list[str]) -> list[dict]:
    rows = []
    for p in paths:
        rows += [json.loads(line) for line in Path(p).read_text().splitlines() if line.strip()]
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """One row per configuration with the median tokens/s over its repeats."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r.get("status") == "ok" and "tokens_per_s" in r:
            ov = dict(r.get("overrides") or {})
            if r.get("alloc_conf"):
                ov["PYTORCH_CUDA_ALLOC_CONF"] = r["alloc_conf"]
            groups[(r["workload"], r["arm"], json.dumps(ov, sort_keys=True))].append(r)
    out = []
    for (w, arm, ov), rs in sorted(groups.items()):
        med = statistics.median(r["tokens_per_s"] for r in rs)
        best = min(rs, key=lambda r: abs(r["tokens_per_s"] - med))
        out.append(dict(workload=w, arm=arm, overrides=ov, repeats=len(rs), tokens_per_s=med,
                        runs=[r["tokens_per_s"] for r in rs], s_per_step=best["s_per_step"],
                        tokens_per_step=best["tokens_per_step"], peak_reserved_gb=best["peak_reserved_gb"],
                        peak_allocated_gb=best["peak_allocated_gb"], mfu=best["mfu"],
                        mfu_needed=best["mfu_needed"]))
    return out


def main() -> None:
    paths = sys.argv[1:] or sorted(str(p) for p in Path(__file__).parent.glob("results/*.jsonl"))
    print("| workload | arm | changed | repeats | tokens/s (median) | s/step | tokens/step | peak reserved GB "
          "| peak allocated GB | MFU | MFU needed |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for s in summarise(load(paths)):
        print(f"| {s['workload']} | {s['arm']} | {s['overrides'] if s['overrides'] != '{}' else ''} | "
              f"{s['repeats']} | {s['tokens_per_s']:,.0f} | {s['s_per_step']} | {s['tokens_per_step']:,.0f} | "
              f"{s['peak_reserved_gb']} | {s['peak_allocated_gb']} | {100 * s['mfu']:.1f}% | "
              f"{100 * s['mfu_needed']:.1f}% |")


if __name__ == "__main__":
    main()
