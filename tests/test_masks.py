"""Label masks in every input mode, from TRL's real preparation and collator, against hand-computed masks.

The tokens below were worked out by hand from the shipped tiny tokenizer (data/tiny-base); trainers are
built with max_steps=1 and never trained: only their prepared ``train_dataset`` is read.
"""

from __future__ import annotations

import pytest
from datasets import Dataset
from transformers import AutoTokenizer
from trl import SFTConfig, SFTTrainer

from sftkit.errors import SftkitError
from sftkit.loading import load_model_and_tokenizer
from sftkit.masks import compare_masks, show_mask
from sftkit.paths import TINY_MODEL_DIR

EOS, END, PAD = 0, 5, 1  # <|endoftext|>, <|end|>, <|pad|>
# "Q: Where does Nobo Orrwood live?\nA:" and " Oakridge", token by token
PROMPT = "Q: Where does Nobo Orrwood live?\nA:"
PROMPT_IDS = [54, 31, 881, 346, 1063, 981, 645, 36, 204, 38, 31]
OAKRIDGE = 913  # " Oakridge"
CHAT = [
    {"role": "user", "content": "Where does Nobo Orrwood live?"},
    {"role": "assistant", "content": "Oakridge"},
]
# <|user|> Where does Nobo Orrwood live?<|end|>\n<|assistant|> Oakridge<|end|>\n
CHAT_TOKENS = [
    ("<|user|>", 0), (" Where", 0), (" does", 0), (" Nobo", 0), (" Orrwood", 0), (" live", 0), ("?", 0),
    ("<|end|>", 0), ("\n", 0), ("<|assistant|>", 0), (" Oakridge", 1), ("<|end|>", 1), ("\n", 0),
]  # fmt: skip


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def prepared(rows: list[dict], tmp_path, **config) -> SFTTrainer:
    """A trainer whose train_dataset is TRL's preparation of ``rows`` (nothing is trained)."""
    model, tok = load_model_and_tokenizer(TINY_MODEL_DIR, dtype="fp32")
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=1,
        report_to="none",
        bf16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        **{"max_length": 64, **config},
    )
    return SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)


def test_tokens_are_what_the_expectations_assume(tokenizer):
    assert tokenizer(PROMPT)["input_ids"] == PROMPT_IDS
    assert tokenizer(" Oakridge")["input_ids"] == [OAKRIDGE]
    assert [tokenizer.convert_ids_to_tokens(i) for i in (EOS, PAD, END)] == [
        "<|endoftext|>",
        "<|pad|>",
        "<|end|>",
    ]


def test_text_mode_trains_every_token_and_trl_appends_eos(tokenizer, tmp_path):
    row = prepared([{"text": PROMPT + " Oakridge"}], tmp_path).train_dataset[0]
    assert row["input_ids"] == PROMPT_IDS + [OAKRIDGE, EOS]
    assert row["labels"] == row["input_ids"]
    view = show_mask(row, tokenizer)
    assert view.trained == [True] * 13 and view.n_trained == 13
    assert view.trained_text(tokenizer) == PROMPT + " Oakridge<|endoftext|>"


def test_formatting_func_mode_equals_text_mode(tokenizer, tmp_path):
    def fmt(row):
        return f"Q: {row['q']}\nA: {row['a']}"

    model, tok = load_model_and_tokenizer(TINY_MODEL_DIR, dtype="fp32")
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, report_to="none", bf16=False, use_cpu=True)
    ds = Dataset.from_list([{"q": "Where does Nobo Orrwood live?", "a": "Oakridge"}])
    row = SFTTrainer(
        model=model, args=args, train_dataset=ds, processing_class=tok, formatting_func=fmt
    ).train_dataset[0]
    assert row["input_ids"] == PROMPT_IDS + [OAKRIDGE, EOS] and row["labels"] == row["input_ids"]


def test_prompt_completion_trains_completion_and_eos_only(tokenizer, tmp_path):
    row = prepared([{"prompt": PROMPT, "completion": " Oakridge"}], tmp_path).train_dataset[0]
    assert row["input_ids"] == PROMPT_IDS + [OAKRIDGE, EOS]
    assert row["labels"] == [-100] * 11 + [OAKRIDGE, EOS]
    view = show_mask(row, tokenizer)
    assert view.trained == [False] * 11 + [True, True]
    assert view.trained_text(tokenizer) == " Oakridge<|endoftext|>"
    assert str(view).splitlines()[1:] == ["Q: Where does Nobo Orrwood live?", "A:⟦ Oakridge<|endoftext|>⟧"]


def test_completion_only_loss_false_trains_the_prompt_too(tokenizer, tmp_path):
    row = prepared([{"prompt": PROMPT, "completion": " Oakridge"}], tmp_path, completion_only_loss=False)
    assert show_mask(row.train_dataset[0], tokenizer).n_trained == 13


def test_assistant_only_loss_with_generation_template(tokenizer, tmp_path):
    row = prepared([{"messages": CHAT}], tmp_path, assistant_only_loss=True).train_dataset[0]
    view = show_mask(row, tokenizer)
    assert list(zip(view.tokens, map(int, view.trained))) == CHAT_TOKENS
    # the same mask straight from the tokenizer (what TRL reads)
    raw = tokenizer.apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    assert show_mask(raw, tokenizer).trained == view.trained
    assert show_mask(raw, tokenizer).source == "assistant_masks"


def test_assistant_only_loss_multi_turn_trains_every_assistant_turn(tokenizer, tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        *CHAT,
        {"role": "user", "content": "And his job?"},
        {"role": "assistant", "content": "potter"},
    ]
    view = show_mask(
        prepared([{"messages": messages}], tmp_path, assistant_only_loss=True).train_dataset[0], tokenizer
    )
    trained = [tok for tok, on in zip(view.tokens, view.trained) if on]
    assert trained == [" Oakridge", "<|end|>", " potter", "<|end|>"]
    assert "⟦ Oakridge<|end|>⟧" in str(view) and "⟦ potter<|end|>⟧" in str(view)


def test_conversational_without_assistant_only_loss_trains_everything(tokenizer, tmp_path):
    view = show_mask(prepared([{"messages": CHAT}], tmp_path).train_dataset[0], tokenizer)
    assert view.n_trained == len(CHAT_TOKENS) == view.n_tokens


def test_pretokenized_labels_are_kept_and_no_eos_is_added(tokenizer, tmp_path):
    labels = [-100] * 11 + [OAKRIDGE]  # a user who forgot EOS
    rows = [{"input_ids": PROMPT_IDS + [OAKRIDGE], "labels": labels}]
    row = prepared(rows, tmp_path).train_dataset[0]
    assert row["input_ids"] == PROMPT_IDS + [OAKRIDGE] and row["labels"] == labels
    assert show_mask(row, tokenizer).trained_text(tokenizer) == " Oakridge"


def test_pretokenized_without_labels_trains_every_token(tokenizer, tmp_path):
    row = prepared([{"input_ids": PROMPT_IDS}], tmp_path).train_dataset[0]
    assert row["labels"] == PROMPT_IDS
    assert show_mask(row, tokenizer).n_trained == 11


def test_collated_batch_never_trains_padding(tokenizer, tmp_path):
    trainer = prepared(
        [{"prompt": PROMPT, "completion": " Oakridge"}, {"prompt": "Q:", "completion": " Oakridge"}], tmp_path
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    view = show_mask(batch, tokenizer, row=1)
    # row 1: "Q:" (2 tokens) + " Oakridge" + EOS, then 9 pad tokens to the longest row (13)
    assert batch["input_ids"][1].tolist() == [54, 31, OAKRIDGE, EOS] + [PAD] * 9
    assert view.padding == [False] * 4 + [True] * 9
    assert view.trained == [False, False, True, True] + [False] * 9
    assert view.summary().startswith("2 of 4 tokens trained (50%), 9 padding")
    assert str(view).endswith("Q:⟦ Oakridge<|endoftext|>⟧·········")


def test_packed_padding_free_batch_masks_each_document_start(tokenizer, tmp_path):
    trainer = prepared(
        [{"text": PROMPT + " Oakridge"}, {"text": "Q: Where does Nobo Orrwood live?"}],
        tmp_path,
        packing=True,
        per_device_train_batch_size=2,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(trainer.train_dataset))])
    view = show_mask(batch, tokenizer)
    assert sum(view.doc_start) == 2 and "2 documents packed" in view.summary()
    # the first token of each document has no preceding context in its document, so it is not a target
    assert [t for t, s in zip(view.trained, view.doc_start) if s] == [False, False]
    assert view.n_trained == view.n_tokens - 2


def test_html_rendering(tokenizer):
    raw = tokenizer.apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    html = show_mask(raw, tokenizer, title="chat")._repr_html_()
    assert html.count('background:#a7e3b5;color:#0b3d17">') == 2  # the two trained tokens
    assert "&lt;|assistant|&gt;" in html and "<|assistant|>" not in html  # escaped
    assert "<b>chat</b>" in html and "↵<br>" in html
    stacked = compare_masks([show_mask(raw, tokenizer), show_mask(raw, tokenizer)])
    assert stacked._repr_html_().count("tokens trained") == 2 and str(stacked).count("tokens trained") == 2


def test_records(tokenizer):
    records = show_mask({"input_ids": PROMPT_IDS[:3], "labels": [-100, 31, 881]}, tokenizer).to_records()
    assert records[0] == {"position": 0, "id": 54, "token": "Q", "trained": False, "padding": False}
    assert [r["trained"] for r in records] == [False, True, True]


def test_show_mask_errors(tokenizer):
    with pytest.raises(SftkitError, match="needs a tokenized example"):
        show_mask({"text": "hi"}, tokenizer)
    with pytest.raises(SftkitError, match="shifted"):
        show_mask({"input_ids": [54, 31, 881], "labels": [31, 881, -100]}, tokenizer)
    with pytest.raises(SftkitError, match="has 2 entries"):
        show_mask({"input_ids": [54, 31, 881], "labels": [54, 31]}, tokenizer)
    with pytest.raises(SftkitError, match="row=5"):
        show_mask({"input_ids": [[54], [31]]}, tokenizer, row=5)
