"""sftkit.resume and sftkit.token_loss: optimizer moments without the old learning rate, run-folder helpers,
an exact resume of the demo run, and a token-weighted eval loss that does not move with the batch size."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from torch.optim.lr_scheduler import LambdaLR

from sftkit.errors import SftkitError
from sftkit.paths import TINY_MODEL_DIR, WORLD_DIR
from sftkit.resume import (
    DemoConfig,
    KeepMomentsSFTTrainer,
    _parser,
    build_trainer,
    checkpoint_files,
    complete_checkpoints,
    load_moments,
    read_losses,
    wait_for_checkpoint,
)
from sftkit.token_loss import TokenLoss, batch_loss_sum, token_mean_loss


def _trained_adam(lr: float = 1e-3):
    """An AdamW that took 3 steps under a LambdaLR schedule (which stamps initial_lr into its groups)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = LambdaLR(opt, lambda step: 1.0 / (1 + step))
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        sched.step()
    return params, opt


def test_naive_load_brings_the_old_learning_rate_back():
    # The pitfall the helper exists for: a scheduler built after load_state_dict adopts the saved initial_lr.
    params, old = _trained_adam(lr=1e-3)
    new = torch.optim.AdamW(params, lr=3e-4)
    new.load_state_dict(old.state_dict())
    assert new.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    assert LambdaLR(new, lambda step: 1.0).base_lrs == [1e-3]


def test_load_moments_keeps_moments_and_the_new_learning_rate():
    params, old = _trained_adam(lr=1e-3)
    saved = old.state_dict()
    new = torch.optim.AdamW(params, lr=3e-4)
    load_moments(new, saved)
    assert new.param_groups[0]["lr"] == 3e-4 and "initial_lr" not in new.param_groups[0]
    assert LambdaLR(new, lambda step: 1.0).base_lrs == [3e-4]
    for i, p in enumerate(params):
        assert torch.equal(new.state[p]["exp_avg"], saved["state"][i]["exp_avg"])
        assert torch.equal(new.state[p]["exp_avg_sq"], saved["state"][i]["exp_avg_sq"])
        assert int(new.state[p]["step"]) == 3
    load_moments(new, saved, learning_rates=[5e-5])
    assert new.param_groups[0]["lr"] == 5e-5


def test_load_moments_refuses_a_different_group_layout():
    params, old = _trained_adam()
    two_groups = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1e-4)
    with pytest.raises(SftkitError, match="parameter groups"):
        load_moments(two_groups, old.state_dict())


def test_run_folder_helpers(tmp_path):
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-5" / "sub").mkdir()
    (tmp_path / "checkpoint-5" / "sub" / "w.bin").write_bytes(b"x" * 7)
    (tmp_path / "checkpoint-10").mkdir()  # interrupted while being written: no trainer_state.json
    (tmp_path / "checkpoint-15").mkdir()
    (tmp_path / "checkpoint-15" / "trainer_state.json").write_text("{}")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-5", "checkpoint-15"]
    assert checkpoint_files(tmp_path / "checkpoint-5") == [("sub/w.bin", 7), ("trainer_state.json", 2)]
    with pytest.raises(SftkitError, match="does not exist"):
        checkpoint_files(tmp_path / "checkpoint-99")

    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "train_runtime": 1.0},
             {"step": 2, "loss": 1.5}]
    text = "\n".join(json.dumps(r) for r in lines) + '\n{"step": 3, "lo'  # a SIGKILL mid-line
    (tmp_path / "losses.jsonl").write_text(text)
    losses = read_losses(tmp_path)
    assert sorted(losses) == [1, 2] and losses[2]["loss"] == 1.5


def test_wait_for_checkpoint(tmp_path):
    done = SimpleNamespace(poll=lambda: 0, returncode=0)
    with pytest.raises(SftkitError, match="ended"):
        wait_for_checkpoint(tmp_path, 5, done)
    with pytest.raises(SftkitError, match="did not appear"):
        wait_for_checkpoint(tmp_path, 5, timeout=0.05)
    (tmp_path / "checkpoint-5").mkdir()
    (tmp_path / "checkpoint-5" / "trainer_state.json").write_text("{}")
    assert wait_for_checkpoint(tmp_path, 5, done).name == "checkpoint-5"


def test_command_line_types():
    args = _parser().parse_args(["--save_total_limit", "2", "--init_adapter", "ck", "--learning_rate", "3e-4"])
    assert args.save_total_limit == 2 and args.init_adapter == "ck" and args.learning_rate == 3e-4
    assert args.resume_from_checkpoint is None and args.max_steps == DemoConfig().max_steps


def test_keep_moments_trainer_needs_optimizer_pt(tmp_path):
    with pytest.raises(SftkitError, match="optimizer.pt"):
        KeepMomentsSFTTrainer(optimizer_checkpoint=tmp_path)


def _config(tmp_path, **kw) -> DemoConfig:
    kw.setdefault("output_dir", str(tmp_path / "run"))
    return DemoConfig(model_name=str(TINY_MODEL_DIR), train_file=str(WORLD_DIR / "chat_train.jsonl"),
                      n_train=48, per_device_train_batch_size=4, **kw)


@pytest.fixture
def one_thread():
    """One torch thread for the test (the same arithmetic in both runs), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_resume_continues_the_same_losses(tmp_path, one_thread):
    trainer = build_trainer(_config(tmp_path, max_steps=4, save_steps=2, output_dir=str(tmp_path / "a")))
    trainer.train()
    full = read_losses(tmp_path / "a")
    assert sorted(full) == [1, 2, 3, 4]
    ckpt = tmp_path / "a" / "checkpoint-2"
    assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth"} <= {
        name for name, _ in checkpoint_files(ckpt)}
    resumed = build_trainer(_config(tmp_path, max_steps=4, save_steps=2, output_dir=str(tmp_path / "b")))
    resumed.train(resume_from_checkpoint=str(ckpt))
    again = read_losses(tmp_path / "b")
    assert sorted(again) == [3, 4]  # only the steps after the checkpoint ran
    for step in (3, 4):
        assert abs(again[step]["loss"] - full[step]["loss"]) <= 1e-6
        assert again[step]["learning_rate"] == full[step]["learning_rate"]



def test_a_checkpointing_run_records_itself_and_refuses_a_different_one(tmp_path):
    out = tmp_path / "run"
    build_trainer(_config(tmp_path, max_steps=2, save_steps=1)).train()
    assert (out / "sftkit_run.json").is_file() and (out / "checkpoint-2").is_dir()
    build_trainer(_config(tmp_path, max_steps=2, save_steps=1))  # the same run: may resume here
    with pytest.raises(SftkitError, match="already holds a different run.*learning_rate"):
        build_trainer(_config(tmp_path, max_steps=2, save_steps=1, learning_rate=5e-4))

def test_token_loss_arithmetic():
    tl = TokenLoss(loss_sum=2 * 1.0 + 6 * 3.0, tokens=8, batch_means=[1.0, 3.0], batch_tokens=[2, 6],
                   batch_sizes=[1, 1])
    assert tl.token_mean == pytest.approx(2.5)
    assert tl.mean_of_batch_means == pytest.approx(2.0)


def test_token_mean_loss_is_independent_of_batch_size(tmp_path, one_thread):
    rows = [json.loads(line) for line in (WORLD_DIR / "chat_heldout.jsonl").read_text().splitlines()[:12]]
    # Answers of very different lengths make the mean of batch means visibly batch-dependent.
    for i, row in enumerate(rows):
        row["messages"][-1]["content"] += " and so on" * (i % 4)
    eval_ds = Dataset.from_list([{"messages": r["messages"]} for r in rows])
    for padding_free in (False, True):
        trainer = build_trainer(_config(tmp_path, max_steps=1, save_steps=0), eval_dataset=eval_ds,
                                padding_free=padding_free)
        by_bs = {bs: token_mean_loss(trainer, batch_size=bs) for bs in (1, 4, 5)}
        assert {tl.tokens for tl in by_bs.values()} == {by_bs[1].tokens} and by_bs[1].tokens > 12
        assert max(abs(tl.token_mean - by_bs[1].token_mean) for tl in by_bs.values()) <= 1e-5 * by_bs[1].token_mean
        assert abs(by_bs[1].mean_of_batch_means - by_bs[4].mean_of_batch_means) > 1e-3
        trainer.args.per_device_eval_batch_size = 4
        assert trainer.evaluate()["eval_loss"] == pytest.approx(by_bs[4].mean_of_batch_means, rel=1e-5)
        assert trainer.args.per_device_eval_batch_size == 4  # token_mean_loss put the setting back


def test_batch_loss_sum_matches_a_direct_cross_entropy():
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR, dtype=torch.float32).eval()
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    labels = torch.tensor([[-100, -100, 7, 8, -100, 10]])
    with torch.no_grad():
        total, n = batch_loss_sum(model, {"input_ids": ids, "labels": labels})
        mean = model(input_ids=ids, labels=labels).loss
    assert n == 3 and math.isclose(float(total) / n, float(mean), rel_tol=1e-5)
    with pytest.raises(SftkitError, match="labels"):
        batch_loss_sum(model, {"input_ids": ids})
