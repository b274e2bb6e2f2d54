"""EmbeddingLRSFTTrainer: the optimizer's real parameter groups, and what a few real steps do to them."""

from __future__ import annotations

import warnings

import pytest
import torch
from datasets import Dataset
from fixtures_tiny import build_model, build_tokenizer
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from sftkit.errors import SftkitError
from sftkit.optim import EmbeddingLRSFTTrainer, embedding_parameters, optimizer_state_bytes
from sftkit.paths import TINY_MODEL_DIR

TEXTS = ["the capital of france is paris .", "the king of rome is old .", "mars is a red planet ."] * 8


def _trainer(model, tokenizer, tmp_path, peft_config=None, **kwargs):
    optim = kwargs.pop("optim", "adamw_torch")
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=kwargs.pop("max_steps", 3),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        weight_decay=0.1,
        optim=optim,
        lr_scheduler_type="cosine",
        max_length=32,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        bf16=False,
        fp16=False,
        use_cpu=True,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return EmbeddingLRSFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"text": TEXTS}),
            processing_class=tokenizer,
            peft_config=peft_config,
            **kwargs,
        )


def _tiny_untied():
    tokenizer = build_tokenizer(with_pad=True)
    return build_model(tokenizer), tokenizer


def _groups(trainer):
    return {g["name"]: g for g in trainer.optimizer.param_groups}


def _ids(params):
    return {id(p) for p in params}


def test_full_finetune_untied_groups(tmp_path):
    model, tokenizer = _tiny_untied()
    trainer = _trainer(model, tokenizer, tmp_path, embedding_learning_rate=1e-5)
    trainer.create_optimizer()
    groups = _groups(trainer)
    assert list(groups) == ["rest", "rest_no_decay", "embeddings"]
    # Both embedding matrices, nothing else, at the embedding LR, with weight decay (as the Trainer decides).
    assert _ids(groups["embeddings"]["params"]) == {
        id(model.model.embed_tokens.weight),
        id(model.lm_head.weight),
    }
    assert groups["embeddings"]["lr"] == 1e-5 and groups["embeddings"]["weight_decay"] == 0.1
    assert groups["rest"]["lr"] == 1e-3 and groups["rest"]["weight_decay"] == 0.1
    # Norm weights: no weight decay, normal LR.
    norms = {id(p) for n, p in model.named_parameters() if "norm" in n}
    assert norms and _ids(groups["rest_no_decay"]["params"]) == norms
    assert groups["rest_no_decay"]["weight_decay"] == 0.0 and groups["rest_no_decay"]["lr"] == 1e-3
    # Every trainable parameter is in exactly one group.
    listed = [id(p) for g in trainer.optimizer.param_groups for p in g["params"]]
    assert len(listed) == len(set(listed)) == sum(1 for p in model.parameters() if p.requires_grad)


def test_tied_embedding_is_one_parameter_in_one_group(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    trainer = _trainer(model, tokenizer, tmp_path, embedding_learning_rate=2e-4)
    trainer.create_optimizer()
    (emb,) = _groups(trainer)["embeddings"]["params"]
    assert emb is model.model.embed_tokens.weight


def test_lora_modules_to_save_copies_get_the_embedding_lr(tmp_path):
    model, tokenizer = _tiny_untied()
    peft_config = LoraConfig(
        r=4, target_modules="all-linear", modules_to_save=["embed_tokens", "lm_head"], task_type="CAUSAL_LM"
    )
    trainer = _trainer(model, tokenizer, tmp_path, peft_config=peft_config, embedding_learning_rate=1e-4)
    trainer.create_optimizer()
    groups = _groups(trainer)
    names = {n for n, p in trainer.model.named_parameters() if id(p) in _ids(groups["embeddings"]["params"])}
    assert names == {
        "base_model.model.model.embed_tokens.modules_to_save.default.weight",
        "base_model.model.lm_head.modules_to_save.default.weight",
    }
    rest = {n for n, p in trainer.model.named_parameters() if id(p) in _ids(groups["rest"]["params"])}
    assert rest and all("lora_" in n for n in rest)


def test_lora_trainable_tokens_get_the_embedding_lr(tmp_path):
    model, tokenizer = _tiny_untied()
    peft_config = LoraConfig(
        r=4, target_modules="all-linear", trainable_token_indices=[7, 8], task_type="CAUSAL_LM"
    )
    trainer = _trainer(model, tokenizer, tmp_path, peft_config=peft_config, embedding_learning_rate=1e-2)
    trainer.create_optimizer()
    (delta,) = _groups(trainer)["embeddings"]["params"]
    assert delta.shape == (2, model.config.hidden_size)


def test_plain_lora_refuses_before_training(tmp_path):
    model, tokenizer = _tiny_untied()
    with pytest.raises(SftkitError, match="no parameter of the input embeddings or lm_head is trainable"):
        _trainer(
            model,
            tokenizer,
            tmp_path,
            peft_config=LoraConfig(r=4, task_type="CAUSAL_LM"),
            embedding_learning_rate=1e-4,
        )


@pytest.mark.parametrize("bad", [-1e-4, float("nan")])
def test_bad_embedding_lr_is_refused(tmp_path, bad):
    model, tokenizer = _tiny_untied()
    with pytest.raises(SftkitError, match="embedding_learning_rate must be a number >= 0"):
        _trainer(model, tokenizer, tmp_path, embedding_learning_rate=bad)


def test_without_embedding_lr_it_is_the_plain_trainer(tmp_path):
    model, tokenizer = _tiny_untied()
    trainer = _trainer(model, tokenizer, tmp_path)
    trainer.create_optimizer()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [1e-3, 1e-3]
    assert "name" not in trainer.optimizer.param_groups[0]


def test_training_uses_the_group_lrs(tmp_path):
    """Embedding LR 0 freezes the embeddings while everything else trains; the schedule keeps the ratio."""
    model, tokenizer = _tiny_untied()
    before_emb = model.model.embed_tokens.weight.detach().clone()
    before_head = model.lm_head.weight.detach().clone()
    before_q = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    trainer = _trainer(model, tokenizer, tmp_path, embedding_learning_rate=0.0, max_steps=4)
    trainer.train()
    assert torch.equal(model.model.embed_tokens.weight, before_emb)
    assert torch.equal(model.lm_head.weight, before_head)
    assert not torch.equal(model.model.layers[0].self_attn.q_proj.weight, before_q)

    model2, tokenizer2 = _tiny_untied()
    trainer2 = _trainer(model2, tokenizer2, tmp_path / "b", embedding_learning_rate=1e-4)
    trainer2.create_optimizer_and_scheduler(num_training_steps=10)
    for _ in range(4):
        trainer2.optimizer.step()
        trainer2.lr_scheduler.step()
    names = [g["name"] for g in trainer2.optimizer.param_groups]
    lrs = dict(zip(names, trainer2.lr_scheduler.get_last_lr()))
    assert 0 < lrs["rest"] < 1e-3  # cosine has started to decay it
    assert lrs["embeddings"] / lrs["rest"] == pytest.approx(0.1)


def test_bitsandbytes_8bit_optimizer_groups_and_state(tmp_path):
    """adamw_8bit keeps the groups; its measured state is smaller than AdamW's fp32 moments."""
    sizes = {}
    for optim in ("adamw_torch", "adamw_8bit"):
        model, tokenizer = _tiny_untied()
        trainer = _trainer(
            model, tokenizer, tmp_path / optim, embedding_learning_rate=1e-4, optim=optim, max_steps=2
        )
        trainer.train()
        assert {g["name"] for g in trainer.optimizer.param_groups} == {"rest", "rest_no_decay", "embeddings"}
        sizes[optim] = optimizer_state_bytes(trainer.optimizer)
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # AdamW: two fp32 moments per parameter plus a step counter per tensor.
    assert 8 * n_trainable <= sizes["adamw_torch"] < 8 * n_trainable + 4096
    assert sizes["adamw_8bit"] < sizes["adamw_torch"]


def test_optimizer_state_bytes_counts_real_tensors():
    param = torch.nn.Parameter(torch.randn(100, 10))
    opt = torch.optim.AdamW([param])
    assert optimizer_state_bytes(opt) == 0
    param.grad = torch.randn_like(param)
    opt.step()
    step = opt.state[param]["step"]
    assert optimizer_state_bytes(opt) == 2 * 1000 * 4 + step.numel() * step.element_size()


def test_embedding_parameters_skips_frozen():
    model, _ = _tiny_untied()
    model.lm_head.weight.requires_grad_(False)
    assert [n for n, _ in embedding_parameters(model)] == ["model.embed_tokens.weight"]
