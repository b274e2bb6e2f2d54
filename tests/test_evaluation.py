"""Answer normalization, metrics, batched greedy generation and evaluate_qa on a real tiny model."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from datasets import Dataset

from sftkit.errors import SftkitError
from sftkit.evaluation import (
    contains,
    evaluate_qa,
    exact_match,
    generate,
    normalize_answer,
    score_records,
)
from sftkit.loading import load_model_and_tokenizer

PROMPTS = [
    "what is the capital of france ?",
    "hello",
    "tell me the name of the largest planet in the sun",
    "red blue",
    "which river is in the north of italy ?",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_model_and_tokenizer(tiny_model_dir)


def _qa_row(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("  The Eiffel Tower. ", "eiffel tower"),
        ("Paris!", "paris"),
        ("an apple", "apple"),
        ("A  big\n dog", "big dog"),
        ('"Rome"', "rome"),
        ("«Berlin»…", "berlin"),
        ("theory", "theory"),  # "the" only as a whole word
        ("St. Louis", "st. louis"),  # inner punctuation kept
        ("  ...  ", ""),
    ],
)
def test_normalize_answer(raw: str, expected: str) -> None:
    assert normalize_answer(raw) == expected


def test_exact_match_and_contains() -> None:
    assert exact_match("The Paris.", "paris")
    assert not exact_match("Paris, France", "Paris")
    assert contains("Paris, France", "Paris")
    assert contains("I think it is the Red Planet!", "red planet")
    assert not contains("Rome", "Paris")
    # An empty reference matches only an empty answer, not everything.
    assert not contains("anything", "")
    assert contains("", "...")


def test_score_records() -> None:
    records = [
        {"exact_match": True, "contains": True},
        {"exact_match": False, "contains": True},
        {"exact_match": False, "contains": False},
        {"exact_match": False, "contains": True},
    ]
    assert score_records(records) == {"exact_match": 0.25, "contains": 0.75, "n": 4}


def test_generate_one_string_per_prompt(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    outputs = generate(model, tokenizer, PROMPTS, max_new_tokens=6, batch_size=2, progress=False)
    assert len(outputs) == len(PROMPTS)
    assert all(isinstance(o, str) for o in outputs)
    assert generate(model, tokenizer, [], progress=False) == []


@pytest.mark.parametrize("chat", [False, True])
def test_left_padded_batches_match_single_prompts(model_and_tokenizer, chat: bool) -> None:
    model, tokenizer = model_and_tokenizer
    prompts = [[{"role": "user", "content": p}] for p in PROMPTS] if chat else PROMPTS
    batched = generate(model, tokenizer, prompts, max_new_tokens=8, batch_size=len(prompts), progress=False)
    alone = [generate(model, tokenizer, [p], max_new_tokens=8, progress=False)[0] for p in prompts]
    assert batched == alone
    # Prompts of different lengths really were padded together, and something was generated.
    assert len({len(p) for p in PROMPTS}) > 1 and any(batched)


def test_strings_with_chat_true_use_the_template(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    as_messages = generate(
        model,
        tokenizer,
        [[{"role": "user", "content": p}] for p in PROMPTS[:2]],
        max_new_tokens=5,
        progress=False,
    )
    assert generate(model, tokenizer, PROMPTS[:2], max_new_tokens=5, chat=True, progress=False) == as_messages


def test_generate_restores_padding_side_and_training_mode(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    tokenizer.padding_side = "right"
    model.train()
    try:
        generate(model, tokenizer, PROMPTS[:2], max_new_tokens=2, progress=False)
        assert tokenizer.padding_side == "right"
        assert model.training
    finally:
        model.eval()


def test_generate_input_errors(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    chat_prompt = [{"role": "user", "content": "hello"}]
    with pytest.raises(SftkitError, match="mix"):
        generate(model, tokenizer, ["hello", chat_prompt], progress=False)
    with pytest.raises(SftkitError, match="chat=False"):
        generate(model, tokenizer, [chat_prompt], chat=False, progress=False)
    with pytest.raises(SftkitError, match="strings or chat message lists"):
        generate(model, tokenizer, [42], progress=False)
    with pytest.raises(SftkitError, match="at least 1"):
        generate(model, tokenizer, ["hello"], max_new_tokens=0, progress=False)


def test_generate_needs_chat_template_and_pad(tiny_model_dir: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(SftkitError, match="chat template") as info:
        generate(model, tokenizer, [[{"role": "user", "content": "hello"}]], progress=False)
    assert "chat=False" in info.value.fix
    tokenizer.pad_token = None
    with pytest.raises(SftkitError, match="no pad token"):
        generate(model, tokenizer, ["hello"], progress=False)


def test_evaluate_qa_scores_known_predictions(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    questions = PROMPTS[:4]
    # The model is random but greedy decoding is deterministic, so we know its answers:
    # use them as references for two rows (hits) and impossible answers for the other two.
    answers = generate(
        model, tokenizer, [[{"role": "user", "content": q}] for q in questions], progress=False
    )
    references = [answers[0], f"The {answers[1]}.", "zebra", "xylophone quartet"]
    rows = [_qa_row(q, r) for q, r in zip(questions, references)]
    metrics, records = evaluate_qa(model, tokenizer, rows, progress=False)
    assert metrics == {"exact_match": 0.5, "contains": 0.5, "n": 4}
    assert [r["exact_match"] for r in records] == [True, True, False, False]
    assert records[0] == {
        "prompt": questions[0],
        "reference": references[0],
        "prediction": answers[0],
        "exact_match": True,
        "contains": True,
    }


def test_evaluate_qa_accepts_datasets_and_multi_turn(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    multi_turn = {
        "messages": [
            {"role": "system", "content": "answer please"},
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "hello world"},
            {"role": "user", "content": "what is the capital of italy ?"},
            {"role": "assistant", "content": "rome"},
        ]
    }
    dataset = Dataset.from_list([multi_turn, _qa_row("red blue", "green")])
    metrics, records = evaluate_qa(model, tokenizer, dataset, max_new_tokens=4, progress=False)
    assert metrics["n"] == 2
    assert records[0]["prompt"] == "what is the capital of italy ?" and records[0]["reference"] == "rome"


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([], "no rows"),
        ([{"text": "hello"}], "Row 0 needs a 'messages' list"),
        ([_qa_row("hello", "hi"), {"messages": [{"role": "user", "content": "hello"}]}], "Row 1"),
        (
            [{"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "hello"}]}],
            "last message must be the assistant",
        ),
    ],
)
def test_evaluate_qa_rejects_bad_rows_before_generating(model_and_tokenizer, rows, match: str) -> None:
    model, tokenizer = model_and_tokenizer
    with pytest.raises(SftkitError, match=match):
        evaluate_qa(model, tokenizer, rows, progress=False)
