"""See which tokens are trained: a label-mask viewer for prepared examples and collated batches.

``show_mask(example, tokenizer)`` accepts a row of ``trainer.train_dataset`` (``input_ids`` + ``labels``), a
tokenizer output with ``assistant_masks`` or a ``completion_mask``, or a collated batch (pick the row with
``row=``). In a notebook it renders as coloured HTML; ``print()`` gives plain text for a terminal or a log.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sftkit.errors import SftkitError

IGNORE_INDEX = -100  # the label value PyTorch's cross-entropy (and so every HF trainer) skips

_TRAINED_OPEN, _TRAINED_CLOSE = "⟦", "⟧"
_PAD_MARK = "·"


@dataclass
class MaskView:
    """Tokens of one sequence with, for each, whether the loss is computed on it."""

    tokens: list[str]
    token_ids: list[int]
    trained: list[bool]
    padding: list[bool]
    special: list[bool]
    doc_start: list[bool] = field(default_factory=list)  # padding-free batches: a new document starts here
    source: str = "labels"  # where the mask came from
    title: str = ""

    @property
    def n_tokens(self) -> int:
        """Tokens that are not padding."""
        return sum(not p for p in self.padding)

    @property
    def n_trained(self) -> int:
        """Tokens that contribute to the loss."""
        return sum(self.trained)

    @property
    def trained_ids(self) -> list[int]:
        """Ids of the trained tokens, in order."""
        return [t for t, keep in zip(self.token_ids, self.trained) if keep]

    def trained_text(self, tokenizer=None) -> str:
        """The trained tokens joined (decoded with ``tokenizer`` if given, which merges multi-byte characters)."""
        if tokenizer is not None:
            return tokenizer.decode(self.trained_ids)
        return "".join(t for t, keep in zip(self.tokens, self.trained) if keep)

    def spans(self) -> list[tuple[str, str]]:
        """Consecutive runs as (kind, text) with kind in {"trained", "masked", "padding"}."""
        out: list[tuple[str, str]] = []
        for tok, trained, pad in zip(self.tokens, self.trained, self.padding):
            kind = "padding" if pad else "trained" if trained else "masked"
            if out and out[-1][0] == kind:
                out[-1] = (kind, out[-1][1] + tok)
            else:
                out.append((kind, tok))
        return out

    def summary(self) -> str:
        """One line: how many tokens are trained, masked and padding."""
        n, k = self.n_tokens, self.n_trained
        pct = f" ({100 * k / n:.0f}%)" if n else ""
        pad = len(self.padding) - n
        text = f"{k} of {n} tokens trained{pct}"
        text += f", {pad} padding" if pad else ""
        if any(self.doc_start[1:]):
            text += f", {sum(self.doc_start)} documents packed in this row"
        return text + f"  [mask from {self.source}]"

    def to_records(self) -> list[dict]:
        """One dict per token (position, id, token, trained, padding): ``pandas.DataFrame(view.to_records())``."""
        return [
            {"position": i, "id": tid, "token": tok, "trained": tr, "padding": pad}
            for i, (tid, tok, tr, pad) in enumerate(
                zip(self.token_ids, self.tokens, self.trained, self.padding)
            )
        ]

    def __str__(self) -> str:
        parts = []
        for i, (tok, trained, pad) in enumerate(zip(self.tokens, self.trained, self.padding)):
            if self.doc_start and self.doc_start[i] and i > 0:
                parts.append(" ┃ ")
            piece = _PAD_MARK if pad else tok
            prev = _state(self, i - 1)
            state = "pad" if pad else "on" if trained else "off"
            if state == "on" and prev != "on":
                piece = _TRAINED_OPEN + piece
            nxt = _state(self, i + 1)
            if state == "on" and nxt != "on":
                piece = piece + _TRAINED_CLOSE
            parts.append(piece)
        header = f"{self.title}: " if self.title else ""
        legend = f"(trained tokens inside {_TRAINED_OPEN} {_TRAINED_CLOSE}, padding {_PAD_MARK})"
        return f"{header}{self.summary()} {legend}\n" + "".join(parts)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        cells = []
        for i, (tok, trained, pad, special) in enumerate(
            zip(self.tokens, self.trained, self.padding, self.special)
        ):
            if self.doc_start and self.doc_start[i] and i > 0:
                cells.append('<span style="border-left:3px solid #d62728;margin:0 2px"></span>')
            text = html.escape(tok.replace("\n", "↵"))
            if "↵" in text:
                text = text.replace("↵", "↵<br>")
            if pad:
                style = "background:#eeeeee;color:#aaaaaa"
                text = html.escape(_PAD_MARK) * max(1, len(tok) // 4)
            elif trained:
                style = "background:#a7e3b5;color:#0b3d17"
            else:
                style = "color:#8a8a8a"
            if special:
                style += ";font-weight:bold"
            cells.append(f'<span title="#{i} id {self.token_ids[i]}" style="{style}">{text}</span>')
        title = f"<b>{html.escape(self.title)}</b> " if self.title else ""
        legend = (
            '<span style="background:#a7e3b5;color:#0b3d17">trained</span> '
            '<span style="color:#8a8a8a">not trained</span> '
            '<span style="background:#eeeeee;color:#aaaaaa">padding</span>'
        )
        return (
            f'<div style="font-family:monospace;font-size:13px;margin:4px 0">{title}{html.escape(self.summary())}'
            f" &nbsp; {legend}</div>"
            '<div style="font-family:monospace;font-size:13px;white-space:pre-wrap;line-height:1.7;'
            f'border:1px solid #ddd;padding:6px;margin-bottom:8px">{"".join(cells)}</div>'
        )


def _state(view: MaskView, i: int) -> str | None:
    if i < 0 or i >= len(view.tokens):
        return None
    return "pad" if view.padding[i] else "on" if view.trained[i] else "off"


def _to_list(value: Any) -> list:
    """Tensor / numpy array / list -> plain (possibly nested) Python list."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return list(value)


def _pick_row(values: list, row: int, name: str) -> list:
    """Return one row of a batch (list of lists), or the list itself when it is a single sequence."""
    if values and isinstance(values[0], (list, tuple)):
        if not -len(values) <= row < len(values):
            raise SftkitError(
                f"row={row} but the batch has {len(values)} rows.",
                f"pass row= between 0 and {len(values) - 1}.",
            )
        return list(values[row])
    return values


def show_mask(example: Mapping[str, Any], tokenizer, row: int = 0, title: str = "") -> MaskView:
    """Which tokens of ``example`` are trained: coloured HTML in a notebook, plain text when printed.

    The mask comes from ``labels`` (``-100`` = not trained) when present, else from ``assistant_masks`` or
    ``completion_mask`` (1 = trained); with none of them every token is trained, as SFTTrainer does.
    """
    if not isinstance(example, Mapping) or "input_ids" not in example:
        keys = sorted(example) if isinstance(example, Mapping) else type(example).__name__
        raise SftkitError(
            f"show_mask needs a tokenized example with 'input_ids', got {keys}.",
            "pass a row of trainer.train_dataset, a collated batch (with row=), or tokenizer(..., "
            "return_assistant_tokens_mask=True) output.",
        )
    ids = _pick_row(_to_list(example["input_ids"]), row, "input_ids")
    n = len(ids)

    def column(name: str) -> list | None:
        if name not in example or example[name] is None:
            return None
        values = _pick_row(_to_list(example[name]), row, name)
        if len(values) != n:
            raise SftkitError(
                f"{name!r} has {len(values)} entries but input_ids has {n}.",
                "pass the example exactly as the trainer prepared or collated it.",
            )
        return values

    labels = column("labels")
    if labels is not None:
        trained = [label != IGNORE_INDEX for label in labels]
        mismatched = [i for i, (t, lab) in enumerate(zip(ids, labels)) if lab not in (IGNORE_INDEX, t)]
        if mismatched:
            raise SftkitError(
                f"labels at positions {mismatched[:5]} are neither -100 nor the input token; these labels look "
                "shifted by one (the model shifts them itself).",
                "keep labels aligned with input_ids: labels[i] = input_ids[i] or -100.",
            )
        source = "labels"
    else:
        masks = [(name, column(name)) for name in ("assistant_masks", "completion_mask")]
        masks = [(name, m) for name, m in masks if m is not None]
        if masks:
            trained = [all(bits) for bits in zip(*(m for _, m in masks))]
            source = " & ".join(name for name, _ in masks)
        else:
            trained = [True] * n
            source = "no labels or mask: every token"
    attention = column("attention_mask")
    padding = [a == 0 for a in attention] if attention is not None else [False] * n
    trained = [t and not p for t, p in zip(trained, padding)]
    positions = column("position_ids")
    doc_start = [p == 0 for p in positions] if positions is not None else [i == 0 for i in range(n)]

    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    special_ids |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tokens = [tokenizer.decode([t]) for t in ids]
    return MaskView(
        tokens=tokens,
        token_ids=ids,
        trained=trained,
        padding=padding,
        special=[t in special_ids for t in ids],
        doc_start=doc_start,
        source=source,
        title=title,
    )


def compare_masks(views: Sequence[MaskView]):
    """Show several MaskViews one under the other (HTML in a notebook, text otherwise)."""
    return _Stack(list(views))


@dataclass
class _Stack:
    views: list[MaskView]

    def __str__(self) -> str:
        return "\n\n".join(str(v) for v in self.views)

    __repr__ = __str__

    def _repr_html_(self) -> str:
        return "".join(v._repr_html_() for v in self.views)
