"""Loss averaged over tokens, whatever the batching: an evaluation loss that does not move with the batch size.

``Trainer.evaluate()`` (transformers 5.23) computes each eval batch's loss as the mean over *that batch's* label
tokens, repeats it ``per_device_eval_batch_size`` times and averages the lot: a mean of per-batch means. A batch
with few label tokens weighs as much as one with many, so ``eval_loss`` changes with the eval batch size (and
with anything that regroups examples). TRL's ``SFTTrainer.prediction_step`` passes no token count, and
``average_tokens_across_devices`` only affects training, so no configuration flag changes this.

:func:`token_mean_loss` sums the per-token cross-entropy and the number of label tokens over every batch and
divides once at the end: every token weighs the same, so batch size, padding and padding-free batching give the
same number (up to float rounding). Training needs no such helper: since transformers 4.46 the Trainer divides
each micro-batch's summed loss by ``num_items_in_batch``, the label tokens of the whole accumulated batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sftkit.errors import SftkitError


@dataclass
class TokenLoss:
    """Summed cross-entropy over label tokens, their count, and per-batch detail."""

    loss_sum: float
    tokens: int
    batch_means: list[float]
    batch_tokens: list[int]
    batch_sizes: list[int]

    @property
    def token_mean(self) -> float:
        """Every label token weighs the same: independent of how examples were grouped into batches."""
        return self.loss_sum / max(self.tokens, 1)

    @property
    def mean_of_batch_means(self) -> float:
        """What ``Trainer.evaluate()`` reports: each batch's token mean, weighted by its number of examples."""
        total = sum(self.batch_sizes)
        return sum(m * n for m, n in zip(self.batch_means, self.batch_sizes)) / max(total, 1)


def batch_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """``(sum of next-token cross-entropy over label tokens, number of label tokens)`` for one collated batch.

    Labels are shifted as the causal-LM loss shifts them (``shift_labels`` is used when the collator provides it);
    ``-100`` marks tokens without a loss (prompt, padding, the first token of each padding-free document).
    """
    if "labels" not in batch:
        raise SftkitError("the batch has no 'labels'.", "collate with the trainer's data collator (trainer.data_collator).")
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "shift_labels")}
    logits = model(**inputs).logits.float()
    if "shift_labels" in batch:
        labels, logits = batch["shift_labels"], logits
    else:
        labels, logits = batch["labels"][..., 1:], logits[..., :-1, :]
    labels = labels.to(logits.device)
    total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                            reduction="sum")
    return total, int(labels.ne(-100).sum())


@torch.no_grad()
def token_mean_loss(trainer, batch_size: int | None = None, dataset=None) -> TokenLoss:
    """Token-weighted loss of ``trainer``'s model over its (already tokenized) eval dataset, one process.

    ``batch_size`` overrides ``per_device_eval_batch_size`` for this call; the trainer's own eval dataloader and
    collator are used, so padding and padding-free batching are exactly as in ``trainer.evaluate()``.
    """
    if trainer.args.world_size > 1:
        raise SftkitError("token_mean_loss runs in one process.",
                          "call it outside `accelerate launch`, or gather loss_sum and tokens across ranks yourself.")
    old = trainer.args.per_device_eval_batch_size
    if batch_size is not None:
        trainer.args.per_device_eval_batch_size = batch_size
    try:
        loader = trainer.get_eval_dataloader(dataset)
    finally:
        trainer.args.per_device_eval_batch_size = old
    model = trainer.model
    was_training = model.training
    model.eval()
    loss_sum, tokens = 0.0, 0
    means, counts, sizes = [], [], []
    try:
        for batch in loader:
            batch = trainer._prepare_inputs(batch)
            total, n = batch_loss_sum(model, batch)
            n_examples = int(batch["position_ids"].eq(0).sum()) if "attention_mask" not in batch and \
                "position_ids" in batch else int(batch["input_ids"].shape[0])
            loss_sum += float(total)
            tokens += n
            means.append(float(total) / max(n, 1))
            counts.append(n)
            sizes.append(n_examples)
    finally:
        model.train(was_training)
    return TokenLoss(loss_sum, tokens, means, counts, sizes)
