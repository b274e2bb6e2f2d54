"""Read generations while training runs: a TrainerCallback that samples fixed prompts at every evaluation.

Loss curves hide a model that learned the wrong thing. ``GenerationSamplesCallback`` answers a fixed set of
held-out prompts (greedy, so a change between evaluations is the model's and not sampling noise) at the start of
training and after every evaluation, and keeps every answer:

- as a ``wandb.Table`` (columns ``step, prompt, generation, reference, generation_settings``) logged to the
  active W&B run, if there is one (``report_to="wandb"`` starts it);
- in ``samples.jsonl`` and ``samples.html`` (prompts down, steps across), for everyone without W&B.

It replaces the 2024 ``WandbCallback`` subclass that read ``kwargs["tokenizer"]``: transformers 5 passes the
tokenizer to callbacks as ``processing_class`` only, and a plain ``TrainerCallback`` that logs to the run
``WandbCallback`` already started does not log every metric a second time.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from pathlib import Path

from transformers import TrainerCallback

from sftkit.errors import SftkitError
from sftkit.evaluation import _split_row, generate
from sftkit.io import atomic_write_text

COLUMNS = ("step", "prompt", "generation", "reference", "generation_settings")


def _display_prompt(prompt) -> str:
    """The text a reader needs to see: a plain prompt as is, a chat as its last user turn."""
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else json.dumps(list(prompt), ensure_ascii=False)


class GenerationSamplesCallback(TrainerCallback):
    """Generate for fixed prompts at train start and every evaluation; log a W&B table and write JSONL + HTML."""

    def __init__(
        self,
        prompts: Sequence,
        references: Sequence[str] | None = None,
        *,
        output_dir: str | os.PathLike | None = None,
        max_new_tokens: int = 32,
        batch_size: int = 16,
        wandb_key: str = "samples",
        at_train_begin: bool = True,
        chat: bool | None = None,
    ) -> None:
        prompts = list(prompts)
        if not prompts:
            raise SftkitError(
                "GenerationSamplesCallback got no prompts.", "pass a few held-out prompts (4–16)."
            )
        if references is not None and len(references) != len(prompts):
            raise SftkitError(
                f"{len(prompts)} prompts but {len(references)} references.",
                "pass one reference per prompt, or references=None.",
            )
        if max_new_tokens < 1 or batch_size < 1:
            raise SftkitError(
                f"max_new_tokens ({max_new_tokens}) and batch_size ({batch_size}) must be at least 1.",
                "pass positive values, e.g. max_new_tokens=32.",
            )
        self.prompts = prompts
        self.references = [str(r) for r in references] if references is not None else [""] * len(prompts)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.wandb_key = wandb_key
        self.at_train_begin = at_train_begin
        self.chat = chat
        self.settings = {"decoding": "greedy", "max_new_tokens": max_new_tokens}
        self.rows: list[dict] = []
        self._done_steps: set[int] = set()

    @classmethod
    def from_rows(cls, rows, n: int | None = 8, **kwargs) -> GenerationSamplesCallback:
        """Build from chat rows ({"messages": [..., assistant answer]}): the answer becomes the reference."""
        rows = list(rows)[:n] if n is not None else list(rows)
        parsed = [_split_row(row, i) for i, row in enumerate(rows)]
        return cls([p for p, _, _ in parsed], [ref for _, _, ref in parsed], **kwargs)

    # -- trainer events -------------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        if self.at_train_begin:
            self._sample(args, state, kwargs)

    def on_evaluate(self, args, state, control, **kwargs):
        self._sample(args, state, kwargs)

    # -- work ---------------------------------------------------------------------------------------------
    @property
    def jsonl_path(self) -> Path | None:
        """Where the rows are written (known once training started if output_dir was not given)."""
        return self.output_dir / "samples.jsonl" if self.output_dir is not None else None

    @property
    def html_path(self) -> Path | None:
        """The HTML page: one row per prompt, one column per step."""
        return self.output_dir / "samples.html" if self.output_dir is not None else None

    def _tokenizer(self, kwargs: dict):
        processing_class = kwargs.get("processing_class")
        # A multimodal processor carries its tokenizer; a tokenizer is its own.
        tokenizer = getattr(processing_class, "tokenizer", None) or processing_class
        if tokenizer is None:
            raise SftkitError(
                "GenerationSamplesCallback needs the tokenizer, but the trainer has no processing_class.",
                "pass processing_class=tokenizer to the trainer (transformers 5 no longer has tokenizer=).",
            )
        return tokenizer

    def _sample(self, args, state, kwargs: dict) -> None:
        step = int(state.global_step)
        # Several eval datasets call on_evaluate once each at the same step; sample once. In multi-process
        # runs only the main process samples (not suited to sharded models: FSDP or ZeRO-3).
        if step in self._done_steps or not state.is_world_process_zero:
            return
        self._done_steps.add(step)
        if self.output_dir is None:
            self.output_dir = Path(args.output_dir) / "samples"
        tokenizer = self._tokenizer(kwargs)
        model = kwargs["model"]
        generations = generate(
            model,
            tokenizer,
            self.prompts,
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            chat=self.chat,
            progress=False,
        )
        for prompt, generation, reference in zip(self.prompts, generations, self.references):
            self.rows.append(
                {
                    "step": step,
                    "prompt": _display_prompt(prompt),
                    "generation": generation,
                    "reference": reference,
                    "generation_settings": dict(self.settings),
                }
            )
        self._write_files()
        self._log_wandb(step)

    def _table_rows(self) -> list[list]:
        return [
            [r[c] if c != "generation_settings" else json.dumps(r[c]) for c in COLUMNS] for r in self.rows
        ]

    def _log_wandb(self, step: int) -> None:
        try:
            import wandb
        except ImportError:
            return
        if wandb.run is None or getattr(wandb.run, "disabled", False):
            return
        # A new table each time, holding every row so far: the latest one shows the whole progression.
        table = wandb.Table(columns=list(COLUMNS), data=self._table_rows())
        wandb.log({self.wandb_key: table, "train/global_step": step})

    def _write_files(self) -> None:
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.rows)
        atomic_write_text(self.jsonl_path, lines)
        atomic_write_text(self.html_path, self.to_html())

    def to_html(self) -> str:
        """A self-contained page: prompts down, steps across, the reference last."""
        n = len(self.prompts)
        steps = [self.rows[i]["step"] for i in range(0, len(self.rows), n)]  # rows come in blocks of n
        esc = html.escape
        head = "".join(f"<th>step {s}</th>" for s in steps)
        body = []
        for i in range(n):
            cells = "".join(
                f"<td>{esc(self.rows[b + i]['generation'])}</td>" for b in range(0, len(self.rows), n)
            )
            prompt, reference = self.rows[i]["prompt"], self.rows[i]["reference"]
            body.append(f"<tr><td>{esc(prompt)}</td>{cells}<td class='ref'>{esc(reference)}</td></tr>")
        return (
            "<!doctype html>\n<html><head><meta charset='utf-8'><title>generation samples</title>\n"
            "<style>body{font-family:sans-serif}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
            ".ref{background:#eef7ee}</style></head><body>\n"
            f"<h2>Generation samples</h2><p>settings: {esc(json.dumps(self.settings))}</p>\n"
            f"<table><tr><th>prompt</th>{head}<th>reference</th></tr>\n" + "\n".join(body) + "\n</table>\n"
            "</body></html>\n"
        )
