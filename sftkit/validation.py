"""Check an SFT dataset against the tokenizer and SFTConfig before any training time is spent.

``validate_sft_dataset(dataset, tokenizer, args)`` finds the input shape SFTTrainer will see (text, formatting
function, prompt/completion, conversational, pre-tokenized), checks every row, and measures what truncation
to ``args.max_length`` would cut. Each problem raises ``SftkitError(problem, fix)`` naming the rows.
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
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

    ``args`` is the SFTConfig (its dataset_text_field, max_length, packing, assistant_only_loss and
    eos_token are used; None means SFTConfig's defaults). ``on_truncation`` is "error", "warn" or "ignore"
    for rows longer than max_length. ``max_rows`` checks only the first rows (an IterableDataset is
    checked on its first 1,000 unless told otherwise). Returns a DatasetReport.
    """
    if on_truncation not in ("error", "warn", "ignore"):
        raise SftkitError(f"on_truncation={on_truncation!r}.", 'use "error", "warn" or "ignore".')
    dataset = require_single_split(dataset)
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
