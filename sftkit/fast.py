"""The fast recipe: SFTConfig and model-loading arguments that cut padding, attention waste and kernel launches.

``fast_recipe()`` returns plain dictionaries for the real ``SFTConfig`` and ``from_pretrained`` calls, so every
lever stays visible and can be switched off one at a time:

- **padding-free batches** (``padding_free=True``): the micro-batch is flattened into one row with
  ``position_ids`` restarting at each example, so no compute is spent on pad tokens;
- **per-document attention** (``attn_implementation="sftkit_varlen"``, CUDA): PyTorch's variable-length flash
  attention over the ``cu_seq_lens`` that TRL's padding-free collator already emits, instead of SDPA with a
  block-diagonal mask that still computes the full L x L score matrix. On CPU it falls back to SDPA, which
  keeps documents apart through the same ``position_ids`` (transformers detects the packed layout);
- **fewer, larger kernels** (``use_liger_kernel=True`` where Liger is installed and a GPU is present): fused
  RMSNorm/SwiGLU/RoPE and a fused linear cross-entropy that never materialises the logits;
- **activation checkpointing only when memory needs it** (off by default: it recomputes the forward pass).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch

VARLEN_ATTENTION = "sftkit_varlen"


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # torch < 2.10
        return None
    return varlen_attn


def _call_varlen(fn, q, k, v, cu_q, cu_k, max_q, max_k, scaling):
    try:
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, scale=scaling, window_size=(-1, 0))
    except TypeError:  # torch 2.10/2.11 spell causality as is_causal
        return fn(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=True, scale=scaling)


def varlen_available() -> bool:
    """Whether PyTorch's varlen flash attention runs here (it needs CUDA; tried once on a tiny input)."""
    fn = _varlen_attn()
    if fn is None or not torch.cuda.is_available():
        return False
    try:
        x = torch.randn(8, 2, 64, device="cuda", dtype=torch.bfloat16)
        cu = torch.tensor([0, 3, 8], device="cuda", dtype=torch.int32)
        _call_varlen(fn, x, x, x, cu, cu, 5, 5, None)
        return True
    except Exception:  # an unsupported GPU or build: fall back to SDPA
        return False


def _sdpa_mask(query, key, attention_mask, cu_seq_lens):
    """The boolean mask SDPA needs where varlen cannot run: causal, within each document, no padding."""
    q_len, k_len = query.shape[2], key.shape[2]
    pos_k = torch.arange(k_len, device=query.device)
    pos_q = pos_k[k_len - q_len:]  # with a KV cache the queries are the last q_len positions
    mask = pos_q[:, None] >= pos_k[None, :]
    if cu_seq_lens is not None:  # a padding-free batch: documents must not see each other
        doc = torch.repeat_interleave(torch.arange(len(cu_seq_lens) - 1, device=query.device),
                                      cu_seq_lens.diff().to(query.device))
        mask = mask & (doc[k_len - q_len:, None] == doc[None, :])
    mask = mask[None, None]
    if attention_mask is not None and attention_mask.dim() == 2:  # padding mask [batch, k_len]
        mask = mask & attention_mask[:, None, None, :].bool()
    return mask


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over each packed document alone: flash varlen on CUDA, a block-diagonal SDPA mask elsewhere."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    fn = _varlen_attn()
    # Varlen needs a flattened batch (batch 1 with cumulative lengths), a CUDA device and no padding mask.
    if fn is None or cu_q is None or query.shape[0] != 1 or not query.is_cuda or attention_mask is not None:
        # The mask hook returns None or a 2-D padding mask (as for flash attention): build the full one here.
        if attention_mask is None or attention_mask.dim() == 2:
            attention_mask = _sdpa_mask(query, key, attention_mask, cu_q)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    n_heads = query.shape[1]
    q = query[0].transpose(0, 1)  # [tokens, heads, dim]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)
    if k.shape[1] != n_heads:  # grouped-query attention: share each KV head across its query heads
        k = k.repeat_interleave(n_heads // k.shape[1], dim=1)
        v = v.repeat_interleave(n_heads // v.shape[1], dim=1)
    cu_q, cu_k = cu_q.to(torch.int32), (cu_k if cu_k is not None else cu_q).to(torch.int32)
    max_q = int(kwargs.get("max_length_q") or (cu_q[1:] - cu_q[:-1]).max())
    max_k = int(kwargs.get("max_length_k") or max_q)
    out = _call_varlen(fn, q, k, v, cu_q, cu_k, max_q, max_k, scaling)
    return out.unsqueeze(0), None  # [1, tokens, heads, dim], as transformers' attention functions return


def register_varlen_attention() -> str:
    """Register the per-document attention with transformers under ``"sftkit_varlen"``; returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)
    # Like flash attention, it needs no mask tensor: document boundaries come from cu_seq_lens.
    ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_ATTENTION, flash_attention_mask)
    return VARLEN_ATTENTION


@dataclass
class FastRecipe:
    """Arguments for ``SFTConfig(**sft_config)`` and ``from_pretrained(..., **model_kwargs)``, with the reasons."""

    sft_config: dict
    model_kwargs: dict
    notes: list[str] = field(default_factory=list)


def fast_recipe(
    *, device: str | None = None, packing: bool = False, liger: bool | None = None,
    activation_checkpointing: bool = False, varlen: bool | None = None,
) -> FastRecipe:
    """The fast defaults for this machine; every lever can be forced on or off by argument."""
    from sftkit.device import detect_device

    device = device or detect_device()
    cuda = device == "cuda"
    notes = []
    sft: dict = {"padding_free": True, "gradient_checkpointing": activation_checkpointing}
    notes.append("padding_free: the micro-batch is one row with restarting position_ids, no pad tokens")
    if packing:  # changes which examples share an optimizer step; exact-examples-per-step recipes keep it off
        sft.update(packing=True, packing_strategy="bfd")
        notes.append("packing (bfd): fills rows to max_length across examples")
    else:
        # TRL does not truncate padding-free batches without packing and refuses a max_length: examples must
        # already fit (sftkit.validation reports overlong ones before training).
        sft["max_length"] = None
    if liger is None:
        liger = cuda and importlib.util.find_spec("liger_kernel") is not None
    if liger:
        sft["use_liger_kernel"] = True
        notes.append("liger: fused norm/SwiGLU/RoPE kernels and a linear cross-entropy without full logits")
    if varlen is None:
        varlen = cuda and varlen_available()
    if varlen:
        model_kwargs = {"attn_implementation": register_varlen_attention()}
        notes.append("varlen attention: flash attention per document, no L x L masked scores")
    else:
        model_kwargs = {"attn_implementation": "sdpa"}
        notes.append("sdpa: documents kept apart by position_ids (transformers builds a block-diagonal mask)")
    return FastRecipe(sft_config=sft, model_kwargs=model_kwargs, notes=notes)
