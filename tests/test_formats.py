"""Format converters: Alpaca, ShareGPT, the EOS-safe per-example formatter, corpus blocks."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset
from transformers import AutoTokenizer

from sftkit.errors import SftkitError
from sftkit.formats import (
    ALPACA,
    ALPACA_SHORT,
    alpaca_prompt,
    alpaca_to_messages,
    alpaca_to_prompt_completion,
    alpaca_to_text,
    group_texts,
    per_example,
    sharegpt_to_messages,
    with_eos,
)
from sftkit.paths import TINY_MODEL_DIR, WORLD_DIR

ROW_IN = {"instruction": "Answer briefly.", "input": "Where does Nobo live?", "output": "Oakridge"}
ROW_NO = {"instruction": "Where does Nobo live?", "input": "", "output": "Oakridge"}


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def test_alpaca_prompt_picks_layout_by_input():
    assert alpaca_prompt(ROW_IN) == (
        "### Instruction:\nAnswer briefly.\n\n### Input:\nWhere does Nobo live?\n\n### Response:"
    )
    assert alpaca_prompt(ROW_NO) == "### Instruction:\nWhere does Nobo live?\n\n### Response:"
    # a whitespace-only input counts as no input
    assert alpaca_prompt({**ROW_NO, "input": "  "}) == alpaca_prompt(ROW_NO)
    assert alpaca_prompt(ROW_NO, ALPACA).startswith("Below is an instruction that describes a task. Write")
    assert "paired with an input" in alpaca_prompt(ROW_IN, ALPACA)


def test_alpaca_text_and_prompt_completion_agree():
    pc = alpaca_to_prompt_completion(ROW_NO)
    assert pc == {"prompt": alpaca_prompt(ROW_NO), "completion": " Oakridge"}
    assert alpaca_to_text(ROW_NO) == pc["prompt"] + pc["completion"]
    # the original template separates the answer with a newline, as the Stanford release did
    assert alpaca_to_text(ROW_NO, template=ALPACA).endswith("### Response:\nOakridge")


def test_eos_is_appended_exactly_once():
    text = alpaca_to_text(ROW_NO, eos_token="<|endoftext|>")
    assert text.endswith(" Oakridge<|endoftext|>") and text.count("<|endoftext|>") == 1
    assert with_eos(text, "<|endoftext|>") == text
    with pytest.raises(SftkitError, match="no EOS token"):
        with_eos("x", "")


def test_alpaca_rejects_bad_rows():
    with pytest.raises(SftkitError, match="empty 'output'"):
        alpaca_to_prompt_completion({**ROW_NO, "output": "  "})
    with pytest.raises(SftkitError, match="'output' is a int"):
        alpaca_to_text({**ROW_NO, "output": 4})
    with pytest.raises(SftkitError, match="no 'instruction' field"):
        alpaca_prompt({"question": "x", "output": "y"})
    with pytest.raises(SftkitError, match="empty 'instruction'"):
        alpaca_prompt({**ROW_NO, "instruction": ""})


def test_alpaca_to_messages():
    assert alpaca_to_messages(ROW_IN, system="Be brief.")["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Answer briefly.\n\nWhere does Nobo live?"},
        {"role": "assistant", "content": "Oakridge"},
    ]


@pytest.mark.parametrize("template", [ALPACA, ALPACA_SHORT], ids=["ALPACA", "ALPACA_SHORT"])
def test_prompt_tokens_are_a_prefix_of_prompt_plus_completion(tokenizer, template):
    """The separator sits where the tokenizer splits, so TRL's completion mask starts exactly at the answer."""
    rows = [json.loads(line) for line in (WORLD_DIR / "alpaca_train.jsonl").open()]
    for row in rows:
        pc = alpaca_to_prompt_completion(row, template)
        prompt_ids = tokenizer(pc["prompt"])["input_ids"]
        full_ids = tokenizer(pc["prompt"] + pc["completion"])["input_ids"]
        assert full_ids[: len(prompt_ids)] == prompt_ids, pc


def test_sharegpt_to_messages_maps_speakers():
    row = {
        "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello"},
        ]
    }
    assert sharegpt_to_messages(row) == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
        ]
    }
    with pytest.raises(SftkitError, match="'narrator'"):
        sharegpt_to_messages({"conversations": [{"from": "narrator", "value": "Once"}]})
    with pytest.raises(SftkitError, match="no non-empty 'conversations'"):
        sharegpt_to_messages({"dialog": []})
    with pytest.raises(SftkitError, match="not a"):
        sharegpt_to_messages({"conversations": [{"role": "user", "content": "x"}]})
    custom = sharegpt_to_messages(
        {"conversations": [{"from": "narrator", "value": "x"}]}, roles={"narrator": "user"}
    )
    assert custom["messages"][0]["role"] == "user"


def test_per_example_rejects_the_2024_list_form():
    def batched(examples):  # the 2024 recipe: loops over a batch, returns a list
        return [f"### Instruction: {examples['instruction'][i]}" for i in range(len(examples["instruction"]))]

    with pytest.raises(SftkitError, match="returned a list of 14 items") as info:
        per_example(batched)(ROW_NO | {"instruction": "Where is Nobo?"})
    assert "ONE row" in info.value.problem and "return" in info.value.fix
    with pytest.raises(SftkitError, match="returned a int"):
        per_example(lambda r: 3)(ROW_NO)
    fmt = per_example(alpaca_to_text, eos_token="<|endoftext|>")
    assert fmt(ROW_NO) == alpaca_to_text(ROW_NO) + "<|endoftext|>"
    assert fmt.__name__ == "alpaca_to_text"


def test_group_texts_joins_documents_with_eos_and_cuts_full_blocks(tokenizer):
    docs = ["Nobo Orrwood lives in Oakridge.", "Petha keeps an owl.", "A potter works in Fernhollow."] * 5
    blocks = group_texts(Dataset.from_dict({"text": docs}), tokenizer, block_size=16)
    stream = [t for d in docs for t in tokenizer(d)["input_ids"] + [tokenizer.eos_token_id]]
    assert blocks.column_names == ["input_ids"]
    assert len(blocks) == len(stream) // 16  # the partial last block is dropped
    assert all(len(b) == 16 for b in blocks["input_ids"])
    assert [t for b in blocks["input_ids"] for t in b] == stream[: 16 * len(blocks)]
    assert blocks[0]["input_ids"].count(tokenizer.eos_token_id) >= 1  # documents are separated by EOS


def test_group_texts_errors(tokenizer):
    ds = Dataset.from_dict({"text": ["short"]})
    with pytest.raises(SftkitError, match="less than one block"):
        group_texts(ds, tokenizer, block_size=64)
    with pytest.raises(SftkitError, match="no 'body' column"):
        group_texts(ds, tokenizer, block_size=64, text_field="body")
