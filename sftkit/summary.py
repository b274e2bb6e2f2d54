"""Wall time, peak memory and token throughput of a training run."""

from __future__ import annotations

import sys
import time
from types import TracebackType

import torch

from sftkit.device import detect_device


def read_peak_memory_gb() -> float | None:
    """Peak memory in GiB: CUDA allocated since the last reset, else the process-lifetime peak RSS."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource
    except ImportError:  # Windows has no resource module
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in kilobytes on Linux but in bytes on macOS.
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20


class RunTimer:
    """Context manager recording wall seconds and peak memory of its block.

    On CUDA, peak_memory_gb is ``torch.cuda.max_memory_allocated`` (reset on entry, so it covers
    only this block) and peak_reserved_gb is what the caching allocator held, closer to what
    nvidia-smi shows. On CPU/MPS it is the process's peak resident memory (``ru_maxrss``): a
    lifetime peak that includes everything the notebook did before the block, never reset.
    Values are GiB (2**30 bytes).
    """

    def __init__(self) -> None:
        self.device: str = detect_device()
        self.seconds: float | None = None
        self.peak_memory_gb: float | None = None
        self.peak_reserved_gb: float | None = None
        self._start: float | None = None

    def __enter__(self) -> RunTimer:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._start = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.device == "cuda":
            # Kernels run asynchronously; without a sync the clock stops before the GPU does.
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._start
        self.peak_memory_gb = read_peak_memory_gb()
        if self.device == "cuda":
            self.peak_reserved_gb = torch.cuda.max_memory_reserved() / 2**30

    def as_dict(self) -> dict:
        """Return {"seconds", "peak_memory_gb", "peak_reserved_gb", "device"}."""
        return {
            "seconds": self.seconds,
            "peak_memory_gb": self.peak_memory_gb,
            "peak_reserved_gb": self.peak_reserved_gb,
            "device": self.device,
        }


def count_train_tokens(trainer) -> int | None:
    """Number of (non-padding) tokens the trainer has trained on, or None if unknown."""
    # trl's SFTTrainer adds every batch's attention_mask.sum() to the private
    # ``_total_train_tokens`` and logs the running total as "num_tokens" at each logging step.
    # The attribute is exact; the log lags by up to logging_steps - 1 steps.
    total = getattr(trainer, "_total_train_tokens", None)
    if isinstance(total, (int, float)) and total > 0:
        return int(total)
    state = getattr(trainer, "state", None)
    for entry in reversed(getattr(state, "log_history", None) or []):
        if "num_tokens" in entry:
            return int(entry["num_tokens"])
    seen = getattr(state, "num_input_tokens_seen", 0)
    if seen:
        # Only filled when TrainingArguments(include_num_input_tokens_seen=...) is on.
        return int(seen)
    return _tokens_from_dataset(trainer)


def _tokens_from_dataset(trainer) -> int | None:
    """Estimate trained tokens from the tokenized dataset and the epochs completed."""
    dataset = getattr(trainer, "train_dataset", None)
    names = getattr(dataset, "column_names", None) or []
    if dataset is None or "input_ids" not in names:
        return None
    per_epoch = sum(len(ids) for ids in dataset["input_ids"])
    state = getattr(trainer, "state", None)
    epochs = getattr(state, "epoch", None) or getattr(getattr(trainer, "args", None), "num_train_epochs", 1)
    return int(per_epoch * float(epochs))


def training_summary(trainer, seconds: float, peak_memory_gb: float | None = None) -> dict:
    """Return {"seconds", "train_tokens", "tokens_per_s", "peak_memory_gb", "device"} for a run."""
    # Pass RunTimer.peak_memory_gb when you have it: on CUDA it covers only the timed block.
    if peak_memory_gb is None:
        peak_memory_gb = read_peak_memory_gb()
    tokens = count_train_tokens(trainer)
    model = getattr(trainer, "model", None)
    device = getattr(getattr(model, "device", None), "type", None) or detect_device()
    return {
        "seconds": round(float(seconds), 2),
        "train_tokens": tokens,
        "tokens_per_s": round(tokens / seconds, 1) if tokens and seconds > 0 else None,
        "peak_memory_gb": round(peak_memory_gb, 2) if peak_memory_gb is not None else None,
        "device": device,
    }
