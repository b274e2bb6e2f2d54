"""Reproducible runs."""

from __future__ import annotations

import os

import torch
from transformers import set_seed


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch (all devices); optionally prefer deterministic kernels."""
    set_seed(seed)
    if deterministic:
        # cuBLAS only gives reproducible matmuls with a fixed workspace; it reads this variable
        # when the CUDA context is created, so it must be set before the first CUDA call.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: some ops (e.g. scatter_add on CUDA) have no deterministic implementation;
        # a warning keeps training running instead of aborting a long run halfway.
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
