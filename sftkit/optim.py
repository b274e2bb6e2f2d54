"""A separate learning rate for the embeddings and lm_head inside a standard TRL ``SFTTrainer``.

``UnslothTrainer(embedding_learning_rate=...)`` did this in 2024. Here it is a small ``SFTTrainer`` subclass:
the optimizer is still the one ``SFTConfig(optim=...)`` names, built by the Trainer itself; only its parameter
groups change (embeddings vs the rest, each split into weight decay / no weight decay exactly as the Trainer
splits them with ``get_decay_parameter_names``).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.trainer_optimizer import is_optimizer_factory
from trl import SFTTrainer

from sftkit.errors import SftkitError

_NO_EMBEDDING_FIX = (
    "make the embeddings trainable first: full fine-tuning, LoraConfig(modules_to_save=['embed_tokens', "
    "'lm_head']) or LoraConfig(trainable_token_indices=[...new token ids...]); or leave "
    "embedding_learning_rate=None."
)


def embedding_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Trainable ``(name, parameter)`` pairs inside the input embeddings or the output head (lm_head)."""
    # By module identity, not by name: works for plain models, PEFT wrappers (modules_to_save copies,
    # trainable-token deltas, LoRA on embeddings) and any architecture's naming. A tied lm_head is the
    # same Parameter as the input embedding and named_parameters() lists it once.
    modules = [m for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None]
    wanted = {id(p) for module in modules for p in module.parameters()}
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and id(p) in wanted]


def embedding_param_groups(
    model: nn.Module,
    *,
    learning_rate: float,
    embedding_learning_rate: float,
    weight_decay: float,
    decay_parameter_names: list[str] | set[str],
) -> list[dict]:
    """Optimizer parameter groups: the rest at ``learning_rate``, embeddings/lm_head at ``embedding_learning_rate``."""
    embedding_ids = {id(p) for _, p in embedding_parameters(model)}
    decay = set(decay_parameter_names)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((id(param) in embedding_ids, name in decay), []).append(param)
    groups = []
    # The non-embedding decay group goes first: the Trainer logs the first group's learning rate.
    for is_embedding, decays in ((False, True), (False, False), (True, True), (True, False)):
        params = buckets.get((is_embedding, decays))
        if params:
            groups.append(
                {
                    "params": params,
                    "lr": embedding_learning_rate if is_embedding else learning_rate,
                    "weight_decay": weight_decay if decays else 0.0,
                    "name": ("embeddings" if is_embedding else "rest") + ("" if decays else "_no_decay"),
                }
            )
    return groups


class EmbeddingLRSFTTrainer(SFTTrainer):
    """``SFTTrainer`` that trains embeddings and lm_head at ``embedding_learning_rate``, the rest at ``args.learning_rate``.

    Any ``SFTConfig(optim=...)`` optimizer that takes parameter groups works (``adamw_torch``, ``adamw_8bit``,
    ``paged_adamw_8bit``, ...); the learning-rate schedule scales every group alike, so the ratio holds.
    """

    def __init__(self, *args, embedding_learning_rate: float | None = None, **kwargs) -> None:
        if embedding_learning_rate is not None and not embedding_learning_rate >= 0:
            raise SftkitError(
                f"embedding_learning_rate must be a number >= 0, got {embedding_learning_rate!r}.",
                "pass e.g. embedding_learning_rate=5e-5, or None to train everything at args.learning_rate.",
            )
        super().__init__(*args, **kwargs)
        self.embedding_learning_rate = embedding_learning_rate
        # The model is wrapped (PEFT) by now: check here, before any training time is spent.
        if embedding_learning_rate is not None and not embedding_parameters(self.model):
            raise SftkitError(
                f"embedding_learning_rate={embedding_learning_rate} was set, but no parameter of the input "
                "embeddings or lm_head is trainable (LoRA freezes them unless asked).",
                _NO_EMBEDDING_FIX,
            )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the configured optimizer over embedding / non-embedding (x decay / no-decay) groups."""
        if self.optimizer is not None or self.embedding_learning_rate is None:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        if self.optimizer_cls_and_kwargs is not None:
            optimizer_cls, optimizer_kwargs = self.optimizer_cls_and_kwargs
        else:
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        if is_optimizer_factory(optimizer_cls) or {"params", "model", "optimizer_dict"} & set(
            optimizer_kwargs
        ):
            raise SftkitError(
                f"optim={self.args.optim!r} builds its own parameter groups, so embedding_learning_rate "
                "cannot be applied to it.",
                "use an AdamW-style optimizer (adamw_torch, adamw_torch_fused, adamw_8bit, paged_adamw_8bit), "
                "or leave embedding_learning_rate=None.",
            )
        groups = embedding_param_groups(
            opt_model,
            learning_rate=optimizer_kwargs.get("lr", self.args.learning_rate),
            embedding_learning_rate=self.embedding_learning_rate,
            weight_decay=self.args.weight_decay,
            decay_parameter_names=self.get_decay_parameter_names(opt_model),
        )
        # Hand the groups to the Trainer's own code path ("params" in the kwargs replaces its groups), so
        # everything else it does (e.g. 32-bit state for nn.Embedding under 8-bit bitsandbytes) still happens.
        saved = self.optimizer_cls_and_kwargs
        self.optimizer_cls_and_kwargs = (optimizer_cls, {**optimizer_kwargs, "params": groups})
        try:
            return super().create_optimizer(model)
        finally:
            self.optimizer_cls_and_kwargs = saved


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (Adam moments, 8-bit quantisation maps, ...)."""
    seen: set[int] = set()
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.data_ptr() not in seen:
                seen.add(value.data_ptr())
                total += value.numel() * value.element_size()
    return total
