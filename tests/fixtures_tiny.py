"""A tiny random Llama and a word-level tokenizer, built in code so tests never touch a model hub."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|system|>"]
WORDS = (
    "the a an of is in what which who where capital city country river king queen planet color "
    "paris france rome italy berlin germany madrid spain red blue green yellow mars venus earth "
    "one two three four five six seven eight nine ten yes no hello world answer question please "
    "tell me name largest small big old new north south east west sun moon star sea lake mountain "
    ". , ? ! : ' -"
).split()
# Every message ends with </s> so a model trained on this format learns to stop.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_tokenizer(with_pad: bool = False) -> PreTrainedTokenizerFast:
    """Word-level tokenizer over a ~80 word vocabulary; by default it has no pad token, like most base models."""
    specials = SPECIAL_TOKENS + (["<pad>"] if with_pad else [])
    vocab = {tok: i for i, tok in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if with_pad else None,
        additional_special_tokens=["<|user|>", "<|assistant|>", "<|system|>"],
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    """Random 2-layer Llama (hidden 32) sized to the tokenizer."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    # Random init with std 0.02 gives near-uniform logits; a larger scale makes greedy
    # decoding pick clear winners, so batch-invariance checks are not decided by float noise.
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 1.0)
    return model


def save_tiny(path: Path, with_pad: bool = False, seed: int = 0) -> Path:
    """Save a tiny model + tokenizer to ``path`` (a folder load_model_and_tokenizer can read)."""
    tokenizer = build_tokenizer(with_pad=with_pad)
    model = build_model(tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# tests/conftest.py registers this module as a plugin (pytest_plugins), so test modules use
# these fixtures by name without importing them.
@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny Llama whose tokenizer has no pad token."""
    return save_tiny(tmp_path_factory.mktemp("tiny-nopad"))


@pytest.fixture(scope="session")
def tiny_model_dir_with_pad(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with a tiny Llama whose tokenizer has its own <pad> token."""
    return save_tiny(tmp_path_factory.mktemp("tiny-pad"), with_pad=True)
