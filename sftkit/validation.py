"""Check an SFT dataset against the tokenizer and SFTConfig before any training time is spent.

``validate_sft_dataset(dataset, tokenizer, args)`` finds the input shape SFTTrainer will see (text, formatting
function, prompt/completion, conversational, pre-tokenized), checks every row, and measures what truncation
to ``args.max_length`` would cut. Each problem raises ``SftkitError(problem, fix)`` naming the rows.

``validate_run(args, model=..., train_dataset=..., tokenizer=...)`` checks a whole run: that, plus options that
cannot work together or on this hardware (:func:`check_options`), and an output folder that already holds a
different run (:func:`check_output_dir`, by the fingerprint in ``sftkit_run.json``). :func:`check_model_folder`,
:func:`check_adapter_folder` and :func:`validate_merge` guard what is loaded and merged (no custom code, no
pickles unless asked; an adapter that fits its base). docs/validation.md lists every refusal and its test.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from sftkit.errors import SftkitError

KNOWN_ROLES = ("system", "user", "assistant", "tool")
_SHOW = 5  # offending rows named in a message
# Column names people use for the shapes SFTTrainer knows, and what to do about them.
_RENAMES = {
    "conversations": "messages",
    "conversation": "messages",
    "chat": "messages",
    "dialog": "messages",
    "dialogue": "messages",
    "question": "prompt",
    "query": "prompt",
    "instruction": "prompt",
    "answer": "completion",
    "response": "completion",
    "output": "completion",
    "target": "completion",
    "content": "text",
    "document": "text",
    "body": "text",
}


@dataclass
class DatasetReport:
    """What validation found: the input shape, token lengths, and what truncation would cut."""

    shape: str  # "text", "formatting_func", "prompt-completion", "conversational", "pre-tokenized"
    n_rows: int  # rows checked
    max_length: int | None
    lengths: list[int]  # tokens per row as the trainer will build them (EOS included)
    n_too_long: int = 0
    tokens_cut: int = 0
    n_emptied: int = 0  # rows whose trained tokens would all be cut (the trainer drops them)
    truncates: bool = True  # False when packing splits instead of cutting
    long_rows: list[int] = field(default_factory=list)  # indices of the rows longer than max_length

    @property
    def n_tokens(self) -> int:
        """Tokens in all checked rows before truncation."""
        return sum(self.lengths)

    def __str__(self) -> str:
        longest = max(self.lengths) if self.lengths else 0
        text = f"{self.n_rows} rows, {self.shape}: {self.n_tokens} tokens, longest {longest}"
        if self.max_length is None or not self.truncates:
            return text + " (no truncation)"
        text += f"; max_length={self.max_length}: {self.n_too_long} rows longer, {self.tokens_cut} tokens cut"
        return text + (f", {self.n_emptied} rows left with nothing to train" if self.n_emptied else "")


def _arg(args: Any, name: str, default: Any) -> Any:
    return getattr(args, name, default) if args is not None else default


def _rows_named(rows: list[int]) -> str:
    shown = ", ".join(str(r) for r in rows[:_SHOW])
    more = len(rows) - _SHOW
    return f"row{'s' if len(rows) > 1 else ''} {shown}" + (f" (and {more} more)" if more > 0 else "")


def check_reiterable(source: Any, consequence: str, fix: str) -> None:
    """Refuse a source that is not an iterable of examples, or a one-shot iterator (``consequence`` says why)."""
    if isinstance(source, (str, bytes, Mapping)) or not isinstance(source, Iterable):
        raise SftkitError(
            f"source must be an iterable of examples (dicts), got a {type(source).__name__}.",
            "pass a list of dicts, a datasets.Dataset or a datasets.IterableDataset.",
        )
    if iter(source) is source:
        raise SftkitError(f"source is a one-shot iterator ({type(source).__name__}): {consequence}", fix)


def require_single_split(dataset: Any, split: str | None = None):
    """Return one split of ``dataset``: a Dataset unchanged, ``dataset[split]`` of a DatasetDict."""
    from datasets import DatasetDict, IterableDatasetDict

    if isinstance(dataset, (DatasetDict, IterableDatasetDict)) or (
        isinstance(dataset, dict) and dataset and all(hasattr(v, "column_names") for v in dataset.values())
    ):
        splits = list(dataset.keys())
        if split is not None and split in dataset:
            return dataset[split]
        guess = "train" if "train" in splits else splits[0] if splits else "train"
        raise SftkitError(
            f"got a {type(dataset).__name__} with splits {splits}, but a trainer takes one split"
            + (f" (and {split!r} is not one of them)" if split is not None else "")
            + ".",
            f'pass dataset["{guess}"] as train_dataset (and another split as eval_dataset), or load one '
            f'split: load_dataset(..., split="{guess}").',
        )
    if isinstance(dataset, list):
        raise SftkitError(
            "got a Python list; SFTTrainer needs a datasets.Dataset.",
            "wrap it: datasets.Dataset.from_list(rows).",
        )
    if not hasattr(dataset, "column_names"):
        raise SftkitError(
            f"got a {type(dataset).__name__}; SFTTrainer needs a datasets.Dataset or IterableDataset.",
            "load the data with datasets.load_dataset(...) or Dataset.from_list(rows).",
        )
    return dataset


def detect_shape(
    column_names: Iterable[str], args: Any = None, formatting_func: Callable | None = None
) -> str:
    """The input shape SFTTrainer will use for these columns (same precedence as trl's preparation)."""
    cols = set(column_names)
    if "input_ids" in cols:
        return "pre-tokenized"
    if formatting_func is not None:
        return "formatting_func"
    if "prompt" in cols and "completion" in cols:
        return "prompt-completion"
    if "messages" in cols:
        return "conversational"
    if "conversations" in cols:
        return "sharegpt"
    if _arg(args, "dataset_text_field", "text") in cols:
        return "text"
    raise _missing_columns(sorted(cols), _arg(args, "dataset_text_field", "text"))


def _missing_columns(cols: list[str], text_field: str) -> SftkitError:
    """The error for a dataset none of whose columns SFTTrainer recognises, with the likely fix."""
    problem = (
        f"the dataset has columns {cols}, none of which SFTTrainer reads as training data: it needs "
        f"'{text_field}' (plain text, SFTConfig.dataset_text_field), 'messages' (chat), 'prompt' + "
        "'completion', or 'input_ids' (pre-tokenized)."
    )
    lowered = {c.lower(): c for c in cols}
    if {"instruction", "output"} <= set(lowered):
        return SftkitError(
            problem + " They look like Alpaca rows.",
            "convert them: dataset.map(sftkit.formats.alpaca_to_prompt_completion, remove_columns=...) (loss on "
            "the answers only), or pass formatting_func=sftkit.formats.alpaca_to_text.",
        )
    for have, need in (("prompt", "completion"), ("completion", "prompt")):
        if have in cols and need not in cols:
            guess = _guess(cols, need)
            return SftkitError(
                f"the dataset has a {have!r} column but no {need!r} column (columns: {cols}); SFTTrainer needs "
                "both for prompt/completion training.",
                f"dataset = dataset.rename_column({guess!r}, {need!r})."
                if guess
                else f"add the {need!r} column, or rename the column that holds it.",
            )
    targets = [text_field, "messages", "prompt", "completion", "input_ids"]
    for col in cols:
        for target in targets:
            if col != target and col.lower() == target.lower():
                return SftkitError(
                    problem + f" Column {col!r} differs from {target!r} only in case.",
                    f"dataset = dataset.rename_column({col!r}, {target!r})"
                    + (f", or SFTConfig(dataset_text_field={col!r})" if target == text_field else "")
                    + ".",
                )
    hints = [f"{c!r} -> {g!r}" for c in cols if (g := _RENAMES.get(c.lower())) or (g := _close(c, targets))]
    if hints:
        return SftkitError(
            problem,
            f"rename the column(s): {', '.join(hints)} (dataset.rename_column(old, new)); for plain text in "
            "another column you can instead set SFTConfig(dataset_text_field=...).",
        )
    return SftkitError(
        problem,
        "rename the column holding the training text to 'text' (or set SFTConfig(dataset_text_field=...)), "
        "or pass formatting_func=... that builds one string per row.",
    )


def _close(name: str, targets: list[str]) -> str | None:
    match = difflib.get_close_matches(name.lower(), targets, n=1, cutoff=0.75)
    return match[0] if match else None


def _guess(cols: list[str], need: str) -> str | None:
    """The column that most likely holds ``need`` (by the usual alternative names, then by spelling)."""
    for col in cols:
        if _RENAMES.get(col.lower()) == need or col.lower() == need:
            return col
    for col in cols:
        if _close(col, [need]):
            return col
    return None


def _check_strings(rows: list[Mapping], keys: Iterable[str], what: str) -> None:
    """Raise if any of ``keys`` is missing, None or not a string in any row."""
    for key in keys:
        bad = [i for i, r in enumerate(rows) if not isinstance(r.get(key), str)]
        if bad:
            kinds = sorted({type(rows[i].get(key)).__name__ for i in bad})
            raise SftkitError(
                f"{what}: {key!r} is not a string in {len(bad)} of {len(rows)} rows "
                f"({_rows_named(bad)}; found {', '.join(kinds)}, e.g. {rows[bad[0]].get(key)!r:.60}).",
                f"convert or drop them first, e.g. dataset.filter(lambda r: isinstance(r[{key!r}], str)) "
                f"or dataset.map(lambda r: {{{key!r}: str(r[{key!r}])}}).",
            )


def _check_not_empty(rows: list[Mapping], key: str, what: str) -> None:
    empty = [i for i, r in enumerate(rows) if not r[key].strip()]
    if empty:
        raise SftkitError(
            f"{what}: {key!r} is empty in {len(empty)} of {len(rows)} rows ({_rows_named(empty)}); an empty "
            "response teaches the model to answer with nothing.",
            f"drop them: dataset.filter(lambda r: r[{key!r}].strip() != '').",
        )


def validate_conversation(messages: Any, row: int | None = None, roles: Iterable[str] = KNOWN_ROLES) -> None:
    """Raise SftkitError unless ``messages`` is a list of role/content turns a chat template can train on."""
    where = f"row {row}" if row is not None else "conversation"
    roles = tuple(roles)
    if not isinstance(messages, list) or not messages:
        raise SftkitError(
            f"{where}: 'messages' is {messages!r:.60}, not a non-empty list of turns.",
            'each row needs messages=[{"role": "user", "content": ...}, {"role": "assistant", "content": ...}].',
        )
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            hint = (
                " It looks like ShareGPT (from/value): use sftkit.formats.sharegpt_to_messages."
                if isinstance(message, Mapping) and "from" in message
                else ""
            )
            raise SftkitError(
                f"{where}, turn {i}: {message!r:.80} is not a {{'role': ..., 'content': ...}} mapping.{hint}",
                "give every turn a 'role' and a 'content' key.",
            )
        role, content = message["role"], message["content"]
        if role not in roles:
            mapped = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}.get(
                str(role).lower()
            )
            raise SftkitError(
                f"{where}, turn {i}: unknown role {role!r} (the chat template knows {list(roles)}).",
                (f"map {role!r} to {mapped!r}" if mapped else f"rename the role to one of {list(roles)}")
                + "; for ShareGPT data use sftkit.formats.sharegpt_to_messages.",
            )
        if not isinstance(content, str):
            raise SftkitError(
                f"{where}, turn {i} ({role}): content is a {type(content).__name__} ({content!r:.60}), "
                "not a string.",
                "convert the content to text (str(...)) or drop the row.",
            )
        if role == "assistant" and not content.strip():
            raise SftkitError(
                f"{where}, turn {i}: the assistant's content is empty, so that turn teaches the model to say "
                "nothing.",
                "drop the turn (and the question before it) or the whole row.",
            )
        if role == "system" and i != 0:
            raise SftkitError(
                f"{where}, turn {i}: a system message in the middle of the conversation; templates put it first "
                "(or drop it silently).",
                "move the system message to the start of 'messages'.",
            )
    if not any(m["role"] == "assistant" for m in messages):
        raise SftkitError(
            f"{where}: the conversation has no assistant turn, so there is nothing to learn to say (with "
            "assistant_only_loss=True, TRL stops with a RuntimeError halfway through preparing the data).",
            "drop rows without an assistant reply: dataset.filter(lambda r: any(m['role'] == 'assistant' for m "
            "in r['messages'])).",
        )
    previous = None
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system":
            continue
        if role == "tool":  # tool results answer the assistant's call; the assistant speaks next
            if previous != "assistant" and messages[i - 1]["role"] != "tool":
                raise SftkitError(
                    f"{where}, turn {i}: a tool result that does not follow an assistant turn.",
                    "put each tool message right after the assistant turn that called the tool.",
                )
            previous = "user"
            continue
        if previous is None and role != "user":
            raise SftkitError(
                f"{where}, turn {i}: the conversation starts with {role!r}; after an optional system message "
                "the user speaks first.",
                "drop the leading assistant turn, or add the user turn it answers.",
            )
        if role == previous:
            raise SftkitError(
                f"{where}, turns {i - 1} and {i}: two {role!r} turns in a row; user and assistant must alternate.",
                "merge consecutive turns of the same role into one, or insert the missing reply.",
            )
        previous = role


def _check_template(tokenizer, args: Any) -> None:
    """Conversational data needs a chat template; assistant_only_loss needs {% generation %} markers in it."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise SftkitError(
            "the data is conversational but the tokenizer has no chat template (typical of a base model).",
            "give it one: SFTConfig(chat_template_path='my_template.jinja') (a local file) or a tokenizer to "
            "clone it from (trl.clone_chat_template), or set tokenizer.chat_template = '...'.",
        )
    if not _arg(args, "assistant_only_loss", False):
        return
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(template):
        return
    try:
        get_training_chat_template(tokenizer)  # trl swaps in a marked copy for the families it knows
    except ValueError as err:
        raise SftkitError(
            "assistant_only_loss=True needs {% generation %} ... {% endgeneration %} around the assistant's "
            f"reply in the chat template; this template has none and TRL has no marked copy of it ({err}).",
            "write a copy of the template with the assistant content (and its end-of-turn token) inside the "
            "markers, save it as a .jinja file and pass SFTConfig(chat_template_path='that.jinja').",
        ) from err


def _training_tokenizer(tokenizer, args: Any):
    """The tokenizer as SFTTrainer will use it: ``args.chat_template_path`` applied to a copy, as TRL does.

    A .jinja/.j2 file becomes the chat template; anything else is a tokenizer whose template, added tokens and
    EOS are cloned (trl.clone_chat_template, without the model's embedding resize). Without the option, or
    without a tokenizer, ``tokenizer`` is returned unchanged.
    """
    path = _arg(args, "chat_template_path", None)
    if not path or tokenizer is None:
        return tokenizer
    import copy
    import os

    tokenizer = copy.deepcopy(tokenizer)
    if os.path.isfile(path) and str(path).endswith((".jinja", ".j2")):
        tokenizer.chat_template = Path(path).read_text(encoding="utf-8")
        return tokenizer
    from transformers import AutoTokenizer

    try:
        source = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise SftkitError(
            f"chat_template_path={path!r} is neither a .jinja/.j2 file nor a tokenizer that can be loaded "
            f"({err}).",
            "point it at a local .jinja file, a local tokenizer folder, or a hub id (needs the network).",
        ) from err
    tokenizer.chat_template = source.get_chat_template()
    tokenizer.add_tokens([t for t in source.added_tokens_decoder.values() if t.content not in tokenizer.vocab])
    tokenizer.eos_token = source.eos_token
    return tokenizer


def _text_lengths(tokenizer, texts: list[str], eos: str) -> list[int]:
    texts = [t if t.endswith(eos) else t + eos for t in texts]
    return [len(ids) for ids in tokenizer(texts)["input_ids"]]


def validate_sft_dataset(
    dataset: Any,
    tokenizer,
    args: Any = None,
    *,
    formatting_func: Callable[[Mapping], str] | None = None,
    on_truncation: str = "error",
    max_rows: int | None = None,
) -> DatasetReport:
    """Check ``dataset`` for ``SFTTrainer(args=args, processing_class=tokenizer)``; raise SftkitError on bad input.

    ``args`` is the SFTConfig (its dataset_text_field, max_length, packing, assistant_only_loss, eos_token
    and chat_template_path are used; None means SFTConfig's defaults). ``on_truncation`` is "error", "warn"
    or "ignore" for rows longer than max_length. ``max_rows`` checks only the first rows (an
    IterableDataset is checked on its first 1,000 unless told otherwise). Returns a DatasetReport.
    """
    if on_truncation not in ("error", "warn", "ignore"):
        raise SftkitError(f"on_truncation={on_truncation!r}.", 'use "error", "warn" or "ignore".')
    dataset = require_single_split(dataset)
    tokenizer = _training_tokenizer(tokenizer, args)  # with SFTConfig.chat_template_path, as the trainer will
    from datasets import IterableDataset

    if isinstance(dataset, IterableDataset):
        rows = list(islice(dataset, max_rows or 1000))
        columns = list(rows[0]) if rows else list(dataset.column_names or [])
    else:
        subset = dataset if max_rows is None or max_rows >= len(dataset) else dataset.select(range(max_rows))
        rows = subset.to_list()
        columns = dataset.column_names
    if not rows:
        raise SftkitError(
            "the dataset has no rows.", "check the file, the split name and any filter applied."
        )

    shape = detect_shape(columns, args, formatting_func)
    eos = _arg(args, "eos_token", None) or tokenizer.eos_token
    text_field = _arg(args, "dataset_text_field", "text")
    prompt_lengths: list[int] | None = None  # tokens before the first trained token, where it matters

    if shape == "sharegpt":
        raise SftkitError(
            "the rows hold ShareGPT 'conversations' (from/value). TRL renames the keys but keeps speaker names "
            "like 'human'/'gpt', which chat templates do not know.",
            "convert first: dataset.map(sftkit.formats.sharegpt_to_messages, remove_columns=['conversations']).",
        )
    if shape == "pre-tokenized":
        bad = [i for i, r in enumerate(rows) if not _is_int_list(r["input_ids"]) or not r["input_ids"]]
        if bad:
            raise SftkitError(
                f"'input_ids' is not a non-empty list of ints in {_rows_named(bad)} "
                f"(e.g. {rows[bad[0]]['input_ids']!r:.60}).",
                "tokenize with tokenizer(text)['input_ids'] (a list of ints per row).",
            )
        if "labels" in columns:
            wrong = [
                i
                for i, r in enumerate(rows)
                if not _is_int_list(r["labels"]) or len(r["labels"]) != len(r["input_ids"])
            ]
            if wrong:
                raise SftkitError(
                    f"'labels' is missing, not a list of ints, or not as long as 'input_ids' in "
                    f"{_rows_named(wrong)} (e.g. {rows[wrong[0]]['labels']!r:.60}).",
                    "give labels the same length as input_ids (-100 where nothing is trained); the model "
                    "shifts them itself.",
                )
            empty = [i for i, r in enumerate(rows) if all(label == -100 for label in r["labels"])]
            if empty:
                raise SftkitError(
                    f"every label is -100 in {_rows_named(empty)}: those rows train nothing (empty responses).",
                    "drop them, or check the code that masks the prompt.",
                )
            prompt_lengths = [next(i for i, lab in enumerate(r["labels"]) if lab != -100) for r in rows]
        lengths = [len(r["input_ids"]) for r in rows]
    elif shape == "formatting_func":
        texts = []
        for i, r in enumerate(rows):
            out = formatting_func(r)
            if not isinstance(out, str):
                what = (
                    f"a {type(out).__name__} of {len(out)} items (the 2024 batched form)"
                    if isinstance(out, (list, tuple))
                    else f"a {type(out).__name__}"
                )
                raise SftkitError(
                    f"formatting_func returned {what} for row {i}; SFTTrainer (trl >= 0.17) calls it on one row "
                    "and needs one string.",
                    "return the text of the single row it receives (no loop over a batch); "
                    "sftkit.formats.per_example(func) checks this for you.",
                )
            texts.append(out)
        empty = [i for i, t in enumerate(texts) if not t.strip()]
        if empty:
            raise SftkitError(
                f"formatting_func returned an empty string for {_rows_named(empty)}.",
                "drop those rows or fix the function.",
            )
        lengths = _text_lengths(tokenizer, texts, eos)
    elif shape == "text":
        _check_strings(rows, [text_field], "text rows")
        _check_not_empty(rows, text_field, "text rows")
        lengths = _text_lengths(tokenizer, [r[text_field] for r in rows], eos)
    elif shape == "prompt-completion":
        if all(isinstance(r["prompt"], list) for r in rows):  # conversational prompt/completion
            for i, r in enumerate(rows):
                validate_conversation(r["prompt"] + r["completion"], row=i)
            _check_template(tokenizer, args)
            lengths = _chat_lengths(tokenizer, [r["prompt"] + r["completion"] for r in rows])
            prompt_lengths = _chat_lengths(tokenizer, [r["prompt"] for r in rows], add_generation_prompt=True)
        else:
            _check_strings(rows, ["prompt", "completion"], "prompt/completion rows")
            _check_not_empty(rows, "completion", "prompt/completion rows")
            lengths = _text_lengths(tokenizer, [r["prompt"] + r["completion"] for r in rows], eos)
            prompt_lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in rows])["input_ids"]]
    else:  # conversational
        for i, r in enumerate(rows):
            validate_conversation(r["messages"], row=i)
        _check_template(tokenizer, args)
        lengths = _chat_lengths(tokenizer, [r["messages"] for r in rows])

    report = DatasetReport(
        shape=shape, n_rows=len(rows), max_length=_arg(args, "max_length", 1024), lengths=lengths
    )
    packing, strategy = _arg(args, "packing", False), _arg(args, "packing_strategy", "bfd")
    report.truncates = not (packing and strategy in ("wrapped", "bfd_split"))
    if report.max_length is not None and report.truncates:
        _measure_truncation(report, rows, tokenizer, args, shape, prompt_lengths)
        if report.n_too_long and on_truncation != "ignore":
            _truncation_problem(report, on_truncation)
    return report


def _chat_lengths(tokenizer, conversations: list[list[dict]], **kwargs) -> list[int]:
    """Token count of each rendered conversation (return_dict=False: transformers 5 returns a dict otherwise)."""
    ids = tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=False, **kwargs)
    return [len(x) for x in ids]


def _is_int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, int) for v in value)


def _measure_truncation(report, rows, tokenizer, args, shape, prompt_lengths) -> None:
    """Fill in how many rows exceed max_length, the tokens cut, and the rows left with nothing to train."""
    limit = report.max_length
    long_rows = [i for i, n in enumerate(report.lengths) if n > limit]
    report.n_too_long = len(long_rows)
    report.tokens_cut = sum(report.lengths[i] - limit for i in long_rows)
    keep_end = _arg(args, "truncation_mode", "keep_start") == "keep_end"
    emptied = 0
    if prompt_lengths is not None and not keep_end:
        completion_only = _arg(args, "completion_only_loss", None) is not False or shape == "pre-tokenized"
        if completion_only:
            emptied = sum(1 for i in long_rows if prompt_lengths[i] >= limit)
    elif shape == "conversational" and _arg(args, "assistant_only_loss", False) and not keep_end:
        for i in long_rows:
            out = tokenizer.apply_chat_template(
                rows[i]["messages"], tokenize=True, return_dict=True, return_assistant_tokens_mask=True
            )
            if 1 not in out["assistant_masks"][:limit]:
                emptied += 1
    report.n_emptied = emptied
    report.long_rows = long_rows


def _truncation_problem(report: DatasetReport, on_truncation: str) -> None:
    long_rows = report.long_rows
    longest = max(report.lengths)
    share = 100 * report.tokens_cut / max(1, report.n_tokens)
    problem = (
        f"{report.n_too_long} of {report.n_rows} rows are longer than max_length={report.max_length} tokens "
        f"({_rows_named(long_rows)}; the longest has {longest}); truncation would cut {report.tokens_cut} tokens "
        f"({share:.1f}% of all)"
    )
    if report.n_emptied:
        problem += (
            f", and {report.n_emptied} rows would lose every trained token, so the trainer would silently "
            "drop them"
        )
    problem += "."
    fix = (
        f"raise SFTConfig(max_length=...) to {longest} or more if memory allows; or filter/shorten those rows; "
        "or pack with packing=True, packing_strategy='bfd_split' (splits long rows instead of cutting); "
        "or accept the cut: validate_sft_dataset(..., on_truncation='warn')."
    )
    if on_truncation == "error":
        raise SftkitError(problem, fix)
    warnings.warn(f"{problem}\nFix: {fix}", UserWarning, stacklevel=3)


# ==============================================================================================================
# Run-level checks: options that cannot work together, the hardware, the output folder, model and adapter folders.
# The train command (sftkit.recipe), the merge command (sftkit.merge), load_model_and_tokenizer (sftkit.loading)
# and the notebooks all go through these, so a bad run stops here, before any weights are read.

RUN_FILE = "sftkit_run.json"  # the run fingerprint written into output_dir when training starts
# Fields of SFTConfig that do not change what is trained (bookkeeping, logging, how long): a run whose other
# fields, model and data match the recorded ones may resume in the same output_dir.
_NOT_FINGERPRINTED = frozenset(
    {
        "output_dir", "logging_dir", "run_name", "resume_from_checkpoint", "overwrite_output_dir", "report_to",
        "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "save_steps",
        "save_strategy", "save_total_limit", "save_only_model", "save_safetensors", "eval_steps", "eval_strategy",
        "eval_delay", "eval_on_start", "per_device_eval_batch_size", "dataloader_num_workers",
        "dataloader_prefetch_factor", "dataloader_persistent_workers", "dataloader_pin_memory", "disable_tqdm",
        "log_level", "log_level_replica", "log_on_each_node", "push_to_hub", "hub_model_id", "hub_strategy",
        "hub_token", "hub_private_repo", "hub_always_push", "hub_revision", "max_steps", "num_train_epochs",
        "trackio_space_id", "project", "include_num_input_tokens_seen", "skip_memory_metrics", "use_cpu",
    }
)  # fmt: skip
# Files that mark a folder as holding a training run (checkpoints, the final model, sftkit's records).
_RUN_MARKERS = ("trainer_state.json", "run_info.json", "metrics.json", "final", "adapter_config.json",
                "model.safetensors", "training_args.bin")  # fmt: skip
_PICKLE_MODEL_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class RunCheck:
    """What validate_run found: the run fingerprint (to record in output_dir) and the dataset report."""

    fingerprint: dict
    report: DatasetReport | None = None
    resumes: bool = False  # output_dir already holds this same run


def _bitsandbytes_available() -> bool:
    """True when bitsandbytes can be imported (needed for 4-/8-bit loading)."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def _training_device(args: Any) -> str:
    from sftkit.device import detect_device

    return "cpu" if _arg(args, "use_cpu", False) else detect_device()


def check_precision(args: Any, device: str | None = None) -> None:
    """Raise SftkitError when args.bf16/args.fp16 asks for a precision ``device`` cannot train in."""
    import torch

    from sftkit.device import choose_precision

    bf16, fp16 = bool(_arg(args, "bf16", False)), bool(_arg(args, "fp16", False))
    if bf16 and fp16:
        raise SftkitError(
            "both bf16=True and fp16=True are set; mixed precision is one or the other.",
            "keep one: bf16 on Ampere or newer GPUs, fp16 on older GPUs, neither on a CPU.",
        )
    if not (bf16 or fp16):
        return
    device = device or _training_device(args)
    choose_precision("bf16" if bf16 else "fp16", device=device)  # CPU, or bf16 on a GPU without it
    if fp16 and device == "cuda":
        major, minor = torch.cuda.get_device_capability(0)
        if (major, minor) < (5, 3):
            name = torch.cuda.get_device_name(0)
            raise SftkitError(
                f"fp16=True but {name} (compute capability {major}.{minor}) has no half-precision arithmetic; "
                "it needs compute capability 5.3 or newer.",
                "train in fp32 (bf16=False, fp16=False) on this GPU, or use a newer GPU.",
            )


def check_options(
    args: Any,
    *,
    use_peft: bool | None = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    data_collator: Any = None,
    train_dataset: Any = None,
    distributed_engine: str = "",
    device: str | None = None,
) -> None:
    """Raise SftkitError for SFTConfig options that cannot work together or on this hardware.

    ``use_peft`` (LoRA/QLoRA; None = not known), ``load_in_4bit``/``load_in_8bit`` (bitsandbytes quantization),
    ``data_collator`` (a custom one, if any), ``train_dataset`` (to spot a stream) and ``distributed_engine``
    ("deepspeed", "fsdp" or "") describe the rest of the run.
    """
    check_precision(args, device)
    if _arg(args, "hub_token", None):
        raise SftkitError(
            "hub_token is set in the training configuration; it would be pickled into training_args.bin next to "
            "every checkpoint and could leak with the run folder.",
            "remove hub_token from the config and set the token in the environment only (HF_TOKEN, or "
            "`hf auth login`); sftkit never writes it anywhere.",
        )
    if load_in_4bit or load_in_8bit:
        bits = "4" if load_in_4bit else "8"
        if not _bitsandbytes_available():
            raise SftkitError(
                f"load_in_{bits}bit=True (QLoRA) but bitsandbytes is not installed, so the base model cannot "
                "be quantized.",
                "pip install bitsandbytes (on a CUDA machine), or drop load_in_4bit/load_in_8bit and train LoRA "
                "on the 16-bit model.",
            )
        if use_peft is False:
            raise SftkitError(
                "load_in_4bit/load_in_8bit without LoRA: a bitsandbytes-quantized model cannot be fully "
                "fine-tuned.",
                "set `use_peft: true` (QLoRA), or drop load_in_4bit/load_in_8bit for full fine-tuning.",
            )
        if distributed_engine == "deepspeed":
            raise SftkitError(
                "load_in_4bit/load_in_8bit with DeepSpeed: ZeRO cannot partition bitsandbytes weights here.",
                "launch quantized LoRA with configs/accelerate/ddp.yaml (each GPU holds the small 4-bit model), "
                "or drop the quantization and use a ZeRO config.",
            )
    packing, strategy = _arg(args, "packing", False), _arg(args, "packing_strategy", "bfd")
    padding_free = _arg(args, "padding_free", False) or (packing and strategy in ("bfd", "bfd_split"))
    if padding_free and data_collator is not None:
        why = "padding_free=True" if _arg(args, "padding_free", False) else f"packing_strategy={strategy!r}"
        raise SftkitError(
            f"{why} with a custom data_collator ({type(data_collator).__name__}): padding-free batches are one "
            "row per batch whose documents are kept apart only by position_ids, which only TRL's own collator "
            "builds (TRL refuses a custom one).",
            "drop data_collator= (SFTTrainer then builds the padding-free collator), or keep the collator and "
            "set padding_free=False with packing=False or packing_strategy='wrapped'.",
        )
    if train_dataset is not None:
        from datasets import IterableDataset

        if isinstance(train_dataset, IterableDataset) and (_arg(args, "max_steps", -1) or -1) <= 0:
            raise SftkitError(
                "the training data is a stream (datasets.IterableDataset) but max_steps is not set; a stream "
                "has no length, so the Trainer cannot work out how many steps an epoch is.",
                "set SFTConfig(max_steps=N) (N = rows to train on / global batch size), or load the data as a "
                "map-style datasets.Dataset.",
            )


def run_fingerprint(args: Any, *, model: str, data: Any = None, peft: Any = None) -> dict:
    """What identifies a training run: the model, the data, the PEFT config and the SFTConfig minus bookkeeping.

    The dict (JSON-able) is what sftkit_run.json records; ``["sha256"]`` is its hash. Token fields are never
    included (SFTConfig.to_dict() masks them and they are dropped here as well).
    """
    config = args.to_dict() if hasattr(args, "to_dict") else dict(vars(args))
    config = {
        k: v for k, v in config.items() if k not in _NOT_FINGERPRINTED and not k.endswith("_token")
    }
    if peft is not None and hasattr(peft, "to_dict"):
        peft = peft.to_dict()
    body = {"model": str(model), "data": data, "peft": peft, "config": config}
    text = json.dumps(body, sort_keys=True, default=str)
    body = json.loads(text)  # what is written back is exactly what was hashed
    return {"sha256": hashlib.sha256(text.encode()).hexdigest(), **body}


def data_identity(*paths: str | None, dataset: Any = None) -> dict:
    """Identify training data: sha256 of each local file, else a datasets fingerprint (None when unknown)."""
    out: dict[str, Any] = {}
    for path in paths:
        if not path:
            continue
        p = Path(path)
        if p.is_file():
            digest = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            out[p.name] = digest.hexdigest()
        else:
            out[str(path)] = "not a local file"
    if dataset is not None:
        out["dataset_fingerprint"] = getattr(dataset, "_fingerprint", None)
    return out


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flatten(item, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: value}


def _differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every field where two fingerprints differ (nested keys dotted, config unprefixed)."""
    flat_old, flat_new = (
        {k.removeprefix("config."): v for k, v in _flatten({k: d.get(k) for k in ("model", "data", "peft", "config")}).items()}
        for d in (old, new)
    )  # fmt: skip
    return [
        f"{key}: {flat_old.get(key)!r:.40} -> {flat_new.get(key)!r:.40}"
        for key in sorted(set(flat_old) | set(flat_new))
        if flat_old.get(key) != flat_new.get(key)
    ]


def check_output_dir(output_dir: str | Path, fingerprint: dict, *, overwrite: bool = False) -> bool:
    """Refuse an output_dir that holds a different run; returns True when it holds this same run (a resume).

    The run is identified by ``sftkit_run.json``: the same fingerprint may resume (checkpoints continue),
    a different one is refused; a folder with checkpoints or a saved model but no record is refused too.
    ``overwrite=True`` (SFTConfig-style ``overwrite_output_dir`` / the train command's ``--overwrite``)
    accepts any folder.
    """
    out = Path(output_dir)
    if overwrite or not out.is_dir():
        return False
    fix = (
        "use a new output_dir, or pass overwrite_output_dir=True (the train command's --overwrite) to train into "
        "it anyway; to resume, run with the same model, data and configuration."
    )
    record = out / RUN_FILE
    if record.is_file():
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except ValueError:
            old = {}
        if old.get("sha256") == fingerprint.get("sha256"):
            return True
        diffs = _differences(old, fingerprint) or ["the recorded fingerprint is unreadable"]
        shown = "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")
        raise SftkitError(
            f"output_dir {str(out)!r} already holds a different run ({RUN_FILE} differs: {shown}).", fix
        )
    found = sorted(
        p.name for p in out.iterdir() if p.name in _RUN_MARKERS or p.name.startswith("checkpoint-")
    )
    if found:
        raise SftkitError(
            f"output_dir {str(out)!r} already holds another run ({', '.join(found[:4])}) with no {RUN_FILE} to "
            "show it is this one.",
            fix,
        )
    return False


def record_run(output_dir: str | Path, fingerprint: dict) -> Path:
    """Write the run fingerprint to ``output_dir/sftkit_run.json`` (atomically); returns its path."""
    from sftkit.io import atomic_write_json

    path = Path(output_dir) / RUN_FILE
    atomic_write_json(path, fingerprint)
    return path


def validate_run(
    args: Any,
    *,
    model: str,
    train_dataset: Any = None,
    tokenizer: Any = None,
    formatting_func: Callable | None = None,
    data_collator: Any = None,
    peft_config: Any = None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    data_id: Any = None,
    overwrite_output_dir: bool = False,
    on_truncation: str = "error",
    max_rows: int | None = None,
    distributed_engine: str = "",
    record: bool = False,
) -> RunCheck:
    """Check a whole SFT run before training; raise SftkitError(problem, fix) on the first bad input.

    Options and hardware (:func:`check_options`), the training data against the tokenizer
    (:func:`validate_sft_dataset`, when both are given), and the output folder (:func:`check_output_dir`,
    by a fingerprint of model + data + config). ``record=True`` writes ``sftkit_run.json`` when all is well.
    """
    use_peft = None if peft_config is None and not (load_in_4bit or load_in_8bit) else peft_config is not None
    check_options(
        args,
        use_peft=use_peft,
        load_in_4bit=load_in_4bit,
        load_in_8bit=load_in_8bit,
        data_collator=data_collator,
        train_dataset=train_dataset,
        distributed_engine=distributed_engine,
    )
    report = None
    if train_dataset is not None and tokenizer is not None:
        report = validate_sft_dataset(
            train_dataset, tokenizer, args, formatting_func=formatting_func, on_truncation=on_truncation,
            max_rows=max_rows,
        )  # fmt: skip
    if data_id is None and train_dataset is not None:
        data_id = data_identity(dataset=train_dataset)
    fingerprint = run_fingerprint(args, model=model, data=data_id, peft=peft_config)
    resumes = check_output_dir(_arg(args, "output_dir", None) or ".", fingerprint, overwrite=overwrite_output_dir)
    if record:
        record_run(args.output_dir, fingerprint)
    return RunCheck(fingerprint, report, resumes)


# --- model and adapter folders: no custom code unless asked, no pickle weights unless asked --------------------


def check_model_folder(path: str | Path, *, trust_remote_code: bool = False, allow_pickle: bool = False) -> None:
    """Refuse a local model folder that needs custom code (auto_map) or holds only pickle weights, unless allowed."""
    folder = Path(path)
    if not folder.is_dir():
        return
    if not trust_remote_code:
        for name in ("config.json", "tokenizer_config.json"):
            file = folder / name
            try:
                auto_map = json.loads(file.read_text(encoding="utf-8")).get("auto_map") if file.is_file() else None
            except (OSError, ValueError):
                auto_map = None
            if auto_map:
                code = sorted({str(v).split(".")[0] for v in _flat_values(auto_map)})
                raise SftkitError(
                    f"{str(folder)!r} ships its own Python code ({name} has auto_map -> {', '.join(code)}); "
                    "loading it would run that code on this machine with your permissions.",
                    "read the .py files first; if you trust them, opt in with trust_remote_code=True (the train "
                    "command's --trust_remote_code true); else use a model that needs no custom code.",
                )
    if allow_pickle:
        return
    has_safetensors = any(folder.glob("*.safetensors")) or (folder / "model.safetensors.index.json").is_file()
    pickles = sorted(p.name for p in folder.iterdir() if p.name.startswith("pytorch_model") and p.suffix == ".bin")
    if pickles and not has_safetensors:
        raise SftkitError(
            f"{str(folder)!r} holds its weights only as pickle ({', '.join(pickles[:3])}); unpickling a file can "
            "run arbitrary code, so sftkit loads safetensors only.",
            "convert it once where you trust the file (load it and save_pretrained(), which writes "
            "model.safetensors), or opt in with allow_pickle=True (--allow-pickle).",
        )


def _flat_values(mapping: Any) -> list:
    if isinstance(mapping, Mapping):
        return [v for value in mapping.values() for v in _flat_values(value)]
    if isinstance(mapping, (list, tuple)):
        return [v for value in mapping for v in _flat_values(value)]
    return [mapping] if mapping else []


def check_adapter_folder(adapter: str | Path, *, allow_pickle: bool = False) -> None:
    """Refuse an adapter folder whose weights are a pickle (adapter_model.bin) unless ``allow_pickle``."""
    folder = Path(adapter)
    if allow_pickle or (folder / "adapter_model.safetensors").is_file():
        return
    if (folder / "adapter_model.bin").is_file():
        raise SftkitError(
            f"the adapter {str(folder)!r} is saved as a pickle (adapter_model.bin); unpickling a file can run "
            "arbitrary code, so sftkit reads safetensors only.",
            "save the adapter again with save_pretrained() (PEFT writes adapter_model.safetensors), or opt in "
            "with allow_pickle=True (--allow-pickle) if you trust the file.",
        )


def validate_merge(
    base_config: Any, adapter: str | Path, *, adapter_vocab: int | None = None, allow_pickle: bool = False
) -> int | None:
    """Check that ``adapter`` may be merged into the base described by ``base_config``; returns rows to resize to.

    Refuses pickle adapters (unless ``allow_pickle``) and an adapter trained on another base
    (:func:`sftkit.merge.check_adapter_matches_base`: every tensor's shape against the base's modules).
    """
    from sftkit.merge import check_adapter_matches_base

    check_adapter_folder(adapter, allow_pickle=allow_pickle)
    return check_adapter_matches_base(base_config, adapter, adapter_vocab=adapter_vocab)
