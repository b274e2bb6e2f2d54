"""validate_sft_dataset: every check raises SftkitError(problem, fix) on real datasets and the tiny tokenizer."""

from __future__ import annotations

import warnings

import pytest
from datasets import Dataset, DatasetDict, IterableDataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from sftkit.errors import SftkitError
from sftkit.formats import sharegpt_to_messages
from sftkit.loading import load_model_and_tokenizer
from sftkit.paths import TINY_MODEL_DIR
from sftkit.validation import (
    detect_shape,
    require_single_split,
    validate_conversation,
    validate_sft_dataset,
)

QA = [
    {"role": "user", "content": "Where does Nobo Orrwood live?"},
    {"role": "assistant", "content": "Oakridge"},
]
TEXT = "Q: Where does Nobo Orrwood live?\nA: Oakridge"  # 12 tokens, 13 with EOS
PROMPT = "Q: Where does Nobo Orrwood live?\nA:"  # 11 tokens


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def config(tmp_path, **kwargs) -> SFTConfig:
    return SFTConfig(
        output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, max_steps=1, **kwargs
    )


def fails(match: str, dataset, tokenizer, args=None, **kwargs) -> SftkitError:
    with pytest.raises(SftkitError, match=match) as info:
        validate_sft_dataset(dataset, tokenizer, args, **kwargs)
    assert info.value.fix  # every error says how to fix it
    return info.value


# --- good data: the report matches what TRL builds ------------------------------------------------


@pytest.mark.parametrize(
    "rows, extra",
    [
        ([{"text": TEXT}, {"text": "Hello there"}], {}),
        ([{"prompt": PROMPT, "completion": " Oakridge"}], {}),
        ([{"messages": QA}, {"messages": [{"role": "system", "content": "Be brief."}, *QA]}], {}),
        ([{"messages": QA}], {"assistant_only_loss": True}),
        ([{"input_ids": [54, 31, 881], "labels": [-100, 31, 881]}], {}),
    ],
    ids=["text", "prompt-completion", "conversational", "assistant-only", "pre-tokenized"],
)
def test_lengths_match_trl_preparation(tokenizer, tmp_path, rows, extra):
    args = config(tmp_path, max_length=None, **extra)
    report = validate_sft_dataset(Dataset.from_list(rows), tokenizer, args)
    model, tok = load_model_and_tokenizer(TINY_MODEL_DIR, dtype="fp32")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert report.lengths == [len(ids) for ids in trainer.train_dataset["input_ids"]]
    assert report.n_rows == len(rows) and report.n_too_long == 0


def test_detect_shape_follows_trl_precedence():
    assert detect_shape(["input_ids", "text"]) == "pre-tokenized"
    assert detect_shape(["text"], formatting_func=str) == "formatting_func"
    assert detect_shape(["prompt", "completion", "text"]) == "prompt-completion"
    assert detect_shape(["messages"]) == "conversational"
    assert detect_shape(["body"], args=type("A", (), {"dataset_text_field": "body"})()) == "text"


# --- missing or misnamed columns ------------------------------------------------------------------


def test_missing_columns(tokenizer):
    err = fails("none of which SFTTrainer reads", Dataset.from_list([{"foo": "x"}]), tokenizer)
    assert "'text'" in err.problem and "formatting_func" in err.fix


def test_misnamed_column_case(tokenizer):
    err = fails("only in case", Dataset.from_list([{"Text": TEXT}]), tokenizer)
    assert "rename_column('Text', 'text')" in err.fix and "dataset_text_field='Text'" in err.fix


def test_misnamed_completion_column(tokenizer):
    err = fails(
        "no 'completion' column", Dataset.from_list([{"prompt": PROMPT, "response": " x"}]), tokenizer
    )
    assert "rename_column('response', 'completion')" in err.fix


def test_misnamed_chat_column(tokenizer):
    err = fails("none of which", Dataset.from_list([{"conversation": QA}]), tokenizer)
    assert "'conversation' -> 'messages'" in err.fix


def test_alpaca_columns_point_to_the_converter(tokenizer):
    err = fails("Alpaca", Dataset.from_list([{"instruction": "Q?", "input": "", "output": "A"}]), tokenizer)
    assert "alpaca_to_prompt_completion" in err.fix


def test_sharegpt_rows_point_to_the_converter(tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}]}]
    err = fails("ShareGPT", Dataset.from_list(rows), tokenizer)
    assert "sharegpt_to_messages" in err.fix
    converted = Dataset.from_list(rows).map(sharegpt_to_messages, remove_columns=["conversations"])
    assert validate_sft_dataset(converted, tokenizer).shape == "conversational"


# --- DatasetDict without a split, wrong container -------------------------------------------------


def test_datasetdict_without_split(tokenizer):
    dd = DatasetDict(train=Dataset.from_list([{"text": TEXT}]), test=Dataset.from_list([{"text": TEXT}]))
    err = fails(r"DatasetDict with splits \['train', 'test'\]", dd, tokenizer)
    assert 'dataset["train"]' in err.fix
    assert require_single_split(dd, "test") is dd["test"]
    with pytest.raises(SftkitError, match="not one of them"):
        require_single_split(dd, "validation")


def test_list_instead_of_dataset(tokenizer):
    fails("Python list", [{"text": TEXT}], tokenizer)


def test_empty_dataset(tokenizer):
    fails("no rows", Dataset.from_dict({"text": []}), tokenizer)


# --- non-string values ------------------------------------------------------------------------------


def test_non_string_text(tokenizer):
    err = fails(
        r"'text' is not a string in 1 of 2 rows \(row 1; found NoneType",
        Dataset.from_list([{"text": TEXT}, {"text": None}]),
        tokenizer,
    )
    assert "filter" in err.fix


def test_non_string_completion(tokenizer):
    fails(
        "'completion' is not a string.*found int",
        Dataset.from_list([{"prompt": "2+2=", "completion": 4}]),
        tokenizer,
    )


def test_non_string_message_content(tokenizer):
    rows = [{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": 4}]}]
    # datasets would refuse mixed types in one column, so pass the rows through an IterableDataset
    fails("row 0, turn 1 \\(assistant\\): content is a int", _iterable(rows), tokenizer)


def test_formatting_func_returning_a_list(tokenizer):
    def old(examples):
        return [f"### Q: {q}" for q in examples["q"]]

    err = fails("the 2024 batched form", Dataset.from_list([{"q": "Where?"}]), tokenizer, formatting_func=old)
    assert "per_example" in err.fix


def test_pretokenized_bad_labels(tokenizer):
    fails(
        "not as long as 'input_ids' in row 0",
        Dataset.from_list([{"input_ids": [1, 2, 3], "labels": [1, 2]}]),
        tokenizer,
    )
    rows = [{"input_ids": [1, 2], "labels": [1, 2]}, {"input_ids": [3, 4], "labels": None}]
    fails("'labels' is missing.* row 1", Dataset.from_list(rows), tokenizer)
    fails("not a non-empty list of ints", Dataset.from_list([{"input_ids": []}]), tokenizer)


# --- empty responses --------------------------------------------------------------------------------


def test_empty_completion(tokenizer):
    rows = [{"prompt": PROMPT, "completion": " Oakridge"}] * 3 + [{"prompt": PROMPT, "completion": "  "}]
    err = fails("'completion' is empty in 1 of 4 rows \\(row 3\\)", Dataset.from_list(rows), tokenizer)
    assert "filter" in err.fix


def test_empty_text(tokenizer):
    fails("'text' is empty", Dataset.from_list([{"text": ""}]), tokenizer)


def test_empty_assistant_turn(tokenizer):
    rows = [{"messages": [QA[0], {"role": "assistant", "content": ""}]}]
    fails("assistant's content is empty", Dataset.from_list(rows), tokenizer)


def test_all_labels_masked(tokenizer):
    fails(
        "every label is -100 in row 0",
        Dataset.from_list([{"input_ids": [1, 2], "labels": [-100, -100]}]),
        tokenizer,
    )


# --- roles --------------------------------------------------------------------------------------------


def test_unknown_role(tokenizer):
    rows = [{"messages": [{"role": "human", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    err = fails("row 0, turn 0: unknown role 'human'", Dataset.from_list(rows), tokenizer)
    assert "'user'" in err.fix


def test_roles_must_alternate(tokenizer):
    rows = [{"messages": [QA[0], QA[0], QA[1]]}]
    fails("turns 0 and 1: two 'user' turns in a row", Dataset.from_list(rows), tokenizer)
    fails("two 'assistant' turns", Dataset.from_list([{"messages": [QA[0], QA[1], QA[1]]}]), tokenizer)


def test_conversation_must_start_with_user(tokenizer):
    fails("starts with 'assistant'", Dataset.from_list([{"messages": [QA[1], QA[0], QA[1]]}]), tokenizer)


def test_system_message_only_first(tokenizer):
    rows = [{"messages": [*QA, {"role": "system", "content": "x"}, *QA]}]
    fails("turn 2: a system message in the middle", Dataset.from_list(rows), tokenizer)


def test_tool_turns_may_follow_the_assistant():
    validate_conversation(
        [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "Calling the weather tool."},
            {"role": "tool", "content": "sunny"},
            {"role": "assistant", "content": "Sunny."},
        ]
    )


def test_no_assistant_turn(tokenizer):
    err = fails("no assistant turn", Dataset.from_list([{"messages": [QA[0]]}]), tokenizer)
    assert "filter" in err.fix


def test_sharegpt_turn_inside_messages():
    with pytest.raises(SftkitError, match="ShareGPT"):
        validate_conversation([{"from": "human", "value": "Hi"}])


# --- chat templates -------------------------------------------------------------------------------------


def test_conversational_data_needs_a_chat_template(tokenizer):
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tok.chat_template = None
    err = fails("no chat template", Dataset.from_list([{"messages": QA}]), tok)
    assert "chat_template_path" in err.fix


def test_assistant_only_loss_needs_generation_markers(tmp_path):
    tok = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    tok.chat_template = tok.chat_template.replace("{% generation %}", "").replace("{% endgeneration %}", "")
    ds = Dataset.from_list([{"messages": QA}])
    args = config(tmp_path, assistant_only_loss=True)
    err = fails("needs \\{% generation %\\}", ds, tok, args)
    assert "chat_template_path" in err.fix
    # what TRL itself does with this template: it stops at construction with a ValueError
    model, _ = load_model_and_tokenizer(TINY_MODEL_DIR, dtype="fp32")
    with pytest.raises(ValueError, match="not training-compatible"):
        SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)


# --- longer than max_length ---------------------------------------------------------------------------


def test_too_long_reports_rows_and_tokens_cut(tokenizer, tmp_path):
    rows = [{"text": TEXT}, {"text": "Hello there"}, {"text": TEXT + " " + TEXT}]
    lengths = [13, 5, 26]  # with EOS; " Q" after "Oakridge" is two tokens, " " and "Q"
    report = validate_sft_dataset(Dataset.from_list(rows), tokenizer, config(tmp_path, max_length=None))
    assert report.lengths == lengths
    err = fails(
        "2 of 3 rows are longer than max_length=10",
        Dataset.from_list(rows),
        tokenizer,
        config(tmp_path, max_length=10),
    )
    assert "rows 0, 2" in err.problem and "the longest has 26" in err.problem
    assert "cut 19 tokens" in err.problem  # (13 - 10) + (26 - 10)
    assert "max_length=" in err.fix and "bfd_split" in err.fix


def test_too_long_warn_returns_the_numbers(tokenizer, tmp_path):
    rows = [{"prompt": PROMPT, "completion": " Oakridge"}, {"prompt": "Q:", "completion": " Oakridge"}]
    with pytest.warns(UserWarning, match="would lose every trained token"):
        report = validate_sft_dataset(
            Dataset.from_list(rows), tokenizer, config(tmp_path, max_length=8), on_truncation="warn"
        )
    assert (report.n_too_long, report.tokens_cut, report.n_emptied) == (1, 5, 1)  # 13 tokens, prompt of 11
    assert report.long_rows == [0]
    # TRL indeed drops the emptied row without a word
    model, tok = load_model_and_tokenizer(TINY_MODEL_DIR, dtype="fp32")
    args = config(tmp_path, max_length=8)
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
    assert len(trainer.train_dataset) == 1 and len(trainer.train_dataset[0]["input_ids"]) == 4


def test_assistant_only_rows_emptied_by_truncation(tokenizer, tmp_path):
    args = config(tmp_path, max_length=8, assistant_only_loss=True)
    report = validate_sft_dataset(
        Dataset.from_list([{"messages": QA}]), tokenizer, args, on_truncation="ignore"
    )
    assert (report.n_too_long, report.tokens_cut, report.n_emptied) == (1, 5, 1)  # 13 tokens, answer at 10


def test_wrapped_packing_does_not_truncate(tokenizer, tmp_path):
    args = config(tmp_path, max_length=8, packing=True, packing_strategy="wrapped")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = validate_sft_dataset(Dataset.from_list([{"text": TEXT}]), tokenizer, args)
    assert not report.truncates and report.n_too_long == 0 and "no truncation" in str(report)


def test_iterable_dataset_is_checked_on_its_first_rows(tokenizer):
    report = validate_sft_dataset(_iterable([{"text": TEXT}] * 5), tokenizer, max_rows=3)
    assert report.n_rows == 3 and report.shape == "text"


def _iterable(rows):
    def gen():
        yield from rows

    return IterableDataset.from_generator(gen)
