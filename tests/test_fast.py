"""The fast recipe changes speed, not the loss: same examples, same per-token loss as naive padding."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from sftkit import fast
from sftkit.paths import TINY_MODEL_DIR


@pytest.fixture(scope="module")
def tiny():
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32), AutoTokenizer.from_pretrained(
        TINY_MODEL_DIR
    )


def _examples(tokenizer, n=6):
    texts = ["Mara Ashwell lives in Oakridge.", "Q: What pet does Lorin Mosswick keep?\nA: goat.",
             "Oakridge is a town on the Isle of Merrow.", "Tevo Dunby works as a potter. He sings while working.",
             "Nothing pleases Belra Thornley more than plum pie.", "A: Highmoor."][:n]
    return [{"input_ids": tokenizer(t).input_ids} for t in texts]


def test_cpu_recipe_is_padding_free_on_sdpa():
    recipe = fast.fast_recipe(device="cpu")
    assert recipe.sft_config["padding_free"] is True and recipe.sft_config["max_length"] is None
    assert recipe.model_kwargs == {"attn_implementation": "sdpa"}
    assert "use_liger_kernel" not in recipe.sft_config and recipe.sft_config["gradient_checkpointing"] is False
    packed = fast.fast_recipe(device="cpu", packing=True)
    assert packed.sft_config["packing_strategy"] == "bfd" and "max_length" not in packed.sft_config


def test_padding_free_batch_gives_the_padded_batch_loss(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer)
    padded = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    assert flat["input_ids"].shape[0] == 1 and (flat["input_ids"] != tokenizer.pad_token_id).all()
    # use_cache=False as in training (TRL's compute_loss sets it): with a cache object transformers skips the
    # packed-sequence detection and documents would attend to each other.
    with torch.no_grad():
        loss_padded = model(**padded, use_cache=False).loss
        loss_flat = model(**flat, use_cache=False).loss
    # Same tokens predicted, each seeing only its own document: equal up to float32 rounding.
    assert torch.allclose(loss_padded, loss_flat, atol=1e-5), (loss_padded, loss_flat)


def test_varlen_attention_falls_back_to_sdpa_off_gpu(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer, 3)
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    name = fast.register_varlen_attention()
    with torch.no_grad():
        ref = model(**flat, use_cache=False).logits
        model.set_attn_implementation(name)
        try:
            out = model(**flat, use_cache=False).logits
        finally:
            model.set_attn_implementation("sdpa")
    assert torch.allclose(ref, out, atol=1e-6)
    assert not fast.varlen_available()  # CPU: the recipe must not pick the CUDA-only kernel


def test_varlen_name_also_serves_padded_generation(tiny):
    # After training with the fast recipe, generation on a left-padded batch must match SDPA's.
    model, tokenizer = tiny
    tokenizer.padding_side = "left"
    enc = tokenizer(["Q: Where does Mara Ashwell live?\nA:", "Oakridge is"], return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    ref = model.generate(**enc, **kw)
    model.set_attn_implementation(fast.register_varlen_attention())
    try:
        out = model.generate(**enc, **kw)
    finally:
        model.set_attn_implementation("sdpa")
    assert torch.equal(ref, out)
