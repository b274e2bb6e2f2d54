"""Add new tokens from a file: tokenizer, embedding resize, and a sensible start for the new rows."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sftkit.errors import SftkitError

INIT_CHOICES = ("mean", "pieces")


def read_token_file(path: str | os.PathLike) -> list[str]:
    """One token per line, exactly as written (leading spaces count); blank lines and repeats are dropped."""
    path = Path(path)
    if not path.is_file():
        raise SftkitError(
            f"token file {str(path)!r} does not exist.",
            "write one new token per line to a UTF-8 text file and pass its path.",
        )
    tokens: list[str] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip() and line not in tokens:
            tokens.append(line)
    if not tokens:
        raise SftkitError(f"token file {str(path)!r} holds no tokens.", "write one new token per line.")
    return tokens


def add_tokens_from_file(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    path: str | os.PathLike,
    *,
    init: str = "mean",
    special: bool = False,
) -> list[str]:
    """Add the file's tokens (see :func:`read_token_file`) with :func:`add_new_tokens`; returns the added tokens."""
    return add_new_tokens(model, tokenizer, read_token_file(path), init=init, special=special)


def add_new_tokens(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    tokens: list[str],
    *,
    init: str = "mean",
    special: bool = False,
) -> list[str]:
    """Add ``tokens``, resize the model's embeddings and initialise the new rows; returns the added tokens.

    Strings the tokenizer already encodes as a single token are skipped.

    ``init="mean"`` starts every new row at the mean of the existing rows (an "average token", so the model's
    outputs barely move); ``init="pieces"`` starts each at the mean of the rows of the pieces the tokenizer
    split it into before (``" cheese dumplings"`` starts between ``" cheese"`` and ``" dumplings"``). Both are
    deterministic, unlike ``resize_token_embeddings``'s default, which samples around the mean.
    """
    if init not in INIT_CHOICES:
        raise SftkitError(f"init={init!r} is not a known initialisation.", f"use one of {INIT_CHOICES}.")
    wanted = list(dict.fromkeys(tokens))
    vocab = tokenizer.get_vocab()
    # Pieces under the old tokenizer, read before the new tokens change how text is split. A string it
    # already encodes as one token (" Oakridge" is the byte-level token "ĠOakridge") is not new.
    pieces = {t: tokenizer(t, add_special_tokens=False)["input_ids"] for t in wanted}
    new = [t for t in wanted if t not in vocab and len(pieces[t]) != 1]
    if not new:
        return []
    old_rows = model.get_input_embeddings().weight.shape[0]
    # normalized=False: match the raw text, so a leading space stays part of the token (byte-level BPE).
    added = [AddedToken(t, normalized=False, special=special) for t in new]
    tokenizer.add_tokens(added, special_tokens=special)
    _resize_and_init(model, tokenizer, old_rows, {t: pieces[t] for t in new}, init)
    return new


def add_pad_token(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, token: str = "<|pad|>"
) -> int | None:
    """Make ``token`` the pad token (adding it if new, with a mean-initialised row); returns its id if added.

    The pad row is never a training target and never attended to, so its value hardly matters; the mean keeps
    it harmless if it is ever looked at (and matches what :func:`add_new_tokens` does). The model's config and
    generation config get the new pad id.
    """
    added = None
    if token not in tokenizer.get_vocab():
        old_rows = model.get_input_embeddings().weight.shape[0]
        tokenizer.add_special_tokens({"pad_token": token})
        _resize_and_init(model, tokenizer, old_rows, {token: []}, "mean")
        added = tokenizer.convert_tokens_to_ids(token)
    else:
        tokenizer.pad_token = token
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return added


def _resize_and_init(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    old_rows: int,
    pieces: dict[str, list[int]],
    init: str,
) -> None:
    """Grow the embeddings to ``len(tokenizer)`` and start each new token's row (and untied head row)."""
    if len(tokenizer) > old_rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)

    with torch.no_grad():
        matrices = [model.get_input_embeddings().weight]
        output = model.get_output_embeddings()
        if output is not None and output.weight is not matrices[0]:  # untied lm_head gets the same start
            matrices.append(output.weight)
        for weight in matrices:
            mean = weight[:old_rows].float().mean(dim=0)
            for token, token_pieces in pieces.items():
                row = tokenizer.convert_tokens_to_ids(token)
                if row < old_rows:
                    continue  # an id the model already had rows for (vocab padded to a multiple)
                ids = [i for i in token_pieces if i < old_rows]
                start = weight[ids].float().mean(dim=0) if init == "pieces" and ids else mean
                weight[row] = start.to(weight.dtype)
            # Rows beyond len(tokenizer) (pad_to_multiple_of) are never produced; keep them harmless too.
            weight[len(tokenizer) :] = mean.to(weight.dtype)
