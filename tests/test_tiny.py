"""The tiny base model: the shipped one is a real pretrained base, and the build command is deterministic."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftkit import tiny, world
from sftkit.paths import REPO_ROOT, TINY_MODEL_DIR


@pytest.fixture(scope="module")
def shipped():
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR), AutoTokenizer.from_pretrained(TINY_MODEL_DIR)


def test_shipped_model_is_small_and_loads_like_a_hub_model(shipped):
    model, tokenizer = shipped
    size = sum(f.stat().st_size for f in TINY_MODEL_DIR.iterdir())
    assert size < 20e6
    assert model.config.model_type == "llama"
    assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.chat_template == tiny.CHAT_TEMPLATE
    assert "{% generation %}" in tokenizer.chat_template


def test_chat_template_marks_exactly_the_answer_tokens(shipped):
    _, tokenizer = shipped
    msgs = [
        {"role": "user", "content": "Where does Ma Ash live?"},
        {"role": "assistant", "content": "Oakridge"},
    ]
    enc = tokenizer.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    trained = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tokenizer.decode(trained) == " Oakridge<|end|>"
    # Training renders the prompt exactly as inference does, so the model sees the same tokens.
    prompt = tokenizer.apply_chat_template(msgs[:1], add_generation_prompt=True, tokenize=False)
    assert tokenizer.apply_chat_template(msgs, tokenize=False).startswith(prompt)


def test_shipped_base_model_knows_held_out_facts_in_prose_form(shipped):
    # Pretraining put the held-out people's facts into the weights (gazette-note form, not chat).
    model, tokenizer = shipped
    score = tiny.probe_knowledge(model, tokenizer, world.make_people(), "cpu", max_people=60)
    assert score >= 0.9
    info = json.loads((TINY_MODEL_DIR / "build_info.json").read_text())
    assert info["heldout_town_probe"] >= 0.9 and info["command"].startswith("python -m sftkit.tiny build")


def _build(out):
    cmd = [
        sys.executable,
        "-m",
        "sftkit.tiny",
        "build",
        "--out",
        str(out),
        "--steps",
        "4",
        "--docs",
        "600",
        "--batch-size",
        "4",
        "--device",
        "cpu",
    ]
    subprocess.run(cmd, cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=300)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_build_command_is_deterministic_and_its_output_loads(tmp_path):
    first, second = _build(tmp_path / "a"), _build(tmp_path / "b")
    assert first == second
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (
        tmp_path / "b" / "tokenizer.json"
    ).read_bytes()
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "a")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "a")
    ids = tokenizer("Ma Ash lives in", return_tensors="pt").input_ids
    assert torch.isfinite(model(ids).logits).all()
    assert json.loads((tmp_path / "a" / "build_info.json").read_text())["steps"] == 4
