"""Where training memory goes: measure it (report, tensor tracker, callback) and predict it (``estimate``).

Measuring
    ``memory_report(model, optimizer)`` is a snapshot: bytes of weights, gradients and optimizer state, and the
    device's view (CUDA allocated/reserved and their peaks; on a CPU the process's resident memory and its
    peak). ``MemoryReportCallback`` takes one at train start and one at train end, with the peak in between.
    ``TensorMemoryTracker`` counts the bytes of live tensors, op by op, on any device: on a CPU it is the
    counterpart of ``torch.cuda.max_memory_allocated`` (which a CPU lacks), exact and repeatable, while
    resident memory also holds the allocator's cached pages and Python itself.

Predicting
    ``estimate(config, method, seq_len, batch, optimizer, checkpointing, ...)`` adds up weights, gradients,
    optimizer state, the activations autograd saves for the backward pass and the largest temporaries, for
    full fine-tuning, LoRA and QLoRA of a Llama-style decoder (Llama, Qwen2, Mistral shapes) trained with
    TRL's ``SFTTrainer``. The terms follow what transformers 5, PEFT and TRL 1.16 actually allocate (see the
    comments in ``_activations``); ``bench/memory_planner_gpu.py`` measures the GPU error.
"""

from __future__ import annotations

import json
import os
import re
import sys
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import TrainerCallback

from sftkit.device import detect_device
from sftkit.errors import SftkitError

GiB = 2**30

# ----------------------------------------------------------------------------------------------------------
# measuring
# ----------------------------------------------------------------------------------------------------------


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr() if st.data_ptr() else id(st))


def _unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied or viewed tensors count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


def _quant_state_tensors(param) -> list[torch.Tensor]:
    """bitsandbytes 4-bit parameters keep their scales (absmax, code) beside the packed weight."""
    qs = getattr(param, "quant_state", None)
    out = []
    while qs is not None:
        out += [getattr(qs, name, None) for name in ("absmax", "code", "offset")]
        qs = getattr(qs, "state2", None)
    return [t for t in out if isinstance(t, torch.Tensor)]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters, buffers and 4-bit quantization scales (shared storages counted once)."""
    tensors = list(model.parameters()) + list(model.buffers())
    for p in model.parameters():
        tensors += _quant_state_tensors(p)
    return _unique_bytes(tensors)


def gradient_bytes(model: torch.nn.Module) -> int:
    """Bytes of the ``.grad`` tensors that currently exist."""
    return _unique_bytes(p.grad for p in model.parameters() if p.grad is not None)


def optimizer_bytes(optimizer) -> int:
    """Bytes of the optimizer's state tensors (Adam's two moments, 8-bit state and scales, step counters)."""
    if optimizer is None:
        return 0
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    tensors = []
    for state in getattr(inner, "state", {}).values():
        tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
    return _unique_bytes(tensors)


def _proc_status_kib(field_name: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field_name}:\s+(\d+) kB", text, re.M)
    return int(match.group(1)) if match else None


def rss_bytes() -> int | None:
    """Resident memory of this process now (Linux), or None where it cannot be read."""
    kib = _proc_status_kib("VmRSS")
    return kib * 1024 if kib is not None else None


def peak_rss_bytes() -> int | None:
    """Peak resident memory since the last ``reset_peak_rss`` (Linux), else the process-lifetime peak."""
    kib = _proc_status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_rss() -> bool:
    """Reset the peak resident memory to the current value (Linux ``/proc/self/clear_refs``); False if not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def total_memory_bytes(device: str | None = None) -> int | None:
    """Memory of the device: GPU memory for CUDA, physical RAM otherwise."""
    device = device or detect_device()
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def reset_peak(device: str | None = None) -> None:
    """Start a new peak: CUDA's max_memory_allocated/reserved, or the process's peak RSS on Linux."""
    device = device or detect_device()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()


def memory_report(model: torch.nn.Module | None = None, optimizer=None, device: str | None = None) -> dict:
    """Snapshot in GiB: weights, gradients, optimizer state, device memory now and at peak, share of the device."""
    device = device or detect_device()
    report: dict = {"device": device}
    if model is not None:
        report["weights_gib"] = weight_bytes(model) / GiB
        report["gradients_gib"] = gradient_bytes(model) / GiB
    if optimizer is not None or model is not None:
        report["optimizer_gib"] = optimizer_bytes(optimizer) / GiB
    total = total_memory_bytes(device)
    report["device_total_gib"] = total / GiB if total else None
    if device == "cuda":
        torch.cuda.synchronize()
        report["allocated_gib"] = torch.cuda.memory_allocated() / GiB
        report["reserved_gib"] = torch.cuda.memory_reserved() / GiB
        report["peak_allocated_gib"] = torch.cuda.max_memory_allocated() / GiB
        report["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / GiB
        peak = report["peak_reserved_gib"]
    else:
        rss, peak_rss = rss_bytes(), peak_rss_bytes()
        report["rss_gib"] = rss / GiB if rss is not None else None
        report["peak_rss_gib"] = peak_rss / GiB if peak_rss is not None else None
        peak = report["peak_rss_gib"]
    report["peak_share_of_device"] = peak / report["device_total_gib"] if peak and total else None
    return report


class TensorMemoryTracker(TorchDispatchMode):
    """Count the bytes of live tensor storages op by op; ``peak_bytes`` is the CPU analogue of max_memory_allocated.

    Tensors created before the block are not seen unless passed to ``track`` (weights, optimizer state).
    Every op goes through Python while the tracker is active, so training runs slower inside it.
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}
        self.current_bytes = 0
        self.peak_bytes = 0
        self.peak_count = 0

    def track(self, tensors) -> None:
        """Count tensors that already exist (e.g. ``model.parameters()``)."""
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._register(t)

    def reset_peak(self) -> None:
        """Start a new peak from the bytes live now."""
        self.peak_bytes = self.current_bytes

    def _register(self, t: torch.Tensor) -> None:
        if t.device.type == "meta" or getattr(t, "is_sparse", False):
            return
        storage = t.untyped_storage()
        key = storage._cdata  # the C++ StorageImpl: views and aliases share it
        if key in self._live:
            return
        nbytes = storage.nbytes()
        self._live[key] = nbytes
        self.current_bytes += nbytes
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
            self.peak_count += 1
        # The storage's Python object lives exactly as long as the storage (PyObject preservation),
        # so its finalizer runs when the memory is freed.
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        self.current_bytes -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._register(t)
        return out


class MemoryReportCallback(TrainerCallback):
    """Reports at train start and end, the peak in between, and gradients/optimizer bytes at their largest.

    ``track_tensors=True`` (CPU) runs training inside a ``TensorMemoryTracker`` started at train begin with
    the weights and optimizer state counted; ``skip_first_step=True`` starts the peak after step 1, when the
    optimizer state exists and the allocator has warmed up (what later steps look like).
    """

    def __init__(self, track_tensors: bool = False, skip_first_step: bool = False) -> None:
        self.track_tensors = track_tensors
        self.skip_first_step = skip_first_step
        self.before: dict | None = None
        self.after: dict | None = None
        self.gradients_bytes = 0
        self.tracker: TensorMemoryTracker | None = None
        self._device = detect_device()

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.before = memory_report(model, optimizer, self._device)
        reset_peak(self._device)
        if self.track_tensors:
            self.tracker = TensorMemoryTracker()
            self.tracker.__enter__()
            self.tracker.track(list(model.parameters()) + list(model.buffers()))
            for p in model.parameters():
                self.tracker.track(_quant_state_tensors(p))

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.gradients_bytes = max(self.gradients_bytes, gradient_bytes(model))

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.tracker is not None and state.global_step == 1:
            # The optimizer state was created inside the tracker during step 1 (lazily, at the first step).
            self.tracker.track(
                t
                for s in getattr(getattr(optimizer, "optimizer", optimizer), "state", {}).values()
                for t in s.values()
            )
        if self.skip_first_step and state.global_step == 1:
            reset_peak(self._device)
            if self.tracker is not None:
                self.tracker.reset_peak()

    def on_train_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.tracker is not None:
            self.tracker.__exit__(None, None, None)
        self.after = memory_report(model, optimizer, self._device)
        self.after["gradients_gib"] = self.gradients_bytes / GiB
        if self.tracker is not None:
            self.after["peak_tensors_gib"] = self.tracker.peak_bytes / GiB

    def breakdown(self) -> dict:
        """Peak split into weights / optimizer state / gradients / activations and temporaries (GiB)."""
        if self.after is None:
            raise SftkitError(
                "no report yet: the callback reports after training.", "call trainer.train() first."
            )
        a = self.after
        peak = a.get("peak_tensors_gib") or a.get("peak_allocated_gib")
        out = {
            "weights": a.get("weights_gib", 0.0),
            "optimizer state": a.get("optimizer_gib", 0.0),
            "gradients": a.get("gradients_gib", 0.0),
        }
        if peak is not None:
            # At the peak (the start of the backward pass) the gradients do not exist yet for most models,
            # so what is left over is activations saved for backward plus temporaries.
            out["activations + temporaries"] = max(0.0, peak - out["weights"] - out["optimizer state"])
            out["peak"] = peak
        return out


# ----------------------------------------------------------------------------------------------------------
# planning
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a Llama-style decoder that memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int = 0
    qkv_bias: bool = False

    @property
    def d(self) -> int:
        """Per-head dimension."""
        return self.head_dim or self.hidden // self.heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer in one decoder layer."""
        h, q, kv, f = self.hidden, self.heads * self.d, self.kv_heads * self.d, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, f),
            "up_proj": (h, f),
            "down_proj": (f, h),
        }

    @property
    def layer_linear_params(self) -> int:
        """Parameters of one layer's linear weights (bias excluded)."""
        return sum(i * o for i, o in self.linear_shapes().values())

    @property
    def parameters(self) -> int:
        """All parameters (tied embeddings counted once)."""
        bias = (self.heads + 2 * self.kv_heads) * self.d if self.qkv_bias else 0
        per_layer = self.layer_linear_params + bias + 2 * self.hidden
        emb = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * per_layer + emb + self.hidden


# Public config.json numbers of common models (hidden, intermediate, layers, heads, kv heads, vocab, tied).
MODEL_SHAPES: dict[str, ModelShape] = {
    "Qwen2.5-0.5B": ModelShape(896, 4864, 24, 14, 2, 151936, True, qkv_bias=True),
    "Qwen2.5-1.5B": ModelShape(1536, 8960, 28, 12, 2, 151936, True, qkv_bias=True),
    "Qwen2.5-3B": ModelShape(2048, 11008, 36, 16, 2, 151936, True, qkv_bias=True),
    "Qwen2.5-7B": ModelShape(3584, 18944, 28, 28, 4, 152064, False, qkv_bias=True),
    "Qwen2.5-14B": ModelShape(5120, 13824, 48, 40, 8, 152064, False, qkv_bias=True),
    "Qwen2.5-32B": ModelShape(5120, 27648, 64, 40, 8, 152064, False, qkv_bias=True),
    "Llama-3.2-1B": ModelShape(2048, 8192, 16, 32, 8, 128256, True, head_dim=64),
    "Llama-3.2-3B": ModelShape(3072, 8192, 28, 24, 8, 128256, True, head_dim=128),
    "Llama-3.1-8B": ModelShape(4096, 14336, 32, 32, 8, 128256, False),
    "Llama-3.1-70B": ModelShape(8192, 28672, 80, 64, 8, 128256, False),
}


def model_shape(config) -> ModelShape:
    """A ModelShape from a ModelShape, a name in MODEL_SHAPES, a model folder, a config object or a dict."""
    if isinstance(config, ModelShape):
        return config
    if isinstance(config, str) and not Path(config).expanduser().is_dir():
        key = config.split("/")[-1]
        for name, shape in MODEL_SHAPES.items():
            if name.lower() == key.lower() or name.lower() == key.lower().removesuffix("-instruct"):
                return shape
        raise SftkitError(
            f"unknown model {config!r}: not a folder and not one of the built-in shapes.",
            f"pass a model folder, a transformers config, or one of {', '.join(MODEL_SHAPES)}.",
        )
    if isinstance(config, (str, os.PathLike)):
        path = Path(config).expanduser() / "config.json"
        if not path.is_file():
            raise SftkitError(f"{config} has no config.json.", "pass the folder of a saved model.")
        config = json.loads(path.read_text())
    if not isinstance(config, dict):
        config = config.to_dict()
    config = config.get("text_config") or config
    try:
        heads = config["num_attention_heads"]
        return ModelShape(
            hidden=config["hidden_size"],
            intermediate=config["intermediate_size"],
            layers=config["num_hidden_layers"],
            heads=heads,
            kv_heads=config.get("num_key_value_heads") or heads,
            vocab=config["vocab_size"],
            tied=bool(config.get("tie_word_embeddings", False)),
            head_dim=config.get("head_dim") or 0,
            qkv_bias=bool(config.get("attention_bias", False) or config.get("model_type") == "qwen2"),
        )
    except KeyError as err:
        raise SftkitError(
            f"the config lacks {err}; the planner knows Llama-style decoders (Llama, Qwen2, Mistral).",
            "pass one of MODEL_SHAPES or a ModelShape(...) with the numbers of your model.",
        ) from err


METHODS = ("full", "lora", "qlora")
OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "sgd")
PRECISIONS = ("bf16", "fp16", "fp32")
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
_LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# TRL 1.16's fused LM head (trl.kernels.chunked_logprob): a [min(N, 4096), 32768] buffer of logits tiles.
_TRL_TOKEN_CHUNK, _TRL_VOCAB_CHUNK = 4096, 32768
# Allocations outside the model on CUDA (cuBLAS workspaces, small buffers) seen by max_memory_allocated.
_CUDA_RUNTIME_BYTES = 64 * 2**20
# What CUDA keeps outside PyTorch's allocator (context, kernels): counted when asking "does it fit".
CUDA_CONTEXT_GIB = 0.6
# nvidia-smi memory of GPUs people ask about, in GiB (what torch.cuda reports as total).
GPUS_GIB = {"T4 16 GB": 14.6, "L4 24 GB": 22.0, "A100 40 GB": 39.4, "H100 80 GB": 79.1}


@dataclass
class MemoryEstimate:
    """Predicted peak training memory, in bytes per component; ``peak_gib`` is the headline.

    ``activations``, ``temporaries`` and ``gradients_at_peak`` are what is live at the moment of the peak
    (``phase``); ``gradients`` is the size of all gradients, which exist together only at the optimizer step.
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    temporaries: int
    runtime: int
    phase: str  # when the peak happens: "backward start", "recompute" or "optimizer step"
    gradients_at_peak: int = 0
    phases: dict = field(default_factory=dict)  # bytes live (besides weights, optimizer, runtime) per moment
    inputs: dict = field(default_factory=dict)

    @property
    def peak_bytes(self) -> int:
        """Predicted peak of live tensors (compare with torch.cuda.max_memory_allocated)."""
        return (
            self.weights
            + self.optimizer
            + self.gradients_at_peak
            + self.activations
            + self.temporaries
            + self.runtime
        )

    @property
    def peak_gib(self) -> float:
        """peak_bytes in GiB."""
        return self.peak_bytes / GiB

    def device_gib(self, fragmentation: float = 0.10) -> float:
        """What the GPU must hold: peak, plus allocator slack (reserved exceeds allocated) and the CUDA context."""
        return self.peak_gib * (1 + fragmentation) + CUDA_CONTEXT_GIB

    def fits(self, gpu_gib: float, fragmentation: float = 0.10) -> bool:
        """True when device_gib() is below a GPU's memory (in GiB, e.g. GPUS_GIB["T4 16 GB"])."""
        return self.device_gib(fragmentation) <= gpu_gib

    def components_gib(self) -> dict:
        """The components in GiB, as a plain dict (for a table or a bar chart)."""
        out = {
            "weights": self.weights / GiB,
            "gradients": self.gradients_at_peak / GiB,
            "optimizer state": self.optimizer / GiB,
            "activations": self.activations / GiB,
            "temporaries": self.temporaries / GiB,
            "runtime": self.runtime / GiB,
        }
        out["peak"] = self.peak_gib
        return out

    def as_dict(self) -> dict:
        """Everything, for JSON."""
        d = asdict(self)
        d["peak_bytes"] = self.peak_bytes
        d["peak_gib"] = self.peak_gib
        return d


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    key = str(value).strip().lower()
    if key not in choices:
        raise SftkitError(f"{name}={value!r} is not one of {', '.join(choices)}.", f"pass one of {choices}.")
    return key


def estimate(
    config,
    method: str = "lora",
    seq_len: int = 1024,
    batch: int = 1,
    optimizer: str = "adamw",
    checkpointing: bool = False,
    *,
    precision: str = "bf16",
    weights_dtype: str = "auto",
    lora_r: int = 16,
    lora_modules: tuple[str, ...] = _LORA_MODULES,
    attention: str = "sdpa",
    device: str = "cuda",
    loss_tokens: int | None = None,
    double_quant: bool = True,
) -> MemoryEstimate:
    """Predict peak training memory of one SFTTrainer step (after the first) for full, LoRA or QLoRA training.

    ``config``: a name in MODEL_SHAPES, a model folder, a transformers config or a ModelShape. ``batch`` is the
    per-device micro-batch and ``seq_len`` its padded length (gradient accumulation does not add memory).
    ``precision`` is the autocast dtype; ``weights_dtype="auto"`` loads full fine-tuning in bf16 for bf16 (pure
    bf16 with bf16 AdamW state, as ``load_model_and_tokenizer(dtype=prec.dtype)`` does) and in fp32 for fp16
    (fp32 master weights, which the fp16 grad scaler needs), and frozen LoRA bases in the autocast dtype.
    ``loss_tokens`` is how many positions carry a label (default: all but the last of each row).
    ``device="cpu"`` models the CPU code paths (no Triton) for checking against ``TensorMemoryTracker``.
    """
    s = model_shape(config)
    method = _check_choice("method", method, METHODS)
    optimizer = _check_choice("optimizer", optimizer, OPTIMIZERS)
    precision = _check_choice("precision", precision, PRECISIONS)
    attention = _check_choice("attention", attention, ("sdpa", "eager"))
    device = _check_choice("device", device, ("cuda", "cpu"))
    if weights_dtype == "auto":
        if method == "full":
            weights_dtype = "fp32" if precision in ("fp16", "fp32") else "bf16"
        else:
            weights_dtype = precision
    weights_dtype = _check_choice("weights_dtype", weights_dtype, PRECISIONS)
    if method == "qlora" and precision == "fp32":
        raise SftkitError(
            "QLoRA computes in 16-bit (bnb_4bit_compute_dtype), so precision='fp32' does not apply.",
            "pass precision='bf16' (Ampere and newer) or 'fp16' (T4, V100).",
        )
    if seq_len < 2 or batch < 1:
        raise SftkitError(
            f"seq_len={seq_len}, batch={batch}: need seq_len >= 2 and batch >= 1.", "pass sizes."
        )
    unknown = set(lora_modules) - set(_LORA_MODULES)
    if unknown:
        raise SftkitError(f"unknown LoRA modules {sorted(unknown)}.", f"use names from {_LORA_MODULES}.")

    a = _BYTES[precision]  # bytes of an activation element
    wb = _BYTES[weights_dtype]  # bytes of a (non-quantized) weight element
    autocast = precision != "fp32"
    h, V, L = s.hidden, s.vocab, s.layers
    T = batch * seq_len
    N = loss_tokens if loss_tokens is not None else batch * (seq_len - 1)
    emb_params = V * h * (1 if s.tied else 2)
    linear_params = L * s.layer_linear_params
    other_params = s.parameters - linear_params - emb_params

    # LoRA adapters: r * (in + out) per adapted linear. PEFT keeps them in fp32 (autocast_adapter_dtype);
    # TRL casts them to bf16 for quantized (QLoRA) models.
    lora_params = 0
    if method != "full":
        lora_params = L * lora_r * sum(i + o for n, (i, o) in s.linear_shapes().items() if n in lora_modules)
    adapter_dtype = "fp32" if method == "lora" else "bf16"
    adapter_bytes = _BYTES[adapter_dtype]
    # PEFT casts a LoRA module's input to the adapter dtype and autocast casts it back for the matmul, so
    # when the two differ each LoRA module keeps its own copy of its input; otherwise they share one.
    per_module_copy = method != "full" and autocast and adapter_dtype != precision

    # --- weights ---
    if method == "qlora":
        # NF4: 4 bits per weight, plus one scale per 64 weights (8-bit with double quantization, else fp32).
        scale = (1 / 64 + 4 / (64 * 256)) if double_quant else 4 / 64
        n_linear_tensors = L * 7
        weights = int(linear_params * (0.5 + scale)) + n_linear_tensors * (1024 + 64)
        weights += (emb_params + other_params) * wb
    else:
        weights = s.parameters * wb
    weights += lora_params * adapter_bytes

    # --- gradients and optimizer state ---
    if method == "full":
        trainable, tbytes = s.parameters, wb
    else:
        trainable, tbytes = lora_params, adapter_bytes
    gradients = trainable * tbytes
    if optimizer == "adamw":
        opt = 2 * trainable * tbytes
    elif optimizer in ("adamw_8bit", "paged_adamw_8bit"):
        # bitsandbytes: one byte per moment plus an fp32 scale per 256 values; tensors under 4096 values, and
        # embeddings (the Trainer registers them for 32-bit state), keep two fp32 moments.
        if method == "full":
            full_precision = V * h + other_params
            opt = int(2 * (trainable - full_precision) * (1 + 4 / 256)) + 8 * full_precision
        else:
            opt = int(2 * trainable * (1 + 4 / 256))
    else:
        opt = 0

    acts_layer, acts_ckpt_layer = _activations(
        s, method, a, batch, seq_len, per_module_copy, lora_r, lora_modules, attention
    )
    # The final norm (fp32 copy, plus its input when the norm weight trains) and what the fused LM head keeps:
    # the rows of hidden states it scores (a copy) and per-token statistics.
    head_saved = T * (4 * h + (a * h if method == "full" else 0)) + N * (a * h + 6 * 4 + 8)
    inputs = T * 8 * 4  # input_ids, labels, attention mask, position ids (int64)
    # Rotary cos/sin tables, one per batch row and position, shared by all layers.
    rope = 2 * T * s.d * a
    layers_saved = L * (acts_ckpt_layer if checkpointing else acts_layer)
    # fp32 weights under low-precision autocast: each linear's low-precision copy is saved for backward.
    weight_casts = linear_params * a if (autocast and weights_dtype == "fp32" and method != "qlora") else 0

    # --- temporaries at the start of backward: the fused LM head's backward ---
    # It keeps its [min(N, 4096), 32768] logits buffer, an fp32 gradient for the hidden states and, when the
    # head trains, an fp32 gradient for its weight; at its end it casts both gradients to their tensors' dtypes.
    buf = min(N, _TRL_TOKEN_CHUNK) * _TRL_VOCAB_CHUNK * a
    head_tmp = buf + N * h * 4 + (V * h * 4 if method == "full" else 0)
    casts = N * h * a + (V * h * wb if method == "full" and wb != 4 else 0)
    if device == "cpu":
        # Without Triton each tile is folded with torch ops: seven fp32 tiles and a bool mask live at once.
        tiles = min(N, _TRL_TOKEN_CHUNK) * min(V, _TRL_VOCAB_CHUNK) * (7 * 4 + 1)
        head_tmp += max(tiles, casts)
    else:
        head_tmp += casts
    head_weight_grad = V * h * wb if method == "full" else 0

    # The peak is the largest of three moments (grads, activations, temporaries live at each):
    phases = {
        # the LM head's backward runs first, with every saved activation still alive;
        "backward start": (0, layers_saved + head_saved + inputs + rope + weight_casts, head_tmp),
        # the end of backward and the optimizer step: every gradient exists, a tied embedding's gradient
        # arrives as a second dense V x h tensor before it is added to the LM head's.
        "optimizer step": (gradients, 0, V * h * wb if (method == "full" and s.tied) else 0),
    }
    # Inside one layer the MLP dominates: in its backward pass two more f-wide gradients live beside the
    # saved ones; when LoRA inputs are cast, the forward also holds down_proj's input in the adapter dtype.
    layer_extra = (a + adapter_bytes if per_module_copy else 2 * a) * s.intermediate * T
    # In full fine-tuning the LM head's and that layer's weight gradients exist by then.
    grads_then = head_weight_grad + (s.layer_linear_params * wb if method == "full" else 0)
    if checkpointing:
        # recomputing and back-propagating the last layer: checkpoints, that layer's activations and the
        # gradients flowing through it.
        phases["recompute"] = (
            grads_then,
            layers_saved + acts_layer + inputs + rope + weight_casts,
            layer_extra + 2 * T * h * a,
        )
    else:
        # the last layer's MLP (its forward, or its backward right after the LM head's).
        phases["last layer"] = (grads_then, layers_saved + inputs + rope + weight_casts, layer_extra)
    if method == "qlora":
        # bitsandbytes dequantizes one weight at a time (the largest is an MLP projection).
        phases["backward start"] = (0, phases["backward start"][1], max(head_tmp, h * s.intermediate * a))
    phase = max(phases, key=lambda k: sum(phases[k]))
    grads_live, saved, temporaries = phases[phase]
    runtime = _CUDA_RUNTIME_BYTES if device == "cuda" else 0
    return MemoryEstimate(
        weights=int(weights),
        gradients=int(gradients),
        optimizer=int(opt),
        activations=int(saved),
        temporaries=int(temporaries),
        runtime=int(runtime),
        phase=phase,
        gradients_at_peak=int(grads_live),
        phases={k: int(sum(v)) for k, v in phases.items()},
        inputs={
            "model": s.__dict__ if not isinstance(config, str) else config,
            "method": method,
            "seq_len": seq_len,
            "batch": batch,
            "optimizer": optimizer,
            "checkpointing": checkpointing,
            "precision": precision,
            "weights_dtype": weights_dtype,
            "lora_r": lora_r if method != "full" else None,
            "attention": attention,
            "device": device,
            "parameters": s.parameters,
            "trainable_parameters": trainable,
        },
    )


def _activations(
    s, method, a, batch, seq_len, per_module_copy, r, lora_modules, attention
) -> tuple[int, int]:
    """Bytes one decoder layer saves for backward, without and with gradient checkpointing."""
    h, f = s.hidden, s.intermediate
    T = batch * seq_len
    q, kv = s.heads * s.d, s.kv_heads * s.d
    full = method == "full"
    n = set(lora_modules)

    def consumers(names: tuple[str, ...], width: int) -> int:
        if full:
            return a * width
        if per_module_copy:
            return sum(a * width for m in names if m in n)
        return a * width if any(m in n for m in names) else 0

    # RMSNorm computes in fp32: it keeps the fp32 input (a copy under autocast) and, when its weight
    # trains, the normalized tensor; its output is kept by whichever linear layers need it.
    norm = 4 * h + (a * h if full else 0) + 8
    per_token = 2 * norm
    per_token += consumers(("q_proj", "k_proj", "v_proj"), h) + consumers(("gate_proj", "up_proj"), h)
    # Attention: RoPE keeps nothing big; SDPA keeps q, k, v, its output (o_proj reads the same storage)
    # and an fp32 log-sum-exp per head.
    per_token += a * (2 * q + 2 * kv) + 4 * s.heads
    if per_module_copy and "o_proj" in n:
        per_token += a * q
    if attention == "eager":
        # Eager attention repeats k/v for every query head.
        per_token += a * 2 * (q - kv)
    # MLP: gate output (for SiLU), SiLU output and up output (for the product), and the product for down_proj
    # (or its LoRA copy).
    mlp = 3 * a * f
    if full or "down_proj" in n:
        mlp += a * f
    per_token += mlp
    if method != "full":
        per_token += a * r * len(n)  # lora_A outputs, kept by lora_B
    layer = per_token * T
    if attention == "eager":
        # ... and keeps the S x S attention probabilities per head: the fp32 softmax (and, under autocast, its cast).
        layer += batch * s.heads * seq_len * seq_len * (4 + (a if a != 4 else 0))
    return layer, a * h * T
