"""add_tokens_from_file: the file format, the resize, the initial rows, and what the init does to the loss."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_tiny import build_model, build_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftkit.errors import SftkitError
from sftkit.paths import TINY_MODEL_DIR, WORLD_DIR
from sftkit.tokens import add_tokens_from_file, read_token_file

FOODS = [" cheese dumplings", " lentil stew", " plum pie"]


def _tiny():
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR), AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def _write(tmp_path, lines):
    path = tmp_path / "tokens.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_read_token_file_keeps_lines_verbatim(tmp_path):
    path = _write(tmp_path, [" cheese dumplings", "", "<tool>", " cheese dumplings", "  "])
    assert read_token_file(path) == [" cheese dumplings", "<tool>"]
    with pytest.raises(SftkitError, match="does not exist"):
        read_token_file(tmp_path / "missing.txt")
    with pytest.raises(SftkitError, match="holds no tokens"):
        read_token_file(_write(tmp_path, ["", " "]))


def test_mean_init_resizes_and_starts_at_the_mean(tmp_path):
    model, tokenizer = _tiny()
    old = model.get_input_embeddings().weight.detach().clone()
    n_old = len(tokenizer)
    # " Oakridge" is already one byte-level token ("ĠOakridge"): skipped, not duplicated.
    added = add_tokens_from_file(model, tokenizer, _write(tmp_path, [*FOODS, " Oakridge"]))
    assert added == FOODS
    assert (
        len(tokenizer) == n_old + 3 == model.get_input_embeddings().weight.shape[0] == model.config.vocab_size
    )
    weight = model.get_input_embeddings().weight
    assert model.get_output_embeddings().weight is weight  # still tied
    assert torch.equal(weight[:n_old], old)  # existing rows untouched
    for token in FOODS:
        assert torch.allclose(weight[tokenizer.convert_tokens_to_ids(token)], old.mean(0), atol=1e-6)
    # The text now uses the new token, and decodes back to the same string.
    text = "She loves cheese dumplings and plum pie."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.convert_tokens_to_ids(" cheese dumplings") in ids
    assert tokenizer.decode(ids) == text
    # Adding the same file again adds nothing.
    assert add_tokens_from_file(model, tokenizer, _write(tmp_path, FOODS)) == []


def test_pieces_init_starts_between_the_old_pieces(tmp_path):
    model, tokenizer = _tiny()
    old = model.get_input_embeddings().weight.detach().clone()
    pieces = tokenizer(" cheese dumplings", add_special_tokens=False)["input_ids"]
    assert len(pieces) == 2
    add_tokens_from_file(model, tokenizer, _write(tmp_path, FOODS), init="pieces")
    row = model.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(" cheese dumplings")]
    assert torch.allclose(row, old[pieces].mean(0), atol=1e-6)


def _new_token_nll(model, tokenizer, new_ids, texts):
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        logits = model(**enc).logits[:, :-1]
    target = enc["input_ids"][:, 1:]
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
    is_new = torch.isin(target, torch.tensor(new_ids)) & enc["attention_mask"][:, 1:].bool()
    assert is_new.sum() > 10
    return float(nll[is_new].mean())


def test_pieces_init_predicts_new_tokens_better_than_mean(tmp_path):
    """Measured on real text: the model already half-knows a token that starts between its pieces."""
    docs = [json.loads(line)["text"] for line in (WORLD_DIR / "corpus.jsonl").read_text().splitlines()]
    docs = [d for d in docs if any(f.strip() in d for f in FOODS)][:40]
    nll = {}
    for init in ("mean", "pieces"):
        model, tokenizer = _tiny()
        added = add_tokens_from_file(model, tokenizer, _write(tmp_path, FOODS), init=init)
        nll[init] = _new_token_nll(model, tokenizer, tokenizer.convert_tokens_to_ids(added), docs)
    assert nll["pieces"] < nll["mean"] - 3, nll


def test_untied_head_gets_rows_too_and_special_tokens(tmp_path):
    tokenizer = build_tokenizer(with_pad=True)
    model = build_model(tokenizer)
    head_old = model.lm_head.weight.detach().clone()
    added = add_tokens_from_file(model, tokenizer, _write(tmp_path, ["<tool>", "</tool>"]), special=True)
    assert added == ["<tool>", "</tool>"]
    assert model.lm_head.weight.shape[0] == len(tokenizer)
    tool = tokenizer.convert_tokens_to_ids("<tool>")
    assert torch.allclose(model.lm_head.weight[tool], head_old.mean(0), atol=1e-6)
    ids = tokenizer("<tool> paris </tool>")["input_ids"]
    assert tool in ids and "<tool>" not in tokenizer.decode(ids, skip_special_tokens=True)


def test_unknown_init_is_refused(tmp_path):
    model, tokenizer = _tiny()
    with pytest.raises(SftkitError, match="not a known initialisation"):
        add_tokens_from_file(model, tokenizer, _write(tmp_path, FOODS), init="random")
