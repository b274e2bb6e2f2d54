"""Convert rows between the shapes SFTTrainer accepts: Alpaca, prompt/completion, ShareGPT, messages, blocks.

Every converter works on one row (``dataset.map(converter)``) and raises ``SftkitError`` naming the row's
problem, so a bad row fails before training instead of being trained on.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sftkit.errors import SftkitError


@dataclass(frozen=True)
class AlpacaTemplate:
    """An Alpaca prompt layout: one prompt for rows with an ``input``, one without, and the answer separator.

    The prompt ends at the response header; ``separator`` starts the completion. Byte-level tokenizers glue
    a space to the word after it, so a separating space belongs to the answer, not to the prompt: a prompt
    that ends in a space is tokenized differently from the same text followed by an answer.
    """

    with_input: str  # uses {instruction} and {input}
    no_input: str  # uses {instruction}
    separator: str = "\n"


# The template of the Stanford Alpaca release (2023), still the default of many tutorials.
ALPACA = AlpacaTemplate(
    with_input=(
        "Below is an instruction that describes a task, paired with an input that provides further context. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
    ),
    no_input=(
        "Below is an instruction that describes a task. "
        "Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:"
    ),
    separator="\n",
)
# The same layout without the preamble, which is identical in every row, teaches nothing and costs tokens
# (89 with the tiny model's tokenizer); the answer follows the header after a space, the form in which the
# tiny tokenizer learned its words (" Oakridge" is one token it knows well, "Oakridge" after a newline less so).
ALPACA_SHORT = AlpacaTemplate(
    with_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:",
    no_input="### Instruction:\n{instruction}\n\n### Response:",
    separator=" ",
)

# ShareGPT speaker names seen in the wild, mapped to the roles chat templates know.
SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "tool": "tool",
    "function": "tool",
    "observation": "tool",
}


def _field(example: Mapping[str, Any], key: str, *, required: bool = True, what: str = "row") -> str:
    """Return ``example[key]`` as a string, raising SftkitError if it is missing or not a string."""
    if key not in example or example[key] is None:
        if not required:
            return ""
        raise SftkitError(
            f"{what} has no {key!r} field (it has {sorted(example)}).",
            f"rename the column that holds it to {key!r} (dataset.rename_column(old, {key!r})).",
        )
    value = example[key]
    if not isinstance(value, str):
        raise SftkitError(
            f"{what}: {key!r} is a {type(value).__name__} ({value!r:.60}), not a string.",
            f"convert it first, e.g. dataset.map(lambda r: {{{key!r}: str(r[{key!r}])}}).",
        )
    return value


def alpaca_prompt(example: Mapping[str, Any], template: AlpacaTemplate = ALPACA_SHORT) -> str:
    """The prompt of one Alpaca row (up to the response header): ``with_input`` when ``input`` is non-empty."""
    instruction = _field(example, "instruction", what="Alpaca row")
    extra = _field(example, "input", required=False, what="Alpaca row")
    if not instruction.strip():
        raise SftkitError("Alpaca row has an empty 'instruction'.", "drop such rows: dataset.filter(...).")
    if extra.strip():
        return template.with_input.format(instruction=instruction, input=extra)
    return template.no_input.format(instruction=instruction)


def with_eos(text: str, eos_token: str) -> str:
    """``text`` ending in exactly one ``eos_token`` (appended only if it is not there yet)."""
    if not eos_token:
        raise SftkitError(
            "no EOS token given, so the model would never see where an answer ends.",
            "pass tokenizer.eos_token (or the chat template's end-of-turn token).",
        )
    return text if text.endswith(eos_token) else text + eos_token


def alpaca_to_text(
    example: Mapping[str, Any], eos_token: str | None = None, template: AlpacaTemplate = ALPACA_SHORT
) -> str:
    """One Alpaca row as one training string: prompt + output (+ ``eos_token`` once, if given)."""
    output = _field(example, "output", what="Alpaca row")
    text = alpaca_prompt(example, template) + template.separator + output
    return with_eos(text, eos_token) if eos_token is not None else text


def alpaca_to_prompt_completion(
    example: Mapping[str, Any], template: AlpacaTemplate = ALPACA_SHORT
) -> dict[str, str]:
    """One Alpaca row as ``{"prompt", "completion"}``: SFTTrainer then trains on the completion only."""
    output = _field(example, "output", what="Alpaca row")
    if not output.strip():
        raise SftkitError(
            "Alpaca row has an empty 'output': there is nothing to train on.",
            "drop such rows first: dataset.filter(lambda r: r['output'].strip() != '').",
        )
    return {"prompt": alpaca_prompt(example, template), "completion": template.separator + output}


def alpaca_to_messages(example: Mapping[str, Any], system: str | None = None) -> dict[str, list[dict]]:
    """One Alpaca row as ``{"messages": [...]}``; instruction and input become one user turn."""
    instruction = _field(example, "instruction", what="Alpaca row")
    extra = _field(example, "input", required=False, what="Alpaca row")
    output = _field(example, "output", what="Alpaca row")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    return {"messages": messages}


def sharegpt_to_messages(
    example: Mapping[str, Any], key: str = "conversations", roles: Mapping[str, str] | None = None
) -> dict[str, list[dict]]:
    """A ShareGPT row (``from``/``value`` turns, speakers like human/gpt) as ``{"messages": [role/content]}``."""
    roles = SHAREGPT_ROLES if roles is None else roles
    turns = example.get(key)
    if not isinstance(turns, list) or not turns:
        raise SftkitError(
            f"ShareGPT row has no non-empty {key!r} list (it has {sorted(example)}).",
            "pass key= the column that holds the turns, e.g. sharegpt_to_messages(row, key='conversation').",
        )
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, Mapping) or "from" not in turn or "value" not in turn:
            raise SftkitError(
                f"ShareGPT turn {i} is {turn!r:.80}, not a {{'from': ..., 'value': ...}} mapping.",
                "check the source file; rows already in role/content form need no conversion.",
            )
        speaker = str(turn["from"]).strip().lower()
        if speaker not in roles:
            raise SftkitError(
                f"ShareGPT turn {i} comes from {turn['from']!r}, a speaker this converter does not know "
                f"(known: {sorted(roles)}).",
                f"pass roles={{**SHAREGPT_ROLES, {speaker!r}: 'user' or 'assistant'}}.",
            )
        if not isinstance(turn["value"], str):
            raise SftkitError(
                f"ShareGPT turn {i} has a {type(turn['value']).__name__} value, not a string.",
                "convert the value to text first.",
            )
        messages.append({"role": roles[speaker], "content": turn["value"]})
    return {"messages": messages}


def per_example(formatting_func: Callable[[Mapping[str, Any]], Any], eos_token: str | None = None):
    """Wrap a formatting function so it returns one string per row (ending in ``eos_token`` if given).

    Since trl 0.17 ``SFTTrainer(formatting_func=...)`` calls the function on one row at a time and expects a
    string. A 2024 function that loops over a batch and returns a list fails there with an IndexError or
    AttributeError deep in ``datasets.map``; wrapped, it fails at once with the fix.
    """

    def formatted(example: Mapping[str, Any]) -> str:
        text = formatting_func(example)
        if isinstance(text, (list, tuple)):
            raise SftkitError(
                f"formatting_func returned a {type(text).__name__} of {len(text)} items; SFTTrainer (trl >= 0.17) "
                "calls it on ONE row and needs ONE string.",
                "drop the loop over the batch: return f\"...{example['instruction']}...\" for the row you get.",
            )
        if not isinstance(text, str):
            raise SftkitError(
                f"formatting_func returned a {type(text).__name__}, not a string.",
                "return the training text of the row as a str.",
            )
        return with_eos(text, eos_token) if eos_token is not None else text

    formatted.__name__ = getattr(formatting_func, "__name__", "formatted")
    formatted.__doc__ = getattr(formatting_func, "__doc__", None)
    return formatted


def group_texts(dataset, tokenizer, block_size: int, text_field: str = "text", add_eos: bool = True):
    """Corpus mode: tokenize every document, join them with EOS, and cut the stream into ``block_size`` blocks.

    Returns a ``datasets.Dataset`` with one ``input_ids`` column (every row exactly ``block_size`` tokens; the
    last partial block is dropped). SFTTrainer treats it as pre-tokenized and trains on every token.
    """
    from datasets import Dataset

    if block_size < 2:
        raise SftkitError(f"block_size is {block_size}.", "use a block size of a few hundred tokens or more.")
    if text_field not in dataset.column_names:
        raise SftkitError(
            f"the dataset has no {text_field!r} column (it has {dataset.column_names}).",
            "pass text_field= the column that holds the documents.",
        )
    eos = [tokenizer.eos_token_id] if add_eos else []
    if add_eos and tokenizer.eos_token_id is None:
        raise SftkitError(
            "the tokenizer has no EOS token, so documents cannot be separated.",
            "set tokenizer.eos_token, or pass add_eos=False if the documents carry their own separator.",
        )
    tokenized = dataset.map(
        lambda batch: {"ids": [ids + eos for ids in tokenizer(batch[text_field])["input_ids"]]},
        batched=True,
        remove_columns=dataset.column_names,
        desc="Tokenizing documents",
    )
    stream = [token for ids in tokenized["ids"] for token in ids]
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise SftkitError(
            f"the whole corpus is {len(stream)} tokens, less than one block of {block_size}.",
            "use a smaller block_size or more documents.",
        )
    blocks = [stream[i * block_size : (i + 1) * block_size] for i in range(n_blocks)]
    return Dataset.from_dict({"input_ids": blocks})
