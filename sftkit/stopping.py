"""Does the model stop? Share of greedy generations that end with a stop token before the token limit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftkit.errors import SftkitError
from sftkit.evaluation import _greedy_config


@dataclass
class StopReport:
    """Per-prompt results of ``stop_rate``: whether each generation stopped, its length and text."""

    stopped: list[bool]
    new_tokens: list[int]  # generated tokens up to and including the stop token
    texts: list[str]  # generated text, special tokens kept so the stop token is visible
    answers: list[str]  # generated text without special tokens, stripped: what a user would be shown
    max_new_tokens: int

    @property
    def rate(self) -> float:
        """Share of generations that emitted a stop token before max_new_tokens."""
        return sum(self.stopped) / len(self.stopped) if self.stopped else 0.0

    @property
    def mean_new_tokens(self) -> float:
        """Average generated length in tokens (max_new_tokens for a generation that never stopped)."""
        return sum(self.new_tokens) / len(self.new_tokens) if self.new_tokens else 0.0

    def __str__(self) -> str:
        return (
            f"{sum(self.stopped)} of {len(self.stopped)} generations stopped before {self.max_new_tokens} new "
            f"tokens ({self.rate:.0%}); mean length {self.mean_new_tokens:.1f} tokens"
        )


def stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Token ids that end generation: the model's generation_config eos ids, else the tokenizer's EOS."""
    ids = getattr(model.generation_config, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    ids = [ids] if isinstance(ids, int) else list(ids or [])
    if not ids:
        raise SftkitError(
            "neither the model's generation_config nor the tokenizer names an EOS token, so generation can only "
            "stop at max_new_tokens.",
            "set model.generation_config.eos_token_id (e.g. to tokenizer.eos_token_id or the end-of-turn token).",
        )
    return ids


def stop_rate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    add_special_tokens: bool = True,
) -> StopReport:
    """Greedy-decode each text prompt and record whether it stopped on a stop token before max_new_tokens.

    Pass ``add_special_tokens=False`` for prompts rendered by a chat template (they already hold BOS).
    """
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise SftkitError(
            "stop_rate needs a non-empty list of prompt strings.",
            "render chat prompts first: tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
            "tokenize=False).",
        )
    eos = stop_ids(model, tokenizer)
    config = _greedy_config(model, tokenizer, max_new_tokens)
    config.eos_token_id = eos
    stopped: list[bool] = []
    lengths: list[int] = []
    texts: list[str] = []
    answers: list[str] = []
    padding_side, was_training = tokenizer.padding_side, model.training
    tokenizer.padding_side = "left"  # decoder-only models continue from the last position
    model.eval()
    try:
        with torch.inference_mode():
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                enc = tokenizer(
                    chunk, return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
                ).to(model.device)
                out = model.generate(**enc, generation_config=config)
                for row in out[:, enc["input_ids"].shape[1] :].tolist():
                    end = next((i for i, t in enumerate(row) if t in eos), None)
                    stopped.append(end is not None)
                    kept = row if end is None else row[: end + 1]
                    lengths.append(len(kept))
                    texts.append(tokenizer.decode(kept))
                    answers.append(tokenizer.decode(kept, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = padding_side
        if was_training:
            model.train()
    return StopReport(
        stopped=stopped, new_tokens=lengths, texts=texts, answers=answers, max_new_tokens=max_new_tokens
    )
