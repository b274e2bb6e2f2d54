"""Which accelerator we are on and which numeric precision to train in."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from sftkit.errors import SftkitError

# Canonical precision names, plus the torch-style spellings people type from habit.
_ALIASES: dict[str, str] = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "fp32": "fp32",
    "float32": "fp32",
}
_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PRECISION_CHOICES: tuple[str, ...] = ("auto", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class Precision:
    """A training precision: its short name and the torch dtype to load weights in."""

    name: str
    dtype: torch.dtype

    @property
    def bf16(self) -> bool:
        """True when training should use bfloat16 mixed precision."""
        return self.name == "bf16"

    @property
    def fp16(self) -> bool:
        """True when training should use float16 mixed precision (with loss scaling)."""
        return self.name == "fp16"

    def trainer_kwargs(self) -> dict[str, bool]:
        """Keyword arguments for SFTConfig / TrainingArguments, e.g. ``SFTConfig(**p.trainer_kwargs())``."""
        # Both keys are always returned: trl's SFTConfig defaults to bf16=True, which fails on a
        # CPU, so fp32 has to say bf16=False explicitly rather than leave the default in place.
        return {"bf16": self.bf16, "fp16": self.fp16}


def detect_device() -> str:
    """Return "cuda", "mps" or "cpu": the best accelerator PyTorch can use here."""
    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


def normalize_precision_name(requested: str) -> str:
    """Map "auto"/"bf16"/"fp16"/"fp32" (or "bfloat16", "float16", "float32") to a canonical name."""
    key = str(requested).strip().lower()
    if key == "auto":
        return "auto"
    if key not in _ALIASES:
        raise SftkitError(
            f"Unknown precision {requested!r}.",
            f"use one of {', '.join(repr(c) for c in PRECISION_CHOICES)} "
            '("bfloat16", "float16" and "float32" are accepted too).',
        )
    return _ALIASES[key]


def choose_precision(requested: str = "auto", device: str | None = None) -> Precision:
    """Pick (for "auto") or validate (for an explicit name) the training precision for ``device``."""
    name = normalize_precision_name(requested)
    device = device or detect_device()
    bf16_ok = device == "cuda" and torch.cuda.is_bf16_supported()

    if name == "auto":
        if device == "cuda":
            # Ampere and newer (A100, L4, H100, RTX 30xx+) have bf16: same range as fp32, no loss
            # scaling needed. Older GPUs such as Colab's free T4 only do fp16 fast.
            name = "bf16" if bf16_ok else "fp16"
        else:
            # CPU/MPS train in fp32: bf16 autocast on CPU is much slower than fp32 on most
            # processors, and the Trainer refuses fp16 on CPU. The models we train on CPU are
            # tiny, so the memory cost of fp32 does not matter there.
            name = "fp32"
        return Precision(name, _DTYPES[name])

    if device == "cpu" and name in ("bf16", "fp16"):
        raise SftkitError(
            f'precision="{name}" was requested but this machine has no GPU (device is "cpu").',
            'use precision="auto" or "fp32" on CPU, or run on a CUDA GPU (e.g. a Colab GPU runtime).',
        )
    if device == "cuda" and name == "bf16" and not bf16_ok:
        gpu = torch.cuda.get_device_name(0) if torch.cuda.device_count() else "this GPU"
        raise SftkitError(
            f'precision="bf16" was requested but {gpu} does not support bfloat16 '
            "(it needs an Ampere or newer GPU).",
            'use precision="auto" (fp16 on this GPU) or "fp16"/"fp32".',
        )
    return Precision(name, _DTYPES[name])


def describe_device() -> dict:
    """Return a summary of the hardware: device, gpu name/memory (GB), cpu count, torch version."""
    device = detect_device()
    gpu_name: str | None = None
    gpu_memory_gb: float | None = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        gpu_name = props.name
        gpu_memory_gb = round(props.total_memory / 2**30, 1)
    elif device == "mps":
        gpu_name = "Apple Silicon (MPS)"
    return {
        "device": device,
        "gpu_name": gpu_name,
        "gpu_memory_gb": gpu_memory_gb,
        "cpu_count": os.cpu_count(),
        "torch_version": torch.__version__,
    }
