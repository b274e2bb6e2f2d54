"""Greedy generation and simple QA metrics (exact match, contains) for before/after comparisons."""

from __future__ import annotations

import copy
import unicodedata
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftkit.errors import SftkitError

if TYPE_CHECKING:
    import datasets

_ARTICLES = ("a ", "an ", "the ")
# Sampling knobs that a model's generation_config may set (e.g. Qwen instruct ships
# temperature/top_p/top_k); with do_sample=False they are ignored but make generate() warn.
_SAMPLING_ATTRS = ("temperature", "top_p", "top_k", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff")


def _strip_punct_space(text: str) -> str:
    """Strip whitespace and Unicode punctuation (quotes, dashes, full stops...) from both ends."""
    start, end = 0, len(text)
    while start < end and (text[start].isspace() or unicodedata.category(text[start]).startswith("P")):
        start += 1
    while end > start and (text[end - 1].isspace() or unicodedata.category(text[end - 1]).startswith("P")):
        end -= 1
    return text[start:end]


def normalize_answer(text: str) -> str:
    """Lowercase, trim punctuation/whitespace at the ends, drop a leading article, collapse spaces."""
    text = " ".join(str(text).lower().split())
    text = _strip_punct_space(text)
    for article in _ARTICLES:
        if text.startswith(article):
            text = text[len(article) :]
            break
    return _strip_punct_space(text)


def exact_match(prediction: str, reference: str) -> bool:
    """True when prediction and reference are equal after normalize_answer."""
    return normalize_answer(prediction) == normalize_answer(reference)


def contains(prediction: str, reference: str) -> bool:
    """True when the normalized reference occurs inside the normalized prediction."""
    ref = normalize_answer(reference)
    # An empty reference is a substring of everything; count it only against an empty answer.
    if not ref:
        return not normalize_answer(prediction)
    return ref in normalize_answer(prediction)


def _is_chat(prompt) -> bool:
    return isinstance(prompt, (list, tuple))


def _prompt_texts(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence, chat: bool | None
) -> tuple[list[str], bool]:
    """Render prompts to text; returns (texts, is_chat). Plain strings become one user turn if chat=True."""
    kinds = {_is_chat(p) for p in prompts}
    if any(not (_is_chat(p) or isinstance(p, str)) for p in prompts):
        bad = next(p for p in prompts if not (_is_chat(p) or isinstance(p, str)))
        raise SftkitError(
            f"Prompts must be strings or chat message lists, got a {type(bad).__name__}.",
            'pass e.g. ["What is 2+2?"] or [[{"role": "user", "content": "What is 2+2?"}]].',
        )
    if len(kinds) > 1:
        raise SftkitError(
            "The prompts mix plain strings and chat message lists.",
            "use one kind for the whole list (chat lists for instruct/fine-tuned chat models).",
        )
    is_chat_input = kinds == {True}
    if chat is None:
        chat = is_chat_input
    if is_chat_input and not chat:
        raise SftkitError(
            "chat=False was given but the prompts are chat message lists.",
            "pass chat=True (or leave chat=None), or pass plain strings.",
        )
    if not chat:
        return [str(p) for p in prompts], False

    if not getattr(tokenizer, "chat_template", None):
        raise SftkitError(
            "chat prompts need a chat template, but this tokenizer has none (typical of base models).",
            "use chat=False with plain-text prompts, or set tokenizer.chat_template "
            "(a fine-tuned tokenizer saved by the SFT notebooks has one).",
        )
    conversations = [list(p) if is_chat_input else [{"role": "user", "content": p}] for p in prompts]
    texts = [
        tokenizer.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        for conv in conversations
    ]
    return texts, True


def _greedy_config(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, max_new_tokens: int):
    """The model's generation config (EOS ids etc.) switched to greedy decoding."""
    config = copy.deepcopy(model.generation_config)
    config.do_sample = False
    for attr in _SAMPLING_ATTRS:
        if hasattr(config, attr):
            setattr(config, attr, None)
    config.max_new_tokens = max_new_tokens
    config.max_length = None
    config.pad_token_id = tokenizer.pad_token_id
    # Gradient checkpointing during training switches use_cache off; without the KV cache
    # generation is quadratic and painfully slow.
    config.use_cache = True
    return config


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    chat: bool | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy-decode each prompt (string or chat message list) and return only the new text."""
    if not prompts:
        return []
    if max_new_tokens < 1 or batch_size < 1:
        raise SftkitError(
            f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be at least 1.",
            "pass positive values, e.g. max_new_tokens=32, batch_size=16.",
        )
    if tokenizer.pad_token_id is None:
        raise SftkitError(
            "The tokenizer has no pad token, so prompts cannot be batched.",
            "load with sftkit.loading.load_model_and_tokenizer (it sets one), or set "
            "tokenizer.pad_token = tokenizer.eos_token.",
        )
    texts, is_chat = _prompt_texts(tokenizer, prompts, chat)
    # Chat templates already contain BOS and friends; adding special tokens again would
    # duplicate BOS, which measurably hurts some models.
    add_special_tokens = not is_chat
    gen_config = _greedy_config(model, tokenizer, max_new_tokens)

    # Sort by length so each batch holds similar lengths (less padding, less wasted compute);
    # results are put back in the caller's order below.
    lengths = [len(tokenizer(t, add_special_tokens=add_special_tokens)["input_ids"]) for t in texts]
    order = sorted(range(len(texts)), key=lambda i: lengths[i], reverse=True)
    outputs: list[str | None] = [None] * len(texts)

    was_training = model.training
    padding_side = tokenizer.padding_side
    # Decoder-only models continue from the last position, so padding must go on the left:
    # right padding would make the model continue after pad tokens.
    tokenizer.padding_side = "left"
    model.eval()
    try:
        with torch.inference_mode():
            starts = range(0, len(order), batch_size)
            for start in tqdm(starts, desc="generate", unit="batch", disable=not progress):
                idx = order[start : start + batch_size]
                enc = tokenizer(
                    [texts[i] for i in idx],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=add_special_tokens,
                ).to(model.device)
                out = model.generate(**enc, generation_config=gen_config)
                new_tokens = out[:, enc["input_ids"].shape[1] :]
                decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                for i, text in zip(idx, decoded):
                    outputs[i] = text.strip()
    finally:
        tokenizer.padding_side = padding_side
        if was_training:
            model.train()
    return outputs  # type: ignore[return-value]


def _split_row(row: dict, index: int) -> tuple[list[dict], str, str]:
    """Return (prompt messages, last user content, reference answer) for one QA row."""
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, (list, tuple)) or len(messages) < 2:
        raise SftkitError(
            f"Row {index} needs a 'messages' list with at least a user turn and the assistant answer.",
            'give each row {"messages": [{"role": "user", ...}, {"role": "assistant", "content": <answer>}]}.',
        )
    last = messages[-1]
    if not isinstance(last, dict) or last.get("role") != "assistant":
        raise SftkitError(
            f"Row {index}: the last message must be the assistant's reference answer, "
            f"got role {last.get('role') if isinstance(last, dict) else last!r}.",
            "end every conversation with the expected assistant reply (it is the reference, not shown to the model).",
        )
    prompt = list(messages[:-1])
    user_turns = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return prompt, (user_turns[-1] if user_turns else ""), str(last.get("content", ""))


def evaluate_qa(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rows: list[dict] | datasets.Dataset,
    *,
    max_new_tokens: int = 32,
    batch_size: int = 32,
    progress: bool = True,
) -> tuple[dict, list[dict]]:
    """Answer each row's question and score it: returns (metrics, per-row records)."""
    rows = list(rows)
    if not rows:
        raise SftkitError("evaluate_qa got no rows.", "pass a non-empty list of {'messages': [...]} rows.")
    # Validate every row before generating anything: a bad row 900 should not cost a full run.
    parsed = [_split_row(row, i) for i, row in enumerate(rows)]
    predictions = generate(
        model,
        tokenizer,
        [prompt for prompt, _, _ in parsed],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        chat=True,
        progress=progress,
    )
    records = [
        {
            "prompt": question,
            "reference": reference,
            "prediction": prediction,
            "exact_match": exact_match(prediction, reference),
            "contains": contains(prediction, reference),
        }
        for (_, question, reference), prediction in zip(parsed, predictions)
    ]
    return score_records(records), records


def score_records(records: list[dict]) -> dict:
    """Aggregate per-row records into {"exact_match", "contains", "n"} (fractions in [0, 1])."""
    n = len(records)
    if n == 0:
        return {"exact_match": 0.0, "contains": 0.0, "n": 0}
    return {
        "exact_match": sum(bool(r["exact_match"]) for r in records) / n,
        "contains": sum(bool(r["contains"]) for r in records) / n,
        "n": n,
    }
