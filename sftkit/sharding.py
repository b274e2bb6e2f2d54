"""Per-GPU memory of the model states (weights, gradients, Adam) under DDP, ZeRO-1/2/3 and FSDP2.

The accounting is the ZeRO paper's for mixed-precision Adam (Rajbhandari et al., 2020, section 3): per trained
parameter 2 bytes of bf16/fp16 weights, 2 bytes of gradients and 12 bytes of optimizer state (fp32 master copy,
momentum, variance): 16 bytes in all. The Trainer's default, fp32 weights with bf16 autocast, also comes to 16
(4 weights + 4 gradients + 8 Adam). Frozen parameters (the base model under LoRA) cost only their 2 bytes.
Activations, the CUDA context, communication buckets and the one layer ZeRO-3/FSDP gather at a time are NOT
included: they come on top and depend on batch size and sequence length.
"""

from __future__ import annotations

from sftkit.errors import SftkitError

WEIGHT_BYTES = 2  # bf16/fp16 weights
GRAD_BYTES = 2  # bf16/fp16 gradients
OPTIMIZER_BYTES = 12  # fp32 master weights + Adam momentum + variance

# What each strategy splits across the N GPUs (True) or keeps whole on every GPU (False), and what it moves to
# CPU RAM instead: (weights sharded, gradients sharded, optimizer sharded, optimizer on CPU, weights on CPU).
STRATEGIES: dict[str, tuple[bool, bool, bool, bool, bool]] = {
    "ddp": (False, False, False, False, False),
    "zero1": (False, False, True, False, False),
    "zero2": (False, True, True, False, False),
    "zero3": (True, True, True, False, False),
    "fsdp2": (True, True, True, False, False),
    "zero2_offload": (False, True, True, True, False),
    "zero3_offload": (True, True, True, True, True),
}


def model_state_gib(
    n_params: float, strategy: str, n_gpus: int, trainable_fraction: float = 1.0
) -> dict[str, float]:
    """GiB per GPU of weights, gradients and optimizer state (and GiB of CPU RAM per GPU) for ``strategy``."""
    if strategy not in STRATEGIES:
        raise SftkitError(f"unknown strategy {strategy!r}.", f"use one of {', '.join(STRATEGIES)}.")
    if n_gpus < 1 or n_params <= 0 or not 0 < trainable_fraction <= 1:
        raise SftkitError(
            f"need n_gpus >= 1, n_params > 0 and 0 < trainable_fraction <= 1 (got {n_gpus}, {n_params}, "
            f"{trainable_fraction}).",
            "pass e.g. n_params=1.24e9, n_gpus=2, trainable_fraction=1.0 (full fine-tuning).",
        )
    w_shard, g_shard, o_shard, o_cpu, w_cpu = STRATEGIES[strategy]
    trained = n_params * trainable_fraction
    weights = n_params * WEIGHT_BYTES / (n_gpus if w_shard else 1)
    grads = trained * GRAD_BYTES / (n_gpus if g_shard else 1)
    optimizer = trained * OPTIMIZER_BYTES / (n_gpus if o_shard else 1)
    cpu = 0.0
    if o_cpu:  # ZeRO-Offload: the optimizer step (and its fp32 state and gradients) runs on the CPU
        cpu += optimizer + grads
        optimizer = grads = 0.0
    if w_cpu:
        cpu += weights
        weights = 0.0
    gib = 2**30
    out = {"weights": weights / gib, "gradients": grads / gib, "optimizer": optimizer / gib}
    out["total"] = sum(out.values())
    out["cpu_ram"] = cpu / gib
    return out
